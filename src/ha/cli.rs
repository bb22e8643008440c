//! The HA operator commands of the `twinsan` binary: `manual-mode-enable`,
//! `manual-mode-disable`, `become-primary`, `become-secondary`.

use crate::control::client::{request_with_timeout, ControlError};
use std::path::Path;
use std::time::Duration;

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
