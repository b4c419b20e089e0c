//! Logging (text, or JSON for machines) with a level that can change at run time, and the
//! metrics exposition of a program's prometheus-client registry.

use std::str::FromStr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry as Subscribers, reload};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?} is not one of: text, json")),
        }
    }
}

/// Logging flags shared by every program (flattened into each `Config`).
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text` for people, `json` for machines.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in tracing's `EnvFilter` syntax (`info`, `warn,ztunnel=debug`, ...).
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_parser = parse_filter)]
    pub log_level: String,
}

fn parse_filter(filter: &str) -> Result<String, String> {
    EnvFilter::try_new(filter)
        .map(|_| filter.to_owned())
        .map_err(|e| format!("invalid log filter {filter:?}: {e}"))
}

/// Changes the log filter of a running program (the admin `/logging` endpoint).
#[derive(Clone, Debug)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Subscribers>,
    current: Arc<std::sync::Mutex<String>>,
}

impl LogHandle {
    pub fn set_filter(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
        self.filter.reload(parsed).map_err(|e| e.to_string())?;
        *self.current.lock().expect("not poisoned") = filter.to_owned();
        Ok(())
    }

    pub fn filter(&self) -> String {
        self.current.lock().expect("not poisoned").clone()
    }
}

/// Installs the global subscriber writing to stdout.
pub fn init_logging(args: &LogArgs) -> Result<LogHandle, tracing_subscriber::util::TryInitError> {
    let (subscriber, handle) = subscriber(args, std::io::stdout);
    subscriber.try_init()?;
    Ok(handle)
}

/// The subscriber `init_logging` installs, writing to `writer` (tests capture it).
pub fn subscriber<W>(args: &LogArgs, writer: W) -> (impl tracing::Subscriber + Send + Sync, LogHandle)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, reload_handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let handle = LogHandle {
        filter: reload_handle,
        current: Arc::new(std::sync::Mutex::new(args.log_level.clone())),
    };
    (Subscribers::default().with(filter).with(fmt), handle)
}

/// Content type of the OpenMetrics text exposition that Prometheus scrapes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders a registry in the OpenMetrics text format.
pub fn encode_metrics(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}
