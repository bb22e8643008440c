//! Operator commands of the `twinsan` binary that talk to the running daemon: `get`, `log`,
//! `manual-mode-enable`, `manual-mode-disable`, `become-primary`, `become-secondary`.

use crate::control::client::{request_with_timeout, ControlError};
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A role change may wait for replication to notice a dead peer: allow for it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// `twinsan <action>` for the four HA actions; prints the daemon's summary.
pub async fn ha_action(socket: &Path, action: &str) -> Result<String, ControlError> {
    let reply = request_with_timeout(
        socket,
        serde_json::json!({"command": "ha", "action": action}),
        COMMAND_TIMEOUT,
    )
    .await?;
    Ok(reply["message"].as_str().unwrap_or("done").to_string())
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
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
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
