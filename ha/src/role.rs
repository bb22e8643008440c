//! The role state machine: decides when this host becomes storage primary or secondary.
//!
//! It is a pure struct: [`RoleMachine::handle`] takes one [`Event`] and returns the ordered
//! [`Action`]s the daemon must carry out (and report back as events). No I/O happens here, so every
//! safety rule is covered by unit tests:
//!
//! * promote order: VIP probe (ARP duplicate detection) -> volumes to primary (stop if that fails)
//!   -> target accepting logins -> VIP added -> gratuitous ARP;
//! * demote order: in-flight commands drained (no new logins) -> target stopped (sessions closed)
//!   -> VIP removed -> volumes to secondary. The sessions close while the VIP is still on this
//!   host: a FIN sent from an address that is already gone never leaves the host, and an
//!   initiator waiting for answers would only notice the dead connection after its own timeout
//!   (30 s with libiscsi, measured). Draining first also lets in-flight answers reach it;
//! * never two primaries: a reachable primary peer blocks every promotion (logged and alerted);
//! * pool.conf alone never promotes at start-up: the peer is asked first (a returning old master
//!   still says `master` until xapi rewrites it);
//! * manual mode: roles change only by operator command; `become-primary` is refused while the peer
//!   is primary or the VIP answers; `become-secondary` is always allowed; leaving manual mode is
//!   refused until this host is in its native role (pool master = primary);
//! * standalone pairs: the secondary promotes only when the primary is unreachable on every path and
//!   at least one witness answers; no automatic fail-back.

use std::time::Duration;

use tracing::{info, warn};

// The machine imports nothing from the rest of the crate: the alerts it raises are plain data
// here, and `crate::alerts` delivers them (mail, XenCenter message).

/// How bad an alert is; `crate::alerts` maps it onto XAPI message priorities (1 = most severe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Data or availability at risk now (two primaries, promotion failed).
    Critical,
    /// Something an operator should look at (promotion blocked, VIP taken).
    Warning,
    /// A role change or other notable event.
    Info,
}

/// One alert, as raised by the role machine or the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Alert {
    /// Severity.
    pub severity: Severity,
    /// Short machine-friendly name (used as the XAPI message name).
    pub name: String,
    /// Human text; duplicate suppression keys on it.
    pub text: String,
}

impl Alert {
    /// Builds an alert.
    pub fn new(severity: Severity, name: impl Into<String>, text: impl Into<String>) -> Self {
        Alert {
            severity,
            name: name.into(),
            text: text.into(),
        }
    }
}

/// Storage role of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostRole {
    /// Replica read-only, no target, no VIP.
    Secondary,
    /// Promotion under way (VIP probe or volume promotion pending).
    Promoting,
    /// Replica writable, target serving, VIP held.
    Primary,
    /// Demotion under way.
    Demoting,
}

impl HostRole {
    /// What this host tells its peer: anything but a settled secondary counts as primary, so that
    /// the peer never promotes while we might still hold volumes, target or VIP.
    pub fn as_peer_state(self) -> PeerState {
        match self {
            HostRole::Secondary => PeerState::Secondary,
            _ => PeerState::Primary,
        }
    }
}

/// What the role source (pool.conf / XAPI) says this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolRole {
    /// Pool master: native role is primary.
    Master,
    /// Pool slave: native role is secondary.
    Slave,
    /// `broken`, unreadable or not yet known: do nothing.
    Unknown,
}

/// Which kind of role source this host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Follow the XenServer/XCP-ng pool master (pool.conf + XAPI events).
    Xapi,
    /// No pool: the pair decides by heartbeats and witnesses.
    Standalone,
}

/// A path over which the peer is asked for its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerPath {
    /// The direct replication link.
    Replication,
    /// The configured management address.
    Management,
}

/// The peer's role as seen over one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Not asked yet (start-up).
    Unknown,
    /// Peer answered: it is primary (or promoting/demoting).
    Primary,
    /// Peer answered: it is secondary.
    Secondary,
    /// Peer was asked and did not answer in time.
    Unreachable,
}

/// Static configuration of the role machine.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// Role source kind.
    pub source: SourceKind,
    /// Whether a management path to the peer is configured (otherwise only the replication link).
    pub management_path: bool,
    /// Standalone only: this host takes the primary role when both are up and secondary.
    pub preferred_primary: bool,
    /// Gratuitous ARPs / unsolicited neighbour advertisements sent after adding the VIP.
    pub garp_count: u32,
    /// Spacing between them.
    pub garp_interval: Duration,
}

impl Default for RoleConfig {
    fn default() -> Self {
        RoleConfig {
            source: SourceKind::Xapi,
            management_path: true,
            preferred_primary: false,
            garp_count: 5,
            garp_interval: Duration::from_millis(200),
        }
    }
}

/// Inputs to the role machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The role source's view. `confirmed` = XAPI itself said so over a live session (not only
    /// pool.conf), which is enough to promote at start-up without the peer's answer.
    Source {
        /// Master / slave / unknown.
        role: PoolRole,
        /// Confirmed by a live XAPI session.
        confirmed: bool,
    },
    /// The peer's answer (or silence) on one path.
    Peer {
        /// Which path.
        path: PeerPath,
        /// What it said.
        state: PeerState,
    },
    /// Whether at least one witness IP answers.
    Witness {
        /// At least one answered.
        reachable: bool,
    },
    /// Operator: enable (true) or disable (false) manual mode.
    ManualMode(bool),
    /// Operator: become primary (manual mode only).
    BecomePrimary,
    /// Operator: become secondary (manual mode only).
    BecomeSecondary,
    /// Result of [`Action::ProbeVip`]: whether some host answered ARP/ND for the VIP.
    VipProbe {
        /// Someone answers for the VIP.
        in_use: bool,
    },
    /// Result of [`Action::PromoteVolumes`].
    PromoteResult {
        /// All volumes are primary.
        ok: bool,
        /// Error text when not ok.
        detail: String,
    },
    /// Starting the target or adding the VIP failed after the volumes were promoted.
    PromoteStepFailed {
        /// What failed.
        detail: String,
    },
    /// Result of the demotion sequence.
    DemoteResult {
        /// Volumes are secondary, VIP and target gone.
        ok: bool,
        /// Error text when not ok.
        detail: String,
    },
    /// While primary, another host answered for our VIP.
    VipDuplicate,
}

/// Outputs, to be carried out in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// ARP/ND duplicate detection for the VIP; report [`Event::VipProbe`].
    ProbeVip,
    /// Replicated volumes to primary; report [`Event::PromoteResult`].
    PromoteVolumes,
    /// Target accepts logins.
    StartTarget,
    /// Add the VIP to the interface.
    AddVip,
    /// Announce the VIP.
    SendGratuitousArp {
        /// How many.
        count: u32,
        /// Spacing.
        interval: Duration,
    },
    /// Remove the VIP from the interface.
    RemoveVip,
    /// Drain or cleanly abort in-flight commands.
    DrainTarget,
    /// Stop the target.
    StopTarget,
    /// Replicated volumes to secondary; after this action report [`Event::DemoteResult`].
    DemoteVolumes,
    /// Persist the manual-mode flag so it survives a restart.
    PersistManualMode(bool),
    /// Raise an alert.
    Alert(Alert),
    /// The operator command was refused.
    Refuse {
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    ProbingVip,
    Volumes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Primary,
    Secondary,
    Hold,
    /// Would promote, but a rule forbids it now; the reason is alerted once.
    Blocked(String),
    /// Waiting for more information (not worth an alert).
    Wait(String),
}

/// Snapshot for `twinsan status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleStatus {
    /// Current role.
    pub role: HostRole,
    /// Manual mode on.
    pub manual: bool,
    /// Last role source signal.
    pub native: PoolRole,
    /// Whether that signal was confirmed by XAPI.
    pub confirmed: bool,
    /// Peer over the replication link.
    pub peer_replication: PeerState,
    /// Peer over the management path.
    pub peer_management: PeerState,
    /// Witness state (None = not known yet).
    pub witness: Option<bool>,
    /// Still in the start-up phase (peer not heard yet).
    pub startup: bool,
    /// Why an automatic promotion is currently not happening, if it is blocked.
    pub blocked: Option<String>,
}

/// The role state machine. See the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct RoleMachine {
    cfg: RoleConfig,
    role: HostRole,
    stage: Option<Stage>,
    by_operator: bool,
    manual: bool,
    native: PoolRole,
    confirmed: bool,
    peer_repl: PeerState,
    peer_mgmt: PeerState,
    witness: Option<bool>,
    startup: bool,
    blocked: Option<String>,
    /// Inputs at the time an automatic promotion failed: no retry until they change.
    failed_at: Option<Inputs>,
    two_primaries_alerted: bool,
    demote_failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inputs {
    native: PoolRole,
    confirmed: bool,
    peer_repl: PeerState,
    peer_mgmt: PeerState,
    witness: Option<bool>,
}

impl RoleMachine {
    /// A machine starting as secondary (the daemon cleans up any leftover VIP/target at start),
    /// with the persisted manual-mode flag.
    pub fn new(cfg: RoleConfig, manual: bool) -> Self {
        RoleMachine {
            cfg,
            role: HostRole::Secondary,
            stage: None,
            by_operator: false,
            manual,
            native: PoolRole::Unknown,
            confirmed: false,
            peer_repl: PeerState::Unknown,
            peer_mgmt: PeerState::Unknown,
            witness: None,
            startup: true,
            blocked: None,
            failed_at: None,
            two_primaries_alerted: false,
            demote_failed: false,
        }
    }

    /// Current role.
    pub fn role(&self) -> HostRole {
        self.role
    }

    /// Manual mode on.
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// Status snapshot.
    pub fn status(&self) -> RoleStatus {
        RoleStatus {
            role: self.role,
            manual: self.manual,
            native: self.native,
            confirmed: self.confirmed,
            peer_replication: self.peer_repl,
            peer_management: self.peer_mgmt,
            witness: self.witness,
            startup: self.startup,
            blocked: self.blocked.clone(),
        }
    }

    fn inputs(&self) -> Inputs {
        Inputs {
            native: self.native,
            confirmed: self.confirmed,
            peer_repl: self.peer_repl,
            peer_mgmt: self.peer_mgmt,
            witness: self.witness,
        }
    }

    fn paths(&self) -> Vec<PeerState> {
        if self.cfg.management_path {
            vec![self.peer_repl, self.peer_mgmt]
        } else {
            vec![self.peer_repl]
        }
    }

    /// The peer answered "primary" on some path.
    fn peer_primary(&self) -> bool {
        self.paths().contains(&PeerState::Primary)
    }

    /// The peer answered on some path, and nowhere said primary.
    fn peer_secondary(&self) -> bool {
        !self.peer_primary() && self.paths().contains(&PeerState::Secondary)
    }

    /// Asked on every path and silent on every path.
    fn peer_unreachable_everywhere(&self) -> bool {
        self.paths().iter().all(|s| *s == PeerState::Unreachable)
    }

    /// Handles one event and returns the actions to carry out, in order.
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::Source { role, confirmed } => {
                if role != self.native || confirmed != self.confirmed {
                    info!(?role, confirmed, "role source changed");
                }
                self.native = role;
                self.confirmed = confirmed;
                if confirmed {
                    self.startup = false;
                }
            }
            Event::Peer { path, state } => {
                let slot = match path {
                    PeerPath::Replication => &mut self.peer_repl,
                    PeerPath::Management => &mut self.peer_mgmt,
                };
                if *slot != state {
                    info!(?path, ?state, "peer state changed");
                }
                *slot = state;
                if matches!(state, PeerState::Primary | PeerState::Secondary) && self.startup {
                    info!("peer answered: start-up phase over");
                    self.startup = false;
                }
                self.check_two_primaries(&mut out);
            }
            Event::Witness { reachable } => {
                if self.witness != Some(reachable) {
                    info!(reachable, "witness state changed");
                }
                self.witness = Some(reachable);
            }
            Event::ManualMode(on) => return self.manual_mode(on),
            Event::BecomePrimary => return self.become_primary(),
            Event::BecomeSecondary => return self.become_secondary(),
            Event::VipProbe { in_use } => return self.vip_probed(in_use),
            Event::PromoteResult { ok, detail } => return self.promoted(ok, detail),
            Event::PromoteStepFailed { detail } => {
                if self.role == HostRole::Primary {
                    warn!(%detail, "promotion step failed after volumes were promoted: demoting");
                    self.failed_at = Some(self.inputs());
                    out.push(alert(
                        Severity::Critical,
                        "TWINSAN_PROMOTE_FAILED",
                        format!("promotion failed ({detail}); demoting again"),
                    ));
                    self.start_demotion(&mut out);
                }
                return out;
            }
            Event::DemoteResult { ok, detail } => return self.demoted(ok, detail),
            Event::VipDuplicate => {
                warn!(role = ?self.role, "another host answers for the VIP");
                out.push(alert(
                    Severity::Critical,
                    "TWINSAN_VIP_DUPLICATE",
                    "another host answers ARP/ND for the floating IP",
                ));
                return out;
            }
        }
        self.reconcile(&mut out);
        out
    }

    fn check_two_primaries(&mut self, out: &mut Vec<Action>) {
        let both = self.role == HostRole::Primary && self.peer_primary();
        if both && !self.two_primaries_alerted {
            warn!("peer reports primary while this host is primary");
            out.push(alert(
                Severity::Critical,
                "TWINSAN_TWO_PRIMARIES",
                "both hosts report the primary role",
            ));
        }
        self.two_primaries_alerted = both;
    }

    /// What automatic role following wants now.
    fn want_auto(&self) -> Want {
        match self.cfg.source {
            SourceKind::Xapi => match self.native {
                PoolRole::Slave => Want::Secondary,
                PoolRole::Unknown => Want::Hold,
                PoolRole::Master => {
                    if self.role == HostRole::Primary {
                        return Want::Hold;
                    }
                    if self.peer_primary() {
                        return Want::Blocked(
                            "this host is pool master but the peer is primary and reachable: \
                             not promoting (it demotes when it sees it is no longer master)"
                                .into(),
                        );
                    }
                    if !self.startup || self.confirmed || self.peer_secondary() {
                        return Want::Primary;
                    }
                    if !self.peer_unreachable_everywhere() {
                        return Want::Wait("start-up: waiting for the peer's answer".into());
                    }
                    if self.witness == Some(true) {
                        Want::Primary
                    } else {
                        Want::Blocked(
                            "start-up: pool.conf says master but the peer is unreachable and no \
                             witness answers; waiting for XAPI or the peer"
                                .into(),
                        )
                    }
                }
            },
            SourceKind::Standalone => {
                if matches!(self.role, HostRole::Primary | HostRole::Demoting) {
                    // No automatic fail-back and no automatic demotion: the primary stays.
                    return Want::Hold;
                }
                if self.peer_primary() {
                    return Want::Hold;
                }
                if self.peer_unreachable_everywhere() {
                    return if self.witness == Some(true) {
                        Want::Primary
                    } else {
                        Want::Blocked(
                            "peer unreachable on every path but no witness answers: not promoting"
                                .into(),
                        )
                    };
                }
                if self.peer_secondary() && self.cfg.preferred_primary {
                    return Want::Primary;
                }
                Want::Hold
            }
        }
    }

    fn reconcile(&mut self, out: &mut Vec<Action>) {
        if self.manual || matches!(self.role, HostRole::Promoting | HostRole::Demoting) {
            return;
        }
        let want = self.want_auto();
        match want {
            Want::Primary => {
                self.blocked = None;
                if self.role == HostRole::Secondary {
                    if self.failed_at == Some(self.inputs()) {
                        return;
                    }
                    self.failed_at = None;
                    info!("automatic promotion");
                    self.start_promotion(false, out);
                }
            }
            Want::Secondary => {
                self.blocked = None;
                if self.role == HostRole::Primary {
                    info!("role source says slave: demoting");
                    self.start_demotion(out);
                }
            }
            Want::Hold => self.blocked = None,
            Want::Wait(reason) => {
                if self.blocked.as_deref() != Some(&reason) {
                    info!(%reason, "not promoting yet");
                }
                self.blocked = Some(reason);
            }
            Want::Blocked(reason) => {
                if self.blocked.as_deref() != Some(&reason) {
                    warn!(%reason, "promotion blocked");
                    out.push(alert(
                        Severity::Warning,
                        "TWINSAN_PROMOTION_BLOCKED",
                        &reason,
                    ));
                }
                self.blocked = Some(reason);
            }
        }
    }

    fn start_promotion(&mut self, by_operator: bool, out: &mut Vec<Action>) {
        self.role = HostRole::Promoting;
        self.stage = Some(Stage::ProbingVip);
        self.by_operator = by_operator;
        out.push(Action::ProbeVip);
    }

    fn start_demotion(&mut self, out: &mut Vec<Action>) {
        self.role = HostRole::Demoting;
        self.stage = None;
        out.extend([
            Action::DrainTarget,
            Action::StopTarget,
            Action::RemoveVip,
            Action::DemoteVolumes,
        ]);
    }

    /// Whether the pending promotion should still go on.
    fn still_wanted(&self) -> Result<(), String> {
        if self.peer_primary() {
            return Err("the peer is primary and reachable".into());
        }
        if self.by_operator {
            if !self.manual {
                return Err("manual mode was left".into());
            }
            return Ok(());
        }
        if self.manual {
            return Err("manual mode was entered".into());
        }
        match self.want_auto() {
            Want::Primary => Ok(()),
            other => Err(format!("automatic promotion no longer wanted ({other:?})")),
        }
    }

    fn abort_promotion(&mut self, reason: String, out: &mut Vec<Action>) {
        warn!(%reason, "promotion aborted");
        self.role = HostRole::Secondary;
        self.stage = None;
        if self.by_operator {
            out.push(Action::Refuse {
                reason: reason.clone(),
            });
        }
        if self.peer_primary() {
            out.push(alert(
                Severity::Warning,
                "TWINSAN_PROMOTION_BLOCKED",
                format!("promotion aborted: {reason}"),
            ));
        }
    }

    fn vip_probed(&mut self, in_use: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role != HostRole::Promoting || self.stage != Some(Stage::ProbingVip) {
            return out;
        }
        if in_use {
            let reason = "the floating IP answers from another host".to_string();
            warn!("VIP probe: address in use, not promoting");
            out.push(alert(
                Severity::Critical,
                "TWINSAN_VIP_IN_USE",
                format!("not promoting: {reason}"),
            ));
            if self.by_operator {
                out.push(Action::Refuse { reason });
            } else {
                self.failed_at = Some(self.inputs());
            }
            self.role = HostRole::Secondary;
            self.stage = None;
            return out;
        }
        if let Err(reason) = self.still_wanted() {
            self.abort_promotion(reason, &mut out);
            return out;
        }
        info!("VIP free: promoting volumes");
        self.stage = Some(Stage::Volumes);
        out.push(Action::PromoteVolumes);
        out
    }

    fn promoted(&mut self, ok: bool, detail: String) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role != HostRole::Promoting || self.stage != Some(Stage::Volumes) {
            return out;
        }
        self.stage = None;
        if !ok {
            warn!(%detail, "volume promotion failed: staying secondary");
            self.role = HostRole::Secondary;
            out.push(alert(
                Severity::Critical,
                "TWINSAN_PROMOTE_FAILED",
                format!("volumes could not be promoted: {detail}"),
            ));
            if self.by_operator {
                out.push(Action::Refuse {
                    reason: format!("volume promotion failed: {detail}"),
                });
            } else {
                self.failed_at = Some(self.inputs());
            }
            return out;
        }
        if let Err(reason) = self.still_wanted() {
            // Volumes are primary already: undo with the full (idempotent) demotion sequence.
            warn!(%reason, "promotion no longer wanted after volumes were promoted: demoting");
            if self.by_operator {
                out.push(Action::Refuse { reason });
            }
            self.start_demotion(&mut out);
            return out;
        }
        info!("volumes primary: starting target, adding VIP, announcing it");
        self.role = HostRole::Primary;
        self.startup = false;
        self.two_primaries_alerted = false;
        out.extend([
            Action::StartTarget,
            Action::AddVip,
            Action::SendGratuitousArp {
                count: self.cfg.garp_count,
                interval: self.cfg.garp_interval,
            },
            alert(
                Severity::Info,
                "TWINSAN_PRIMARY",
                "this host is now storage primary",
            ),
        ]);
        out
    }

    fn demoted(&mut self, ok: bool, detail: String) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role != HostRole::Demoting {
            return out;
        }
        if !ok {
            warn!(%detail, "demotion failed");
            self.demote_failed = true;
            out.push(alert(
                Severity::Critical,
                "TWINSAN_DEMOTE_FAILED",
                format!("demotion failed: {detail}; retry with become-secondary"),
            ));
            return out;
        }
        info!("demotion complete: secondary");
        self.demote_failed = false;
        self.role = HostRole::Secondary;
        self.startup = false;
        out.push(alert(
            Severity::Info,
            "TWINSAN_SECONDARY",
            "this host is now storage secondary",
        ));
        self.reconcile(&mut out);
        out
    }

    fn refuse(reason: &str) -> Vec<Action> {
        info!(%reason, "operator command refused");
        vec![Action::Refuse {
            reason: reason.into(),
        }]
    }

    fn manual_mode(&mut self, on: bool) -> Vec<Action> {
        if on {
            if !self.manual {
                info!("manual mode enabled");
            }
            self.manual = true;
            return vec![Action::PersistManualMode(true)];
        }
        if !self.manual {
            return vec![Action::PersistManualMode(false)];
        }
        if let Err(reason) = self.native_check() {
            return Self::refuse(&format!("cannot leave manual mode: {reason}"));
        }
        info!("manual mode disabled");
        self.manual = false;
        let mut out = vec![Action::PersistManualMode(false)];
        self.reconcile(&mut out);
        out
    }

    /// Whether this host is in its native role (pool master = primary).
    fn native_check(&self) -> Result<(), String> {
        match self.role {
            HostRole::Promoting | HostRole::Demoting => {
                return Err("a role change is in progress".into())
            }
            HostRole::Primary | HostRole::Secondary => {}
        }
        match self.cfg.source {
            SourceKind::Xapi => match (self.native, self.role) {
                (PoolRole::Master, HostRole::Primary) | (PoolRole::Slave, HostRole::Secondary) => {
                    Ok(())
                }
                (PoolRole::Unknown, _) => Err("the pool role is unknown".into()),
                (PoolRole::Master, _) => {
                    Err("this host is pool master but not primary: run become-primary".into())
                }
                (PoolRole::Slave, _) => {
                    Err("this host is pool slave but primary: run become-secondary".into())
                }
            },
            SourceKind::Standalone => {
                if self.role == HostRole::Primary && self.peer_primary() {
                    Err("both hosts are primary".into())
                } else {
                    Ok(())
                }
            }
        }
    }

    fn become_primary(&mut self) -> Vec<Action> {
        if !self.manual {
            return Self::refuse("become-primary needs manual mode (manual-mode-enable)");
        }
        match self.role {
            HostRole::Primary => return Self::refuse("already primary"),
            HostRole::Promoting | HostRole::Demoting => {
                return Self::refuse("a role change is in progress")
            }
            HostRole::Secondary => {}
        }
        if self.peer_primary() {
            warn!("become-primary refused: the peer is primary");
            return vec![
                Action::Refuse {
                    reason: "the peer is primary: run become-secondary there first".into(),
                },
                alert(
                    Severity::Warning,
                    "TWINSAN_PROMOTION_BLOCKED",
                    "become-primary refused: the peer is primary and reachable",
                ),
            ];
        }
        info!("operator: become-primary");
        let mut out = Vec::new();
        self.failed_at = None;
        self.start_promotion(true, &mut out);
        out
    }

    fn become_secondary(&mut self) -> Vec<Action> {
        let stuck = self.role == HostRole::Demoting && self.demote_failed;
        if !self.manual && !stuck {
            return Self::refuse("become-secondary needs manual mode (manual-mode-enable)");
        }
        let mut out = Vec::new();
        match self.role {
            HostRole::Secondary => {}
            HostRole::Demoting if !stuck => {}
            HostRole::Promoting => {
                info!("operator: become-secondary aborts the promotion");
                if self.stage == Some(Stage::ProbingVip) {
                    self.role = HostRole::Secondary;
                    self.stage = None;
                } else {
                    self.start_demotion(&mut out);
                }
            }
            HostRole::Primary | HostRole::Demoting => {
                info!("operator: become-secondary");
                self.demote_failed = false;
                self.start_demotion(&mut out);
            }
        }
        out
    }
}

fn alert(severity: Severity, name: &str, text: impl Into<String>) -> Action {
    Action::Alert(Alert::new(severity, name, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMOTE_TAIL: [&str; 3] = ["StartTarget", "AddVip", "SendGratuitousArp"];
    const DEMOTE: [Action; 4] = [
        Action::DrainTarget,
        Action::StopTarget,
        Action::RemoveVip,
        Action::DemoteVolumes,
    ];

    fn xapi() -> RoleMachine {
        RoleMachine::new(RoleConfig::default(), false)
    }

    fn standalone(preferred: bool) -> RoleMachine {
        RoleMachine::new(
            RoleConfig {
                source: SourceKind::Standalone,
                preferred_primary: preferred,
                ..RoleConfig::default()
            },
            false,
        )
    }

    fn src(m: &mut RoleMachine, role: PoolRole, confirmed: bool) -> Vec<Action> {
        m.handle(Event::Source { role, confirmed })
    }

    fn peer(m: &mut RoleMachine, state: PeerState) -> Vec<Action> {
        let mut a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state,
        });
        a.extend(m.handle(Event::Peer {
            path: PeerPath::Management,
            state,
        }));
        a
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter(|a| !matches!(a, Action::Alert(_)))
            .map(|a| {
                let s = format!("{a:?}");
                s.split(|c: char| !c.is_alphanumeric())
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }

    fn has_alert(actions: &[Action], name: &str) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Alert(al) if al.name == name))
    }

    fn refused(actions: &[Action]) -> bool {
        actions.iter().any(|a| matches!(a, Action::Refuse { .. }))
    }

    /// Drives a started promotion to Primary and checks the promote order.
    fn finish_promotion(m: &mut RoleMachine) {
        assert_eq!(m.role(), HostRole::Promoting);
        let a = m.handle(Event::VipProbe { in_use: false });
        assert_eq!(a, vec![Action::PromoteVolumes]);
        let a = m.handle(Event::PromoteResult {
            ok: true,
            detail: String::new(),
        });
        assert_eq!(names(&a), PROMOTE_TAIL);
        assert_eq!(m.role(), HostRole::Primary);
    }

    fn finish_demotion(m: &mut RoleMachine) -> Vec<Action> {
        assert_eq!(m.role(), HostRole::Demoting);
        let a = m.handle(Event::DemoteResult {
            ok: true,
            detail: String::new(),
        });
        assert_eq!(m.role(), HostRole::Secondary);
        a
    }

    fn xapi_primary() -> RoleMachine {
        let mut m = xapi();
        peer(&mut m, PeerState::Secondary);
        let a = src(&mut m, PoolRole::Master, false);
        assert_eq!(a, vec![Action::ProbeVip]);
        finish_promotion(&mut m);
        m
    }

    #[test]
    fn promote_order_is_probe_volumes_target_vip_garp() {
        let m = xapi_primary();
        assert!(!m.status().startup);
    }

    #[test]
    fn garp_uses_configured_count_and_interval() {
        let mut m = RoleMachine::new(
            RoleConfig {
                garp_count: 3,
                garp_interval: Duration::from_millis(50),
                ..RoleConfig::default()
            },
            false,
        );
        peer(&mut m, PeerState::Secondary);
        src(&mut m, PoolRole::Master, false);
        m.handle(Event::VipProbe { in_use: false });
        let a = m.handle(Event::PromoteResult {
            ok: true,
            detail: String::new(),
        });
        assert!(a.contains(&Action::SendGratuitousArp {
            count: 3,
            interval: Duration::from_millis(50)
        }));
    }

    #[test]
    fn demote_order_is_vip_drain_target_volumes() {
        let mut m = xapi_primary();
        let a = src(&mut m, PoolRole::Slave, false);
        assert_eq!(a, DEMOTE.to_vec());
        assert_eq!(m.role(), HostRole::Demoting);
        // Events during demotion do not start anything else.
        assert!(src(&mut m, PoolRole::Master, false).is_empty());
        let a = m.handle(Event::DemoteResult {
            ok: true,
            detail: String::new(),
        });
        // Source says master again by now: a fresh promotion begins once secondary.
        assert_eq!(names(&a), vec!["ProbeVip"]);
        assert_eq!(m.role(), HostRole::Promoting);
    }

    #[test]
    fn slave_stays_secondary_and_unknown_does_nothing() {
        let mut m = xapi();
        peer(&mut m, PeerState::Primary);
        assert!(src(&mut m, PoolRole::Slave, false).is_empty());
        assert!(src(&mut m, PoolRole::Unknown, false).is_empty());
        let mut p = xapi_primary();
        assert!(src(&mut p, PoolRole::Unknown, false).is_empty());
        assert_eq!(p.role(), HostRole::Primary);
    }

    #[test]
    fn pool_conf_alone_never_promotes_at_startup() {
        let mut m = xapi();
        // pool.conf says master; nobody asked the peer yet.
        assert!(src(&mut m, PoolRole::Master, false).is_empty());
        assert_eq!(m.role(), HostRole::Secondary);
        assert!(m.status().blocked.is_some());
        // Only one path answered "unreachable": still waiting.
        assert!(m
            .handle(Event::Peer {
                path: PeerPath::Replication,
                state: PeerState::Unreachable
            })
            .iter()
            .all(|a| !matches!(a, Action::ProbeVip)));
        // Peer unreachable on every path and no witness: blocked with an alert.
        let a = m.handle(Event::Peer {
            path: PeerPath::Management,
            state: PeerState::Unreachable,
        });
        assert!(has_alert(&a, "TWINSAN_PROMOTION_BLOCKED"));
        assert_eq!(m.role(), HostRole::Secondary);
        // Alert not repeated for the same reason.
        assert!(m.handle(Event::Witness { reachable: false }).is_empty());
        // A witness answers: the peer is gone, promote.
        let a = m.handle(Event::Witness { reachable: true });
        assert_eq!(names(&a), vec!["ProbeVip"]);
    }

    #[test]
    fn returning_old_master_is_blocked_by_primary_peer() {
        let mut m = xapi();
        src(&mut m, PoolRole::Master, false);
        let a = peer(&mut m, PeerState::Primary);
        assert!(has_alert(&a, "TWINSAN_PROMOTION_BLOCKED"));
        assert_eq!(m.role(), HostRole::Secondary);
        // XAPI rewrites pool.conf: slave. Nothing to do.
        assert!(src(&mut m, PoolRole::Slave, false).is_empty());
    }

    #[test]
    fn confirmed_master_promotes_at_startup_without_peer() {
        let mut m = xapi();
        let a = src(&mut m, PoolRole::Master, true);
        assert_eq!(a, vec![Action::ProbeVip]);
    }

    #[test]
    fn confirmed_master_still_blocked_by_primary_peer() {
        let mut m = xapi();
        peer(&mut m, PeerState::Primary);
        let a = src(&mut m, PoolRole::Master, true);
        assert!(!a.contains(&Action::ProbeVip));
        assert!(has_alert(&a, "TWINSAN_PROMOTION_BLOCKED"));
    }

    #[test]
    fn handover_waits_for_old_primary_to_demote() {
        // Runtime master change: we see master before the peer has demoted.
        let mut m = xapi();
        src(&mut m, PoolRole::Slave, false);
        peer(&mut m, PeerState::Primary);
        let a = src(&mut m, PoolRole::Master, false);
        assert!(!a.contains(&Action::ProbeVip));
        // The peer demotes and reports secondary on one path: promotion starts.
        let a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Secondary,
        });
        // Management path still says primary: blocked.
        assert!(!a.contains(&Action::ProbeVip));
        let a = m.handle(Event::Peer {
            path: PeerPath::Management,
            state: PeerState::Secondary,
        });
        assert_eq!(names(&a), vec!["ProbeVip"]);
        finish_promotion(&mut m);
    }

    #[test]
    fn runtime_master_with_dead_peer_promotes() {
        let mut m = xapi();
        src(&mut m, PoolRole::Slave, false);
        peer(&mut m, PeerState::Primary);
        peer(&mut m, PeerState::Unreachable);
        let a = src(&mut m, PoolRole::Master, false);
        assert_eq!(names(&a), vec!["ProbeVip"]);
    }

    #[test]
    fn peer_becoming_primary_during_promotion_aborts() {
        let mut m = xapi();
        peer(&mut m, PeerState::Secondary);
        src(&mut m, PoolRole::Master, false);
        peer(&mut m, PeerState::Primary);
        let a = m.handle(Event::VipProbe { in_use: false });
        assert!(!a.contains(&Action::PromoteVolumes));
        assert_eq!(m.role(), HostRole::Secondary);
    }

    #[test]
    fn peer_primary_after_volume_promotion_demotes_again() {
        let mut m = xapi();
        peer(&mut m, PeerState::Secondary);
        src(&mut m, PoolRole::Master, false);
        m.handle(Event::VipProbe { in_use: false });
        peer(&mut m, PeerState::Primary);
        let a = m.handle(Event::PromoteResult {
            ok: true,
            detail: String::new(),
        });
        assert_eq!(a, DEMOTE.to_vec());
        assert_eq!(m.role(), HostRole::Demoting);
    }

    #[test]
    fn vip_in_use_blocks_promotion_without_retry_loop() {
        let mut m = xapi();
        peer(&mut m, PeerState::Secondary);
        src(&mut m, PoolRole::Master, false);
        let a = m.handle(Event::VipProbe { in_use: true });
        assert!(has_alert(&a, "TWINSAN_VIP_IN_USE"));
        assert!(!refused(&a));
        assert_eq!(m.role(), HostRole::Secondary);
        // Same inputs again: no new attempt.
        assert!(peer(&mut m, PeerState::Secondary).is_empty());
        // Inputs change: retry.
        let a = m.handle(Event::Witness { reachable: true });
        assert_eq!(names(&a), vec!["ProbeVip"]);
    }

    #[test]
    fn failed_volume_promotion_stops_and_alerts() {
        let mut m = xapi();
        peer(&mut m, PeerState::Secondary);
        src(&mut m, PoolRole::Master, false);
        m.handle(Event::VipProbe { in_use: false });
        let a = m.handle(Event::PromoteResult {
            ok: false,
            detail: "outdated".into(),
        });
        assert!(has_alert(&a, "TWINSAN_PROMOTE_FAILED"));
        assert!(
            names(&a).is_empty(),
            "no target/VIP after failed promotion: {a:?}"
        );
        assert_eq!(m.role(), HostRole::Secondary);
        assert!(peer(&mut m, PeerState::Secondary).is_empty());
    }

    #[test]
    fn failed_promotion_step_demotes() {
        let mut m = xapi_primary();
        let a = m.handle(Event::PromoteStepFailed {
            detail: "bind".into(),
        });
        assert!(has_alert(&a, "TWINSAN_PROMOTE_FAILED"));
        assert_eq!(
            names(&a),
            vec!["DrainTarget", "StopTarget", "RemoveVip", "DemoteVolumes"]
        );
        finish_demotion(&mut m);
        // Not retried with unchanged inputs.
        assert_eq!(m.role(), HostRole::Secondary);
    }

    #[test]
    fn stale_results_are_ignored() {
        let mut m = xapi();
        assert!(m.handle(Event::VipProbe { in_use: false }).is_empty());
        assert!(m
            .handle(Event::PromoteResult {
                ok: true,
                detail: String::new()
            })
            .is_empty());
        assert!(m
            .handle(Event::DemoteResult {
                ok: true,
                detail: String::new()
            })
            .is_empty());
        assert_eq!(m.role(), HostRole::Secondary);
    }

    #[test]
    fn two_primaries_are_alerted_once() {
        let mut m = xapi_primary();
        let a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Primary,
        });
        assert!(has_alert(&a, "TWINSAN_TWO_PRIMARIES"));
        let a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Primary,
        });
        assert!(!has_alert(&a, "TWINSAN_TWO_PRIMARIES"));
        assert_eq!(m.role(), HostRole::Primary);
    }

    #[test]
    fn vip_duplicate_while_primary_alerts() {
        let mut m = xapi_primary();
        let a = m.handle(Event::VipDuplicate);
        assert!(has_alert(&a, "TWINSAN_VIP_DUPLICATE"));
    }

    #[test]
    fn demotion_failure_is_retried_by_become_secondary() {
        let mut m = xapi_primary();
        src(&mut m, PoolRole::Slave, false);
        let a = m.handle(Event::DemoteResult {
            ok: false,
            detail: "busy".into(),
        });
        assert!(has_alert(&a, "TWINSAN_DEMOTE_FAILED"));
        assert_eq!(m.role(), HostRole::Demoting);
        let a = m.handle(Event::BecomeSecondary);
        assert_eq!(a, DEMOTE.to_vec());
        finish_demotion(&mut m);
    }

    // ---- manual mode ----

    #[test]
    fn manual_mode_freezes_roles() {
        let mut m = xapi_primary();
        assert_eq!(
            m.handle(Event::ManualMode(true)),
            vec![Action::PersistManualMode(true)]
        );
        assert!(src(&mut m, PoolRole::Slave, false).is_empty());
        assert_eq!(m.role(), HostRole::Primary);
        let mut s = xapi();
        s.handle(Event::ManualMode(true));
        peer(&mut s, PeerState::Secondary);
        assert!(src(&mut s, PoolRole::Master, true).is_empty());
        assert_eq!(s.role(), HostRole::Secondary);
    }

    #[test]
    fn operator_commands_need_manual_mode() {
        let mut m = xapi_primary();
        assert!(refused(&m.handle(Event::BecomeSecondary)));
        let mut s = xapi();
        assert!(refused(&s.handle(Event::BecomePrimary)));
    }

    #[test]
    fn become_primary_refused_while_peer_primary() {
        let mut m = RoleMachine::new(RoleConfig::default(), true);
        src(&mut m, PoolRole::Slave, false);
        m.handle(Event::Peer {
            path: PeerPath::Management,
            state: PeerState::Primary,
        });
        let a = m.handle(Event::BecomePrimary);
        assert!(refused(&a));
        assert!(has_alert(&a, "TWINSAN_PROMOTION_BLOCKED"));
        assert_eq!(m.role(), HostRole::Secondary);
    }

    #[test]
    fn become_primary_refused_when_vip_answers() {
        let mut m = RoleMachine::new(RoleConfig::default(), true);
        peer(&mut m, PeerState::Unreachable);
        assert_eq!(m.handle(Event::BecomePrimary), vec![Action::ProbeVip]);
        let a = m.handle(Event::VipProbe { in_use: true });
        assert!(refused(&a));
        assert_eq!(m.role(), HostRole::Secondary);
    }

    #[test]
    fn become_primary_refused_when_busy_or_already() {
        let mut m = RoleMachine::new(RoleConfig::default(), true);
        peer(&mut m, PeerState::Secondary);
        m.handle(Event::BecomePrimary);
        assert!(refused(&m.handle(Event::BecomePrimary)));
        finish_promotion(&mut m);
        assert!(refused(&m.handle(Event::BecomePrimary)));
    }

    #[test]
    fn become_primary_promotes_even_as_pool_slave_and_refuses_on_volume_failure() {
        let mut m = RoleMachine::new(RoleConfig::default(), true);
        src(&mut m, PoolRole::Slave, false);
        peer(&mut m, PeerState::Secondary);
        m.handle(Event::BecomePrimary);
        finish_promotion(&mut m);

        let mut f = RoleMachine::new(RoleConfig::default(), true);
        peer(&mut f, PeerState::Secondary);
        f.handle(Event::BecomePrimary);
        f.handle(Event::VipProbe { in_use: false });
        let a = f.handle(Event::PromoteResult {
            ok: false,
            detail: "x".into(),
        });
        assert!(refused(&a));
        // An operator may retry at once.
        assert_eq!(f.handle(Event::BecomePrimary), vec![Action::ProbeVip]);
    }

    #[test]
    fn become_secondary_always_allowed_in_manual_mode() {
        let mut m = xapi_primary();
        m.handle(Event::ManualMode(true));
        // Even with the peer primary / unreachable and source master.
        peer(&mut m, PeerState::Unreachable);
        let a = m.handle(Event::BecomeSecondary);
        assert_eq!(a, DEMOTE.to_vec());
        let a = finish_demotion(&mut m);
        assert_eq!(
            names(&a),
            Vec::<String>::new(),
            "manual mode: no automatic re-promotion"
        );
        // Already secondary: no-op, not refused.
        assert!(m.handle(Event::BecomeSecondary).is_empty());
    }

    #[test]
    fn become_secondary_aborts_pending_promotion() {
        let mut m = RoleMachine::new(RoleConfig::default(), true);
        peer(&mut m, PeerState::Secondary);
        m.handle(Event::BecomePrimary);
        assert!(m.handle(Event::BecomeSecondary).is_empty());
        assert_eq!(m.role(), HostRole::Secondary);
        m.handle(Event::BecomePrimary);
        m.handle(Event::VipProbe { in_use: false });
        assert_eq!(m.handle(Event::BecomeSecondary), DEMOTE.to_vec());
        // The late volume result is ignored.
        assert!(m
            .handle(Event::PromoteResult {
                ok: true,
                detail: String::new()
            })
            .is_empty());
    }

    #[test]
    fn leaving_manual_mode_requires_native_roles() {
        let mut m = RoleMachine::new(RoleConfig::default(), true);
        peer(&mut m, PeerState::Secondary);
        // Unknown pool role: refused.
        assert!(refused(&m.handle(Event::ManualMode(false))));
        src(&mut m, PoolRole::Master, false);
        // Master but secondary: refused.
        assert!(refused(&m.handle(Event::ManualMode(false))));
        assert!(m.manual());
        m.handle(Event::BecomePrimary);
        // In progress: refused.
        assert!(refused(&m.handle(Event::ManualMode(false))));
        finish_promotion(&mut m);
        assert_eq!(
            m.handle(Event::ManualMode(false)),
            vec![Action::PersistManualMode(false)]
        );
        assert!(!m.manual());

        // Slave but primary: refused.
        let mut s = RoleMachine::new(RoleConfig::default(), true);
        peer(&mut s, PeerState::Secondary);
        s.handle(Event::BecomePrimary);
        finish_promotion(&mut s);
        src(&mut s, PoolRole::Slave, false);
        assert!(refused(&s.handle(Event::ManualMode(false))));
        s.handle(Event::BecomeSecondary);
        finish_demotion(&mut s);
        assert_eq!(
            s.handle(Event::ManualMode(false)),
            vec![Action::PersistManualMode(false)]
        );
    }

    #[test]
    fn rolling_maintenance_sequence() {
        // A = master/primary, B = slave/secondary, both into manual mode.
        let mut a = xapi_primary();
        let mut b = xapi();
        src(&mut b, PoolRole::Slave, false);
        peer(&mut b, PeerState::Primary);
        a.handle(Event::ManualMode(true));
        b.handle(Event::ManualMode(true));
        // B cannot take over while A is primary.
        assert!(refused(&b.handle(Event::BecomePrimary)));
        // Demote A, B learns it, promote B.
        a.handle(Event::BecomeSecondary);
        finish_demotion(&mut a);
        peer(&mut b, a.role().as_peer_state());
        b.handle(Event::BecomePrimary);
        finish_promotion(&mut b);
        peer(&mut a, b.role().as_peer_state());
        // A restarts (manual mode persisted) and stays secondary even though it is master.
        let mut a = RoleMachine::new(RoleConfig::default(), true);
        src(&mut a, PoolRole::Master, true);
        peer(&mut a, PeerState::Primary);
        assert_eq!(a.role(), HostRole::Secondary);
        // Leaving manual mode now is refused on both.
        assert!(refused(&a.handle(Event::ManualMode(false))));
        assert!(refused(&b.handle(Event::ManualMode(false))));
        // Move storage back.
        b.handle(Event::BecomeSecondary);
        finish_demotion(&mut b);
        peer(&mut a, b.role().as_peer_state());
        a.handle(Event::BecomePrimary);
        finish_promotion(&mut a);
        peer(&mut b, a.role().as_peer_state());
        assert_eq!(
            a.handle(Event::ManualMode(false)),
            vec![Action::PersistManualMode(false)]
        );
        assert_eq!(
            b.handle(Event::ManualMode(false)),
            vec![Action::PersistManualMode(false)]
        );
    }

    #[test]
    fn entering_manual_mode_is_always_allowed_and_persisted() {
        let mut m = xapi();
        assert_eq!(
            m.handle(Event::ManualMode(true)),
            vec![Action::PersistManualMode(true)]
        );
        assert_eq!(
            m.handle(Event::ManualMode(true)),
            vec![Action::PersistManualMode(true)]
        );
    }

    // ---- standalone ----

    #[test]
    fn standalone_secondary_promotes_only_when_peer_gone_everywhere_and_witness_answers() {
        let mut m = standalone(false);
        m.handle(Event::Witness { reachable: true });
        peer(&mut m, PeerState::Primary);
        // Replication link lost, management still answers: no promotion.
        let a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Unreachable,
        });
        assert!(a.is_empty());
        // Both paths lost but witness down: blocked.
        m.handle(Event::Witness { reachable: false });
        let a = m.handle(Event::Peer {
            path: PeerPath::Management,
            state: PeerState::Unreachable,
        });
        assert!(has_alert(&a, "TWINSAN_PROMOTION_BLOCKED"));
        assert_eq!(m.role(), HostRole::Secondary);
        // Witness answers: promote.
        let a = m.handle(Event::Witness { reachable: true });
        assert_eq!(names(&a), vec!["ProbeVip"]);
        finish_promotion(&mut m);
    }

    #[test]
    fn standalone_without_management_path_uses_replication_only() {
        let mut m = RoleMachine::new(
            RoleConfig {
                source: SourceKind::Standalone,
                management_path: false,
                ..RoleConfig::default()
            },
            false,
        );
        m.handle(Event::Witness { reachable: true });
        let a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Unreachable,
        });
        assert_eq!(names(&a), vec!["ProbeVip"]);
    }

    #[test]
    fn standalone_no_automatic_failback() {
        // The old primary comes back: it stays secondary even if preferred.
        let mut m = standalone(true);
        m.handle(Event::Witness { reachable: true });
        assert!(peer(&mut m, PeerState::Primary).is_empty());
        assert_eq!(m.role(), HostRole::Secondary);
        // And a primary never demotes by itself when the peer returns.
        let mut p = standalone(false);
        p.handle(Event::Witness { reachable: true });
        peer(&mut p, PeerState::Unreachable);
        finish_promotion(&mut p);
        let a = peer(&mut p, PeerState::Secondary);
        assert!(a.is_empty());
        assert_eq!(p.role(), HostRole::Primary);
    }

    #[test]
    fn standalone_preferred_host_starts_primary_when_both_secondary() {
        let mut pref = standalone(true);
        let a = peer(&mut pref, PeerState::Secondary);
        assert_eq!(names(&a), vec!["ProbeVip"]);
        let mut other = standalone(false);
        assert!(peer(&mut other, PeerState::Secondary).is_empty());
    }

    #[test]
    fn standalone_startup_waits_for_peer() {
        let mut m = standalone(true);
        m.handle(Event::Witness { reachable: true });
        assert_eq!(m.role(), HostRole::Secondary);
        let a = m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Unreachable,
        });
        assert!(a.is_empty());
    }

    #[test]
    fn standalone_manual_mode_leave_allowed_unless_two_primaries() {
        let mut m = RoleMachine::new(
            RoleConfig {
                source: SourceKind::Standalone,
                ..RoleConfig::default()
            },
            true,
        );
        peer(&mut m, PeerState::Secondary);
        m.handle(Event::BecomePrimary);
        finish_promotion(&mut m);
        m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Primary,
        });
        assert!(refused(&m.handle(Event::ManualMode(false))));
        m.handle(Event::Peer {
            path: PeerPath::Replication,
            state: PeerState::Secondary,
        });
        m.handle(Event::Peer {
            path: PeerPath::Management,
            state: PeerState::Secondary,
        });
        assert_eq!(
            m.handle(Event::ManualMode(false)),
            vec![Action::PersistManualMode(false)]
        );
    }

    #[test]
    fn as_peer_state_counts_transitions_as_primary() {
        assert_eq!(HostRole::Secondary.as_peer_state(), PeerState::Secondary);
        assert_eq!(HostRole::Promoting.as_peer_state(), PeerState::Primary);
        assert_eq!(HostRole::Demoting.as_peer_state(), PeerState::Primary);
        assert_eq!(HostRole::Primary.as_peer_state(), PeerState::Primary);
    }

    /// Two machines wired together under random event sequences never both reach Primary
    /// while each sees the other (the "never two primaries" invariant with a working link).
    #[test]
    fn never_two_primaries_with_working_link() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut hs = [xapi(), xapi()];
            for _ in 0..60 {
                let i = (next() % 2) as usize;
                let j = 1 - i;
                let ev = match next() % 9 {
                    0 => Event::Source {
                        role: [PoolRole::Master, PoolRole::Slave, PoolRole::Unknown]
                            [(next() % 3) as usize],
                        confirmed: next() % 2 == 0,
                    },
                    1 => Event::ManualMode(next() % 2 == 0),
                    2 => Event::BecomePrimary,
                    3 => Event::BecomeSecondary,
                    4 => Event::VipProbe { in_use: false },
                    5 => Event::PromoteResult {
                        ok: true,
                        detail: String::new(),
                    },
                    6 => Event::DemoteResult {
                        ok: true,
                        detail: String::new(),
                    },
                    _ => Event::Witness {
                        reachable: next() % 2 == 0,
                    },
                };
                hs[i].handle(ev);
                // Heartbeat exchange after every step (a working link).
                for k in 0..2 {
                    let s = hs[1 - k].role().as_peer_state();
                    hs[k].handle(Event::Peer {
                        path: PeerPath::Replication,
                        state: s,
                    });
                    hs[k].handle(Event::Peer {
                        path: PeerPath::Management,
                        state: s,
                    });
                }
                assert!(
                    !(hs[i].role() == HostRole::Primary && hs[j].role() == HostRole::Primary),
                    "two primaries: {:?} / {:?}",
                    hs[0].status(),
                    hs[1].status()
                );
            }
        }
    }
}
