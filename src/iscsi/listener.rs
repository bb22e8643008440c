//! A portal's listener: binds the portal and accepts TCP connections, each handed to its
//! own connection task.

use super::context::IscsiContext;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Binds a portal's listening socket (`SO_REUSEADDR`: a restart does not wait for old
/// connections' TIME_WAIT). With `freebind` (`IP_FREEBIND`) the address need not be local yet:
/// under `[ha]` the portal may be the VIP, which the role machine adds only after the target
/// accepts logins.
pub fn bind(addr: SocketAddr, freebind: bool) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    match (addr.is_ipv4(), freebind) {
        (true, _) => s.set_freebind_v4(freebind)?,
        // Under [ha] an IPv6 portal is that one address family, beside an IPv4 VIP on the
        // same port; without it `[::]` keeps the system's dual-stack default.
        (false, true) => {
            s.set_only_v6(true)?;
            s.set_freebind_v6(true)?;
        }
        (false, false) => {}
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

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
