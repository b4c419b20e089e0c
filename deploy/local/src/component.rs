//! Components in processes of their own: a program (the lab runner, a benchmark, a test) re-runs
//! its own binary with [`ROLE_FLAG`] to run istiod-lite or ztunnel, so each lives in the network
//! namespace it is started in and is measured, stopped and restarted on its own.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use clap::Parser;

/// `<binary> --mesh-role <istiod-lite|ztunnel|waypoint|echo|http> <flags…>` runs that component.
pub const ROLE_FLAG: &str = "--mesh-role";

/// Runs the component when this process was started as one; `None` for the benchmark itself.
/// Call it first in `main`.
pub fn run_role_if_asked() -> Option<anyhow::Result<()>> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == ROLE_FLAG)?;
    let role = args.get(at + 1)?.clone();
    let flags = std::iter::once(role.clone()).chain(args[at + 2..].iter().cloned());
    if role == "http" {
        return Some(EchoArgs::try_parse_from(flags).map_err(Into::into).and_then(|a| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let listener = tokio::net::TcpListener::bind(a.listen).await?;
                    serve_http(listener, a.name);
                    std::future::pending::<anyhow::Result<()>>().await
                })
        }));
    }
    if role == "echo" {
        return Some(
            EchoArgs::try_parse_from(flags)
                .map_err(Into::into)
                .and_then(|a| crate::runner::serve_echo(a.listen, a.name)),
        );
    }
    let mut builder = match std::env::var("BENCH_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return Some(Err(error.into())),
    };
    Some(runtime.block_on(async move {
        let signals = mesh_core::lifecycle::Signals::install()?;
        match role.as_str() {
            "istiod-lite" => {
                let config = istiod_lite::Config::try_parse_from(flags)?;
                let log = mesh_core::telemetry::init_logging(&config.log)?;
                istiod_lite::run(Arc::new(config), signals, log).await
            }
            "waypoint" => {
                let config = waypoint::Config::try_parse_from(flags)?;
                let log = mesh_core::telemetry::init_logging(&config.log)?;
                waypoint::run(Arc::new(config), signals, log).await
            }
            "ztunnel" => {
                let config = ztunnel::Config::try_parse_from(flags)?;
                let log = mesh_core::telemetry::init_logging(&config.log)?;
                ztunnel::run(Arc::new(config), signals, log).await
            }
            other => anyhow::bail!("unknown role {other}"),
        }
    }))
}

/// The lab's test apps: where they listen, and the name they answer with.
#[derive(Debug, clap::Parser)]
struct EchoArgs {
    #[arg(long)]
    listen: std::net::SocketAddr,
    #[arg(long)]
    name: String,
}

/// A component running in a child process; killed when dropped.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
}

/// Linux reports process CPU times in USER_HZ ticks, fixed at 100 per second by its ABI.
const TICKS_PER_SECOND: f64 = 100.0;

impl Process {
    /// Starts `role` with `flags`; its stdout is piped (for the caller to read) or discarded.
    pub fn spawn(role: &str, flags: &[String], pipe_stdout: bool) -> anyhow::Result<Self> {
        let stdout = if pipe_stdout { Stdio::piped() } else { Stdio::null() };
        Self::spawn_with(Command::new(std::env::current_exe()?), role, flags, stdout)
    }

    /// Starts `role` with `flags` through `command` (`ip netns exec <ns> <this binary>`, say).
    pub fn spawn_with(mut command: Command, role: &str, flags: &[String], stdout: Stdio) -> anyhow::Result<Self> {
        let child = command.arg(ROLE_FLAG).arg(role).args(flags).stdout(stdout).spawn()?;
        Ok(Self { child })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .ok_or_else(|| anyhow::anyhow!("no {field}"))?;
        Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
    }

    pub fn rss_kib(&self) -> anyhow::Result<f64> {
        self.status_kib("VmRSS:")
    }

    pub fn peak_rss_kib(&self) -> anyhow::Result<f64> {
        self.status_kib("VmHWM:")
    }

    /// User plus system CPU time so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may contain spaces): utime is the 12th, stime the 13th.
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("short /proc stat"))?
                .parse::<f64>()?)
        };
        Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lab's HTTP/1.1 test app: answers `<name> <METHOD> <path>` with `x-served-by: <name>`;
/// `/status/<code>` answers that code, `/flaky` fails every other request with 503, `/slow`
/// answers after 2 s, `/bytes/<n>` answers n bytes. Returns the count of requests it served.
pub fn serve_http(listener: tokio::net::TcpListener, name: String) -> Arc<std::sync::atomic::AtomicUsize> {
    use hyper::service::service_fn;
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (counter, name) = (counter.clone(), name.clone());
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let count = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let path = request.uri().path().to_owned();
                let status = match path.as_str() {
                    "/flaky" if count.is_multiple_of(2) => 503,
                    _ => path
                        .strip_prefix("/status/")
                        .and_then(|code| code.parse::<u16>().ok())
                        .unwrap_or(200),
                };
                let delay = if path == "/slow" {
                    std::time::Duration::from_secs(2)
                } else {
                    std::time::Duration::ZERO
                };
                // `/bytes/<n>`: a body of n bytes (for benchmarks).
                let body = match path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
                    Some(size) => "x".repeat(size.min(1 << 20)),
                    None => format!("{name} {} {path}", request.method()),
                };
                let response = hyper::Response::builder()
                    .status(status)
                    .header("x-served-by", &*name)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .expect("valid response");
                async move {
                    // Even a zero sleep waits for the timer's next 1 ms tick: skip it.
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    served
}
