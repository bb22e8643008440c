//! [`ReplicatedVolume`]: a block volume replicated synchronously to one peer host with DRBD
//! protocol-C semantics, DRBD-format metadata, bitmap-based resync, online verify and
//! split-brain handling.
//!
//! # Model
//! * One volume per (backing store, metadata, peer). The primary serves the data area
//!   `[0, usable)` through [`ReplicatedVolume::store`]; the secondary never serves and only
//!   applies what the primary sends.
//! * **Write path (protocol C)**, `drbd_req.c`: interval lock on the range, activity-log
//!   extents activated (transaction durable first), then the local write and the `Write`
//!   message go out concurrently; the request completes when the local write is done *and*
//!   the peer acked after its own local write. FUA is durable on both; `flush` flushes both.
//! * **Degraded**: with no peer, writes mark their blocks out of sync (bitmap) and go on,
//!   unless `Fencing::SuspendIo`, where they wait for the peer or [`ReplicatedVolume::resume_io`].
//!   Writes in flight when the link drops are marked out of sync too.
//! * **Connection**: both hosts listen and dial (see [`crate::link::auth`] for the rule
//!   that keeps exactly one connection). After authentication both sides exchange role, disk
//!   state, UUIDs and bitmaps and run [`crate::policy::decide`]; application writes wait
//!   during this short handshake so the bitmaps are exact.
//! * **Resync**: the source walks the union bitmap in coalesced chunks of up to 1 MiB,
//!   each chunk under the interval lock (no race with application writes), rate limited by a
//!   token bucket at `resync_rate`, halved while application writes are in flight.
//! * **Verify**: [`ReplicatedVolume::start_verify`] on the primary (or either side when both
//!   are secondary) compares per-4 KiB digests; mismatches are marked out of sync on both
//!   sides, counted and logged, and **a resync repairs them automatically** when the verify
//!   pass ends (from the verifying side, which must be UpToDate).
//! * **Secondary crash safety**: the secondary does not keep an activity log; blocks that
//!   were in flight when it died are marked out of sync by the primary, which sees the link
//!   drop before their acks.
//!
//! # Structure
//! The protocol rules (which state follows which event, what a handshake verdict does to
//! the role / disk / connection state, what is refused) are a pure machine in
//! `machine.rs` (`VolumeMachine::step(event) -> actions`, unit tested without I/O). The
//! async code here and in `conn.rs`, `io.rs` and `sync.rs` moves bytes and metadata, feeds
//! events to the machine under the state mutex and carries out the actions after it (frames
//! go to the connection's [`LinkSender`], never under the mutex: a small frame straight to
//! the socket when it is free, the rest through the writer task, at most `LINK_QUEUE` queued).
//!
//! # Initial sync
//! [`create_metadata`] writes fresh DRBD v08/v09 metadata and takes an [`InitialSync`]:
//! `FullFrom` on the host whose data is authoritative (it gets a new generation UUID and is
//! UpToDate; the other host is created with `None`, stays "just created"/Inconsistent and
//! receives a full sync on the first connect), or `SkipIdentical { uuid }` on **both**
//! hosts with the **same** operator-chosen UUID (like `drbdadm new-current-uuid
//! --clear-bitmap`): both are UpToDate with equal current UUIDs, so no sync happens. The
//! operator asserts the disks are identical (e.g. both new and zeroed). The UUID can be
//! derived on both hosts from the volume name and a shared token with [`skip_sync_uuid`].

mod conn;
mod io;
mod machine;
mod pr;
mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::drbd::layout::Layout;
use crate::drbd::{
    ActivityLog, GenerationUuids, MdFlags, MdVersion, MetaState, Metadata, MetadataError,
};
use crate::interval::IntervalLock;
use crate::link::{DiskState, LinkSender, Message, VerifyDigest};
use crate::policy::{SplitBrainPolicies, SplitBrainPolicy};
use crate::store::{BlockStore, StoreError};
use machine::{Action, Event, Refusal, VolumeMachine};

pub use crate::drbd::Role;
pub use pr::{PrReplicated, PrSink};

/// What the primary does when it loses the peer (`fencing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fencing {
    /// Keep serving; record written blocks in the bitmap (DRBD `dont-care`).
    #[default]
    DontCare,
    /// Suspend writes until the peer is back or [`ReplicatedVolume::resume_io`] is called
    /// (DRBD `resource-and-stonith` with a fence-peer handler that does not return).
    SuspendIo,
}

/// Configuration of one replicated volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Volume (resource) name, must be equal on both hosts.
    pub name: String,
    /// Address this host listens on for the peer (port 0 picks one; see
    /// [`ReplicatedVolume::local_addr`]).
    pub listen: SocketAddr,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Shared secret for the HMAC challenge-response.
    pub secret: Vec<u8>,
    /// Keepalive ping interval (`ping-int`).
    pub ping_interval: Duration,
    /// Peer declared dead after this long without any frame (`timeout`); also bounds each
    /// handshake step.
    pub timeout: Duration,
    /// Maximum resync / verify rate in bytes per second (0 = unlimited).
    pub resync_rate: u64,
    /// Fencing policy.
    pub fencing: Fencing,
    /// `after-sb-0pri`.
    pub after_sb_0pri: SplitBrainPolicy,
    /// `after-sb-1pri`.
    pub after_sb_1pri: SplitBrainPolicy,
    /// `after-sb-2pri`.
    pub after_sb_2pri: SplitBrainPolicy,
    /// `verify-alg`.
    pub verify_digest: VerifyDigest,
    /// Activity log slots (`al-extents`), 7 ..= the AL's capacity; 257 by default.
    pub al_extents: u32,
}

impl VolumeConfig {
    /// A configuration with DRBD-like defaults: ping every 2 s, timeout 6 s, resync rate
    /// 100 MiB/s, fencing dont-care, all split-brain policies `disconnect`, crc32c verify.
    pub fn new(
        name: impl Into<String>,
        listen: SocketAddr,
        peer: SocketAddr,
        secret: impl Into<Vec<u8>>,
    ) -> Self {
        VolumeConfig {
            name: name.into(),
            listen,
            peer,
            secret: secret.into(),
            ping_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(6),
            resync_rate: 100 << 20,
            fencing: Fencing::DontCare,
            after_sb_0pri: SplitBrainPolicy::Disconnect,
            after_sb_1pri: SplitBrainPolicy::Disconnect,
            after_sb_2pri: SplitBrainPolicy::Disconnect,
            verify_digest: VerifyDigest::Crc32c,
            al_extents: 257,
        }
    }

    fn policies(&self) -> SplitBrainPolicies {
        SplitBrainPolicies {
            after_sb_0pri: self.after_sb_0pri,
            after_sb_1pri: self.after_sb_1pri,
            after_sb_2pri: self.after_sb_2pri,
        }
    }
}

/// Where the DRBD metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing device (`meta-disk internal`); the path is the same
    /// file/device the data store uses.
    Internal(PathBuf),
    /// A whole separate file/device (`meta-disk /dev/x`, flexible external).
    External(PathBuf),
    /// Slot N (0..=255) of 128 MiB on a shared meta device (`meta-disk /dev/x[N]`).
    Indexed(PathBuf, u32),
}

impl MetaLocation {
    fn parts(&self) -> Result<(PathBuf, Layout), ReplicationError> {
        Ok(match self {
            MetaLocation::Internal(p) => (p.clone(), Layout::Internal),
            MetaLocation::External(p) => (p.clone(), Layout::FlexExternal),
            MetaLocation::Indexed(p, i) => {
                let index = u8::try_from(*i).map_err(|_| ReplicationError::BadIndex(*i))?;
                (p.clone(), Layout::IndexedExternal { index })
            }
        })
    }
}

/// How a freshly created pair starts; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialSync {
    /// Just created: Inconsistent, current UUID 4; receives a full sync from a `FullFrom` peer.
    None,
    /// This host's data is authoritative: new generation, UpToDate; the peer (created with
    /// `None`) gets a full sync.
    FullFrom,
    /// Both hosts are identical: both must be created with the same `uuid`; no sync.
    SkipIdentical {
        /// The shared current UUID (bit 0 is ignored; must not be 0 or 4).
        uuid: u64,
    },
}

/// A UUID for [`InitialSync::SkipIdentical`] both hosts can compute independently from the
/// volume name and an operator-chosen token (SHA-256, first 8 bytes).
pub fn skip_sync_uuid(volume_name: &str, token: &str) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"twinsan-skip-sync\0");
    h.update(volume_name.as_bytes());
    h.update([0]);
    h.update(token.as_bytes());
    let d = h.finalize();
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    let mut u = u64::from_be_bytes(a) & !1;
    if u == 0 || u == 4 {
        u = 0x7a11_5a00_0000_0000;
    }
    u
}

/// Creates DRBD metadata on `meta` (like `drbdmeta create-md`) and sets it up for
/// `initial`. `data_size` is the size of the data area for external metadata (0 for
/// internal: everything in front of the metadata). Returns the usable data size in bytes.
pub fn create_metadata(
    meta: &MetaLocation,
    data_size: u64,
    version: MdVersion,
    initial: InitialSync,
) -> Result<u64, ReplicationError> {
    let (path, layout) = meta.parts()?;
    let mut md = Metadata::create(&path, layout, data_size, version)?;
    let sectors = md.data_sectors();
    md.set_effective_size(sectors)?;
    let mut flags = md.flags();
    match initial {
        InitialSync::None => {}
        InitialSync::FullFrom => {
            let mut u = GenerationUuids::just_created();
            let mut v: u64 = rand::random::<u64>() & !1;
            while v == 0 || v == 4 {
                v = rand::random::<u64>() & !1;
            }
            u.current = v;
            md.set_uuids(&u)?;
            flags.insert(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
        }
        InitialSync::SkipIdentical { uuid } => {
            let v = uuid & !1;
            if v == 0 || v == 4 {
                return Err(ReplicationError::Config(format!(
                    "skip-sync UUID {uuid:#x} is reserved; choose another"
                )));
            }
            let mut u = GenerationUuids::just_created();
            u.current = v;
            md.set_uuids(&u)?;
            flags.insert(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
        }
    }
    md.set_flags(flags);
    md.mark_clean()?;
    info!(
        path = %path.display(),
        %layout,
        usable_bytes = sectors * 512,
        ?initial,
        "created {version} metadata"
    );
    Ok(sectors * 512)
}

/// Connection state (DRBD's `drbd_conns`, the subset twinsan uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ConnState {
    /// Not connected and not trying (split brain, refused peer, operator `disconnect`).
    StandAlone,
    /// Trying to connect / handshaking.
    Connecting,
    /// Connected, replicas in sync.
    Connected,
    /// Connected, resyncing to the peer.
    SyncSource,
    /// Connected, resyncing from the peer.
    SyncTarget,
    /// Connected, online verify running from this side.
    VerifySource,
}

impl std::fmt::Display for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Resync progress.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResyncProgress {
    /// Bytes synced so far.
    pub done_bytes: u64,
    /// Bytes to sync (out of sync at the start, plus blocks that went out of sync since).
    pub total_bytes: u64,
    /// 0..=100.
    pub percent: f64,
    /// Average rate since the start.
    pub bytes_per_sec: u64,
    /// Estimated seconds left, if a rate is known.
    pub eta_secs: Option<u64>,
}

/// Online-verify progress.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VerifyProgress {
    /// Bytes compared.
    pub done_bytes: u64,
    /// Bytes to compare.
    pub total_bytes: u64,
    /// 4 KiB blocks found different so far.
    pub mismatched_blocks: u64,
    /// The pass ended (complete or aborted).
    pub finished: bool,
    /// It ended because the connection dropped.
    pub aborted: bool,
}

fn ser_role<S: serde::Serializer>(r: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match r {
        Role::Primary => "Primary",
        Role::Secondary => "Secondary",
    })
}

fn ser_opt_role<S: serde::Serializer>(r: &Option<Role>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => ser_role(r, s),
        None => s.serialize_none(),
    }
}

/// A snapshot of the volume's state (`drbdadm status` / `drbdsetup events2`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Our role.
    #[serde(serialize_with = "ser_role")]
    pub role: Role,
    /// The peer's role, when connected.
    #[serde(serialize_with = "ser_opt_role")]
    pub peer_role: Option<Role>,
    /// Connection state.
    pub connection: ConnState,
    /// Our disk.
    pub disk_state: DiskState,
    /// The peer's disk, when connected.
    pub peer_disk_state: Option<DiskState>,
    /// Resync in progress.
    pub resync: Option<ResyncProgress>,
    /// Last or current verify pass.
    pub verify: Option<VerifyProgress>,
    /// Bytes marked out of sync in our bitmap.
    pub out_of_sync_bytes: u64,
    /// Replicated data bytes sent (application writes and resync).
    pub sent_bytes: u64,
    /// Replicated data bytes received.
    pub received_bytes: u64,
    /// Resync data bytes sent since open.
    pub resync_sent_bytes: u64,
    /// Resync data bytes received since open.
    pub resync_received_bytes: u64,
    /// Peer (or local) write errors since open.
    pub write_errors: u64,
    /// A split brain was detected on the last connect.
    pub split_brain: bool,
    /// Writes are suspended (fencing) waiting for the peer.
    pub suspended: bool,
    /// Usable data size in bytes.
    pub size_bytes: u64,
    /// Current generation UUID.
    pub current_uuid: u64,
    /// Bitmap UUID.
    pub bitmap_uuid: u64,
    /// History UUIDs.
    pub history_uuids: Vec<u64>,
    /// Metadata flags (DRBD `MDF_*` bits).
    pub md_flags: u32,
}

/// Errors of the volume API.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Metadata I/O or format.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// Socket or file error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Data store error.
    #[error("data store: {0}")]
    Store(#[from] StoreError),
    /// The data store is smaller than the metadata says.
    #[error("data store has {have} bytes, the metadata describes {need} bytes of data")]
    DataTooSmall {
        /// Needed.
        need: u64,
        /// Present.
        have: u64,
    },
    /// Indexed metadata slot out of range.
    #[error("metadata index {0} is outside 0..=255")]
    BadIndex(u32),
    /// Promotion refused.
    #[error("refusing to promote: local disk is {0} (use force to override)")]
    NotUpToDate(DiskState),
    /// Promotion refused.
    #[error("refusing to promote: the peer is primary (dual primary is never allowed)")]
    PeerIsPrimary,
    /// Needs a connection.
    #[error("not connected to the peer")]
    NotConnected,
    /// Not allowed in the current state.
    #[error("not allowed now: {0}")]
    NotAllowed(String),
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The volume was shut down.
    #[error("volume is shut down")]
    ShutDown,
}

impl From<Refusal> for ReplicationError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotUpToDate(d) => ReplicationError::NotUpToDate(d),
            Refusal::PeerIsPrimary => ReplicationError::PeerIsPrimary,
            Refusal::NotConnected => ReplicationError::NotConnected,
            Refusal::NotAllowed(s) | Refusal::Protocol(s) => ReplicationError::NotAllowed(s),
        }
    }
}

/// Metadata plus the in-memory activity log, behind one mutex (never held across `.await`).
pub(crate) struct MdState {
    pub(crate) md: Metadata,
    pub(crate) al: ActivityLog,
}

/// Reply to a request sent to the peer.
#[derive(Debug)]
pub(crate) enum Reply {
    Ok,
    Failed(String),
    /// The connection dropped before the reply.
    Lost,
    Verify(Vec<u64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingKind {
    Write,
    Flush,
    Resync,
    Verify,
    PrState,
}

pub(crate) struct Pending {
    kind: PendingKind,
    offset: u64,
    len: u64,
    tx: oneshot::Sender<Reply>,
}

/// The attached connection, as seen by request submitters.
pub(crate) struct LinkHandle {
    epoch: u64,
    tx: LinkSender,
    pending: std::collections::HashMap<u64, Pending>,
    next_seq: u64,
    kill: CancellationToken,
}

impl LinkHandle {
    /// Allocates the next request number and registers the request whose reply the
    /// connection loop will deliver on the returned receiver.
    fn register(
        &mut self,
        kind: PendingKind,
        offset: u64,
        len: u64,
    ) -> (u64, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                kind,
                offset,
                len,
                tx,
            },
        );
        (seq, rx)
    }
}

/// An action [`ReplicatedVolume::run_step`] left for after the state lock.
#[derive(Debug)]
pub(crate) enum Deferred {
    /// A frame for the link of that sender.
    Send(LinkSender, Message),
    /// Anything else (see [`ReplicatedVolume::perform`]).
    Act(Action),
}

/// Everything under the state mutex: the protocol machine and the attached link. The link
/// is `Some` exactly while the machine is `Connected` on the link's epoch (both change under
/// this one lock, in [`ReplicatedVolume::run_step`]).
pub(crate) struct State {
    m: VolumeMachine,
    link: Option<LinkHandle>,
}

/// Frames queued to one connection's [`LinkSender`]. A bound gives backpressure: a peer that
/// stops reading stalls the senders (application writes, resync) instead of growing memory
/// without limit until the ping timeout drops the link. 128 frames is far more than the
/// writer needs to batch (it sends whatever is queued in vectored writes) and more than the
/// requests usually in flight (iSCSI queue depth, resync `IN_FLIGHT`). No one awaits a send
/// while holding the state mutex, and the receive loop never awaits a send (it `try_send`s
/// pongs, and its replies go out from spawned tasks), so a full queue cannot stop the acks
/// that drain it.
pub(crate) const LINK_QUEUE: usize = 128;

/// Room for received frames per read of the link. With tokio-util's default (8 KiB) one
/// `recv` took at most one 4 KiB write's frame, so a busy secondary paid a system call and a
/// wake-up per write; 64 KiB (the most `BytesMut` keeps as its refill size) takes a burst of
/// frames at once. A 4 KiB payload keeps its block alive until it is written, so this holds at
/// most 64 KiB per write in flight, and those are bounded by the peer's queue.
pub(crate) const LINK_READ_BUF: usize = 64 * 1024;

#[derive(Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    resync_sent: AtomicU64,
    resync_received: AtomicU64,
    write_errors: AtomicU64,
    app_inflight: AtomicU64,
    /// The peer's writes being applied here (secondary).
    peer_writes_inflight: AtomicU64,
    /// Application writes: queued to the peer until its ack (protocol C).
    write_ack: crate::latency::LatencyHistogram,
}

/// A replicated volume. See the module docs.
pub struct ReplicatedVolume {
    cfg: VolumeConfig,
    data: Arc<dyn BlockStore>,
    usable: u64,
    node_id: u64,
    local_addr: SocketAddr,
    md: Arc<Mutex<MdState>>,
    st: Mutex<State>,
    changed: Notify,
    /// A write released the last reference on an activity-log extent (writers waiting
    /// because every extent was busy try again).
    al_idle: Notify,
    /// Writes waiting in `al_begin` for an activity-log extent: a release with none skips the
    /// notify (which locks the `Notify`).
    al_waiting: AtomicUsize,
    locks: IntervalLock,
    ctr: Counters,
    shutdown: CancellationToken,
    crashed: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Refused link connections by direction and peer address: an address whose connections
    /// keep failing authentication waits before its next handshake, and the refusals are
    /// logged once per burst with a count (issue 13).
    link_throttle: twinsan_throttle::SharedThrottle<conn::LinkKey>,
    /// Role changes and `invalidate` against a connection's handshake, as DRBD's state
    /// mutex: a handshake sends this host's role, disk and bitmap once, at its start, and
    /// a change made between that snapshot and the attached link would never reach the
    /// peer (its update is dropped while no link is attached) and would not be part of the
    /// sync decision. Held by a connection from `LinkUp` until its verdict is applied.
    state_change: tokio::sync::Mutex<()>,
    /// Persistent reservation state carried for the SCSI layer (`pr.rs`).
    pr: Mutex<pr::PrRepl>,
    /// Held while a reservation state is sent and acked: states reach the peer in order.
    pr_gate: tokio::sync::Mutex<()>,
    /// One call of the sink at a time (secondary).
    pr_apply: Mutex<()>,
    /// Where received reservation state goes (the secondary's logical unit).
    pr_sink: std::sync::OnceLock<PrSink>,
}

/// Evaluates the fail point `name` on a blocking thread, where a test's callback may wait.
/// Nothing runs unless the `fail` crate's "failpoints" feature is on, which only this
/// crate's test builds enable.
async fn fail_point(name: &'static str) {
    if fail::has_failpoints() {
        let _ = tokio::task::spawn_blocking(move || {
            let _ = name; // without the feature the macro is empty
            fail::fail_point!(name)
        })
        .await;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn disk_from_flags(f: MdFlags) -> DiskState {
    if !f.contains(MdFlags::CONSISTENT) {
        DiskState::Inconsistent
    } else if f.contains(MdFlags::WAS_UP_TO_DATE) {
        DiskState::UpToDate
    } else {
        DiskState::Outdated
    }
}

impl ReplicatedVolume {
    /// Opens the volume: reads the metadata (replaying the activity log into the bitmap if
    /// it was not closed cleanly, `drbd_nl.c` attach / `drbdmeta apply-al`), binds the
    /// listener and starts connecting. `role` is the initial role; `Primary` requires an
    /// UpToDate disk (see [`ReplicatedVolume::promote`]).
    pub async fn open(
        cfg: VolumeConfig,
        data: Arc<dyn BlockStore>,
        meta: MetaLocation,
        role: Role,
    ) -> Result<Arc<ReplicatedVolume>, ReplicationError> {
        if cfg.timeout.is_zero() || cfg.ping_interval.is_zero() {
            return Err(ReplicationError::Config(
                "timeout and ping_interval must be > 0".into(),
            ));
        }
        let (path, layout) = meta.parts()?;
        let data_size = data.size() & !511;
        let al_extents = cfg.al_extents;
        let name = cfg.name.clone();
        let (mds, crashed_primary) = tokio::task::spawn_blocking(move || {
            open_metadata(&name, path, layout, data_size, al_extents)
        })
        .await
        .map_err(|e| ReplicationError::Config(format!("metadata task failed: {e}")))??;
        let usable = mds.md.data_sectors() * 512;
        if usable > data.size() {
            return Err(ReplicationError::DataTooSmall {
                need: usable,
                have: data.size(),
            });
        }
        let disk = disk_from_flags(mds.md.flags());
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        info!(
            volume = %cfg.name,
            listen = %local_addr,
            peer = %cfg.peer,
            usable_bytes = usable,
            disk = %disk,
            backing = %data.describe(),
            "opened replicated volume"
        );
        let vol = Arc::new(ReplicatedVolume {
            cfg,
            data,
            usable,
            node_id: rand::random(),
            local_addr,
            md: Arc::new(Mutex::new(mds)),
            st: Mutex::new(State {
                m: VolumeMachine::new(disk, crashed_primary),
                link: None,
            }),
            changed: Notify::new(),
            al_idle: Notify::new(),
            al_waiting: AtomicUsize::new(0),
            locks: IntervalLock::new(),
            ctr: Counters::default(),
            shutdown: CancellationToken::new(),
            crashed: AtomicBool::new(false),
            state_change: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            link_throttle: Default::default(),
            pr: Mutex::new(pr::PrRepl::default()),
            pr_gate: tokio::sync::Mutex::new(()),
            pr_apply: Mutex::new(()),
            pr_sink: std::sync::OnceLock::new(),
        });
        if role == Role::Primary {
            vol.promote(false).await?;
        }
        vol.start_tasks(listener);
        Ok(vol)
    }

    /// The address the peer listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Usable data size in bytes (the DRBD data area).
    pub fn size(&self) -> u64 {
        self.usable
    }

    /// The peer's address (`peer`).
    pub fn peer_addr(&self) -> SocketAddr {
        self.cfg.peer
    }

    /// Latency of application writes from queueing to the peer's ack (the Prometheus
    /// endpoint's write-ack histogram).
    pub fn write_ack_latency(&self) -> crate::latency::HistogramSnapshot {
        self.ctr.write_ack.snapshot()
    }

    /// Volume name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// Runs the machine on `ev` with the state lock held and carries out the actions that
    /// need no await: logs, in-memory metadata, cancelling the link, attaching `attach`.
    /// Frames to send are built here (so they match this state) and returned with the
    /// link's sender; [`ReplicatedVolume::perform`] sends them after the lock is released.
    fn run_step(
        &self,
        st: &mut State,
        ev: Event,
        mut attach: Option<LinkHandle>,
    ) -> Result<Vec<Deferred>, Refusal> {
        let name = &self.cfg.name;
        let mut rest = Vec::new();
        for a in st.m.step(ev)? {
            match a {
                Action::ConnChanged { from, to, why } => {
                    info!(volume = %name, "connection {from} -> {to} ({why})")
                }
                Action::RoleChanged { from, to } => {
                    info!(volume = %name, "role {from:?} -> {to:?}")
                }
                Action::ForcedPromotion { disk } => {
                    warn!(volume = %name, "forced promotion of a {disk} disk: it is now considered UpToDate")
                }
                Action::PeerRoleChanged { from, to } => {
                    info!(volume = %name, "peer role {from:?} -> {to:?}")
                }
                Action::PeerDiskChanged { from, to } => {
                    info!(volume = %name, "peer disk {from:?} -> {to}")
                }
                Action::HandshakeRefused { why, split_brain } => {
                    if split_brain {
                        error!(volume = %name, "split brain detected: {why}");
                    } else {
                        error!(volume = %name, "refusing to connect: {why}");
                    }
                }
                Action::HandshakeAccepted { why, split_brain } => {
                    if split_brain {
                        warn!(volume = %name, "split brain detected and resolved: {why}");
                    } else {
                        info!(volume = %name, "sync handshake: {why}");
                    }
                }
                Action::ResyncStarts { bytes } => {
                    info!(volume = %name, "resync of {bytes} bytes to the peer starts")
                }
                Action::ResyncFinished {
                    source: true,
                    progress: p,
                } => info!(
                    volume = %name,
                    bytes = p.done_bytes,
                    "resync finished (sync source): {} bytes at {} KiB/s",
                    p.done_bytes,
                    p.bytes_per_sec / 1024
                ),
                Action::ResyncFinished {
                    source: false,
                    progress: p,
                } => {
                    info!(volume = %name, bytes = p.done_bytes, rate = p.bytes_per_sec, "resync finished (sync target), disk UpToDate")
                }
                Action::ResyncInterrupted => {
                    warn!(volume = %name, "resync interrupted; it continues from the bitmap on the next connect")
                }
                Action::VerifyFinished { mismatches, secs } => {
                    info!(volume = %name, "online verify finished in {secs:.1} s: {mismatches} blocks ({} bytes) differ",
                        mismatches * crate::link::proto::VERIFY_BLOCK)
                }
                Action::IoResumed => {
                    warn!(volume = %name, "I/O resumed without the peer: writes continue degraded")
                }
                Action::DiscardMyData => {
                    warn!(volume = %name, "operator: discard my data on the next connect")
                }
                Action::ShuttingDown => info!(volume = %name, "shutting down"),
                Action::NewGeneration => {
                    let mut m = lock(&self.md);
                    let mut u = m.md.uuids();
                    if u.bitmap == 0 {
                        u.new_current_random(true);
                        let _ = m.md.set_uuids(&u);
                        info!(volume = %name, current = format_args!("{:016X}", u.current), "new data generation (primary lost its peer)");
                    }
                }
                Action::MarkOutOfSync { offset, len } => self.mark_oos(offset, len),
                Action::TakeSyncUuid(uuid) => {
                    // In memory now (a ResyncDone right behind must see it), on disk soon.
                    let mut m = lock(&self.md);
                    let mut u = m.md.uuids();
                    u.receive_sync_uuid(uuid);
                    if let Err(e) = m.md.set_uuids(&u) {
                        return Err(Refusal::Protocol(format!("cannot take the sync UUID: {e}")));
                    }
                    let mut f = m.md.flags();
                    f.remove(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
                    m.md.set_flags(f);
                }
                Action::AttachLink { epoch } => {
                    let link = attach.take().filter(|l| l.epoch == epoch);
                    debug_assert!(link.is_some(), "AttachLink without the link");
                    st.link = link;
                }
                Action::DropLink => {
                    if let Some(l) = &st.link {
                        l.kill.cancel();
                    }
                }
                Action::SendStateChange => {
                    if let Some(link) = &st.link {
                        let m = lock(&self.md);
                        let msg = Message::StateChange {
                            role: st.m.role(),
                            disk: st.m.disk(),
                            uuids: m.md.uuids(),
                            flags: 0,
                            bm_weight: m.md.bitmap().count(),
                        };
                        rest.push(Deferred::Send(link.tx.clone(), msg));
                    }
                }
                Action::SendSyncUuid(uuid) => {
                    if let Some(link) = &st.link {
                        rest.push(Deferred::Send(link.tx.clone(), Message::SyncUuid { uuid }));
                    }
                }
                Action::SendResyncDone(uuids) => {
                    if let Some(link) = &st.link {
                        rest.push(Deferred::Send(
                            link.tx.clone(),
                            Message::ResyncDone { uuids },
                        ));
                    }
                }
                other => rest.push(Deferred::Act(other)),
            }
        }
        Ok(rest)
    }

    /// [`Self::run_step`] under the state lock, then [`Self::perform`]; returns the actions
    /// `perform` leaves to the caller.
    async fn step(&self, ev: Event) -> Result<Vec<Action>, Refusal> {
        let d = {
            let mut st = lock(&self.st);
            self.run_step(&mut st, ev, None)?
        };
        self.notify();
        Ok(self.perform(d).await)
    }

    /// Carries out deferred actions in order, without the state lock: sends frames (a full
    /// link queue waits here, never under the lock) and persists the metadata. Returns the
    /// actions only the caller knows how to do (see [`Self::spawn_tasks`]).
    async fn perform(&self, deferred: Vec<Deferred>) -> Vec<Action> {
        let mut left = Vec::new();
        for d in deferred {
            match d {
                // A closed queue means the link is going; teardown answers what was pending.
                Deferred::Send(tx, m) => {
                    let _ = tx.send(m).await;
                }
                Deferred::Act(Action::Persist(what)) => self.persist(what).await,
                Deferred::Act(a) => left.push(a),
            }
        }
        left
    }

    /// Spawns the resync / verify walkers `actions` ask for; returns the other actions.
    fn spawn_tasks(self: &Arc<Self>, actions: Vec<Action>) -> Vec<Action> {
        let mut left = Vec::new();
        for a in actions {
            match a {
                Action::StartResyncSource { epoch } => {
                    self.spawn(self.clone().resync_source(epoch))
                }
                Action::StartVerify { epoch } => self.spawn(self.clone().verify_source(epoch)),
                a => left.push(a),
            }
        }
        left
    }

    /// Runs `f` on the metadata in a blocking thread (metadata I/O `fsync`s).
    async fn md_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut MdState) -> Result<R, MetadataError> + Send + 'static,
    ) -> Result<R, ReplicationError> {
        let md = self.md.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = lock(&md);
            f(&mut g)
        })
        .await
        .map_err(|e| ReplicationError::Config(format!("metadata task failed: {e}")))?
        .map_err(ReplicationError::from)
    }

    /// Writes dirty bitmap pages and the superblock; logs (does not return) errors.
    async fn persist(&self, what: &str) {
        if self.crashed.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.md_blocking(|m| m.md.flush()).await {
            error!(volume = %self.cfg.name, "writing metadata ({what}) failed: {e}");
        }
    }

    /// Takes [`Self::state_change`]: waits (bounded) for a running connection handshake.
    async fn lock_state_change(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, ReplicationError> {
        // Saturating: a timeout the configuration did not bound must not panic here.
        let wait = self.cfg.timeout.saturating_mul(4);
        match tokio::time::timeout(wait, self.state_change.lock()).await {
            Ok(g) => Ok(g),
            Err(_) => Err(ReplicationError::NotAllowed(
                "connection handshake in progress".into(),
            )),
        }
    }

    /// Makes this host primary (`drbdadm primary [--force]`, `drbd_nl.c` `drbd_set_role`).
    /// Refused if the peer is primary, or unless `force`, if the local disk is not
    /// UpToDate. Starting a new data generation when disconnected (`drbd_uuid_new_current`)
    /// so the next connect resyncs exactly what was written meanwhile.
    pub async fn promote(&self, force: bool) -> Result<(), ReplicationError> {
        if self.shutdown.is_cancelled() {
            return Err(ReplicationError::ShutDown);
        }
        let _serial = self.lock_state_change().await?;
        let plan = self.step(Event::Promote { force }).await?;
        let Some(&Action::PromoteMetadata { connected, forced }) = plan.first() else {
            return Ok(()); // already primary
        };
        let name = self.cfg.name.clone();
        // Tests stop a promotion here, between its check and its new role.
        fail_point("promote-metadata").await;
        self.md_blocking(move |m| {
            let mut u = m.md.uuids();
            if (!connected && u.bitmap == 0) || forced {
                u.new_current_random(true);
                info!(volume = %name, current = format_args!("{:016X}", u.current), "new data generation (promoted without peer)");
            } else {
                let c = u.current;
                u.set_current(c, true);
            }
            m.md.set_uuids(&u)?;
            if forced {
                let mut f = m.md.flags();
                f.insert(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
                m.md.set_flags(f);
            }
            m.md.mark_unclean(true)
        })
        .await?;
        self.step(Event::Promoted { forced }).await?;
        Ok(())
    }

    /// Makes this host secondary: new writes are refused, in-flight writes drain (bounded),
    /// data and metadata are flushed and the metadata is marked clean.
    pub async fn demote(&self) -> Result<(), ReplicationError> {
        if lock(&self.st).m.role() == Role::Secondary {
            return Ok(());
        }
        // Only the role flip: a handshake after it sends Secondary. Draining (up to 30 s)
        // under the lock would hold a reconnecting peer past its handshake timeout.
        {
            let _serial = self.lock_state_change().await?;
            self.step(Event::Demote).await?;
        }
        self.drain_app_io().await;
        if let Err(e) = self.data.flush().await {
            error!(volume = %self.cfg.name, "flush on demote failed: {e}");
        }
        self.md_blocking(|m| {
            let mut u = m.md.uuids();
            let c = u.current;
            u.set_current(c, false);
            m.md.set_uuids(&u)?;
            let mut f = m.md.flags();
            f.remove(MdFlags::PRIMARY_IND);
            m.md.set_flags(f);
            m.md.write_bitmap(true)?;
            m.md.mark_clean()
        })
        .await?;
        let d = {
            let mut st = lock(&self.st);
            self.run_step(&mut st, Event::Demoted, None)?
        };
        self.perform(d).await;
        Ok(())
    }

    async fn drain_app_io(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr.app_inflight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                warn!(volume = %self.cfg.name, "application writes still in flight after 30 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resumes suspended writes without the peer (`drbdadm resume-io`): they continue
    /// degraded, marking the bitmap. Cleared on the next connect.
    pub fn resume_io(&self) {
        let _ = self.step_sync(Event::ResumeIo);
    }

    /// Leaves StandAlone and tries to connect again (`drbdadm connect`).
    pub fn connect(&self) {
        let _ = self.step_sync(Event::Connect);
    }

    /// Drops the connection and stays StandAlone (`drbdadm disconnect`).
    pub fn disconnect(&self) {
        let _ = self.step_sync(Event::Disconnect);
    }

    /// Split-brain recovery on the losing host (`drbdadm connect --discard-my-data`): on
    /// the next connect this host becomes sync target and its changes (its bitmap, merged
    /// with the peer's) are overwritten. Requires the Secondary role.
    pub fn discard_my_data(&self) -> Result<(), ReplicationError> {
        self.step_sync(Event::DiscardMyData)
    }

    /// A step whose actions need no await (operator commands that only change state).
    fn step_sync(&self, ev: Event) -> Result<(), ReplicationError> {
        let d = {
            let mut st = lock(&self.st);
            self.run_step(&mut st, ev, None)?
        };
        debug_assert!(d.is_empty(), "deferred actions dropped: {d:?}");
        self.notify();
        Ok(())
    }

    /// Marks the whole local replica out of sync and Inconsistent (`drbdadm invalidate`):
    /// the next connect makes this host the target of a full sync. Requires Secondary; drops
    /// the current connection so the handshake runs again.
    pub async fn invalidate(&self) -> Result<(), ReplicationError> {
        let _serial = self.lock_state_change().await?;
        {
            let mut st = lock(&self.st);
            self.run_step(&mut st, Event::Invalidate, None)?;
        }
        warn!(volume = %self.cfg.name, "invalidate: whole replica marked out of sync");
        // Bitmap and flags first, so the next handshake sees them.
        self.md_blocking(|m| {
            m.md.bitmap_mut().set_all();
            let mut f = m.md.flags();
            f.remove(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
            m.md.set_flags(f);
            m.md.write_bitmap(true)?;
            m.md.write_superblock()
        })
        .await?;
        self.step_sync(Event::Invalidated)
    }

    /// This host's role and, while connected, the peer's: what ALUA reports, read for every
    /// SCSI command of such a LUN (one lock, unlike [`ReplicatedVolume::status`]).
    pub fn roles(&self) -> (Role, Option<Role>) {
        let st = lock(&self.st);
        (st.m.role(), st.m.peer().map(|p| p.role))
    }

    /// Current state.
    pub fn status(&self) -> VolumeStatus {
        let st = lock(&self.st);
        let m = lock(&self.md);
        let u = m.md.uuids();
        VolumeStatus {
            name: self.cfg.name.clone(),
            role: st.m.role(),
            peer_role: st.m.peer().map(|p| p.role),
            connection: st.m.conn_state(),
            disk_state: st.m.disk(),
            peer_disk_state: st.m.peer().map(|p| p.disk),
            resync: st.m.resync(),
            verify: st.m.verify().cloned(),
            out_of_sync_bytes: m.md.bitmap().count() * 4096,
            sent_bytes: self.ctr.sent.load(Ordering::Relaxed),
            received_bytes: self.ctr.received.load(Ordering::Relaxed),
            resync_sent_bytes: self.ctr.resync_sent.load(Ordering::Relaxed),
            resync_received_bytes: self.ctr.resync_received.load(Ordering::Relaxed),
            write_errors: self.ctr.write_errors.load(Ordering::Relaxed),
            split_brain: st.m.split_brain(),
            suspended: st.m.suspended(self.cfg.fencing),
            size_bytes: self.usable,
            current_uuid: u.current,
            bitmap_uuid: u.bitmap,
            history_uuids: u.history.clone(),
            md_flags: m.md.flags().bits(),
        }
    }

    /// Clean stop (`drbdadm down`): disconnects, flushes data, writes the whole bitmap and
    /// marks the metadata clean. The volume cannot be used afterwards.
    pub async fn shutdown(&self) -> Result<(), ReplicationError> {
        {
            let mut st = lock(&self.st);
            if st.m.closing() {
                return Ok(());
            }
            self.run_step(&mut st, Event::Shutdown, None)?;
        }
        self.shutdown.cancel();
        self.notify();
        self.drain_app_io().await;
        let handles: Vec<_> = std::mem::take(&mut *lock(&self.tasks));
        for h in handles {
            let _ = tokio::time::timeout(self.cfg.timeout, h).await;
        }
        self.data.flush().await?;
        self.md_blocking(|m| {
            let mut f = m.md.flags();
            f.remove(MdFlags::PRIMARY_IND);
            m.md.set_flags(f);
            let mut u = m.md.uuids();
            let c = u.current;
            u.set_current(c, false);
            m.md.set_uuids(&u)?;
            m.md.write_bitmap(true)?;
            m.md.mark_clean()
        })
        .await?;
        self.step_sync(Event::ShutdownDone)
    }

    /// Test hook: simulates a crash. Every background task and the peer connection are
    /// dropped at once, nothing more is written to the metadata (it stays as it was, e.g.
    /// unclean with the activity log of a primary).
    #[doc(hidden)]
    pub fn crash_for_test(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        let _ = self.step_sync(Event::Crash);
        self.shutdown.cancel();
        for h in lock(&self.tasks).drain(..) {
            h.abort();
        }
        self.notify();
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = tokio::spawn(f);
        let mut t = lock(&self.tasks);
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    fn wire_flags(st: &State) -> u32 {
        let flags = st.m.flags();
        let mut f = 0;
        if flags.discard_my_data {
            f |= crate::link::proto::WIRE_DISCARD_MY_DATA;
        }
        if flags.crashed_primary {
            f |= crate::link::proto::WIRE_CRASHED_PRIMARY;
        }
        f
    }
}

impl Drop for ReplicatedVolume {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Opens the metadata for a volume: replays the activity log if unclean, notes a crashed
/// primary, re-initialises the on-disk activity log and creates the in-memory one.
fn open_metadata(
    name: &str,
    path: PathBuf,
    layout: Layout,
    data_size: u64,
    al_extents: u32,
) -> Result<(MdState, bool), ReplicationError> {
    let mut md = match Metadata::open(&path, layout) {
        Err(MetadataError::UnknownDataSize) => {
            Metadata::open_with_data_size(&path, layout, data_size)?
        }
        r => r?,
    };
    let mut crashed_primary = md.flags().contains(MdFlags::CRASHED_PRIMARY);
    let was_primary = md.flags().contains(MdFlags::PRIMARY_IND);
    if md.state() == MetaState::Unclean {
        let report = md.apply_al()?;
        warn!(
            volume = %name,
            was_primary,
            hot_extents = report.replay.as_ref().map_or(0, |r| r.hot_extents.len()),
            bits_newly_set = report.bits_newly_set,
            "metadata was not closed cleanly: activity log replayed into the bitmap"
        );
    }
    if was_primary {
        // drbd_nl.c attach: MDF_PRIMARY_IND at attach -> CRASHED_PRIMARY, clean or not
        // (clean metadata with it set comes from DRBD, e.g. a primary stopped without
        // demoting; twinsan itself clears it on every clean stop).
        crashed_primary = true;
    }
    let mut f = md.flags();
    f.set(MdFlags::CRASHED_PRIMARY, crashed_primary);
    f.remove(MdFlags::PRIMARY_IND);
    md.set_flags(f);
    if md.effective_size() == 0 {
        let s = md.data_sectors();
        md.set_effective_size(s)?;
    }
    md.initialize_al()?;
    let al = md.new_activity_log(al_extents)?;
    md.flush()?;
    Ok((MdState { md, al }, crashed_primary))
}

impl std::fmt::Debug for ReplicatedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedVolume")
            .field("name", &self.cfg.name)
            .field("usable", &self.usable)
            .finish_non_exhaustive()
    }
}

/// Splits `[offset, offset+len)` data into parts of at most `max` bytes.
pub(crate) fn split_parts(offset: u64, data: &Bytes, max: usize) -> Vec<(u64, Bytes)> {
    let mut v = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let n = (data.len() - pos).min(max);
        v.push((offset + pos as u64, data.slice(pos..pos + n)));
        pos += n;
    }
    v
}
