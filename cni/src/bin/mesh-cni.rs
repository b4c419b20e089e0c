//! The chained CNI plugin: see `mesh_cni::plugin`.

use std::io::{Read, Write};

fn main() {
    let outcome = mesh_cni::plugin::main(
        |name| std::env::var(name).ok(),
        || {
            let mut input = Vec::new();
            std::io::stdin().read_to_end(&mut input)?;
            Ok(input)
        },
    );
    if !outcome.stdout.is_empty() {
        let mut stdout = std::io::stdout().lock();
        // A runtime that closed our stdout learns nothing more from us either way.
        let _ = writeln!(stdout, "{}", outcome.stdout);
        let _ = stdout.flush();
    }
    eprint!("{}", outcome.stderr);
    std::process::exit(outcome.exit_code);
}
