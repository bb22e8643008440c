//! The iSCSI server: builds targets and LUNs from the configuration, listens on every portal
//! and hands each accepted connection to [`crate::iscsi::connection`]; serves the control
//! socket.

use crate::config::{Config, Credentials, LunConfig, TargetConfig};
use crate::control::ControlContext;
use crate::ha::HaHandle;
use crate::identity::IdentityStore;
use crate::iscsi::budget::MemoryBudget;
use crate::iscsi::chap::ChapCredentials;
use crate::iscsi::context::{ConnectionTimers, IscsiContext, ResourceLimits};
use crate::iscsi::listener::{self, accept_loop};
use crate::iscsi::login::{LoginConfig, TargetAuth};
use crate::iscsi::negotiation::{Digest, TargetLimits};
use crate::iscsi::session::{SessionLimits, SessionRegistry, TargetEntry};
use crate::scsi::thin::ThinThreshold;
use crate::scsi::{LunSettings, ScsiTarget};
use crate::store::{choose_engine, open_file_store, BlockStore, EngineChoice, FileStoreOptions};
use crate::volumes::Volumes;
use anyhow::Context;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The daemon's iSCSI side, volumes and control socket, built from the configuration. Each
/// part gets only its own context: connections the [`IscsiContext`], the HA loop that and
/// the [`Volumes`], the control socket the [`ControlContext`].
pub struct Server {
    iscsi: Arc<IscsiContext>,
    volumes: Volumes,
    control: Arc<ControlContext>,
    listeners: Vec<TcpListener>,
    control_socket: std::path::PathBuf,
    /// The Prometheus endpoint's socket (`server.metrics_listen`), bound at start.
    metrics: Option<TcpListener>,
}

impl Server {
    /// Opens every LUN's store, resolves identities and binds every portal.
    pub async fn build(config: &Config) -> anyhow::Result<Server> {
        let data_dir = &config.server.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let mut identities = IdentityStore::open(data_dir)?;
        let engine = choose_engine(config.server.io_engine, config.server.io_threads)?;
        info!(
            engine = engine.engine.as_str(),
            setting = engine.setting.as_str(),
            "I/O engine {} ({})",
            engine.engine.as_str(),
            engine.reason
        );
        let mut targets = HashMap::new();
        let mut volumes = Vec::new();
        for t in &config.targets {
            let mut luns = Vec::new();
            let mut replicated = Vec::new();
            for l in &t.luns {
                let mut store = open_store(l, &engine)?;
                if l.replication.is_some() {
                    // With [ha] the role loop promotes; every volume starts secondary.
                    let volume = crate::volumes::open(l, store, config.ha.is_some()).await?;
                    info!(target = %t.iqn, lun = l.number, volume = volume.name(),
                        usable = volume.size(), "replicated volume open");
                    store = volume.store();
                    replicated.push((l.number, volume.clone()));
                    volumes.push(volume);
                }
                let mut identity = identities.resolve(t, l)?;
                if let Some(groups) = alua_groups(t, l) {
                    // ALUA: this host's target port is the one of its group (SPC-4 5.16).
                    identity.port_group = Some(groups.own);
                    identity.relative_port = groups.own;
                }
                info!(target = %t.iqn, lun = l.number, store = %store.describe(),
                    naa = %hex::encode(&identity.naa), serial = %identity.serial, "LUN ready");
                let settings = LunSettings {
                    block_size: l.block_size,
                    // Unset: the logical block size (exponent 0), what twinsan always
                    // reported, so existing initiators see no change; `physical_block_size =
                    // 4096` makes a 512-byte LUN 512e. Configured rather than probed, so both
                    // hosts of a pair answer READ CAPACITY(16) alike.
                    physical_block_size: l
                        .physical_block_size
                        .unwrap_or(l.block_size)
                        .max(l.block_size),
                    read_only: l.read_only,
                    identity,
                    write_cache: l.write_cache,
                    thin_provisioning: l.thin_provisioning && !l.read_only,
                    thin_threshold: thin_threshold(l),
                    sanitize_rate: l.sanitize_rate.0,
                    removable: l.removable,
                };
                luns.push((l.number, settings, store));
            }
            let scsi = Arc::new(ScsiTarget::new(luns));
            // Persistent reservations with APTPL survive restarts (SPC-4 5.13.5).
            for unit in scsi.logical_units() {
                let file = data_dir.join("reservations").join(format!(
                    "{}-lun{}.json",
                    t.iqn.to_ascii_lowercase().replace('/', "_"),
                    unit.lun()
                ));
                unit.persist_reservations_in(file.clone())
                    .with_context(|| {
                        format!(
                            "cannot load persistent reservations from {}",
                            file.display()
                        )
                    })?;
            }
            // Reservations of a replicated LUN go to the peer with the data's rules.
            for (lun, volume) in &replicated {
                if let Some(unit) = scsi.logical_unit(*lun) {
                    crate::volumes::replicate_reservations(unit, volume);
                    if let Some(groups) = t
                        .luns
                        .iter()
                        .find(|l| l.number == *lun)
                        .and_then(|l| alua_groups(t, l))
                    {
                        crate::volumes::report_alua(unit, volume, groups);
                        info!(target = %t.iqn, lun, own_group = groups.own, peer_group = groups.peer, "ALUA on");
                    }
                }
            }
            targets.insert(
                t.iqn.to_ascii_lowercase(),
                Arc::new(TargetEntry {
                    iqn: t.iqn.clone(),
                    scsi,
                }),
            );
        }
        let mut addrs = BTreeSet::new();
        let mut portals = Vec::new();
        for t in &config.targets {
            for p in &t.portals {
                let a = p.parse::<SocketAddr>().expect("validated");
                if addrs.insert(a) {
                    portals.push(a);
                }
            }
        }
        let mut listeners = Vec::new();
        // With [ha] the role loop binds the portals while this host is primary; the host
        // portals (ALUA's standby path) are bound in both roles.
        let host_portals: BTreeSet<SocketAddr> = config
            .targets
            .iter()
            .flat_map(|t| &t.host_portals)
            .map(|p| p.parse::<SocketAddr>().expect("validated"))
            .filter(|a| !addrs.contains(a))
            .collect();
        let always = host_portals.into_iter();
        for a in addrs
            .into_iter()
            .filter(|_| config.ha.is_none())
            .chain(always)
        {
            let l =
                listener::bind(a, false).with_context(|| format!("cannot listen on portal {a}"))?;
            listeners.push(l);
        }
        let s = &config.server;
        let metrics = match s.metrics_addr() {
            Ok(Some(a)) => Some(crate::metrics::bind(a).await?),
            Ok(None) => None,
            Err(e) => anyhow::bail!("server.metrics_listen: {e}"),
        };
        let iscsi = Arc::new(IscsiContext {
            sessions: SessionRegistry::default(),
            targets,
            login: build_login_config(config),
            portals,
            timers: ConnectionTimers::from_secs(
                s.login_timeout_secs,
                s.nop_in_interval_secs,
                s.nop_in_timeout_secs,
            ),
            limits: ResourceLimits {
                sessions: SessionLimits {
                    max_sessions: s.max_sessions as usize,
                    max_sessions_per_initiator: s.max_sessions_per_initiator as usize,
                },
                session_inflight_bytes: s.effective_max_session_inflight_bytes(),
                max_logins: s.max_logins_in_progress as usize,
            },
            budget: MemoryBudget::new(s.effective_max_inflight_bytes()),
            logins: Arc::new(tokio::sync::Semaphore::new(
                s.max_logins_in_progress as usize,
            )),
            login_refusals: Default::default(),
            auth_throttle: Default::default(),
        });
        // PREEMPT AND ABORT aborts the preempted nexus's tasks on the logical unit.
        for t in iscsi.targets.values() {
            let ctx = Arc::downgrade(&iscsi);
            t.scsi.set_abort_tasks(Box::new(move |nexus, lun| {
                let Some(ctx) = ctx.upgrade() else { return };
                for s in ctx.sessions.list().iter().filter(|s| s.nexus == nexus) {
                    drop(s.abort_where(|t| crate::scsi::spc::decode_lun(t.lun) == Some(lun)));
                }
            }));
        }
        let volumes = Volumes::new(volumes);
        let control = Arc::new(ControlContext {
            iscsi: iscsi.clone(),
            volumes: volumes.clone(),
            ha: std::sync::OnceLock::new(),
            effective_config: config.masked_json(),
        });
        Ok(Server {
            iscsi,
            volumes,
            control,
            listeners,
            control_socket: config.server.control_socket_path(),
            metrics,
        })
    }

    /// Targets, sessions, login settings and portals (for the HA loop's portal control).
    pub fn iscsi(&self) -> Arc<IscsiContext> {
        self.iscsi.clone()
    }

    /// The replicated volumes (for the HA loop).
    pub fn volumes(&self) -> Volumes {
        self.volumes.clone()
    }

    /// Hands the running HA loop to the control socket (`status`, `ha ...`).
    pub fn set_ha(&self, ha: Arc<HaHandle>) {
        let _ = self.control.ha.set(ha);
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts connections until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        let control = {
            let (path, state, shutdown) = (
                self.control_socket.clone(),
                self.control.clone(),
                shutdown.clone(),
            );
            // Bind first so a second twinsan on the same data dir fails at start, not later.
            let serve = crate::control::serve(path.clone(), state, shutdown);
            tokio::spawn(async move {
                if let Err(e) = serve.await {
                    error!(socket = %path.display(), "control socket failed: {e}");
                }
            })
        };
        if let Some(l) = self.metrics {
            tokio::spawn(crate::metrics::serve(
                l,
                self.control.clone(),
                shutdown.clone(),
            ));
        }
        for listener in self.listeners {
            let iscsi = self.iscsi.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(accept_loop(listener, iscsi, shutdown)));
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = control.await;
        for v in &self.volumes {
            match v.shutdown().await {
                Ok(()) => info!(volume = v.name(), "volume stopped cleanly"),
                Err(e) => error!(volume = v.name(), "volume shutdown: {e}"),
            }
        }
        Ok(())
    }
}

fn chap(c: &Option<Credentials>) -> Option<ChapCredentials> {
    c.as_ref().map(|c| ChapCredentials {
        user: c.user.clone(),
        secret: c.secret.clone(),
    })
}

/// Maps the configuration to what login needs.
pub fn build_login_config(config: &Config) -> Arc<LoginConfig> {
    let n = &config.negotiation;
    let d = TargetLimits::default();
    let digests = |v: &Option<Vec<String>>, default: &Vec<Digest>| {
        v.as_ref()
            .map(|l| l.iter().filter_map(|s| Digest::parse(s)).collect())
            .unwrap_or_else(|| default.clone())
    };
    let limits = TargetLimits {
        max_recv_data_segment_length: n
            .max_recv_data_segment_length
            .unwrap_or(d.max_recv_data_segment_length),
        max_burst_length: n.max_burst_length.unwrap_or(d.max_burst_length),
        first_burst_length: n.first_burst_length.unwrap_or(d.first_burst_length),
        immediate_data: n.immediate_data.unwrap_or(d.immediate_data),
        initial_r2t: n.initial_r2t.unwrap_or(d.initial_r2t),
        max_outstanding_r2t: n.max_outstanding_r2t.unwrap_or(d.max_outstanding_r2t),
        header_digest: digests(&n.header_digest, &d.header_digest),
        data_digest: digests(&n.data_digest, &d.data_digest),
        default_time2wait: n.default_time2wait.unwrap_or(d.default_time2wait),
        // Sessions end with their connection (ErrorRecoveryLevel 0, no retention).
        default_time2retain: n.default_time2retain.unwrap_or(0),
        max_connections: 1,
    };
    let targets = config
        .targets
        .iter()
        .map(|t| {
            let mut a = TargetAuth::new(t.iqn.clone());
            a.alias = t.alias.clone();
            a.allowed_initiators = t.allowed_initiators.clone();
            a.chap = chap(&t.chap);
            a.mutual_chap = chap(&t.mutual_chap);
            a.portals = t
                .advertised_portals()
                .filter_map(|p| p.parse().ok())
                .collect();
            a.portal_group_tag = Some(t.tpgt);
            a
        })
        .collect();
    Arc::new(LoginConfig {
        portal_group_tag: config.targets.first().map(|t| t.tpgt).unwrap_or(1),
        targets,
        discovery_chap: chap(&config.discovery.chap),
        discovery_mutual_chap: chap(&config.discovery.mutual_chap),
        limits,
        cmd_window: config.server.queue_depth,
        ..LoginConfig::default()
    })
}

/// The soft threshold of a thin, writable LUN on a file (`thin_threshold_percent`); check-config
/// refuses the key for block devices, and a path that became one since is warned about here.
fn thin_threshold(l: &LunConfig) -> Option<ThinThreshold> {
    use std::os::unix::fs::FileTypeExt;
    let percent = l.thin_threshold_percent?;
    if !l.thin_provisioning || l.read_only {
        return None;
    }
    if std::fs::metadata(&l.path).is_ok_and(|m| m.file_type().is_block_device()) {
        warn!(lun = l.number, path = %l.path.display(),
            "thin_threshold_percent applies to files, not block devices: not checked");
        return None;
    }
    info!(lun = l.number, path = %l.path.display(), threshold_percent = percent,
        "thin provisioning soft threshold on the backing filesystem");
    Some(ThinThreshold {
        percent,
        path: l.path.clone(),
    })
}

fn open_store(l: &LunConfig, engine: &EngineChoice) -> anyhow::Result<Arc<dyn BlockStore>> {
    let mut opts = FileStoreOptions::new(&l.path);
    opts.read_only = l.read_only;
    opts.direct = l.direct;
    opts.create_size = l.size.map(|s| s.0);
    let store = open_file_store(opts, engine)
        .with_context(|| format!("LUN {}: cannot open {}", l.number, l.path.display()))?;
    let size = store.size();
    if size < l.block_size as u64 {
        anyhow::bail!(
            "LUN {}: {} is smaller than one block",
            l.number,
            l.path.display()
        );
    }
    if size % l.block_size as u64 != 0 {
        warn!(
            lun = l.number,
            size,
            block_size = l.block_size,
            "backing size is not a multiple of the block size: the tail is not addressable"
        );
    }
    if let Some(want) = l.size {
        if want.0 != size {
            warn!(
                lun = l.number,
                configured = want.0,
                actual = size,
                "backing exists with a size other than configured: serving its actual size"
            );
        }
    }
    Ok(store)
}

/// The URL a libiscsi client uses to reach LUN `lun` of `target` on `portal`.
pub fn iscsi_url(portal: &str, target: &TargetConfig, lun: u64) -> String {
    format!("iscsi://{portal}/{}/{lun}", target.iqn)
}

/// The ALUA port groups of LUN `l` of target `t`: with `alua = true`, from its replication
/// link (validated: every LUN replicated, the same numbering for all).
fn alua_groups(t: &TargetConfig, l: &LunConfig) -> Option<crate::scsi::alua::PortGroups> {
    let r = l.replication.as_ref().filter(|_| t.alua)?;
    crate::scsi::alua::PortGroups::from_link(r.listen.parse().ok()?, r.peer.parse().ok()?)
}
