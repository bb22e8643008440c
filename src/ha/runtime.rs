//! The role loop proper: owns the [`RoleMachine`], feeds it events and carries out its actions
//! in order, reporting results back as events (VIP probe, volume promotion and demotion).
//!
//! Events produced by actions are handled before the loop waits again, but inputs that arrived
//! meanwhile (a peer turning primary, say) are handled first, so the machine's last check before
//! each promotion step sees them. An operator command is answered once the chain of events it
//! started has finished (`become-primary` answers when this host is primary, or why not).

use super::{label_for_source, Command, Counters, Input, Published};
use crate::config::ha::{parse_xapi_url, HaConfig, HaXapiConfig};
use crate::volumes::Volumes;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use twinsan_ha::alerts::{
    Alert, AlertFilter, Alerter, Decision, Severity, SmtpConfig, SmtpTls, XapiSink,
};
use twinsan_ha::heartbeat::LocalBeat;
use twinsan_ha::poolconf::PoolConfWatcher;
use twinsan_ha::replug::{Outcome, ReplugConfig};
use twinsan_ha::role::{Action, Event, HostRole, PeerState, RoleMachine};
use twinsan_ha::vip::{Vip, VipManager};
use twinsan_ha::xapi::{self, XapiClient, XapiError};
use twinsan_replication::volume::ReplicationError;

pub(super) struct Runtime {
    pub machine: RoleMachine,
    pub ha: HaConfig,
    pub volumes: Volumes,
    pub target: Arc<super::target::TargetControl>,
    pub vips: Vec<Vip>,
    pub vip_mgr: Option<Arc<VipManager>>,
    pub alerter: Arc<Alerter>,
    pub alerts_sent: Arc<AtomicU64>,
    pub local_tx: watch::Sender<LocalBeat>,
    pub published: Arc<Mutex<Published>>,
    pub state_path: PathBuf,
    /// Cancels the gratuitous-ARP sender still running after a promotion.
    pub announcing: Option<CancellationToken>,
    /// Cancels the task refreshing the VIPs' lifetime while primary.
    pub keeping: Option<CancellationToken>,
    pub counters: Counters,
    /// When the current promotion or demotion began (for `last_promotion_ms` /
    /// `last_demotion_ms`).
    pub transition_started: Option<Instant>,
    /// How long a promotion waits for replication to notice that a silent peer is gone.
    pub peer_wait: Duration,
    pub started: Instant,
    pub loop_alive_ms: Arc<AtomicU64>,
    /// PBD replug settings (`[ha] replug_pbds` with `[ha.xapi]`).
    pub replug: Option<Replug>,
    /// Cancels the PBD replug of the current time as primary; set while primary and serving,
    /// so that it runs once per promotion.
    pub replugging: Option<CancellationToken>,
}

/// What the PBD replug needs: where XAPI is and the replug settings.
pub(super) struct Replug {
    pub client: XapiClient,
    pub cfg: ReplugConfig,
}

/// Deadline of one `PBD.plug`: attaching an SR logs in to the target and scans its LUNs.
const PLUG_TIMEOUT: Duration = Duration::from_secs(120);

/// The PBD replug settings when `[ha] replug_pbds` and `[ha.xapi]` are set; the IQNs are those
/// of every configured target.
pub(super) fn replug_setup(ha: &HaConfig, iqns: Vec<String>) -> Option<Replug> {
    if !ha.replug_enabled() {
        return None;
    }
    let x = ha.xapi.as_ref()?;
    let endpoint = match parse_xapi_url(&x.url, &x.fingerprint) {
        Ok(e) => e,
        Err(e) => {
            error!("[ha.xapi] url: {e}; no PBD replug");
            return None;
        }
    };
    let (attempts, first_backoff) = ha.replug_schedule();
    Some(Replug {
        client: XapiClient::new(endpoint, Duration::from_millis(x.timeout_ms)),
        cfg: ReplugConfig {
            user: x.user.clone(),
            password: x.password.clone(),
            our_iqns: iqns,
            attempts,
            first_backoff,
            plug_timeout: PLUG_TIMEOUT,
        },
    })
}

/// The operator command whose answer waits for the end of its chain of events.
struct Pending {
    reply: oneshot::Sender<Result<String, String>>,
    refusals: Vec<String>,
}

impl Runtime {
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>, stop: CancellationToken) {
        let mut follow_ups: VecDeque<Event> = VecDeque::new();
        let mut deferred: VecDeque<(Command, oneshot::Sender<Result<String, String>>)> =
            VecDeque::new();
        let mut pending: Option<Pending> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish();
        loop {
            self.alive();
            // Inputs that are already there go first (the machine must know about a primary
            // peer before the next promotion step).
            while let Ok(input) = rx.try_recv() {
                match input {
                    Input::Command(c, reply) => deferred.push_back((c, reply)),
                    other => self.input(other, &mut follow_ups, &mut pending).await,
                }
            }
            if let Some(ev) = follow_ups.pop_front() {
                self.event(ev, &mut follow_ups, &mut pending).await;
                continue;
            }
            if let Some(p) = pending.take() {
                let answer = if p.refusals.is_empty() {
                    Ok(self.summary())
                } else {
                    Err(p.refusals.join("; "))
                };
                let _ = p.reply.send(answer);
            }
            if let Some((c, reply)) = deferred.pop_front() {
                self.command(c, reply, &mut follow_ups, &mut pending).await;
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.fencing_check(),
                input = rx.recv() => match input {
                    Some(Input::Command(c, reply)) => deferred.push_back((c, reply)),
                    Some(other) => self.input(other, &mut follow_ups, &mut pending).await,
                    None => break,
                },
            }
        }
        self.teardown().await;
    }

    /// Fencing hook (`fencing = "suspend-io"`): replication freezes writes when it loses the
    /// peer, because the peer might be promoting. When the heartbeats show the peer is alive and
    /// secondary on some path, it is not, and the writes resume. A peer silent on every path
    /// keeps the volume frozen (it may have promoted itself): an operator decides, with
    /// `twinsan replication resume-io` (as DRBD's fence-peer handler would).
    fn fencing_check(&self) {
        let s = self.machine.status();
        let peer_secondary = s.peer_replication == PeerState::Secondary
            || (self.ha.management_listen.is_some() && s.peer_management == PeerState::Secondary);
        if s.role != HostRole::Primary || !peer_secondary {
            return;
        }
        for v in &self.volumes {
            if v.status().suspended {
                warn!(
                    volume = v.name(),
                    "replication lost the peer but the heartbeats show it secondary: resuming I/O"
                );
                v.resume_io();
                let alert = twinsan_ha::alerts::Alert::new(
                    twinsan_ha::alerts::Severity::Warning,
                    "TWINSAN_IO_RESUMED",
                    format!(
                        "volume {}: replication link lost; the peer is secondary (heartbeats): I/O resumed without replication",
                        v.name()
                    ),
                );
                let alerter = self.alerter.clone();
                let sent = self.alerts_sent.clone();
                tokio::spawn(async move {
                    if alerter.raise(&alert).await.decision == twinsan_ha::alerts::Decision::Send {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }

    fn alive(&self) {
        self.loop_alive_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        let s = self.machine.status();
        format!(
            "role {}, manual mode {}",
            super::role_name(s.role),
            if s.manual { "on" } else { "off" }
        )
    }

    async fn input(
        &mut self,
        input: Input,
        follow_ups: &mut VecDeque<Event>,
        pending: &mut Option<Pending>,
    ) {
        let ev = match input {
            Input::Source {
                role,
                confirmed,
                signal,
            } => {
                {
                    let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
                    p.last_signal = signal;
                    p.last_signal_at = Some(Instant::now());
                }
                Event::Source { role, confirmed }
            }
            Input::Peer(r) => {
                {
                    let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
                    if !r.node.is_empty() {
                        p.peer_node = r.node.clone();
                    }
                    p.peer_manual = r.manual;
                }
                Event::Peer {
                    path: r.path,
                    state: r.state,
                }
            }
            Input::Witness(up) => Event::Witness { reachable: up },
            Input::Command(..) => unreachable!("commands are deferred by the caller"),
        };
        self.event(ev, follow_ups, pending).await;
    }

    async fn command(
        &mut self,
        c: Command,
        reply: oneshot::Sender<Result<String, String>>,
        follow_ups: &mut VecDeque<Event>,
        pending: &mut Option<Pending>,
    ) {
        info!(command = ?c, "operator command");
        if c == Command::ManualModeDisable && self.ha.source == "manual" {
            self.counters.refusals += 1;
            let _ = reply.send(Err(
                "source = \"manual\": roles change only by command; manual mode cannot be left"
                    .into(),
            ));
            return;
        }
        *pending = Some(Pending {
            reply,
            refusals: Vec::new(),
        });
        let ev = match c {
            Command::ManualModeEnable => Event::ManualMode(true),
            Command::ManualModeDisable => Event::ManualMode(false),
            Command::BecomePrimary => Event::BecomePrimary,
            Command::BecomeSecondary => Event::BecomeSecondary,
        };
        self.event(ev, follow_ups, pending).await;
    }

    /// Feeds one event to the machine and carries out the resulting actions.
    async fn event(
        &mut self,
        ev: Event,
        follow_ups: &mut VecDeque<Event>,
        pending: &mut Option<Pending>,
    ) {
        debug!(?ev, "role event");
        let actions = self.machine.handle(ev);
        // Tell the peer at once when we leave Secondary (before any promotion step runs) or
        // settle again.
        self.publish();
        let mut step_failed = false;
        for a in actions {
            if step_failed
                && matches!(
                    a,
                    Action::StartTarget | Action::AddVip | Action::SendGratuitousArp { .. }
                )
            {
                continue;
            }
            if let Some(ev) = self.execute(a, pending).await {
                step_failed |= matches!(ev, Event::PromoteStepFailed { .. });
                follow_ups.push_back(ev);
            }
        }
        self.publish();
        self.follow_replug();
    }

    /// Starts the PBD replug when this host has become primary and serves, and stops it when
    /// it no longer does (plugging an SR is pointless while its target moves away).
    fn follow_replug(&mut self) {
        let serving = self.machine.role() == HostRole::Primary && self.target.serving();
        match (serving, self.replugging.is_some()) {
            (true, false) => {
                let Some(r) = &self.replug else { return };
                let stop = CancellationToken::new();
                self.replugging = Some(stop.clone());
                info!("serving: checking for unplugged PBDs of our iSCSI SRs");
                tokio::spawn(replug(
                    r.client.clone(),
                    r.cfg.clone(),
                    self.alerter.clone(),
                    self.alerts_sent.clone(),
                    stop,
                ));
            }
            (false, true) => {
                if let Some(t) = self.replugging.take() {
                    t.cancel();
                }
            }
            _ => {}
        }
    }

    /// Publishes status and the heartbeat content (senders wake at once on a change).
    fn publish(&mut self) {
        let status = self.machine.status();
        let role = status.role;
        let beat = LocalBeat {
            state: role.as_peer_state(),
            manual: status.manual,
        };
        self.local_tx.send_if_modified(|b| {
            let changed = *b != beat;
            *b = beat;
            changed
        });
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if p.status.role != role {
            info!(from = ?p.status.role, to = ?role, "role changed");
            let took_ms = self
                .transition_started
                .take()
                .map(|t| t.elapsed().as_millis() as u64);
            match role {
                HostRole::Primary => {
                    self.counters.promotions += 1;
                    if p.status.role == HostRole::Promoting {
                        self.counters.last_promotion_ms = took_ms;
                    }
                }
                HostRole::Secondary if p.status.role == HostRole::Demoting => {
                    self.counters.demotions += 1;
                    self.counters.last_demotion_ms = took_ms;
                }
                HostRole::Promoting | HostRole::Demoting => {
                    self.transition_started = Some(Instant::now());
                }
                _ => {}
            }
            crate::sdnotify::notify(&format!(
                "STATUS=HA {}: {}{}",
                self.ha.node,
                super::role_name(role),
                if status.manual { " (manual mode)" } else { "" }
            ));
        }
        p.status = status;
        p.counters = self.counters;
    }

    async fn execute(&mut self, a: Action, pending: &mut Option<Pending>) -> Option<Event> {
        match a {
            Action::ProbeVip => Some(Event::VipProbe {
                in_use: self.probe_vips().await,
            }),
            Action::PromoteVolumes => {
                let (ok, detail) = self.promote_volumes().await;
                Some(Event::PromoteResult { ok, detail })
            }
            Action::StartTarget => match self.target.start().await {
                Ok(()) => None,
                Err(e) => {
                    error!("cannot start the target: {e:#}");
                    Some(Event::PromoteStepFailed {
                        detail: format!("{e:#}"),
                    })
                }
            },
            Action::AddVip => {
                let m = self.vip_mgr.clone()?;
                let lifetime = self.ha.vip_lifetime();
                for v in &self.vips {
                    if let Err(e) = m.add_for(v, lifetime).await {
                        error!(vip = %v.addr, interface = %v.ifname, "cannot add the VIP: {e}");
                        return Some(Event::PromoteStepFailed {
                            detail: format!("adding VIP {}: {e}", v.addr),
                        });
                    }
                    info!(vip = %v.addr, interface = %v.ifname, ?lifetime, "VIP added");
                }
                if let Some(l) = lifetime {
                    let stop = CancellationToken::new();
                    if let Some(old) = self.keeping.replace(stop.clone()) {
                        old.cancel();
                    }
                    tokio::spawn(keep_vips(m, self.vips.clone(), l, stop));
                }
                None
            }
            Action::SendGratuitousArp { count, interval } => {
                // Announcing takes count x interval: run it beside the loop; a demotion stops it.
                let stop = CancellationToken::new();
                if let Some(old) = self.announcing.replace(stop.clone()) {
                    old.cancel();
                }
                for v in self.vips.clone() {
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            r = twinsan_ha::vip::announce(&v, count, interval) => if let Err(e) = r {
                                warn!(vip = %v.addr, "gratuitous ARP / NA failed: {e}");
                            }
                        }
                    });
                }
                None
            }
            Action::RemoveVip => {
                self.remove_vips().await;
                None
            }
            Action::DrainTarget => {
                self.target
                    .drain(Duration::from_millis(self.ha.drain_timeout_ms))
                    .await;
                None
            }
            Action::StopTarget => {
                self.target.stop().await;
                None
            }
            Action::DemoteVolumes => {
                let mut errors = Vec::new();
                for v in &self.volumes {
                    if let Err(e) = v.demote().await {
                        error!(volume = v.name(), "demotion failed: {e}");
                        errors.push(format!("{}: {e}", v.name()));
                    }
                }
                Some(Event::DemoteResult {
                    ok: errors.is_empty(),
                    detail: errors.join("; "),
                })
            }
            Action::PersistManualMode(on) => {
                self.alerter.set_manual(on);
                let st = super::state_file::HaState { manual: on };
                if let Err(e) = super::state_file::store(&self.state_path, &st) {
                    error!(file = %self.state_path.display(), "cannot persist manual mode: {e:#}");
                }
                None
            }
            Action::Alert(alert) => {
                let alerter = self.alerter.clone();
                let sent = self.alerts_sent.clone();
                tokio::spawn(async move {
                    let d = alerter.raise(&alert).await;
                    if d.decision == twinsan_ha::alerts::Decision::Send {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
                None
            }
            Action::Refuse { reason } => {
                warn!(%reason, "refused");
                self.counters.refusals += 1;
                if let Some(p) = pending.as_mut() {
                    p.refusals.push(reason);
                }
                None
            }
        }
    }

    /// RFC 5227 duplicate detection for every VIP at once. RFC 5227 §2.1.1 probes three times
    /// 1-2 s apart; we send `vip_probe_count` probes `vip_probe_wait_ms` apart (default 2 x
    /// 100 ms) because the peer was already asked over the heartbeat paths and a long probe
    /// would add directly to the I/O pause of every switchover. A probe that cannot be sent
    /// counts as "in use": no promotion on a guess.
    ///
    /// When the peer is silent on every path, an answering VIP is most likely the address a
    /// killed daemon left on the peer's interface: it expires after `vip_lifetime_secs`, so the
    /// probe is repeated until then before giving up.
    async fn probe_vips(&self) -> bool {
        let deadline = match self.ha.vip_lifetime() {
            Some(l) if self.peer_unreachable_everywhere() => {
                Instant::now() + l + Duration::from_secs(1)
            }
            _ => Instant::now(),
        };
        let mut logged = false;
        loop {
            if !self.probe_vips_once().await {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
            if !logged {
                info!("the VIP still answers while the peer is silent: waiting for its lifetime to end");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn probe_vips_once(&self) -> bool {
        let wait = Duration::from_millis(self.ha.vip_probe_wait_ms);
        let count = self.ha.vip_probe_count;
        let results = futures::future::join_all(self.vips.iter().map(|v| async move {
            for _ in 0..count {
                match twinsan_ha::vip::probe(v, wait).await {
                    Ok(false) => {}
                    Ok(true) => return true,
                    Err(e) => {
                        error!(vip = %v.addr, interface = %v.ifname, "VIP probe failed: {e}");
                        return true;
                    }
                }
            }
            false
        }))
        .await;
        results.into_iter().any(|x| x)
    }

    fn peer_unreachable_everywhere(&self) -> bool {
        let s = self.machine.status();
        s.peer_replication == PeerState::Unreachable
            && (self.ha.management_listen.is_none() || s.peer_management == PeerState::Unreachable)
    }

    fn peer_not_primary(&self) -> bool {
        let s = self.machine.status();
        let mgmt = self.ha.management_listen.is_some();
        s.peer_replication != PeerState::Primary
            && !(mgmt && s.peer_management == PeerState::Primary)
    }

    /// Promotes every replicated volume; on a failure the ones already promoted go back.
    /// Replication refuses while it still believes the peer is primary: when the heartbeats
    /// say otherwise (the peer demoted, or is silent), it is given `peer_wait` to notice.
    async fn promote_volumes(&self) -> (bool, String) {
        let mut done = Vec::new();
        let mut failure = None;
        for v in &self.volumes {
            let deadline = Instant::now() + self.peer_wait;
            let mut waited = false;
            loop {
                match v.promote(false).await {
                    Ok(()) => {
                        done.push(v.clone());
                        break;
                    }
                    Err(ReplicationError::PeerIsPrimary)
                        if self.peer_not_primary() && Instant::now() < deadline =>
                    {
                        if !waited {
                            info!(
                                volume = v.name(),
                                "replication still sees the peer primary; waiting for it to notice"
                            );
                            waited = true;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        failure = Some(format!("{}: {e}", v.name()));
                        break;
                    }
                }
            }
            if failure.is_some() {
                break;
            }
        }
        match failure {
            None => (true, String::new()),
            Some(f) => {
                for v in done {
                    if let Err(e) = v.demote().await {
                        error!(volume = v.name(), "rollback demotion failed: {e}");
                    }
                }
                (false, f)
            }
        }
    }

    /// Planned stop: portals and sessions go (while the VIP is still here, so initiators see
    /// the connections close), then the VIP; the volumes are shut down by the server.
    async fn teardown(&mut self) {
        info!("HA role loop stopping: stopping the target and removing the VIP");
        if let Some(t) = self.replugging.take() {
            t.cancel();
        }
        if let Some(a) = self.announcing.take() {
            a.cancel();
        }
        self.target
            .drain(Duration::from_millis(self.ha.drain_timeout_ms))
            .await;
        self.target.stop().await;
        self.remove_vips().await;
    }

    /// Stops announcing and refreshing the VIPs, then removes them from the interface.
    async fn remove_vips(&mut self) {
        if let Some(a) = self.announcing.take() {
            a.cancel();
        }
        if let Some(k) = self.keeping.take() {
            k.cancel();
        }
        if let Some(m) = self.vip_mgr.clone() {
            for v in &self.vips {
                if let Err(e) = m.remove(v).await {
                    error!(vip = %v.addr, "cannot remove the VIP: {e}");
                }
            }
        }
    }
}

/// Runs one PBD replug until it ends or `stop`, and reports how it ended: a give-up raises an
/// alert naming every PBD left unplugged.
async fn replug(
    client: XapiClient,
    cfg: ReplugConfig,
    alerter: Arc<Alerter>,
    sent: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let outcome = tokio::select! {
        _ = stop.cancelled() => {
            debug!("PBD replug stopped: no longer serving");
            return;
        }
        o = twinsan_ha::replug::run(client, cfg) => o,
    };
    let alert = match outcome {
        Outcome::Done { plugged, host_down } => {
            if plugged.is_empty() && host_down.is_empty() {
                info!("PBD replug: every PBD of our iSCSI SRs is attached");
            } else {
                info!(
                    plugged = plugged.len(),
                    host_down = host_down.len(),
                    "PBD replug done"
                );
            }
            return;
        }
        Outcome::MasterUnreachable { master, error } => {
            info!(%master, %error, "PBD replug: this pool slave cannot reach its master; not replugging");
            return;
        }
        Outcome::GaveUp {
            attempts,
            plugged,
            failed,
            error,
        } => {
            const SHOWN: usize = 10;
            let mut parts: Vec<String> = failed
                .iter()
                .take(SHOWN)
                .map(|(r, e)| {
                    format!(
                        "SR {} ({}) PBD {} on host {}: {e}",
                        r.target.sr_name, r.target.sr_uuid, r.target.pbd_uuid, r.host_uuid
                    )
                })
                .collect();
            if failed.len() > SHOWN {
                parts.push(format!("and {} more", failed.len() - SHOWN));
            }
            if let Some(e) = &error {
                parts.push(format!("XAPI: {e}"));
            }
            let text = format!(
                "gave up plugging the PBDs of iSCSI SRs served here after {attempts} attempts \
                 ({} plugged, {} not): {}",
                plugged.len(),
                failed.len(),
                parts.join("; ")
            );
            error!("{text}");
            Alert::new(Severity::Warning, "TWINSAN_PBD_PLUG_FAILED", text)
        }
    };
    if alerter.raise(&alert).await.decision == Decision::Send {
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Refreshes the VIPs' lifetime every second (at most a third of it) until `stop`.
async fn keep_vips(
    m: Arc<VipManager>,
    vips: Vec<Vip>,
    lifetime: Duration,
    stop: CancellationToken,
) {
    let period = (lifetime / 3).min(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        for v in &vips {
            if let Err(e) = m.add_for(v, Some(lifetime)).await {
                warn!(vip = %v.addr, "cannot refresh the VIP's lifetime: {e}");
            }
        }
    }
}

/// The alert dispatcher configured by `[ha.alerts]` (without it: log only, default quiet
/// periods).
pub(super) fn build_alerter(ha: &HaConfig) -> Arc<Alerter> {
    let a = ha.alerts.clone();
    let (window, grace) = a
        .as_ref()
        .map(|a| (a.suppress_minutes.saturating_mul(60), a.startup_quiet_secs))
        .unwrap_or((30 * 60, 60));
    let filter = AlertFilter::new(
        Duration::from_secs(window),
        Duration::from_secs(grace),
        std::time::Instant::now(),
    );
    let smtp = a.filter(|a| !a.smtp_server.is_empty()).map(|a| SmtpConfig {
        server: a.smtp_server,
        port: a.smtp_port,
        tls: match a.smtp_tls.as_str() {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Implicit,
            _ => SmtpTls::None,
        },
        verify_cert: a.smtp_verify_cert,
        user: (!a.smtp_user.is_empty()).then_some(a.smtp_user),
        password: (!a.smtp_password.is_empty()).then_some(a.smtp_password),
        from: a.from,
        to: a.to,
        subject_prefix: a.subject,
        helo_name: ha.node.clone(),
        timeout: Duration::from_secs(30),
    });
    Alerter::new(filter, smtp, ha.node.clone())
}

/// Feeds pool.conf values (inotify, immediate) to the role loop.
pub(super) async fn watch_pool_conf(
    path: PathBuf,
    tx: mpsc::Sender<Input>,
    stop: CancellationToken,
) {
    let mut watcher = loop {
        match PoolConfWatcher::new(&path) {
            Ok(w) => break w,
            Err(e) => {
                error!(path = %path.display(), "cannot watch pool.conf: {e}; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    loop {
        let v = tokio::select! {
            _ = stop.cancelled() => return,
            v = watcher.next() => v,
        };
        let role = v.role();
        let detail = match &v {
            twinsan_ha::poolconf::PoolConf::Slave(m) => Some(m.as_str()),
            _ => None,
        };
        let signal = match (&v, role) {
            (twinsan_ha::poolconf::PoolConf::Broken, _) => "pool.conf: broken".to_string(),
            (twinsan_ha::poolconf::PoolConf::Unknown(t), _) => {
                format!("pool.conf: unreadable ({t})")
            }
            _ => label_for_source(role, "pool.conf", detail),
        };
        let input = Input::Source {
            role,
            confirmed: false,
            signal,
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

fn host_uuid(x: &HaXapiConfig) -> anyhow::Result<String> {
    if !x.host_uuid.is_empty() {
        return Ok(x.host_uuid.clone());
    }
    let text = std::fs::read_to_string(&x.inventory)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", x.inventory.display()))?;
    xapi::inventory_host_uuid(&text).ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no INSTALLATION_UUID (set ha.xapi.host_uuid)",
            x.inventory.display()
        )
    })
}

/// XAPI feeds: `event.from` on the pool (confirmed master signals) and, for XenCenter alerts,
/// a session for `message.create` (at the pool master: a slave's xapi refuses with
/// HOST_IS_SLAVE).
pub(super) fn xapi_feeds(
    ha: &HaConfig,
    x: &HaXapiConfig,
    tx: mpsc::Sender<Input>,
    alerter: Arc<Alerter>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let endpoint = parse_xapi_url(&x.url, &x.fingerprint).map_err(anyhow::Error::msg)?;
    let uuid = host_uuid(x)?;
    let timeout = Duration::from_millis(x.timeout_ms);
    let client = XapiClient::new(endpoint.clone(), timeout);
    let cfg = xapi::WatchConfig {
        user: x.user.clone(),
        password: x.password.clone(),
        host_uuid: uuid.clone(),
        event_timeout: x.event_timeout_secs as f64,
        retry: Duration::from_secs(1),
    };
    let mut tasks = Vec::new();
    let (stx, mut srx) = mpsc::channel(8);
    tasks.push(tokio::spawn(xapi::watch_master(client.clone(), cfg, stx)));
    {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let sig = tokio::select! {
                    _ = stop.cancelled() => return,
                    s = srx.recv() => match s { Some(s) => s, None => return },
                };
                let input = Input::Source {
                    role: sig.role,
                    confirmed: true,
                    signal: label_for_source(sig.role, "xapi", sig.master_address.as_deref()),
                };
                if tx.send(input).await.is_err() {
                    return;
                }
            }
        }));
    }
    let xencenter = ha.alerts.as_ref().is_none_or(|a| a.xencenter);
    if xencenter {
        let (user, password) = (x.user.clone(), x.password.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let session = match client.login(&user, &password).await {
                    Ok(s) => Some((client.clone(), s)),
                    Err(XapiError::HostIsSlave { master }) => {
                        let mut ep = client.endpoint().clone();
                        ep.host = master;
                        let remote = XapiClient::new(ep, timeout);
                        remote
                            .login(&user, &password)
                            .await
                            .ok()
                            .map(|s| (remote, s))
                    }
                    Err(e) => {
                        debug!("XAPI login for XenCenter messages failed: {e}");
                        None
                    }
                };
                alerter
                    .set_xapi(session.map(|(client, session)| XapiSink {
                        client,
                        session,
                        host_uuid: uuid.clone(),
                    }))
                    .await;
                // Sessions expire and masters change: renew now and then.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }));
    }
    Ok(tasks)
}
