//! What every benchmark shares: a report that prints its setup and results and writes them as
//! JSON under `target/bench-results/`, and single-threaded runtimes to pin "one core per side".

pub mod mesh;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// A benchmark's setup and measured figures.
#[derive(Debug)]
pub struct Report {
    name: String,
    setup: Map<String, Value>,
    results: Map<String, Value>,
}

impl Report {
    pub fn new(name: &str) -> Self {
        let mut setup = Map::new();
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        setup.insert("build_profile".into(), profile.into());
        setup.insert(
            "cpus".into(),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .into(),
        );
        Self {
            name: name.into(),
            setup,
            results: Map::new(),
        }
    }

    pub fn setup(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.setup.insert(key.into(), value.into());
        self
    }

    pub fn result(&mut self, key: &str, value: f64, unit: &str) -> &mut Self {
        println!("  {key:<32} {value:>12.2} {unit}");
        self.results.insert(key.into(), json!({ "value": value, "unit": unit }));
        self
    }

    /// Prints the setup, then writes `target/bench-results/<name>.json`.
    pub fn print_setup(&self) {
        println!("== {}", self.name);
        for (key, value) in &self.setup {
            println!("  setup {key} = {value}");
        }
    }

    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.json", self.name));
        let body = json!({ "name": self.name, "setup": self.setup, "results": self.results });
        std::fs::write(&path, serde_json::to_string_pretty(&body)?)?;
        println!("  results written to {}", path.display());
        Ok(path)
    }
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// A single-threaded runtime on its own OS thread: one core's worth of work per side.
pub fn spawn_on_own_thread<F>(name: &str, future: F) -> std::thread::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(future)
        })
        .expect("spawn thread")
}

/// `--name value` from the command line (cargo bench passes its own flags too; they are ignored).
pub fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(arg) = args.next() {
        if arg == name {
            return args.next();
        }
    }
    None
}
