//! A logical unit (SAM-5 4.6.19): settings, store, Block Limits and the unit attentions
//! pending per I_T nexus. The SBC handlers and the target's dispatch both work on it.

use super::alua::Alua;
use super::limits::BlockLimits;
use super::medium::MediumState;
use super::pr::PrState;
use super::sanitize::SanitizeState;
use super::sense::Sense;
use super::thin::ThinMonitor;
use super::{LunSettings, NexusId};
use crate::store::BlockStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// One logical unit: its settings, its store, and the unit attentions pending per I_T nexus.
pub struct LogicalUnit {
    lun: u64,
    pub(crate) settings: LunSettings,
    pub(crate) store: Arc<dyn BlockStore>,
    pub(crate) limits: BlockLimits,
    /// Reads and writes take it shared; COMPARE AND WRITE, ORWRITE and WRITE ATOMIC
    /// exclusively: they are atomic with respect to every other read and write of the
    /// logical unit (SBC-3 5.2, 5.11; SBC-4 4.29).
    pub(crate) write_gate: tokio::sync::RwLock<()>,
    unit_attentions: Mutex<HashMap<NexusId, Vec<(u8, u8)>>>,
    /// Fast path: false when no nexus has a unit attention pending.
    any_unit_attention: AtomicBool,
    /// The soft threshold of a thin LUN that has one.
    pub(crate) thin: Option<ThinMonitor>,
    /// Persistent and SPC-2 reservations (SPC-4 5.13).
    pr: Mutex<PrState>,
    /// Fast path: false while no registration and no SPC-2 reservation exist.
    pr_active: AtomicBool,
    /// Where the reservation state is kept while APTPL is set (unset: never persisted).
    pr_file: OnceLock<PathBuf>,
    /// On a replicated LUN: where a PERSISTENT RESERVE OUT's new state goes before the
    /// command completes.
    pr_replicator: OnceLock<Arc<dyn PrReplicator>>,
    /// PERSISTENT RESERVE OUTs of a replicated LUN one at a time, change and replication
    /// together: the replica receives the states in the order they were made.
    pub(super) pr_out_gate: tokio::sync::Mutex<()>,
    /// Command counters, latencies and queue depth (status and the metrics endpoint).
    pub(super) stats: super::stats::LunStats,
    /// Asymmetric access across the pair (SPC-4 5.16), when on.
    alua: OnceLock<Alua>,
    /// The SANITIZE running on this unit, or the failure mode one left (SBC-4 4.11).
    pub(crate) sanitize: SanitizeState,
    /// SWP of the Control mode page (SPC-4 7.5.8): the medium is write protected for every
    /// I_T nexus. Not saved: a restart (or a failover) comes up with SWP clear.
    swp: AtomicBool,
    /// Every block is deallocated: a SANITIZE BLOCK ERASE succeeded and nothing has written
    /// since (GET LBA STATUS reports the range deallocated; otherwise "mapped or unknown").
    deallocated: AtomicBool,
    /// A removable unit's medium: loaded or not, and the preventions of its removal (SBC-3
    /// 5.12). In memory only: a restart (or the peer after a failover) starts loaded, with
    /// none.
    pub(crate) medium: MediumState,
    /// On a removable unit, the commands that need the medium hold it shared while they
    /// run; an unload takes it exclusively, so it waits for them (see `start_stop_unit`).
    pub(crate) medium_gate: tokio::sync::RwLock<()>,
}

/// Future of [`PrReplicator::replicate`].
pub type PrReplicateFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// Carries a logical unit's persistent reservation state to the replica of a replicated LUN
/// (the replicated volume implements it; the SCSI layer knows nothing else of it). Same rule
/// as the data (protocol C): a PERSISTENT RESERVE OUT completes only once the peer stored the
/// new state, so after a failover the reservation holder still holds it (SPC-4 5.13: a
/// failover is not a power loss of the logical unit, the reservations stay).
pub trait PrReplicator: Send + Sync {
    /// Replicates `state` (the encoded [`PrState`]): done when the peer stored it or, with
    /// no peer connected, when it is marked to be sent at the next connect. An error means
    /// this host may not change reservations (not primary): the change is undone.
    fn replicate(&self, state: bytes::Bytes) -> PrReplicateFuture<'_>;
}

impl LogicalUnit {
    pub(super) fn new(lun: u64, settings: LunSettings, store: Arc<dyn BlockStore>) -> Self {
        let thin = settings
            .thin_threshold
            .clone()
            .filter(|_| settings.thin_provisioning)
            .map(ThinMonitor::new);
        LogicalUnit {
            lun,
            thin,
            limits: BlockLimits::for_block_size(settings.block_size),
            settings,
            store,
            write_gate: tokio::sync::RwLock::new(()),
            unit_attentions: Mutex::new(HashMap::new()),
            any_unit_attention: AtomicBool::new(false),
            pr: Mutex::new(PrState::default()),
            pr_active: AtomicBool::new(false),
            pr_file: OnceLock::new(),
            pr_replicator: OnceLock::new(),
            pr_out_gate: tokio::sync::Mutex::new(()),
            stats: Default::default(),
            alua: OnceLock::new(),
            sanitize: SanitizeState::default(),
            swp: AtomicBool::new(false),
            deallocated: AtomicBool::new(false),
            medium: MediumState::default(),
            medium_gate: tokio::sync::RwLock::new(()),
        }
    }

    /// Whether software write protection (SWP) is on.
    pub fn software_write_protected(&self) -> bool {
        self.swp.load(Ordering::Acquire)
    }

    /// Sets SWP; returns whether it changed.
    pub(super) fn set_software_write_protect(&self, on: bool) -> bool {
        self.swp.swap(on, Ordering::AcqRel) != on
    }

    /// Whether every block is known to be deallocated (see the field).
    pub(super) fn all_deallocated(&self) -> bool {
        self.deallocated.load(Ordering::Acquire)
    }

    pub(super) fn set_all_deallocated(&self, v: bool) {
        // Most writes find it clear: a load first keeps the cache line shared.
        if self.deallocated.load(Ordering::Relaxed) != v {
            self.deallocated.store(v, Ordering::Release);
        }
    }

    /// This unit's command statistics.
    pub fn stats(&self) -> &super::stats::LunStats {
        &self.stats
    }

    /// Turns ALUA on for this unit (its identity must carry the own port group, so INQUIRY
    /// reports TPGS=01b). The first one set stays.
    pub fn enable_alua(&self, alua: Alua) {
        let _ = self.alua.set(alua);
    }

    pub(super) fn alua(&self) -> Option<&Alua> {
        self.alua.get()
    }

    /// Replicates this unit's reservation changes through `r` (a replicated LUN). The first
    /// one set stays.
    pub fn replicate_reservations_through(&self, r: Arc<dyn PrReplicator>) {
        let _ = self.pr_replicator.set(r);
    }

    pub(super) fn pr_replicator(&self) -> Option<&Arc<dyn PrReplicator>> {
        self.pr_replicator.get()
    }

    /// The reservation state as replicated: [`PrState`] in JSON, the APTPL file's format.
    pub fn encode_reservations(state: &PrState) -> bytes::Bytes {
        serde_json::to_vec(state).expect("serializes").into()
    }

    /// The peer's reservation state (this host is the replica): replaces the persistent
    /// reservations (the SPC-2 reservation is per nexus, never replicated, and stays), and
    /// is persisted like a local change (APTPL). Err: unreadable, or the APTPL file could
    /// not be written.
    pub fn receive_replicated_reservations(&self, bytes: &[u8]) -> Result<(), String> {
        let mut new: PrState =
            serde_json::from_slice(bytes).map_err(|e| format!("reservation state: {e}"))?;
        let mut state = self.reservations();
        new.spc2_holder = state.spc2_holder.take();
        *state = new;
        tracing::debug!(
            lun = self.lun,
            generation = state.generation,
            registrations = state.registrations.len(),
            reserved = state.reservation.is_some(),
            "reservation state received from the peer"
        );
        self.write_reservations(&state)
            .map_err(|e| format!("cannot persist the reservations (APTPL): {e}"))
    }

    /// The reservation state (SPC-4 5.13), locked.
    pub fn reservations(&self) -> PrGuard<'_> {
        PrGuard {
            state: self.pr.lock().unwrap_or_else(|p| p.into_inner()),
            active: &self.pr_active,
        }
    }

    /// Whether any registration or SPC-2 reservation exists: without, nothing conflicts.
    pub fn reservations_active(&self) -> bool {
        self.pr_active.load(Ordering::Acquire)
    }

    /// Keeps the persistent reservation state in `file` while APTPL is set (SPC-4 5.13.5)
    /// and loads what it holds: the state persisted by an earlier run. A file that cannot be
    /// read is an error (starting without the reservations would drop a fence silently).
    pub fn persist_reservations_in(&self, file: PathBuf) -> std::io::Result<()> {
        match std::fs::read(&file) {
            Ok(bytes) => {
                let state: PrState = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", file.display()),
                    )
                })?;
                if state.aptpl {
                    tracing::info!(lun = self.lun, file = %file.display(),
                        registrations = state.registrations.len(),
                        reserved = state.reservation.is_some(),
                        "persistent reservations reloaded (APTPL)");
                    *self.reservations() = state;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = self.pr_file.set(file);
        Ok(())
    }

    /// After a change to the reservations: writes them (atomic write and rename) while APTPL
    /// is set, removes the file once it is cleared.
    pub(super) fn save_reservations(&self, state: &PrState) {
        if let Err(e) = self.write_reservations(state) {
            tracing::error!(lun = self.lun, file = ?self.pr_file.get(), error = %e,
                "cannot persist the persistent reservations (APTPL)");
        }
    }

    fn write_reservations(&self, state: &PrState) -> std::io::Result<()> {
        let Some(file) = self.pr_file.get() else {
            return Ok(());
        };
        if state.aptpl {
            write_atomic(file, &serde_json::to_vec_pretty(state).expect("serializes"))
        } else {
            match std::fs::remove_file(file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }

    /// The LUN number (not the 8-byte encoding).
    pub fn lun(&self) -> u64 {
        self.lun
    }

    pub fn settings(&self) -> &LunSettings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.store
    }

    pub fn block_size(&self) -> u32 {
        self.settings.block_size
    }

    /// Capacity in logical blocks (a partial trailing block is not addressable).
    pub fn num_blocks(&self) -> u64 {
        self.store.size() / u64::from(self.settings.block_size)
    }

    fn unit_attentions(&self) -> std::sync::MutexGuard<'_, HashMap<NexusId, Vec<(u8, u8)>>> {
        self.unit_attentions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Establishes a unit attention for `nexuses` (SAM-5 5.14). A reset supersedes whatever
    /// was pending; other conditions queue behind it once each.
    pub(super) fn establish_unit_attention<'a>(
        &self,
        nexuses: impl Iterator<Item = &'a NexusId>,
        code: (u8, u8),
    ) {
        let mut map = self.unit_attentions();
        for &nexus in nexuses {
            let pending = map.entry(nexus).or_default();
            if code.0 == 0x29 {
                pending.clear();
                pending.push(code);
            } else if !pending.contains(&code) {
                pending.push(code);
            }
        }
        self.any_unit_attention
            .store(!map.is_empty(), Ordering::Release);
    }

    /// Reports and clears the highest-priority unit attention pending for `nexus`.
    pub(super) fn take_unit_attention(&self, nexus: NexusId) -> Option<Sense> {
        if !self.any_unit_attention.load(Ordering::Acquire) {
            return None;
        }
        let mut map = self.unit_attentions();
        let pending = map.get_mut(&nexus)?;
        let (asc, ascq) = pending.remove(0);
        if pending.is_empty() {
            map.remove(&nexus);
        }
        self.any_unit_attention
            .store(!map.is_empty(), Ordering::Release);
        Some(Sense::unit_attention(asc, ascq))
    }

    pub(super) fn forget_nexus(&self, nexus: NexusId) {
        let mut map = self.unit_attentions();
        map.remove(&nexus);
        self.any_unit_attention
            .store(!map.is_empty(), Ordering::Release);
    }
}

fn write_atomic(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The locked reservation state of a logical unit; keeps the unit's fast-path flag in step.
pub struct PrGuard<'a> {
    state: MutexGuard<'a, PrState>,
    active: &'a AtomicBool,
}

impl std::ops::Deref for PrGuard<'_> {
    type Target = PrState;
    fn deref(&self) -> &PrState {
        &self.state
    }
}

impl std::ops::DerefMut for PrGuard<'_> {
    fn deref_mut(&mut self) -> &mut PrState {
        &mut self.state
    }
}

impl Drop for PrGuard<'_> {
    fn drop(&mut self) {
        let active = !self.state.registrations.is_empty() || self.state.spc2_holder.is_some();
        self.active.store(active, Ordering::Release);
    }
}
