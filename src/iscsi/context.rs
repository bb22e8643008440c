//! What every iSCSI connection of this server shares: the targets, the session registry, the
//! login settings, the portals and the connection timers. Nothing here knows the daemon's
//! configuration file, the HA loop or the control socket; the server builds it once.

use super::budget::{MemoryBudget, Occurrences};
use super::login::LoginConfig;
use super::session::{SessionLimits, SessionRegistry, TargetEntry};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use twinsan_throttle::SharedThrottle;

/// The timers a connection runs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimers {
    /// Login must complete within this (a connection that never logs in is dropped).
    pub login_timeout: Duration,
    /// Quiet time after which the target pings with a NOP-In (§11.19); None: never.
    pub nop_in_interval: Option<Duration>,
    /// How long the initiator has to answer a ping before the connection is dropped.
    pub nop_in_timeout: Duration,
}

impl ConnectionTimers {
    /// From the configured seconds: an interval of 0 turns pings off, and the answer timeout
    /// is at least one second.
    pub fn from_secs(login_timeout: u64, nop_in_interval: u64, nop_in_timeout: u64) -> Self {
        ConnectionTimers {
            login_timeout: Duration::from_secs(login_timeout),
            nop_in_interval: (nop_in_interval != 0).then(|| Duration::from_secs(nop_in_interval)),
            nop_in_timeout: Duration::from_secs(nop_in_timeout.max(1)),
        }
    }
}

/// Bounds on what clients can make the server hold (issue 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    pub sessions: SessionLimits,
    /// Each session's share of the in-flight data budget.
    pub session_inflight_bytes: u64,
    /// Connections in the login phase at once; more are closed at once.
    pub max_logins: usize,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            sessions: SessionLimits::default(),
            session_inflight_bytes: 256 << 20,
            max_logins: 256,
        }
    }
}

/// The context of every connection: [`super::connection::serve`] and the login take this.
pub struct IscsiContext {
    pub sessions: SessionRegistry,
    /// Targets by lower-case IQN.
    pub targets: HashMap<String, Arc<TargetEntry>>,
    pub login: Arc<LoginConfig>,
    /// Portals advertised by SendTargets, in configuration order.
    pub portals: Vec<SocketAddr>,
    pub timers: ConnectionTimers,
    pub limits: ResourceLimits,
    /// Memory for in-flight command data, shared by every session.
    pub budget: Arc<MemoryBudget>,
    /// One permit per connection in the login phase (`limits.max_logins`).
    pub logins: Arc<Semaphore>,
    /// Connections closed because too many were logging in, for a log line per ten seconds.
    pub login_refusals: Occurrences,
    /// Failed CHAP logins per (lower-case InitiatorName, source address): later logins of a
    /// failing initiator wait, others never do (issue 13).
    pub auth_throttle: SharedThrottle<AuthKey>,
}

/// What CHAP failures are counted by: the initiator's name (lower case: names compare
/// case-insensitively, RFC 7143 §4.2.7) and the address it connects from.
pub type AuthKey = (String, IpAddr);

impl IscsiContext {
    /// The target called `iqn` (names compare case-insensitively, RFC 7143 §4.2.7).
    pub fn target(&self, iqn: &str) -> Option<&Arc<TargetEntry>> {
        self.targets.get(&iqn.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_interval_turns_pings_off_and_the_timeout_is_at_least_a_second() {
        let t = ConnectionTimers::from_secs(15, 0, 0);
        assert_eq!(t.login_timeout, Duration::from_secs(15));
        assert_eq!(t.nop_in_interval, None);
        assert_eq!(t.nop_in_timeout, Duration::from_secs(1));
        let t = ConnectionTimers::from_secs(15, 10, 15);
        assert_eq!(t.nop_in_interval, Some(Duration::from_secs(10)));
        assert_eq!(t.nop_in_timeout, Duration::from_secs(15));
    }

    #[test]
    fn targets_are_found_whatever_the_case_of_the_name() {
        use crate::scsi::ScsiTarget;
        let entry = Arc::new(TargetEntry {
            iqn: "iqn.2026-01.x:Disk".into(),
            scsi: Arc::new(ScsiTarget::new(vec![])),
        });
        let ctx = IscsiContext {
            sessions: SessionRegistry::default(),
            targets: HashMap::from([(entry.iqn.to_ascii_lowercase(), entry)]),
            login: Arc::new(LoginConfig::default()),
            portals: Vec::new(),
            timers: ConnectionTimers::from_secs(15, 10, 15),
            limits: ResourceLimits::default(),
            budget: MemoryBudget::new(1 << 30),
            logins: Arc::new(Semaphore::new(1)),
            login_refusals: Occurrences::default(),
            auth_throttle: SharedThrottle::default(),
        };
        assert!(ctx.target("IQN.2026-01.X:disk").is_some());
        assert!(ctx.target("iqn.2026-01.x:other").is_none());
    }
}
