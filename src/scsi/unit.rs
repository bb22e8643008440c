//! A logical unit (SAM-5 4.6.19): settings, store, Block Limits and the unit attentions
//! pending per I_T nexus. The SBC handlers and the target's dispatch both work on it.

use super::limits::BlockLimits;
use super::sense::Sense;
use super::thin::ThinMonitor;
use super::{LunSettings, NexusId};
use crate::store::BlockStore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One logical unit: its settings, its store, and the unit attentions pending per I_T nexus.
pub struct LogicalUnit {
    lun: u64,
    pub(crate) settings: LunSettings,
    pub(crate) store: Arc<dyn BlockStore>,
    pub(crate) limits: BlockLimits,
    /// Writes take it shared, COMPARE AND WRITE exclusively: the compare and the write are
    /// atomic with respect to every other write to the logical unit (SBC-3 5.2).
    pub(crate) write_gate: tokio::sync::RwLock<()>,
    unit_attentions: Mutex<HashMap<NexusId, Vec<(u8, u8)>>>,
    /// Fast path: false when no nexus has a unit attention pending.
    any_unit_attention: AtomicBool,
    /// The soft threshold of a thin LUN that has one.
    pub(crate) thin: Option<ThinMonitor>,
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
