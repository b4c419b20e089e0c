//! Runs a scenario inside a network namespace of its own, so capture rules, socket marks and
//! listeners on any loopback address touch nothing of the host's, and vanish with the scenario
//! (also when it fails: the namespace dies with its last thread).
//!
//! Network namespaces belong to threads: the scenario gets a fresh thread that unshares its
//! namespace and brings `lo` up, then a runtime whose worker threads (created there) inherit it.

use std::future::Future;

/// Whether this process may create namespaces. Without root the scenario is skipped with a
/// message, except in CI (`CI=true`), where that is a failure.
pub fn privileged(scenario: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{scenario}: needs root (network namespaces, nftables), and CI=true requires it to run"
    );
    eprintln!("SKIPPED {scenario}: needs root (network namespaces, nftables)");
    false
}

/// Runs `scenario` on a multi-threaded runtime inside a new network namespace.
pub fn isolated<F, Fut, T>(scenario: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let thread = std::thread::spawn(move || -> anyhow::Result<T> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        run("ip", &["link", "set", "lo", "up"], None)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let result = runtime.block_on(scenario());
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        result
    });
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs a command in the calling thread's namespace (children inherit it).
pub use mesh_lab::topology::run;
