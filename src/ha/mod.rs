//! The HA role loop: wires the `twinsan-ha` crate (role machine, pool.conf / XAPI sources, VIPs,
//! alerts) into the daemon.
//!
//! One task owns the [`RoleMachine`]. It is fed by the role source (pool.conf watcher and, with
//! `[ha.xapi]`, XAPI `event.from`), the peer heartbeats ([`heartbeat`]), the witness prober
//! ([`witness`]) and operator commands, and carries out the machine's actions in order
//! ([`runtime`]). Its state is published for `twinsan status` and the systemd watchdog.

pub mod cli;
pub mod runtime;
pub mod target;

use crate::config::ha::HaConfig;
use crate::config::Config;
use crate::iscsi::context::IscsiContext;
use crate::volumes::Volumes;
use serde_json::json;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use twinsan_ha::role::{HostRole, PeerPath, PeerState, PoolRole, RoleMachine, RoleStatus};
// The role sources live in the ha crate; runtime.rs reaches state_file through this import.
use twinsan_ha::vip::{Vip, VipManager};
use twinsan_ha::{heartbeat, state_file, witness};

/// An operator command for the role loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    ManualModeEnable,
    ManualModeDisable,
    BecomePrimary,
    BecomeSecondary,
}

impl Command {
    /// Parses the control-socket action name.
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "manual-mode-enable" => Command::ManualModeEnable,
            "manual-mode-disable" => Command::ManualModeDisable,
            "become-primary" => Command::BecomePrimary,
            "become-secondary" => Command::BecomeSecondary,
            _ => return None,
        })
    }
}

/// Inputs of the role loop.
#[derive(Debug)]
pub enum Input {
    /// A role-source signal; `signal` is shown in status ("pool.conf: master").
    Source {
        role: PoolRole,
        confirmed: bool,
        signal: String,
    },
    Peer(heartbeat::PeerReport),
    Witness(bool),
    Command(Command, oneshot::Sender<Result<String, String>>),
}

/// Counters shown in status.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub promotions: u64,
    pub demotions: u64,
    pub refusals: u64,
    pub alerts_sent: u64,
    /// Milliseconds the last promotion took (promoting until primary: volumes promoted,
    /// target started, VIP added), this host's part of a switchover's I/O pause.
    pub last_promotion_ms: Option<u64>,
    /// Milliseconds the last demotion took (demoting until secondary).
    pub last_demotion_ms: Option<u64>,
}

/// What the role loop publishes.
#[derive(Debug, Clone)]
pub struct Published {
    pub status: RoleStatus,
    pub last_signal: String,
    pub last_signal_at: Option<Instant>,
    pub counters: Counters,
    pub peer_node: String,
    pub peer_manual: bool,
}

/// Handle on the running role loop (shared with the control socket).
pub struct HaHandle {
    node: String,
    source: String,
    tx: mpsc::Sender<Input>,
    published: Arc<Mutex<Published>>,
    alerts_sent: Arc<AtomicU64>,
    target: Arc<target::TargetControl>,
    vips: Vec<Vip>,
    vip_mgr: Option<Arc<VipManager>>,
    started: Instant,
    /// Milliseconds after `started` at which the role loop last went round.
    loop_alive_ms: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    role_loop: Mutex<Option<JoinHandle<()>>>,
}

fn role_name(r: HostRole) -> &'static str {
    match r {
        HostRole::Primary => "primary",
        HostRole::Secondary => "secondary",
        HostRole::Promoting => "promoting",
        HostRole::Demoting => "demoting",
    }
}

fn peer_name(p: PeerState) -> &'static str {
    match p {
        PeerState::Primary => "primary",
        PeerState::Secondary => "secondary",
        PeerState::Unknown => "unknown",
        PeerState::Unreachable => "unreachable",
    }
}

fn native_name(p: PoolRole) -> &'static str {
    match p {
        PoolRole::Master => "master",
        PoolRole::Slave => "slave",
        PoolRole::Unknown => "unknown",
    }
}

impl HaHandle {
    /// Sends an operator command and waits for its outcome (Ok = done, Err = refused + reason).
    pub async fn command(&self, c: Command) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Command(c, tx))
            .await
            .map_err(|_| "the role loop is not running".to_string())?;
        rx.await
            .map_err(|_| "the role loop stopped before answering".to_string())?
    }

    /// How long ago the role loop last went round.
    pub fn loop_age(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.loop_alive_ms.load(Ordering::Relaxed)))
    }

    /// Current role.
    pub fn role(&self) -> HostRole {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status
            .role
    }

    /// The `ha` object of `twinsan status --json` (see README "High availability").
    pub async fn status_json(&self) -> serde_json::Value {
        let p = self
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut vips = Vec::new();
        for v in &self.vips {
            let local = match &self.vip_mgr {
                Some(m) => m.is_local(v).await.ok(),
                None => None,
            };
            vips.push(json!({
                "address": format!("{}/{}", v.addr, v.prefix_len),
                "interface": v.ifname,
                "local": local,
            }));
        }
        let mut counters = p.counters;
        counters.alerts_sent = self.alerts_sent.load(Ordering::Relaxed);
        json!({
            "node": self.node,
            "source": self.source,
            "role": role_name(p.status.role),
            "manual": p.status.manual,
            "native": native_name(p.status.native),
            "confirmed": p.status.confirmed,
            "last_signal": p.last_signal,
            "last_signal_age_ms": p.last_signal_at.map(|t| t.elapsed().as_millis() as u64),
            "peer_replication": peer_name(p.status.peer_replication),
            "peer_management": peer_name(p.status.peer_management),
            "peer_node": p.peer_node,
            "peer_manual": p.peer_manual,
            "witness": p.status.witness,
            "startup": p.status.startup,
            "blocked": p.status.blocked,
            "target_serving": self.target.serving(),
            "target_expected": p.status.role == HostRole::Primary,
            "vips": vips,
            "counters": counters,
        })
    }

    /// Stops the role loop and leaves the host without VIP and target (volumes are shut down by
    /// the server afterwards). A planned stop: the peer sees our last heartbeat and our VIP gone.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let role_loop = self
            .role_loop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = role_loop {
            let _ = t.await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

/// Human-readable lines for the `ha` object (`twinsan status`).
pub fn render(ha: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |k: &str| match &ha[k] {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ha node {}: {}{} (source {}, native {}{})",
        s("node"),
        s("role").to_uppercase(),
        if ha["manual"] == true {
            ", MANUAL MODE"
        } else {
            ""
        },
        s("source"),
        s("native"),
        if ha["confirmed"] == true {
            ", confirmed by XAPI"
        } else {
            ""
        },
    );
    if ha["last_signal"].as_str().is_some_and(|x| !x.is_empty()) {
        let _ = writeln!(
            o,
            "  last signal: {} ({} ms ago)",
            s("last_signal"),
            s("last_signal_age_ms")
        );
    }
    let _ = writeln!(
        o,
        "  peer {}: replication link {}, management {}, witness {}",
        s("peer_node"),
        s("peer_replication"),
        s("peer_management"),
        match &ha["witness"] {
            serde_json::Value::Bool(true) => "answers",
            serde_json::Value::Bool(false) => "SILENT",
            _ => "-",
        }
    );
    let _ = writeln!(
        o,
        "  target serving: {} (expected {})",
        s("target_serving"),
        s("target_expected")
    );
    if let Some(vips) = ha["vips"].as_array() {
        for v in vips {
            let _ = writeln!(
                o,
                "  vip {} on {}: {}",
                v["address"].as_str().unwrap_or("?"),
                v["interface"].as_str().unwrap_or("?"),
                match &v["local"] {
                    serde_json::Value::Bool(true) => "local",
                    serde_json::Value::Bool(false) => "not local",
                    _ => "unknown",
                }
            );
        }
    }
    if !ha["blocked"].is_null() {
        let _ = writeln!(o, "  blocked: {}", s("blocked"));
    }
    let c = &ha["counters"];
    let _ = writeln!(
        o,
        "  promotions {}, demotions {}, refusals {}, alerts sent {}",
        c["promotions"], c["demotions"], c["refusals"], c["alerts_sent"]
    );
    o
}

pub(crate) fn label_for_source(role: PoolRole, what: &str, detail: Option<&str>) -> String {
    match (role, detail) {
        (PoolRole::Slave, Some(m)) => format!("{what}: slave of {m}"),
        _ => format!("{what}: {}", native_name(role)),
    }
}

/// Starts the role loop and its feeders. Removes VIPs left behind by a crash first.
pub async fn start(
    config: &Config,
    iscsi: Arc<IscsiContext>,
    volumes: Volumes,
) -> anyhow::Result<Arc<HaHandle>> {
    let ha: HaConfig = config.ha.clone().expect("[ha] configured");
    let stop = CancellationToken::new();
    let vips = ha.vip_list();
    let vip_mgr = if vips.is_empty() {
        None
    } else {
        Some(Arc::new(VipManager::new()?))
    };
    if let Some(m) = &vip_mgr {
        for v in &vips {
            match m.cleanup(v).await {
                Ok(gone) if !gone.is_empty() => {
                    warn!(?gone, interface = %v.ifname, "removed VIPs left behind by an earlier run")
                }
                Ok(_) => {}
                Err(e) => {
                    error!(vip = %v.addr, interface = %v.ifname, "VIP start-up cleanup failed: {e}")
                }
            }
        }
    }
    let state_path = ha.state_file_path(&config.server.data_dir);
    let persisted = state_file::load(&state_path)?;
    let manual = persisted.manual || ha.source == "manual";
    if ha.source == "standalone" && ha.witnesses.is_empty() {
        warn!("standalone pair without witnesses: this host never promotes when the peer is lost");
    }
    let machine = RoleMachine::new(ha.role_config(), manual);
    let published = Arc::new(Mutex::new(Published {
        status: machine.status(),
        last_signal: String::new(),
        last_signal_at: None,
        counters: Counters::default(),
        peer_node: String::new(),
        peer_manual: false,
    }));
    let (tx, rx) = mpsc::channel::<Input>(256);
    let (local_tx, local_rx) = watch::channel(heartbeat::LocalBeat {
        state: machine.role().as_peer_state(),
        manual,
    });
    let scsi_targets: Vec<_> = iscsi
        .targets
        .values()
        .map(|t| (t.iqn.clone(), t.scsi.clone()))
        .collect();
    let target = Arc::new(target::TargetControl::new(iscsi));
    let alerts_sent = Arc::new(AtomicU64::new(0));
    let alerter = runtime::build_alerter(&ha);
    alerter.set_manual(manual);
    // A LUN crossing its thin provisioning soft threshold is an alert too (warning).
    for (iqn, scsi) in scsi_targets {
        let (alerter, sent) = (alerter.clone(), alerts_sent.clone());
        scsi.set_thin_alert(Box::new(move |_lun, text| {
            let alert = twinsan_ha::alerts::Alert::new(
                twinsan_ha::alerts::Severity::Warning,
                "TWINSAN_THIN_THRESHOLD",
                format!("target {iqn}, {text}"),
            );
            let (alerter, sent) = (alerter.clone(), sent.clone());
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    if alerter.raise(&alert).await.decision == twinsan_ha::alerts::Decision::Send {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }));
    }
    let mut tasks = Vec::new();

    // Heartbeats: one task per path.
    let secret = Arc::new(ha.secret.as_bytes().to_vec());
    let boot_id: u64 = rand::random();
    let seq = Arc::new(AtomicU64::new(0));
    let mut paths = vec![(PeerPath::Replication, ha.listen.clone(), ha.peer.clone())];
    if let (Some(l), Some(p)) = (&ha.management_listen, &ha.management_peer) {
        paths.push((PeerPath::Management, l.clone(), p.clone()));
    }
    let (peer_tx, mut peer_rx) = mpsc::channel(64);
    for (path, listen, peer) in paths {
        let cfg = heartbeat::PathConfig {
            path,
            listen: listen.parse()?,
            peer: peer.parse()?,
            interval: Duration::from_millis(ha.heartbeat_interval_ms),
            timeout: Duration::from_millis(ha.peer_timeout_ms),
            node: ha.node.clone(),
            secret: secret.clone(),
            boot_id,
            seq: seq.clone(),
        };
        tasks.push(tokio::spawn(heartbeat::run_path(
            cfg,
            local_rx.clone(),
            peer_tx.clone(),
            stop.clone(),
        )));
    }
    drop(peer_tx);
    {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(r) = peer_rx.recv().await {
                if tx.send(Input::Peer(r)).await.is_err() {
                    return;
                }
            }
        }));
    }

    // Witnesses.
    let witnesses: Vec<IpAddr> = ha.witnesses.iter().filter_map(|w| w.parse().ok()).collect();
    if !witnesses.is_empty() {
        let (wtx, mut wrx) = mpsc::channel(8);
        tasks.push(tokio::spawn(witness::run(
            witnesses,
            ha.witness_port,
            Duration::from_millis(ha.witness_interval_ms),
            Duration::from_millis(ha.witness_timeout_ms),
            wtx,
            stop.clone(),
        )));
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(up) = wrx.recv().await {
                if tx.send(Input::Witness(up)).await.is_err() {
                    return;
                }
            }
        }));
    }

    // Role source.
    if ha.source == "xapi" {
        tasks.push(tokio::spawn(runtime::watch_pool_conf(
            ha.pool_conf.clone(),
            tx.clone(),
            stop.clone(),
        )));
        if let Some(x) = &ha.xapi {
            match runtime::xapi_feeds(&ha, x, tx.clone(), alerter.clone(), stop.clone()) {
                Ok(t) => tasks.extend(t),
                Err(e) => error!("[ha.xapi] not used: {e:#}; following pool.conf only"),
            }
        }
    }

    let loop_alive_ms = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handle = Arc::new(HaHandle {
        node: ha.node.clone(),
        source: ha.source.clone(),
        tx,
        published: published.clone(),
        alerts_sent: alerts_sent.clone(),
        target: target.clone(),
        vips: vips.clone(),
        vip_mgr: vip_mgr.clone(),
        started,
        loop_alive_ms: loop_alive_ms.clone(),
        stop: stop.clone(),
        tasks: Mutex::new(tasks),
        role_loop: Mutex::new(None),
    });
    let peer_wait = config
        .targets
        .iter()
        .flat_map(|t| t.luns.iter())
        .filter_map(|l| l.replication.as_ref())
        .map(|r| Duration::from_secs(r.timeout_secs.saturating_add(1)))
        .max()
        .unwrap_or(Duration::from_secs(1));
    let rt = runtime::Runtime {
        machine,
        ha: ha.clone(),
        volumes,
        target,
        vips,
        vip_mgr,
        alerter,
        alerts_sent,
        local_tx,
        published,
        state_path,
        announcing: None,
        keeping: None,
        counters: Counters::default(),
        transition_started: None,
        peer_wait,
        started,
        loop_alive_ms,
        replug: runtime::replug_setup(&ha, config.targets.iter().map(|t| t.iqn.clone()).collect()),
        replugging: None,
    };
    let role_loop = tokio::spawn(rt.run(rx, stop));
    *handle.role_loop.lock().unwrap_or_else(|e| e.into_inner()) = Some(role_loop);
    info!(node = %ha.node, source = %ha.source, manual, "HA role loop started");
    Ok(handle)
}
