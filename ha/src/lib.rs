//! twinsan HA layer: role sources (pool.conf, XAPI, standalone heartbeats and witnesses, the
//! persisted manual-mode flag), the role state machine, the floating IP (VIP) and alerts.
//!
//! The state machine ([`role::RoleMachine`]) is pure: it turns events into ordered actions, so every
//! safety rule is unit-tested without I/O. The I/O edges (pool.conf watcher, XAPI client, VIP via
//! rtnetlink and raw sockets, SMTP) live in their own modules and only report events or carry out actions.
//! [`replug`] plugs the iSCSI SRs that XenServer left unplugged after a boot.
//!
//! Nothing here knows the daemon: sources take addresses, secrets and timeouts as plain values
//! (e.g. [`heartbeat::PathConfig`]), and the daemon's `src/ha` adapter starts them and feeds the
//! machine.

pub mod alerts;
pub mod heartbeat;
pub mod poolconf;
pub mod replug;
pub mod role;
pub mod state_file;
#[cfg(feature = "test-xapi")]
pub mod testxapi;
pub mod tls;
pub mod vip;
pub mod witness;
pub mod xapi;
pub mod xmlrpc;
