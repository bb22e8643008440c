//! A portal's listener: accepts TCP connections and hands each to its own connection task.

use super::context::IscsiContext;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Accepts iSCSI connections on `listener` until `stop`; dropping the listener closes the port.
pub async fn accept_loop(listener: TcpListener, iscsi: Arc<IscsiContext>, stop: CancellationToken) {
    let addr = listener.local_addr().ok();
    info!(portal = ?addr, "listening");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(super::connection::serve(stream, iscsi.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    error!(portal = ?addr, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    info!(portal = ?addr, "portal closed");
}
