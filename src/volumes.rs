//! Replicated LUNs: turns `[target.lun.replication]` into a running
//! [`ReplicatedVolume`], the [`Volumes`] handle the HA loop and the control socket share, and
//! answers the `twinsan replication ...` commands.

use crate::config::{parse_meta, LunConfig, MetaDisk, ReplicationConfig};
use crate::scsi::alua::{Alua, PairRoles, PortGroups};
use crate::scsi::{LogicalUnit, PrReplicateFuture, PrReplicator};
use crate::store::BlockStore;
use anyhow::{anyhow, bail, Context};
use std::sync::Arc;
use std::time::Duration;
use twinsan_replication::drbd::MdVersion;
use twinsan_replication::policy::SplitBrainPolicy;
use twinsan_replication::volume::{
    create_metadata, skip_sync_uuid, Fencing, InitialSync, MetaLocation, ReplicatedVolume, Role,
    VolumeConfig,
};

/// The daemon's replicated volumes, in configuration order: what the HA loop promotes and
/// demotes and the control socket reports and acts on. Cheap to clone.
#[derive(Clone, Default)]
pub struct Volumes(Arc<[Arc<ReplicatedVolume>]>);

impl Volumes {
    pub fn new(volumes: Vec<Arc<ReplicatedVolume>>) -> Self {
        Volumes(volumes.into())
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Arc<ReplicatedVolume>> {
        self.0.iter()
    }

    /// The volume named `name` (`[target.lun.replication] name`).
    pub fn by_name(&self, name: &str) -> Option<&Arc<ReplicatedVolume>> {
        self.0.iter().find(|v| v.name() == name)
    }
}

impl<'a> IntoIterator for &'a Volumes {
    type Item = &'a Arc<ReplicatedVolume>;
    type IntoIter = std::slice::Iter<'a, Arc<ReplicatedVolume>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

pub fn meta_location(lun: &LunConfig, r: &ReplicationConfig) -> anyhow::Result<MetaLocation> {
    Ok(
        match parse_meta(&r.meta).map_err(|m| anyhow!("volume {}: meta: {m}", r.name))? {
            MetaDisk::Internal => MetaLocation::Internal(lun.path.clone()),
            MetaDisk::External(p) => MetaLocation::External(p),
            MetaDisk::Indexed(p, i) => MetaLocation::Indexed(p, i),
        },
    )
}

fn policy(key: &str, v: &str) -> anyhow::Result<SplitBrainPolicy> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|_| anyhow!("{key}: unknown split-brain policy `{v}`"))
}

pub fn volume_config(r: &ReplicationConfig) -> anyhow::Result<VolumeConfig> {
    let mut c = VolumeConfig::new(
        r.name.clone(),
        r.listen.parse().context("replication.listen")?,
        r.peer.parse().context("replication.peer")?,
        r.secret.as_bytes().to_vec(),
    );
    c.ping_interval = Duration::from_secs(r.ping_interval_secs);
    c.timeout = Duration::from_secs(r.timeout_secs);
    c.resync_rate = r.resync_rate.0;
    c.fencing = match r.fencing.as_str() {
        "suspend-io" => Fencing::SuspendIo,
        _ => Fencing::DontCare,
    };
    c.after_sb_0pri = policy("after_sb_0pri", &r.after_sb_0pri)?;
    c.after_sb_1pri = policy("after_sb_1pri", &r.after_sb_1pri)?;
    c.after_sb_2pri = policy("after_sb_2pri", &r.after_sb_2pri)?;
    c.verify_digest = match r.verify_digest.as_str() {
        "sha256" => twinsan_replication::link::VerifyDigest::Sha256,
        _ => twinsan_replication::link::VerifyDigest::Crc32c,
    };
    Ok(c)
}

/// Opens the replicated volume of `lun` over its backing store, in its configured role or, with
/// `ha` (the role loop decides), as secondary.
pub async fn open(
    lun: &LunConfig,
    backing: Arc<dyn BlockStore>,
    ha: bool,
) -> anyhow::Result<Arc<ReplicatedVolume>> {
    let r = lun.replication.as_ref().expect("replicated LUN");
    let role = if r.role == "primary" && !ha {
        Role::Primary
    } else {
        Role::Secondary
    };
    let meta = meta_location(lun, r)?;
    ReplicatedVolume::open(volume_config(r)?, backing, meta, role)
        .await
        .with_context(|| {
            format!(
                "volume {}: cannot open (new volume? run `twinsan replication create-md --volume {}` first)",
                r.name, r.name
            )
        })
}

/// The replicated volume as the SCSI layer's [`PrReplicator`]: a PERSISTENT RESERVE OUT on
/// the primary completes once the peer stored the new state (or, the peer away, once it is
/// marked to be sent at the next connect).
struct VolumeReservations(Arc<ReplicatedVolume>);

impl PrReplicator for VolumeReservations {
    fn replicate(&self, state: bytes::Bytes) -> PrReplicateFuture<'_> {
        Box::pin(async move {
            self.0
                .replicate_pr_state(state)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// Replicates `unit`'s persistent reservations over `volume` (SPC-4 5.13 on a replicated
/// LUN): its changes go to the peer before they complete, the peer's state (this host
/// secondary) becomes the unit's, and the unit's current state (e.g. reloaded from its APTPL
/// file) is what this host sends at connect while primary.
pub fn replicate_reservations(unit: &Arc<LogicalUnit>, volume: &Arc<ReplicatedVolume>) {
    volume.seed_pr_state(LogicalUnit::encode_reservations(&unit.reservations()));
    // Weak: the volume outlives no unit it would keep alive.
    let u = Arc::downgrade(unit);
    volume.set_pr_sink(Arc::new(move |bytes: &[u8]| match u.upgrade() {
        Some(unit) => unit.receive_replicated_reservations(bytes),
        None => Err("logical unit is gone".into()),
    }));
    unit.replicate_reservations_through(Arc::new(VolumeReservations(volume.clone())));
}

/// ALUA on `unit` (SPC-4 5.16): its port groups' states follow `volume`'s roles, read for
/// every command, so a standby host refuses media access before the store is touched.
pub fn report_alua(unit: &LogicalUnit, volume: &Arc<ReplicatedVolume>, groups: PortGroups) {
    let v = volume.clone();
    unit.enable_alua(Alua::new(
        groups,
        Box::new(move || {
            let (local, peer) = v.roles();
            PairRoles {
                local_primary: local == Role::Primary,
                peer_primary: peer.map(|p| p == Role::Primary),
            }
        }),
    ));
}

/// `twinsan replication create-md`: fresh DRBD v08 metadata for a new volume.
pub fn create_md(
    lun: &LunConfig,
    initial_sync: Option<&str>,
    skip_token: Option<&str>,
) -> anyhow::Result<u64> {
    let r = lun.replication.as_ref().expect("replicated LUN");
    let meta = meta_location(lun, r)?;
    let initial = match (initial_sync, skip_token) {
        (None, None) => InitialSync::None,
        (Some("full"), None) => InitialSync::FullFrom,
        (Some("skip-identical"), Some(t)) => InitialSync::SkipIdentical {
            uuid: skip_sync_uuid(&r.name, t),
        },
        (Some("skip-identical"), None) => {
            bail!("--initial-sync skip-identical needs --skip-token (the same on both hosts)")
        }
        (Some(other), _) if other != "full" && other != "skip-identical" => {
            bail!("--initial-sync must be `full` or `skip-identical`, not `{other}`")
        }
        _ => bail!("--skip-token only goes with --initial-sync skip-identical"),
    };
    let data_size = match &meta {
        MetaLocation::Internal(_) => 0,
        _ => std::fs::metadata(&lun.path)
            .with_context(|| format!("cannot stat {}", lun.path.display()))?
            .len(),
    };
    create_metadata(&meta, data_size, MdVersion::V08, initial)
        .with_context(|| format!("volume {}: create-md on {}", r.name, lun.path.display()))
}

/// One operator action on a running volume.
pub async fn act(v: &Arc<ReplicatedVolume>, action: &str, force: bool) -> anyhow::Result<()> {
    match action {
        "primary" => v.promote(force).await?,
        "secondary" => v.demote().await?,
        "verify" => v.start_verify()?,
        "discard-my-data" => v.discard_my_data()?,
        "invalidate" => v.invalidate().await?,
        "connect" => v.connect(),
        "disconnect" => v.disconnect(),
        "resume-io" => v.resume_io(),
        other => bail!("unknown replication action `{other}`"),
    }
    tracing::info!(volume = v.name(), action, force, "operator action done");
    Ok(())
}
