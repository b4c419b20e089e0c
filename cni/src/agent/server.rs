//! The CNI socket: one plugin request per connection, one JSON line each way
//! ([`crate::protocol`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use super::Agent;
use crate::protocol::{MAX_LINE, Request, Response, code};

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens at `path`, replacing a socket file a previous agent left behind.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let error = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    UnixListener::bind(path).map_err(error)
}

/// Serves plugin requests until `drain` fires; requests under way finish first.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>, drain: drain::Watch) {
    let mut requests = JoinSet::new();
    let drained = drain.clone().signaled();
    tokio::pin!(drained);
    let mut next = 0u64;
    loop {
        tokio::select! {
            _ = &mut drained => break,
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next += 1;
                    let agent = agent.clone();
                    let watch = drain.clone();
                    requests.spawn(async move {
                        let _release = watch;
                        serve_request(stream, agent).await;
                    }.instrument(info_span!("cni", request = next)));
                }
                Err(error) => warn!(%error, "CNI socket accept failed"),
            },
        }
    }
    while requests.join_next().await.is_some() {}
}

async fn serve_request(stream: UnixStream, agent: Arc<Agent>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let mut line = String::new();
    let response = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return debug!("no request in time"),
        Ok(Err(error)) => return debug!(%error, "reading the request"),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim_end()) {
            Ok(request) => agent.handle(request).await,
            Err(error) => Response::Failed {
                code: code::PROTOCOL,
                message: format!("the node agent cannot read the request {:?}: {error}", line.trim_end()),
            },
        },
    };
    let mut answer = serde_json::to_string(&response).expect("responses serialize");
    answer.push('\n');
    if let Err(error) = write.write_all(answer.as_bytes()).await {
        // The plugin gave up (its timeout): the runtime will DEL the sandbox it failed.
        warn!(%error, ?response, "the plugin left before its answer");
    }
}
