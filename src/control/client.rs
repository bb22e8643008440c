//! The client side of the control socket: one JSON request line, one JSON answer line (or a
//! stream of lines for `log --follow`). The CLI (`twinsan status`, `get`, `log`, the HA
//! commands, `replication ...`) talks to the daemon through it.

use std::io::Write;
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
    let stream = connect(path).await?;
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

/// `twinsan get`: the effective configuration (secrets masked), as TOML.
pub async fn get(socket: &Path) -> anyhow::Result<String> {
    let reply = request_with_timeout(
        socket,
        serde_json::json!({"command": "get"}),
        Duration::from_secs(10),
    )
    .await?;
    let cfg = &reply["config"];
    Ok(toml::to_string_pretty(&strip_nulls(cfg.clone()))?)
}

/// TOML has no null: unset options are left out.
fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.into_iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k, strip_nulls(x)))
                .collect(),
        ),
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(strip_nulls).collect())
        }
        other => other,
    }
}

/// `twinsan log [--follow]`: recent lines, then (with `follow`) new ones until interrupted.
pub async fn log(socket: &Path, follow: bool) -> anyhow::Result<()> {
    let stream = connect(socket).await?;
    let (rd, mut wr) = stream.into_split();
    let mut req = serde_json::json!({"command": "log", "follow": follow}).to_string();
    req.push('\n');
    wr.write_all(req.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    let mut out = std::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if v["ok"] == false {
            anyhow::bail!("twinsan refused: {}", v["error"].as_str().unwrap_or("?"));
        }
        if let Some(ls) = v["lines"].as_array() {
            for l in ls {
                writeln!(out, "{}", l.as_str().unwrap_or_default())?;
            }
        }
        if let Some(l) = v["line"].as_str() {
            writeln!(out, "{l}")?;
        }
        out.flush()?;
        if !follow && v.get("lines").is_some() {
            break;
        }
    }
    Ok(())
}

async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })
}
