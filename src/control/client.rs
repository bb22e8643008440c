//! The client side of the control socket: one JSON request line, one JSON answer line. The
//! CLI (`twinsan status`, `twinsan ha ...`, `twinsan replication ...`) talks to the daemon
//! through it.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach twinsan at {path}: {source} (is `twinsan serve` running with this config?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad answer from twinsan: {0}")]
    Protocol(String),
    #[error("twinsan refused: {0}")]
    Refused(String),
}

/// Sends one request to the daemon at `path` and returns the `ok` answer's payload.
pub async fn request(
    path: &Path,
    request: serde_json::Value,
) -> Result<serde_json::Value, ControlError> {
    request_with_timeout(path, request, Duration::from_secs(10)).await
}

/// [`request`] with a custom answer deadline (role changes may take longer).
pub async fn request_with_timeout(
    path: &Path,
    request: serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (rd, mut wr) = stream.into_split();
    let mut line = request.to_string();
    line.push('\n');
    wr.write_all(line.as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(rd).lines();
    let reply = tokio::time::timeout(timeout, lines.next_line())
        .await
        .map_err(|_| ControlError::Protocol(format!("no answer within {} s", timeout.as_secs())))?
        .map_err(io)?
        .ok_or_else(|| ControlError::Protocol("connection closed without an answer".into()))?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v)
    } else {
        Err(ControlError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}
