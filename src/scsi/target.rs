//! The SCSI target device: logical units behind LUNs, unit attentions per I_T nexus, and the
//! dispatch from a CDB to the SPC / SBC handlers.
//!
//! # What the transport does with lengths (iSCSI residuals, RFC 7143 11.4.5)
//!
//! * Before soliciting data, call [`ScsiTarget::plan`]. `Fail` → send that response, solicit
//!   nothing (unsolicited / immediate data that arrives anyway is read and dropped).
//!   `Gather(n)` → `n` is the SCSI transfer length in bytes. Solicit (R2T) only up to
//!   `min(n, EDTL)`; of the immediate + unsolicited + solicited data keep the first
//!   `min(n, EDTL)` bytes, drop the rest, and pass them as `ScsiRequest::data_out`.
//!   `None` → no Data-Out (Data-Out sent for it anyway is dropped).
//! * Data-Out shorter than `n` (EDTL < transfer length) is not an error when it is a whole
//!   number of [`PlannedCommand::data_out_unit`]s: the SCSI layer writes / compares only the
//!   whole blocks that arrived, status GOOD (FCP-4 FCP_DL overflow rule a; libiscsi iSCSIResiduals: "if EDTL
//!   < SCSI TL then only EDTL is written"). An EDTL below `n` that is not (a WRITE's 200 bytes
//!   of a 512-byte block) cannot be honoured: before soliciting anything, answer CHECK
//!   CONDITION, ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT with the overflow
//!   residual below, and write nothing (FCP-4 FCP_DL overflow rule b). Never GOOD with other bytes on the
//!   medium than the initiator sent. WRITE SAME and COMPARE AND WRITE need exactly their
//!   buffer and fail with ILLEGAL REQUEST otherwise (libiscsi `*InvalidDataOutSize`).
//! * Residuals for a Data-Out command: with `n` from `Gather(n)` (0 for `None`),
//!   EDTL < n → overflow (O bit), residual n − EDTL; EDTL > n → underflow (U bit),
//!   residual EDTL − n.
//! * Residuals for a Data-In command: `data_in` is the length the command produced
//!   (allocation length already applied). Send `min(len, EDTL)` bytes; len > EDTL →
//!   overflow, residual len − EDTL; len < EDTL → underflow, residual EDTL − len.

use super::alua;
use super::cdb::{self, opcode, Command, StartStopUnit};
use super::medium::{self, Movement};
use super::pr::{Effects, InitiatorPort, PrError, PrOut};
use super::sanitize::{self, Operation, Pacer};
use super::sbc;
use super::sense::{Sense, SenseKey};
use super::spc;
use super::stats::CommandClass;
use super::thin::{ThresholdEvent, UA_SOFT_THRESHOLD};
use super::unit::{LogicalUnit, PrReplicator};
use super::xcopy;
use super::{DataOutPlan, LunSettings, NexusId, ScsiRequest, ScsiResponse, Status};
use crate::store::{BlockStore, WriteMode};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;
use tracing::{debug, error, info, warn};

/// Additional sense codes of the unit attentions this target establishes (SPC-4 D.2).
const UA_RESET: (u8, u8) = (0x29, 0x00);
const UA_LOGICAL_UNIT_RESET: (u8, u8) = (0x29, 0x03);
const UA_CAPACITY_CHANGED: (u8, u8) = (0x2A, 0x09);
const UA_MODE_PARAMETERS_CHANGED: (u8, u8) = (0x2A, 0x01);

/// What the HA layer gives the target to send an alert: (LUN, message).
pub type ThinAlertHook = Box<dyn Fn(u64, String) + Send + Sync>;

/// What the transport gives the target to abort the tasks of an I_T nexus on a logical unit
/// (PREEMPT AND ABORT, SPC-4 5.13.11.5): (nexus, LUN number).
pub type AbortTasksHook = Box<dyn Fn(NexusId, u64) + Send + Sync>;

/// Operation code of a CDB for logs, in hex.
struct Opcode<'a>(&'a [u8]);

impl std::fmt::Display for Opcode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.first() {
            Some(op) => write!(f, "{op:#04x}"),
            None => f.write_str("none"),
        }
    }
}

/// A command routed once by [`ScsiTarget::plan`] (LUN resolved, unit attention reported, CDB
/// decoded and checked) and carried to [`ScsiTarget::execute`].
#[derive(Debug, Clone)]
pub struct PlannedCommand {
    /// The PDU's 8-byte LUN field, for logs.
    raw_lun: u64,
    /// The logical unit's LUN number; `None` for INQUIRY, REQUEST SENSE or REPORT LUNS
    /// addressed to a LUN without one.
    unit: Option<u64>,
    cmd: Command,
    /// Bytes of bulk Data-In the command produces (a READ's transfer length), else 0.
    data_in: u64,
    /// [`Command::data_out_unit`]: a shorter Data-Out must be a multiple of this.
    data_out_unit: u32,
}

impl PlannedCommand {
    /// Bytes of bulk Data-In the command produces at most: a READ's transfer length; 0 for
    /// commands whose parameter data is small (INQUIRY, MODE SENSE, REPORT LUNS...).
    pub fn data_in_len(&self) -> u64 {
        self.data_in
    }

    /// Whether the command's work belongs to the logical unit rather than to its task
    /// (SANITIZE, SBC-4 4.11): its execution only waits for that work, so a transport may
    /// stop waiting when the task is aborted; the work goes on.
    pub fn owned_by_unit(&self) -> bool {
        matches!(self.cmd, Command::Sanitize(_))
    }

    /// The unit a Data-Out shorter than `Gather(n)`'s `n` must come in (a WRITE's block
    /// size; 1 for other commands). See the module documentation.
    pub fn data_out_unit(&self) -> u32 {
        self.data_out_unit
    }
}

/// Where a command goes once the LUN is resolved.
enum Route<'a> {
    Unit(&'a LogicalUnit, Command),
    /// INQUIRY, REQUEST SENSE or REPORT LUNS addressed to a LUN without a logical unit.
    NoUnit(Command),
}

/// The SCSI target device: a set of logical units and the I_T nexuses that have talked to
/// them.
pub struct ScsiTarget {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
    /// Called with (LUN, message) when a LUN crosses its thin provisioning soft threshold
    /// (the HA layer sends it as an alert); unset without `[ha]`.
    thin_alert: OnceLock<ThinAlertHook>,
    /// Aborts a nexus's tasks on a logical unit (PREEMPT AND ABORT); unset: nothing aborted.
    abort_tasks: OnceLock<AbortTasksHook>,
    /// Every I_T nexus that has sent a command since it was established; resets establish
    /// unit attentions for these. New nexuses get none (no power-on unit attention: a
    /// reconnecting initiator must not see a spurious one).
    nexuses: RwLock<HashSet<NexusId>>,
    /// The initiator port (name + ISID) of each I_T nexus logged in, for reservations.
    ports: RwLock<HashMap<NexusId, InitiatorPort>>,
    /// Status of the EXTENDED COPY commands each I_T nexus sent with a list identifier to
    /// keep, for RECEIVE COPY RESULTS (SPC-4 6.18.3); oldest first, bounded per nexus.
    copy_results: std::sync::Mutex<HashMap<NexusId, Vec<(u8, xcopy::CopyStatus)>>>,
    /// (I_T nexus, list identifier) of the EXTENDED COPY commands being processed.
    copies_in_progress: Arc<std::sync::Mutex<HashSet<(NexusId, u8)>>>,
}

/// Removes a copy from [`ScsiTarget::copies_in_progress`] when it ends, however it ends.
struct CopyInProgress {
    set: Arc<std::sync::Mutex<HashSet<(NexusId, u8)>>>,
    key: (NexusId, u8),
}

impl Drop for CopyInProgress {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Copy statuses kept per I_T nexus (one per list identifier, the oldest dropped first).
const MAX_COPY_RESULTS: usize = 256;
/// Bytes one EXTENDED COPY reads and writes at a time (bounds the memory a copy pins).
const COPY_CHUNK_BYTES: u64 = 1 << 20;
/// Bytes one SANITIZE OVERWRITE write carries (the memory a sanitize pins).
const SANITIZE_CHUNK_BYTES: u64 = 1 << 20;
/// Bytes one SANITIZE BLOCK ERASE deallocates at a time (the progress indication's step).
const ERASE_CHUNK_BYTES: u64 = 1 << 30;

/// RESERVATION CONFLICT: status 18h, no sense data (SAM-5 5.3.1).
fn reservation_conflict() -> ScsiResponse {
    ScsiResponse {
        status: Status::ReservationConflict,
        sense: None,
        data_in: Bytes::new(),
    }
}

impl ScsiTarget {
    /// Builds the target from `(LUN number, settings, store)`. LUN numbers above
    /// [`spc::MAX_LUN`] and block sizes that are not a power of two in 512..=65536 are
    /// refused (logged and left out).
    pub fn new(luns: Vec<(u64, LunSettings, Arc<dyn BlockStore>)>) -> Self {
        let mut map = BTreeMap::new();
        for (lun, settings, store) in luns {
            let bs = settings.block_size;
            if lun > spc::MAX_LUN {
                error!(
                    lun,
                    "LUN number cannot be addressed (max {}); skipped",
                    spc::MAX_LUN
                );
                continue;
            }
            if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                error!(
                    lun,
                    block_size = bs,
                    "unsupported logical block size; LUN skipped"
                );
                continue;
            }
            if store.size() % u64::from(bs) != 0 {
                warn!(
                    lun,
                    size = store.size(),
                    block_size = bs,
                    "store size is not a whole number of blocks"
                );
            }
            info!(lun, block_size = bs, read_only = settings.read_only, thin = settings.thin_provisioning, store = %store.describe(), "logical unit");
            let unit = Arc::new(LogicalUnit::new(lun, settings, store));
            if map.insert(lun, unit).is_some() {
                warn!(lun, "LUN configured twice; the last one wins");
            }
        }
        ScsiTarget {
            luns: map,
            thin_alert: OnceLock::new(),
            abort_tasks: OnceLock::new(),
            nexuses: RwLock::new(HashSet::new()),
            ports: RwLock::new(HashMap::new()),
            copy_results: std::sync::Mutex::new(HashMap::new()),
            copies_in_progress: Arc::new(std::sync::Mutex::new(HashSet::new())),
        }
    }

    /// A session logged in to this target: `nexus` is the I_T nexus of initiator port
    /// `initiator` + `isid` (RFC 7143 4.4.2). A new session of the same initiator port means
    /// the previous I_T nexus was lost: its SPC-2 reservations go.
    pub fn nexus_established(&self, nexus: NexusId, initiator: &str, isid: [u8; 6]) {
        let port = InitiatorPort::new(initiator, isid);
        for unit in self.luns.values() {
            unit.reservations().nexus_lost(&port);
        }
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nexus, port);
    }

    /// The session of `nexus` ended (logout or connection loss): SPC-2 reservations it held
    /// are released (SPC-2 5.5.1); persistent reservations stay (SPC-4 5.13.1).
    pub fn nexus_closed(&self, nexus: NexusId) {
        let port = self
            .ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nexus);
        if let Some(port) = port {
            for unit in self.luns.values() {
                unit.reservations().nexus_lost(&port);
            }
        }
        // SBC-3 5.12: the I_T nexus loss ends its preventions of medium removal.
        for unit in self.luns.values() {
            unit.medium.nexus_lost(nexus);
        }
    }

    /// The initiator port of `nexus`; one made up from the id for a nexus nobody announced
    /// (a transport's unit tests).
    fn port_of(&self, nexus: NexusId) -> InitiatorPort {
        self.ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&nexus)
            .cloned()
            .unwrap_or_else(|| {
                InitiatorPort::new(
                    "twinsan.nexus",
                    nexus.to_be_bytes()[2..].try_into().unwrap(),
                )
            })
    }

    /// Carries out what a reservation command asks of other I_T nexuses: unit attentions
    /// (SPC-4 5.13.11) to every nexus of the initiator ports named.
    fn apply_effects(&self, unit: &LogicalUnit, fx: &Effects) {
        if fx.unit_attentions.is_empty() && fx.abort.is_empty() {
            return;
        }
        let ports = self.ports.read().unwrap_or_else(|p| p.into_inner());
        let nexuses_of = |port: &InitiatorPort| -> Vec<NexusId> {
            ports
                .iter()
                .filter(|(_, p)| port.covers(p))
                .map(|(&n, _)| n)
                .collect()
        };
        for (port, code) in &fx.unit_attentions {
            unit.establish_unit_attention(nexuses_of(port).iter(), *code);
        }
        for port in &fx.abort {
            for nexus in nexuses_of(port) {
                info!(lun = unit.lun(), initiator = %port.port_name(), "PREEMPT AND ABORT: aborting the preempted nexus's tasks");
                if let Some(hook) = self.abort_tasks.get() {
                    hook(nexus, unit.lun());
                }
            }
        }
    }

    /// Sets how the tasks of an I_T nexus on a logical unit are aborted (PREEMPT AND ABORT).
    /// The first hook set stays.
    pub fn set_abort_tasks(&self, hook: AbortTasksHook) {
        let _ = self.abort_tasks.set(hook);
    }

    /// PERSISTENT RESERVE IN / OUT, RESERVE and RELEASE on `unit`.
    async fn execute_reservation(
        &self,
        unit: &LogicalUnit,
        cmd: &Command,
        req: &ScsiRequest,
    ) -> ScsiResponse {
        if let (Command::PersistentReserveOut(p), Some(rep)) = (cmd, unit.pr_replicator()) {
            return self
                .replicated_reserve_out(unit, rep.as_ref(), p, req)
                .await;
        }
        let me = self.port_of(req.nexus);
        let rel_port = unit.settings.identity.relative_port;
        let mut state = unit.reservations();
        let r = match cmd {
            Command::PersistentReserveIn {
                service_action,
                alloc_len,
            } => {
                return match state.reserve_in(*service_action, rel_port) {
                    Ok(mut d) => {
                        d.truncate(*alloc_len as usize);
                        ScsiResponse::good(d.into())
                    }
                    Err(sense) => ScsiResponse::check(sense),
                }
            }
            Command::PersistentReserveOut(p) => {
                state.reserve_out(&me, rel_port, p, &req.data_out).map(|fx| {
                    unit.save_reservations(&state);
                    info!(lun = unit.lun(), initiator = %me.port_name(), service_action = p.service_action,
                        generation = state.generation, "PERSISTENT RESERVE OUT");
                    self.apply_effects(unit, &fx);
                })
            }
            Command::Reserve => state.reserve_spc2(&me),
            Command::Release => state.release_spc2(&me),
            _ => unreachable!("not a reservation command"),
        };
        match r {
            Ok(()) => ScsiResponse::good(Bytes::new()),
            Err(PrError::Conflict) => reservation_conflict(),
            Err(PrError::Check(sense)) => ScsiResponse::check(sense),
        }
    }

    /// PERSISTENT RESERVE OUT on a replicated logical unit: the change is made, then
    /// replicated, and the command completes (and its unit attentions and aborts happen) only
    /// once the peer stored the new state, or once it is marked to be sent at the next
    /// connect when the peer is away (the protocol-C rule of the data; SPC-4 5.13). A host
    /// that may not change reservations (not primary) undoes the change: NOT READY, LOGICAL
    /// UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE.
    async fn replicated_reserve_out(
        &self,
        unit: &LogicalUnit,
        rep: &dyn PrReplicator,
        p: &PrOut,
        req: &ScsiRequest,
    ) -> ScsiResponse {
        let _one = unit.pr_out_gate.lock().await;
        let me = self.port_of(req.nexus);
        let rel_port = unit.settings.identity.relative_port;
        let (before, fx, blob, generation) = {
            let mut state = unit.reservations();
            let before = state.clone();
            match state.reserve_out(&me, rel_port, p, &req.data_out) {
                Ok(fx) => {
                    unit.save_reservations(&state);
                    let blob = LogicalUnit::encode_reservations(&state);
                    (before, fx, blob, state.generation)
                }
                Err(PrError::Conflict) => return reservation_conflict(),
                Err(PrError::Check(sense)) => return ScsiResponse::check(sense),
            }
        };
        if let Err(e) = rep.replicate(blob).await {
            warn!(lun = unit.lun(), initiator = %me.port_name(), "PERSISTENT RESERVE OUT refused: {e}");
            let mut state = unit.reservations();
            let spc2 = state.spc2_holder.take();
            *state = before;
            state.spc2_holder = spc2;
            unit.save_reservations(&state);
            return ScsiResponse::check(Sense::new(SenseKey::NotReady, 0x04, 0x0b));
        }
        info!(lun = unit.lun(), initiator = %me.port_name(), service_action = p.service_action,
            generation, "PERSISTENT RESERVE OUT (replicated)");
        self.apply_effects(unit, &fx);
        ScsiResponse::good(Bytes::new())
    }

    /// The logical unit with LUN number `lun`.
    pub fn logical_unit(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    /// All logical units, by ascending LUN.
    pub fn logical_units(&self) -> impl Iterator<Item = &Arc<LogicalUnit>> {
        self.luns.values()
    }

    /// Whether a logical unit answers at `lun` (the raw 8-byte LUN field of a PDU), e.g. to
    /// answer a task management request for a LUN that does not exist.
    pub fn has_lun(&self, lun: u64) -> bool {
        self.unit_at(lun).is_some()
    }

    fn unit_at(&self, raw_lun: u64) -> Option<&LogicalUnit> {
        spc::decode_lun(raw_lun)
            .and_then(|n| self.luns.get(&n))
            .map(|u| u.as_ref())
    }

    fn note_nexus(&self, nexus: NexusId) {
        let known = self
            .nexuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&nexus);
        if !known {
            self.nexuses
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(nexus);
        }
    }

    /// Sets what is called, besides the log line and the unit attention, when a LUN crosses
    /// its thin provisioning soft threshold. The first hook set stays.
    pub fn set_thin_alert(&self, hook: ThinAlertHook) {
        let _ = self.thin_alert.set(hook);
    }

    /// After a command that writes or unmaps on `unit` (`full`: it failed for want of space):
    /// compares the backing filesystem's usage with the LUN's soft threshold, and on an
    /// upward crossing raises UNIT ATTENTION 38/07 for every I_T nexus (SBC-3 4.7.3.8, SITUA
    /// 0), logs one warn line and calls the alert hook; below the threshold again, re-arms.
    fn check_thin_threshold(&self, unit: &LogicalUnit, full: bool) {
        let Some(monitor) = &unit.thin else {
            return;
        };
        let t = &monitor.threshold;
        match monitor.after_write(full) {
            Some(ThresholdEvent::Reached { used }) => {
                let msg = format!(
                    "LUN {}: the filesystem of {} is {used}% full, at or above the thin provisioning soft threshold of {}%; writes fail with SPACE ALLOCATION FAILED once it is full",
                    unit.lun(),
                    t.path.display(),
                    t.percent
                );
                warn!(lun = unit.lun(), path = %t.path.display(), used_percent = used,
                    threshold_percent = t.percent, "thin provisioning soft threshold reached: {msg}");
                self.establish_unit_attention(&[unit], UA_SOFT_THRESHOLD);
                if let Some(hook) = self.thin_alert.get() {
                    hook(unit.lun(), msg);
                }
            }
            Some(ThresholdEvent::Cleared { used }) => {
                info!(lun = unit.lun(), path = %t.path.display(), used_percent = used,
                    threshold_percent = t.percent,
                    "backing filesystem below the thin provisioning soft threshold again; re-armed");
            }
            None => {}
        }
    }

    fn establish_unit_attention(&self, units: &[&LogicalUnit], code: (u8, u8)) {
        let nexuses = self.nexuses.read().unwrap_or_else(|p| p.into_inner());
        for unit in units {
            unit.establish_unit_attention(nexuses.iter(), code);
        }
    }

    /// Resolves the LUN, reports a pending unit attention, decodes the CDB and runs the
    /// checks that need no data. Order: LOGICAL UNIT NOT SUPPORTED (SPC-4 6.4.1, 6.33,
    /// 6.39: only INQUIRY, REPORT LUNS and REQUEST SENSE work without a logical unit), then
    /// UNIT ATTENTION (SAM-5 5.14: not reported to those three), then the CDB itself.
    fn route(&self, raw_lun: u64, cdb: &[u8], nexus: NexusId) -> Result<Route<'_>, Sense> {
        let unit = self.unit_at(raw_lun);
        // ALUA (SPC-4 5.16.2.7): a change of the groups' states since the last command is a
        // unit attention for every I_T nexus that existed (noted after, so that a nexus
        // whose first command this is does not get one for a change it never saw).
        let own_state = unit.and_then(|u| u.alua()).map(|a| {
            let (states, changed) = a.observe();
            if let Some(unit) = unit.filter(|_| changed) {
                info!(lun = unit.lun(), own = ?states.own, peer = ?states.peer,
                    "ALUA: asymmetric access state changed");
                self.establish_unit_attention(&[unit], alua::UA_ACCESS_STATE_CHANGED);
            }
            states.own
        });
        self.note_nexus(nexus);
        let exempt = matches!(
            cdb.first().copied(),
            Some(opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE)
        );
        let Some(unit) = unit else {
            if !exempt {
                return Err(Sense::logical_unit_not_supported());
            }
            return Ok(Route::NoUnit(cdb::parse(cdb)?));
        };
        if !exempt {
            if let Some(ua) = unit.take_unit_attention(nexus) {
                return Err(ua);
            }
        }
        let cmd = cdb::parse(cdb)?;
        // PREVENT ALLOW MEDIUM REMOVAL is offered by a removable unit only; without a medium
        // to remove the command is not supported (RMB=0, as before it was implemented).
        if matches!(cmd, Command::PreventAllowMediumRemoval { .. }) && !unit.settings.removable {
            return Err(Sense::invalid_opcode());
        }
        // Before anything touches the store: a standby port never runs a media access.
        alua::admit(own_state, &cmd)?;
        // A SANITIZE running (04/1B) or failed (31/03) on the unit (SBC-4 4.11).
        unit.sanitize.admit(&cmd)?;
        // An unloaded medium: NOT READY, MEDIUM NOT PRESENT (SBC-3 4.2.1).
        unit.medium.admit(&cmd)?;
        sbc::check(&unit.settings, &unit.limits, unit.num_blocks(), &cmd, cdb)?;
        if cmd.writes_medium() && unit.software_write_protected() {
            return Err(Sense::software_write_protected());
        }
        if let Command::Sanitize(s) = &cmd {
            sanitize::check_cdb(s, unit.block_size(), unit.settings.thin_provisioning)?;
        }
        Ok(Route::Unit(unit, cmd))
    }

    /// Decides, from the CDB alone, whether the command needs Data-Out and how much, or
    /// fails it before any data moves (invalid CDB, LBA out of range, write protected,
    /// pending unit attention — which this reports and clears —, no such LUN).
    /// `lun` is the raw 8-byte LUN field of the PDU. The command is routed here once: the
    /// [`PlannedCommand`] in the plan is what [`ScsiTarget::execute`] runs.
    pub fn plan(&self, lun: u64, cdb: &[u8], nexus: NexusId) -> DataOutPlan {
        match self.route(lun, cdb, nexus) {
            Err(sense) => {
                debug!(lun, opcode = %Opcode(cdb), %sense, "command refused before data");
                let response = ScsiResponse::check(sense);
                if let Some(unit) = self.unit_at(lun) {
                    unit.stats.failed(&response);
                }
                DataOutPlan::Fail(response)
            }
            Ok(Route::NoUnit(cmd)) => DataOutPlan::None(PlannedCommand {
                raw_lun: lun,
                unit: None,
                cmd,
                data_in: 0,
                data_out_unit: 1,
            }),
            Ok(Route::Unit(unit, cmd)) => {
                if unit.reservations_active()
                    && unit.reservations().conflicts(&self.port_of(nexus), &cmd)
                {
                    debug!(lun, opcode = %Opcode(cdb), nexus, "reservation conflict");
                    let response = reservation_conflict();
                    unit.stats.failed(&response);
                    return DataOutPlan::Fail(response);
                }
                let planned = PlannedCommand {
                    raw_lun: lun,
                    unit: Some(unit.lun()),
                    cmd,
                    data_in: cmd.data_in_len(unit.settings.block_size),
                    data_out_unit: cmd.data_out_unit(unit.settings.block_size),
                };
                match cmd.data_out_len(unit.settings.block_size) {
                    0 => DataOutPlan::None(planned),
                    n => DataOutPlan::Gather(u32::try_from(n).unwrap_or(u32::MAX), planned),
                }
            }
        }
    }

    /// Runs a command [`ScsiTarget::plan`] accepted, with the Data-Out gathered for it. See
    /// the module documentation for how `data_out` and the response relate to iSCSI lengths.
    pub async fn execute(&self, planned: PlannedCommand, req: ScsiRequest) -> ScsiResponse {
        // The logical units never change after start: a planned unit is still there.
        let Some(unit) = planned.unit.and_then(|n| self.luns.get(&n)) else {
            return self.run_planned(planned, req).await;
        };
        let class = CommandClass::of(&planned.cmd);
        let _in_flight = unit.stats.start();
        let started = Instant::now();
        let data_out_len = req.data_out.len();
        let response = self.run_planned(planned, req).await;
        unit.stats
            .finish(class, data_out_len, &response, started.elapsed());
        response
    }

    /// [`ScsiTarget::execute`] without the statistics.
    async fn run_planned(&self, planned: PlannedCommand, req: ScsiRequest) -> ScsiResponse {
        let PlannedCommand {
            raw_lun, unit, cmd, ..
        } = planned;
        // The logical units never change after start: a planned unit is still there.
        let unit_ref = unit.and_then(|n| self.luns.get(&n));
        // The role may have changed while the Data-Out came in: checked again, still before
        // the store is touched.
        if let Some(a) = unit_ref.and_then(|u| u.alua()) {
            if let Err(sense) = alua::check_access(a.current().own, &cmd) {
                debug!(lun = raw_lun, opcode = %Opcode(&req.cdb), %sense, "ALUA: refused at execution");
                return ScsiResponse::check(sense);
            }
        }
        if let Some(unit) = unit_ref {
            // A sanitize may have started while the Data-Out came in.
            if let Err(sense) = unit.sanitize.admit(&cmd) {
                return ScsiResponse::check(sense);
            }
        }
        // A command that needs the medium holds it while it runs (an unload waits for it),
        // and checks again that it is there: it may have been unloaded since planned.
        let _medium_held = match unit_ref {
            Some(unit) if unit.settings.removable && medium::needs_medium(&cmd) => {
                let held = unit.medium_gate.read().await;
                if let Err(sense) = unit.medium.admit(&cmd) {
                    return ScsiResponse::check(sense);
                }
                Some(held)
            }
            _ => None,
        };
        if let Some(unit) = unit_ref {
            let unmaps = matches!(cmd, Command::Unmap { .. })
                || matches!(cmd, Command::WriteSame(ws) if ws.unmap);
            if cmd.writes_medium() && !unmaps {
                unit.set_all_deallocated(false);
            }
        }
        let data = match unit_ref {
            Some(unit)
                if matches!(
                    cmd,
                    Command::PersistentReserveIn { .. }
                        | Command::PersistentReserveOut(_)
                        | Command::Reserve
                        | Command::Release
                ) =>
            {
                return self.execute_reservation(unit, &cmd, &req).await;
            }
            None => self.execute_without_unit(&cmd),
            Some(unit) if matches!(cmd, Command::ExtendedCopy { .. }) => {
                self.extended_copy(unit, &req).await.map(|()| Bytes::new())
            }
            Some(unit) if matches!(cmd, Command::ReceiveCopyResults { .. }) => {
                self.receive_copy_results(unit, &cmd, req.nexus)
            }
            Some(unit) if matches!(cmd, Command::Sanitize(_)) => {
                self.sanitize(unit, &cmd, &req).await.map(|()| Bytes::new())
            }
            Some(unit) => {
                let r = self.execute_on(unit, &cmd, &req).await;
                if unit.thin.is_some() && cmd.writes_medium() {
                    let full = matches!(&r, Err(s) if (s.key, s.asc, s.ascq) == (SenseKey::DataProtect, 0x27, 0x07));
                    self.check_thin_threshold(unit, full);
                }
                r
            }
        }
        .map(|d| match cmd.alloc_len() {
            Some(alloc) if (alloc as usize) < d.len() => d.slice(..alloc as usize),
            _ => d,
        });
        match data {
            Ok(data) => ScsiResponse::good(data),
            Err(sense) => {
                debug!(lun = raw_lun, opcode = %Opcode(&req.cdb), %sense, "check condition");
                ScsiResponse::check(sense)
            }
        }
    }

    fn execute_without_unit(&self, cmd: &Command) -> Result<Bytes, Sense> {
        match *cmd {
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => spc::report_luns(self.luns.keys().copied(), select_report, alloc_len)
                .map(Bytes::from),
            Command::Inquiry { evpd: false, .. } => Ok(spc::missing_lun_inquiry(
                self.luns.values().next().map(|u| &u.settings.identity),
            )
            .into()),
            // SPC-4 6.39: REQUEST SENSE to a LUN without a logical unit returns GOOD with
            // LOGICAL UNIT NOT SUPPORTED as the sense data.
            Command::RequestSense { .. } => {
                Ok(Sense::logical_unit_not_supported().to_fixed_bytes())
            }
            _ => Err(Sense::logical_unit_not_supported()),
        }
    }

    async fn execute_on(
        &self,
        unit: &LogicalUnit,
        cmd: &Command,
        req: &ScsiRequest,
    ) -> Result<Bytes, Sense> {
        let settings = &unit.settings;
        match cmd {
            Command::TestUnitReady => Ok(Bytes::new()),
            // A pending unit attention, else the progress of a running sanitize (SBC-4 4.11).
            Command::RequestSense { .. } => Ok(unit
                .take_unit_attention(req.nexus)
                .or_else(|| unit.sanitize.request_sense())
                .or_else(|| unit.medium.request_sense())
                .unwrap_or(Sense::no_sense())
                .to_fixed_bytes()),
            Command::Inquiry { evpd: false, .. } => {
                Ok(spc::standard_inquiry(&settings.identity, settings.removable).into())
            }
            Command::Inquiry { page, .. } => {
                spc::inquiry_vpd(*page, settings, &unit.limits, unit.num_blocks()).map(Bytes::from)
            }
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => spc::report_luns(self.luns.keys().copied(), *select_report, *alloc_len)
                .map(Bytes::from),
            Command::ModeSense(ms) => spc::mode_sense(
                ms,
                settings,
                unit.num_blocks(),
                unit.software_write_protected(),
            )
            .map(Bytes::from),
            Command::ModeSelect(sel) => {
                let params = &req.data_out[..req.data_out.len().min(sel.param_len as usize)];
                let swp = unit.software_write_protected();
                let new = spc::mode_select(sel, params, settings, unit.num_blocks(), swp)?;
                // SWP is the logical unit's, for every I_T nexus; the others learn of the
                // change by MODE PARAMETERS CHANGED (SPC-4 7.5.1).
                if let Some(on) = new.filter(|&on| unit.set_software_write_protect(on)) {
                    info!(
                        lun = unit.lun(),
                        nexus = req.nexus,
                        swp = on,
                        "software write protect changed"
                    );
                    let nexuses = self.nexuses.read().unwrap_or_else(|p| p.into_inner());
                    unit.establish_unit_attention(
                        nexuses.iter().filter(|&&n| n != req.nexus),
                        UA_MODE_PARAMETERS_CHANGED,
                    );
                }
                Ok(Bytes::new())
            }
            Command::StartStopUnit(ssu) => {
                self.start_stop_unit(unit, ssu, req.nexus).await?;
                Ok(Bytes::new())
            }
            Command::PreventAllowMediumRemoval { prevent } => {
                unit.medium.prevent(req.nexus, *prevent);
                debug!(
                    lun = unit.lun(),
                    nexus = req.nexus,
                    prevent,
                    "PREVENT ALLOW MEDIUM REMOVAL"
                );
                Ok(Bytes::new())
            }
            Command::ReportSupportedOpcodes(r) => spc::report_supported_opcodes(
                r,
                settings.thin_provisioning,
                unit.alua().is_some(),
                settings.removable,
            )
            .map(Bytes::from),
            Command::ReportTargetPortGroups { .. } => {
                alua::rtpg_data(unit.alua(), cmd).map(Bytes::from)
            }
            _ => sbc::execute(unit, cmd, req.data_out.clone(), req.expected_len).await,
        }
    }

    /// START STOP UNIT (SBC-3 5.25). A removable unit moves its medium: a load raises NOT
    /// READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED for every other I_T nexus (the loading
    /// one knows; libiscsi's StartStopUnit.Simple expects TEST UNIT READY GOOD from it); an
    /// unload is MEDIUM REMOVAL PREVENTED while a prevention holds.
    async fn start_stop_unit(
        &self,
        unit: &LogicalUnit,
        ssu: &StartStopUnit,
        nexus: NexusId,
    ) -> Result<(), Sense> {
        spc::start_stop_unit(ssu, unit.settings.removable)?;
        if !unit.settings.removable {
            return Ok(());
        }
        match Movement::of(ssu) {
            Movement::Stay => Ok(()),
            Movement::Load => {
                if unit.medium.apply(Movement::Load)? {
                    info!(lun = unit.lun(), nexus, "medium loaded");
                    let nexuses = self.nexuses.read().unwrap_or_else(|p| p.into_inner());
                    unit.establish_unit_attention(
                        nexuses.iter().filter(|&&n| n != nexus),
                        medium::UA_MEDIUM_MAY_HAVE_CHANGED,
                    );
                }
                Ok(())
            }
            Movement::Unload => {
                if unit.medium.prevented() {
                    return Err(Sense::medium_removal_prevented());
                }
                // SBC-3 5.25: the unload waits for the commands using the medium (the gate
                // held exclusively), so no read or write is cut off; later ones find it gone.
                let _all = unit.medium_gate.write().await;
                unit.sanitize.admit(&Command::StartStopUnit(*ssu))?;
                // NO_FLUSH clear: cached blocks reach the medium before it goes (SBC-3 5.25).
                if !ssu.no_flush && unit.medium.present() {
                    unit.store
                        .flush()
                        .await
                        .map_err(|e| sbc::store_error(e, 0, true))?;
                }
                if unit.medium.apply(Movement::Unload)? {
                    info!(lun = unit.lun(), nexus, "medium unloaded");
                }
                Ok(())
            }
        }
    }

    /// RECEIVE COPY RESULTS (SPC-4 6.18): OPERATING PARAMETERS, or the COPY STATUS of the
    /// EXTENDED COPY this I_T nexus sent with LIST IDENTIFIER `list_id` (INVALID FIELD IN CDB
    /// when there is none).
    fn receive_copy_results(
        &self,
        unit: &LogicalUnit,
        cmd: &Command,
        nexus: NexusId,
    ) -> Result<Bytes, Sense> {
        let Command::ReceiveCopyResults {
            service_action,
            list_id,
            ..
        } = *cmd
        else {
            return Err(Sense::invalid_opcode());
        };
        if service_action == xcopy::SA_OPERATING_PARAMETERS {
            return Ok(xcopy::operating_parameters(unit.block_size()).into());
        }
        let in_progress = self
            .copies_in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(nexus, list_id));
        if in_progress {
            return Ok(xcopy::copy_in_progress_data().into());
        }
        let results = self.copy_results.lock().unwrap_or_else(|p| p.into_inner());
        results
            .get(&nexus)
            .and_then(|v| v.iter().rev().find(|(id, _)| *id == list_id))
            .map(|(_, status)| Bytes::from(xcopy::copy_status_data(status)))
            .ok_or(Sense::invalid_field_in_cdb(2, None))
    }

    /// The logical unit of this target a CSCD descriptor names: an NAA designator equal to one
    /// the unit reports in its Device Identification VPD page (SPC-4 7.8.6).
    fn cscd_unit(&self, cscd: &xcopy::Cscd) -> Option<&LogicalUnit> {
        if cscd.null || !cscd.is_lu_naa() {
            return None;
        }
        self.luns.values().map(|u| u.as_ref()).find(|u| {
            let Ok(page) = spc::inquiry_vpd(0x83, &u.settings, &u.limits, u.num_blocks()) else {
                return false;
            };
            let mut off = 4;
            while let Some(h) = page.get(off..off + 4) {
                let len = usize::from(h[3]);
                let Some(designator) = page.get(off + 4..off + 4 + len) else {
                    break;
                };
                if h[1] & 0x3F == 0x03
                    && h[0] & 0x0F == cscd.code_set
                    && designator == cscd.designator.as_slice()
                {
                    return true;
                }
                off += 4 + len;
            }
            false
        })
    }

    /// EXTENDED COPY(LID1) (SPC-4 6.4) received on `unit`: decodes the parameter list, then
    /// processes each block to block segment through the logical units' read and write paths
    /// (so a replicated LUN replicates the copied writes), [`COPY_CHUNK_BYTES`] at a time.
    /// Errors in the parameter list are ILLEGAL REQUEST before anything is copied; errors
    /// while processing a segment are COPY ABORTED (SPC-4 5.17.4).
    async fn extended_copy(&self, unit: &LogicalUnit, req: &ScsiRequest) -> Result<(), Sense> {
        let Some(list) = xcopy::parse(&req.data_out)? else {
            return Ok(());
        };
        // A list identifier in use by a copy of this I_T nexus still running: OPERATION IN
        // PROGRESS (SPC-4 6.4.3.2).
        let _running = if list.keep_status {
            let key = (req.nexus, list.list_id);
            let mut set = self
                .copies_in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !set.insert(key) {
                return Err(Sense::new(SenseKey::IllegalRequest, 0x00, 0x16));
            }
            Some(CopyInProgress {
                set: self.copies_in_progress.clone(),
                key,
            })
        } else {
            None
        };
        let mut status = xcopy::CopyStatus {
            failed: false,
            segments_processed: 0,
            bytes: 0,
        };
        let r = self.run_segments(&list, req.nexus, &mut status).await;
        status.failed = r.is_err();
        if let Err(sense) = &r {
            warn!(lun = unit.lun(), list_id = list.list_id, segment = status.segments_processed,
                %sense, "EXTENDED COPY aborted");
        }
        if list.keep_status {
            let mut results = self.copy_results.lock().unwrap_or_else(|p| p.into_inner());
            let v = results.entry(req.nexus).or_default();
            v.retain(|(id, _)| *id != list.list_id);
            if v.len() >= MAX_COPY_RESULTS {
                v.remove(0);
            }
            v.push((list.list_id, status));
        }
        r
    }

    async fn run_segments(
        &self,
        list: &xcopy::CopyList,
        nexus: NexusId,
        status: &mut xcopy::CopyStatus,
    ) -> Result<(), Sense> {
        let me = self.port_of(nexus);
        for (i, seg) in list.segments.iter().enumerate() {
            let resolve = |index: u16| -> Result<&LogicalUnit, Sense> {
                let cscd = list
                    .cscds
                    .get(usize::from(index))
                    .ok_or(xcopy::not_reachable(i))?;
                let unit = self.cscd_unit(cscd).ok_or(xcopy::not_reachable(i))?;
                if cscd.peripheral_type != 0
                    || (cscd.block_len != 0 && cscd.block_len != unit.block_size())
                {
                    return Err(xcopy::incorrect_type(i));
                }
                Ok(unit)
            };
            let src = resolve(seg.src)?;
            let dst = resolve(seg.dst)?;
            let (sbs, dbs) = (u64::from(src.block_size()), u64::from(dst.block_size()));
            let bytes = u64::from(seg.blocks) * if seg.dc { dbs } else { sbs };
            if bytes % sbs != 0 || bytes % dbs != 0 {
                return Err(xcopy::data_underrun(i));
            }
            // What the copy target devices would answer the copy manager's READ and WRITE:
            // LBA OUT OF RANGE, WRITE PROTECTED, RESERVATION CONFLICT (SPC-4 5.17.4.3).
            let in_range = |u: &LogicalUnit, lba: u64, blocks: u64| {
                sbc::check_range(lba, blocks, u.num_blocks()).is_ok()
            };
            let read_probe = Command::Read(cdb::Transfer {
                lba: seg.src_lba,
                blocks: 0,
                dpo: false,
                fua: false,
            });
            let write_probe = Command::Write(cdb::Transfer {
                lba: seg.dst_lba,
                blocks: 0,
                dpo: false,
                fua: false,
            });
            let conflict = |u: &LogicalUnit, c: &Command| {
                u.reservations_active() && u.reservations().conflicts(&me, c)
            };
            if !in_range(src, seg.src_lba, bytes / sbs)
                || !in_range(dst, seg.dst_lba, bytes / dbs)
                || dst.settings.read_only
                || dst.software_write_protected()
                || src.sanitize.admit(&read_probe).is_err()
                || dst.sanitize.admit(&write_probe).is_err()
                || src.medium.admit(&read_probe).is_err()
                || dst.medium.admit(&write_probe).is_err()
                || conflict(src, &read_probe)
                || conflict(dst, &write_probe)
            {
                debug!(
                    segment = i,
                    src = src.lun(),
                    dst = dst.lun(),
                    src_lba = seg.src_lba,
                    dst_lba = seg.dst_lba,
                    blocks = seg.blocks,
                    "EXTENDED COPY segment refused by a copy target device"
                );
                return Err(xcopy::target_failed(i));
            }
            let mut done = 0u64;
            while done < bytes {
                let n = (bytes - done).min(COPY_CHUNK_BYTES / sbs.max(dbs) * sbs.max(dbs));
                let n = n.max(sbs.max(dbs)).min(bytes - done);
                let data = sbc::read(src, seg.src_lba + done / sbs, (n / sbs) as u32)
                    .await
                    .map_err(|_| xcopy::target_failed(i))?;
                let x = cdb::Transfer {
                    lba: seg.dst_lba + done / dbs,
                    blocks: (n / dbs) as u32,
                    dpo: false,
                    fua: false,
                };
                dst.set_all_deallocated(false);
                let r = sbc::write(dst, x, &data).await;
                if dst.thin.is_some() {
                    let full = matches!(&r, Err(s) if (s.key, s.asc, s.ascq) == (SenseKey::DataProtect, 0x27, 0x07));
                    self.check_thin_threshold(dst, full);
                }
                r.map_err(|_| xcopy::target_failed(i))?;
                done += n;
                status.bytes += n;
            }
            status.segments_processed += 1;
        }
        Ok(())
    }

    /// SANITIZE (SBC-4 5.30) received on `unit`: EXIT FAILURE MODE at once; OVERWRITE and BLOCK
    /// ERASE start a job owned by the logical unit (it goes on whatever happens to the command,
    /// its task or its session: aborts, resets, logout) and the command completes when it ends,
    /// or, with IMMED, once the parameter list is checked. A job that fails leaves the unit in
    /// failure mode; the command, if still waiting, gets MEDIUM ERROR, SANITIZE COMMAND FAILED.
    async fn sanitize(
        &self,
        unit: &Arc<LogicalUnit>,
        cmd: &Command,
        req: &ScsiRequest,
    ) -> Result<(), Sense> {
        let Command::Sanitize(s) = *cmd else {
            return Err(Sense::invalid_opcode());
        };
        let params = &req.data_out[..req.data_out.len().min(usize::from(s.param_len))];
        let op = match s.service_action {
            cdb::SA_SANITIZE_EXIT_FAILURE_MODE => {
                unit.sanitize.exit_failure_mode()?;
                info!(lun = unit.lun(), "SANITIZE EXIT FAILURE MODE");
                return Ok(());
            }
            cdb::SA_SANITIZE_OVERWRITE => {
                Operation::Overwrite(sanitize::parse_overwrite(params, unit.block_size())?)
            }
            cdb::SA_SANITIZE_BLOCK_ERASE => Operation::BlockErase,
            _ => return Err(Sense::invalid_field_in_cdb(1, Some(4))),
        };
        let capacity = unit.num_blocks() * u64::from(unit.block_size());
        unit.sanitize.begin(op.total_bytes(capacity), s.ause)?;
        let what = match &op {
            Operation::Overwrite(o) => format!(
                "OVERWRITE ({} pass(es), {}-byte pattern{})",
                o.passes,
                o.pattern.len(),
                if o.invert {
                    ", inverted between passes"
                } else {
                    ""
                }
            ),
            Operation::BlockErase => "BLOCK ERASE".to_string(),
        };
        info!(
            lun = unit.lun(),
            nexus = req.nexus,
            immed = s.immed,
            ause = s.ause,
            rate = unit.settings.sanitize_rate,
            "SANITIZE {what} started"
        );
        let job_unit = Arc::clone(unit);
        let job = tokio::spawn(async move {
            let done = SanitizeDone {
                unit: &job_unit,
                ok: false,
            };
            run_sanitize(done, &op).await
        });
        if s.immed {
            return Ok(());
        }
        match job.await {
            Ok(r) => r,
            Err(_) => Err(Sense::sanitize_failed()),
        }
    }

    /// LOGICAL UNIT RESET task management function (SAM-5 7.7, 6.3.3): establishes a unit
    /// attention (29/03 BUS DEVICE RESET FUNCTION OCCURRED) for every I_T nexus, the
    /// requesting one included (libiscsi MultipathIO.Reset expects it on every path).
    /// Aborting the tasks in flight is the transport's part. `lun` is the raw LUN field;
    /// returns false when no logical unit is there.
    pub fn logical_unit_reset(&self, lun: u64, from: NexusId) -> bool {
        let Some(unit) = self.unit_at(lun) else {
            return false;
        };
        info!(lun = unit.lun(), from, "logical unit reset");
        self.establish_unit_attention(&[unit], UA_LOGICAL_UNIT_RESET);
        // SPC-2 reservations do not survive a reset (SPC-2 5.5.1); persistent ones do.
        unit.reservations().spc2_holder = None;
        // Nor do preventions of medium removal (SBC-3 5.12).
        unit.medium.reset();
        true
    }

    /// TARGET RESET task management function (SAM-5 7.11, hard reset 6.3.2): a unit
    /// attention (29/00 POWER ON, RESET, OR BUS DEVICE RESET OCCURRED) for every I_T nexus
    /// on every logical unit.
    pub fn target_reset(&self, from: NexusId) {
        info!(from, "target reset");
        let units: Vec<&LogicalUnit> = self.luns.values().map(|u| u.as_ref()).collect();
        self.establish_unit_attention(&units, UA_RESET);
        for unit in &units {
            unit.reservations().spc2_holder = None;
            unit.medium.reset();
        }
    }

    /// The capacity of logical unit number `lun` changed: 2A/09 CAPACITY DATA HAS CHANGED
    /// for every I_T nexus (SBC-3 4.6).
    pub fn capacity_changed(&self, lun: u64) {
        if let Some(unit) = self.luns.get(&lun) {
            self.establish_unit_attention(&[unit.as_ref()], UA_CAPACITY_CHANGED);
        }
    }

    /// The I_T nexus is gone (session closed, reinstated or dropped): forget it and its
    /// pending unit attentions. A new session starts with none.
    pub fn nexus_lost(&self, nexus: NexusId) {
        self.nexuses
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nexus);
        for unit in self.luns.values() {
            unit.forget_nexus(nexus);
            unit.medium.nexus_lost(nexus);
        }
        self.copy_results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nexus);
    }
}

/// Ends the running sanitize of a unit when dropped: as a success if the job said so, else
/// (an error, or a panic unwinding through the job) as a failure.
struct SanitizeDone<'a> {
    unit: &'a LogicalUnit,
    ok: bool,
}

impl Drop for SanitizeDone<'_> {
    fn drop(&mut self) {
        let lun = self.unit.lun();
        if self.ok {
            info!(lun, "SANITIZE completed");
        } else {
            warn!(lun, "SANITIZE failed: medium access is refused (SANITIZE COMMAND FAILED) until EXIT FAILURE MODE or a SANITIZE that succeeds");
        }
        self.unit.sanitize.finish(self.ok);
    }
}

/// The sanitize job: with the unit's write gate held exclusively (a read or write that
/// slipped past the SANITIZE IN PROGRESS check waits for the end), OVERWRITE writes each pass
/// [`SANITIZE_CHUNK_BYTES`] at a time through the unit's store (so a replicated LUN
/// replicates it), paced to `sanitize_rate`; BLOCK ERASE deallocates the whole capacity
/// through the store's discard, the path UNMAP takes. The cache is flushed at the end.
async fn run_sanitize(mut done: SanitizeDone<'_>, op: &Operation) -> Result<(), Sense> {
    let unit = done.unit;
    let bs = u64::from(unit.block_size());
    let capacity = unit.num_blocks() * bs;
    let failed = |what: &str, at: u64, e: crate::store::StoreError| {
        warn!(lun = unit.lun(), offset = at, error = %e, "SANITIZE: {what} failed");
        Sense::sanitize_failed()
    };
    let _exclusive = unit.write_gate.write().await;
    unit.set_all_deallocated(false);
    match op {
        Operation::Overwrite(o) => {
            let chunk_len = (SANITIZE_CHUNK_BYTES / bs).max(1) * bs;
            let mode = if unit.settings.write_cache {
                WriteMode::Cached
            } else {
                WriteMode::Durable
            };
            let mut pacer = Pacer::new(unit.settings.sanitize_rate, Instant::now());
            for pass in 0..o.passes {
                let block = o.block(pass, unit.block_size());
                let chunk: Bytes = block
                    .iter()
                    .cycle()
                    .take(chunk_len.min(capacity.max(bs)) as usize)
                    .copied()
                    .collect::<Vec<u8>>()
                    .into();
                let mut at = 0u64;
                while at < capacity {
                    let n = (chunk.len() as u64).min(capacity - at);
                    let wait = pacer.delay(n, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    unit.store
                        .write(at, chunk.slice(..n as usize), mode)
                        .await
                        .map_err(|e| failed("write", at, e))?;
                    unit.sanitize.advance(n);
                    at += n;
                }
            }
        }
        Operation::BlockErase => {
            let step = (ERASE_CHUNK_BYTES / bs).max(1) * bs;
            let mut at = 0u64;
            while at < capacity {
                let n = step.min(capacity - at);
                unit.store
                    .discard(at, n)
                    .await
                    .map_err(|e| failed("deallocation", at, e))?;
                unit.sanitize.advance(n);
                at += n;
            }
        }
    }
    unit.store
        .flush()
        .await
        .map_err(|e| failed("flush", 0, e))?;
    if matches!(op, Operation::BlockErase) {
        unit.set_all_deallocated(true);
    }
    done.ok = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether blocks `blocks` (of `BS` bytes) of `snap` are all zero.
    fn zeroed(snap: &[u8], blocks: std::ops::Range<usize>) -> bool {
        snap[blocks.start * BS as usize..blocks.end * BS as usize]
            .iter()
            .all(|&b| b == 0)
    }
    use crate::scsi::{LunIdentity, Status};
    use crate::store::MemStore;
    use rand::{Rng, SeedableRng};

    const BS: u32 = 512;
    const BLOCKS: u64 = 1024;

    fn identity() -> LunIdentity {
        LunIdentity {
            vendor: "TWINSAN".into(),
            product: "Virtual disk".into(),
            revision: "0.1".into(),
            serial: "SN1".into(),
            naa: vec![0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            t10_vendor_specific: "uuid".into(),
            target_port_name: "iqn.2024-01.org.example:t,t,0x0001".into(),
            relative_port: 1,
            port_group: None,
            compat: None,
        }
    }

    fn settings(read_only: bool, thin: bool) -> LunSettings {
        LunSettings {
            block_size: BS,
            physical_block_size: 4096,
            read_only,
            identity: identity(),
            write_cache: true,
            thin_provisioning: thin,
            thin_threshold: None,
            sanitize_rate: 0,
            removable: false,
        }
    }

    fn target_with(read_only: bool, thin: bool) -> (ScsiTarget, Arc<MemStore>) {
        let store = Arc::new(MemStore::new((BLOCKS * u64::from(BS)) as usize));
        let t = ScsiTarget::new(vec![(
            0,
            settings(read_only, thin),
            store.clone() as Arc<dyn BlockStore>,
        )]);
        (t, store)
    }

    fn raw(lun: u64) -> u64 {
        u64::from_be_bytes(spc::encode_lun(lun).unwrap())
    }

    /// What the transport does: plan, then execute what the plan accepted.
    async fn exec(t: &ScsiTarget, lun: u64, req: ScsiRequest) -> ScsiResponse {
        match t.plan(lun, &req.cdb, req.nexus) {
            DataOutPlan::Fail(r) => r,
            DataOutPlan::None(p) | DataOutPlan::Gather(_, p) => t.execute(p, req).await,
        }
    }

    async fn run(t: &ScsiTarget, nexus: NexusId, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        run_edtl(t, nexus, cdb, data, data.len() as u32).await
    }

    async fn run_edtl(
        t: &ScsiTarget,
        nexus: NexusId,
        cdb: &[u8],
        data: &[u8],
        edtl: u32,
    ) -> ScsiResponse {
        let req = ScsiRequest {
            cdb: Bytes::copy_from_slice(cdb),
            data_out: Bytes::copy_from_slice(data),
            expected_len: edtl,
            nexus,
        };
        exec(t, raw(0), req).await
    }

    fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
        assert_eq!(r.status, Status::CheckCondition, "expected CHECK CONDITION");
        let s = r.sense.as_ref().unwrap();
        (s[2] & 0x0F, s[12], s[13])
    }

    fn cdb16(op: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn cdb10(op: u8, flags: u8, lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op;
        c[1] = flags;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    const TUR: [u8; 6] = [0; 6];

    #[tokio::test]
    async fn write_then_read_back() {
        let (t, _) = target_with(false, false);
        let data: Vec<u8> = (0..2 * BS).map(|i| i as u8).collect();
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0x08, 5, 2), &data).await;
        assert_eq!(r.status, Status::Good);
        let r = run(&t, 1, &cdb16(opcode::READ_16, 0, 5, 2), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(&r.data_in[..], &data[..]);
        let r = run(&t, 1, &[opcode::READ_6, 0, 0, 5, 1, 0], &[]).await;
        assert_eq!(&r.data_in[..], &data[..BS as usize]);
    }

    #[tokio::test]
    async fn lba_out_of_range_moves_no_data() {
        let (t, _) = target_with(false, false);
        let cdb = cdb10(opcode::WRITE_10, 0, (BLOCKS - 1) as u32, 2);
        assert!(matches!(t.plan(raw(0), &cdb, 1), DataOutPlan::Fail(_)));
        let r = run(&t, 1, &cdb, &vec![0; 2 * BS as usize]).await;
        assert_eq!(sense_of(&r), (0x5, 0x21, 0x00));
        let r = run(&t, 1, &cdb16(opcode::READ_16, 0, BLOCKS + 1, 0), &[]).await;
        assert_eq!(sense_of(&r), (0x5, 0x21, 0x00));
        let r = run(&t, 1, &cdb16(opcode::READ_16, 0, BLOCKS - 1, 1), &[]).await;
        assert_eq!(r.status, Status::Good);
    }

    #[tokio::test]
    async fn plan_sizes() {
        let (t, _) = target_with(false, true);
        let gather = |cdb: &[u8]| match t.plan(raw(0), cdb, 1) {
            DataOutPlan::Gather(n, _) => n,
            DataOutPlan::None(_) => 0,
            DataOutPlan::Fail(r) => panic!("failed: {:?}", r.sense),
        };
        assert_eq!(gather(&cdb10(opcode::WRITE_10, 0, 0, 3)), 3 * BS);
        assert_eq!(gather(&cdb10(opcode::READ_10, 0, 0, 3)), 0);
        assert_eq!(gather(&[opcode::WRITE_6, 0, 0, 0, 0, 0]), 256 * BS);
        assert_eq!(gather(&cdb16(opcode::WRITE_SAME_16, 0, 0, 8)), BS);
        assert_eq!(gather(&cdb16(opcode::WRITE_SAME_16, 0x09, 0, 8)), 0);
        assert_eq!(gather(&cdb10(opcode::UNMAP, 0, 0, 24)), 24);
        let mut caw = [0u8; 16];
        caw[0] = opcode::COMPARE_AND_WRITE;
        caw[13] = 2;
        assert_eq!(gather(&caw), 4 * BS);
        // The unit a shorter Data-Out must come in: blocks for WRITE and WRITE AND VERIFY;
        // WRITE SAME and COMPARE AND WRITE check their buffer themselves.
        let unit = |cdb: &[u8]| match t.plan(raw(0), cdb, 1) {
            DataOutPlan::Gather(_, p) | DataOutPlan::None(p) => p.data_out_unit(),
            DataOutPlan::Fail(r) => panic!("failed: {:?}", r.sense),
        };
        assert_eq!(unit(&cdb10(opcode::WRITE_10, 0, 0, 3)), BS);
        assert_eq!(unit(&cdb16(opcode::WRITE_16, 0, 0, 1)), BS);
        assert_eq!(unit(&cdb10(opcode::WRITE_AND_VERIFY_10, 0, 0, 1)), BS);
        // VERIFY(10) with BYTCHK=01b compares whole blocks too.
        assert_eq!(unit(&cdb10(opcode::VERIFY_10, 0x02, 0, 1)), BS);
        assert_eq!(unit(&cdb16(opcode::WRITE_SAME_16, 0, 0, 8)), 1);
        assert_eq!(unit(&caw), 1);
        assert_eq!(unit(&cdb10(opcode::UNMAP, 0, 0, 24)), 1);
        assert_eq!(unit(&cdb10(opcode::READ_10, 0, 0, 3)), 1);
    }

    #[tokio::test]
    async fn medium_error_from_store_fault() {
        let (t, store) = target_with(false, false);
        store.inject_fault(10 * u64::from(BS), 11 * u64::from(BS));
        let r = run(&t, 1, &cdb10(opcode::READ_10, 0, 8, 4), &[]).await;
        assert_eq!(sense_of(&r), (0x3, 0x11, 0x00));
        let s = r.sense.unwrap();
        assert_eq!(s[0], 0xF0);
        assert_eq!(&s[3..7], &8u32.to_be_bytes());
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 10, 1), &[0; BS as usize]).await;
        assert_eq!(sense_of(&r), (0x3, 0x0C, 0x00));
        let r = run(&t, 1, &cdb10(opcode::VERIFY_10, 0, 0, 64), &[]).await;
        assert_eq!(sense_of(&r), (0x3, 0x11, 0x00));
        let r = run(&t, 1, &cdb10(opcode::READ_10, 0, 11, 4), &[]).await;
        assert_eq!(r.status, Status::Good);
    }

    /// A full pool (the store answers ENOSPC): every command that writes gets DATA PROTECT /
    /// SPACE ALLOCATION FAILED WRITE PROTECT with the LBA, reads go on, and once space is
    /// back writes succeed again.
    #[tokio::test]
    async fn full_store_is_space_allocation_failed() {
        let (t, store) = target_with(false, true);
        let data = vec![0x5Au8; 2 * BS as usize];
        assert_eq!(
            run(&t, 1, &cdb10(opcode::WRITE_10, 0, 4, 2), &data)
                .await
                .status,
            Status::Good
        );
        store.set_full(true);
        let mut caw = [0u8; 16];
        caw[0] = opcode::COMPARE_AND_WRITE;
        caw[2..10].copy_from_slice(&4u64.to_be_bytes());
        caw[13] = 1;
        let mut caw_data = vec![0x5Au8; BS as usize];
        caw_data.extend_from_slice(&[1u8; BS as usize]);
        for (cdb, out, lba) in [
            (
                cdb10(opcode::WRITE_10, 0, 9, 2).to_vec(),
                data.clone(),
                9u32,
            ),
            (
                cdb16(opcode::WRITE_16, 0x08, 20, 2).to_vec(),
                data.clone(),
                20,
            ),
            (
                cdb16(opcode::WRITE_AND_VERIFY_16, 0, 30, 2).to_vec(),
                data.clone(),
                30,
            ),
            (
                cdb16(opcode::WRITE_SAME_16, 0, 40, 3).to_vec(),
                data[..BS as usize].to_vec(),
                40,
            ),
            (caw.to_vec(), caw_data.clone(), 4),
        ] {
            let r = run(&t, 1, &cdb, &out).await;
            assert_eq!(sense_of(&r), (0x7, 0x27, 0x07), "cdb {cdb:02x?}");
            let s = r.sense.unwrap();
            assert_eq!(s[0], 0xF0, "VALID with the LBA in INFORMATION");
            assert_eq!(&s[3..7], &lba.to_be_bytes());
        }
        let r = run(&t, 1, &cdb10(opcode::READ_10, 0, 4, 2), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(&r.data_in[..], &data[..]);
        store.set_full(false);
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 9, 2), &data).await;
        assert_eq!(r.status, Status::Good);
    }

    /// A soft threshold the backing filesystem is over (1 %): the first write raises UNIT
    /// ATTENTION 38/07 once for every nexus (the writer's too), the alert hook runs once,
    /// further writes raise nothing until re-armed; VPD B2 reports a threshold exponent.
    #[tokio::test]
    async fn soft_threshold_raises_unit_attention_once() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if crate::scsi::thin::used_percent(&path).unwrap() < 1 {
            eprintln!("skipped: the filesystem of {} is empty", path.display());
            return;
        }
        let store = Arc::new(MemStore::new((BLOCKS * u64::from(BS)) as usize));
        let mut s = settings(false, true);
        s.thin_threshold = Some(crate::scsi::thin::ThinThreshold { percent: 1, path });
        let t = ScsiTarget::new(vec![(0, s, store as Arc<dyn BlockStore>)]);
        let alerts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = alerts.clone();
        t.set_thin_alert(Box::new(move |lun, text| {
            a.lock().unwrap().push((lun, text))
        }));
        // Both nexuses known before the crossing.
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 2, &TUR, &[]).await.status, Status::Good);
        let data = vec![1u8; BS as usize];
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 0, 1), &data).await;
        assert_eq!(r.status, Status::Good, "the write itself succeeds");
        for nexus in [1, 2] {
            let r = run(&t, nexus, &TUR, &[]).await;
            assert_eq!(sense_of(&r), (0x6, 0x38, 0x07), "nexus {nexus}");
            assert_eq!(run(&t, nexus, &TUR, &[]).await.status, Status::Good);
        }
        {
            let alerts = alerts.lock().unwrap();
            assert_eq!(alerts.len(), 1);
            assert_eq!(alerts[0].0, 0);
            assert!(
                alerts[0].1.contains("soft threshold of 1%"),
                "{}",
                alerts[0].1
            );
        }
        tokio::time::sleep(crate::scsi::thin::CHECK_INTERVAL * 2).await;
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 1, 1), &data).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(
            run(&t, 1, &TUR, &[]).await.status,
            Status::Good,
            "raised once"
        );
        assert_eq!(alerts.lock().unwrap().len(), 1);
        let mut inq = [0u8; 6];
        inq[0] = opcode::INQUIRY;
        inq[1] = 1;
        inq[2] = 0xB2;
        inq[4] = 64;
        let r = run(&t, 1, &inq, &[]).await;
        assert_eq!(r.data_in[4], 1, "THRESHOLD EXPONENT");
        // Without a threshold the exponent is 0.
        let (t0, _) = target_with(false, true);
        assert_eq!(run(&t0, 1, &inq, &[]).await.data_in[4], 0);
    }

    #[tokio::test]
    async fn read_only_write_is_write_protected() {
        let (t, store) = target_with(true, true);
        for cdb in [
            cdb16(opcode::WRITE_16, 0, 0, 1),
            cdb16(opcode::WRITE_SAME_16, 0x08, 0, 1),
            cdb16(opcode::WRITE_AND_VERIFY_16, 0, 0, 1),
        ] {
            assert!(matches!(t.plan(raw(0), &cdb, 1), DataOutPlan::Fail(_)));
            let r = run(&t, 1, &cdb, &[0xAA; BS as usize]).await;
            assert_eq!(sense_of(&r), (0x7, 0x27, 0x00));
        }
        let r = run(&t, 1, &cdb10(opcode::UNMAP, 0, 0, 24), &[]).await;
        assert_eq!(sense_of(&r), (0x7, 0x27, 0x00));
        assert!(store.snapshot().iter().all(|&b| b == 0));
        let r = run(&t, 1, &cdb16(opcode::READ_16, 0, 0, 1), &[]).await;
        assert_eq!(r.status, Status::Good);
        let ms = run(&t, 1, &[opcode::MODE_SENSE_6, 0x08, 0x3F, 0, 255, 0], &[]).await;
        assert_eq!(ms.data_in[2] & 0x80, 0x80);
    }

    #[tokio::test]
    async fn lu_reset_unit_attention_delivered_once_per_nexus() {
        let (t, _) = target_with(false, false);
        for nexus in [1, 2, 3] {
            assert_eq!(run(&t, nexus, &TUR, &[]).await.status, Status::Good);
        }
        assert!(t.logical_unit_reset(raw(0), 1));
        // INQUIRY and REPORT LUNS neither report nor clear it.
        let inq = run(&t, 2, &[opcode::INQUIRY, 0, 0, 0, 96, 0], &[]).await;
        assert_eq!(inq.status, Status::Good);
        let mut rl = [0u8; 12];
        rl[0] = opcode::REPORT_LUNS;
        rl[9] = 64;
        assert_eq!(run(&t, 2, &rl, &[]).await.status, Status::Good);
        // Other nexus: once, then gone.
        assert_eq!(sense_of(&run(&t, 2, &TUR, &[]).await), (0x6, 0x29, 0x03));
        assert_eq!(run(&t, 2, &TUR, &[]).await.status, Status::Good);
        // The requesting nexus gets it too.
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x6, 0x29, 0x03));
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        // REQUEST SENSE reports it as data and clears it.
        let rs = run(&t, 3, &[opcode::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]).await;
        assert_eq!(rs.status, Status::Good);
        assert_eq!(
            (rs.data_in[2], rs.data_in[12], rs.data_in[13]),
            (0x6, 0x29, 0x03)
        );
        assert_eq!(run(&t, 3, &TUR, &[]).await.status, Status::Good);
        let rs = run(&t, 3, &[opcode::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]).await;
        assert_eq!((rs.data_in[2], rs.data_in[12]), (0x0, 0x00));
        // A nexus that appears after the reset sees nothing.
        assert_eq!(run(&t, 9, &TUR, &[]).await.status, Status::Good);
    }

    #[tokio::test]
    async fn plan_reports_unit_attention_and_nexus_loss_forgets_it() {
        let (t, _) = target_with(false, false);
        run(&t, 1, &TUR, &[]).await;
        run(&t, 2, &TUR, &[]).await;
        t.target_reset(2);
        let read = cdb10(opcode::READ_10, 0, 0, 1);
        match t.plan(raw(0), &read, 1) {
            DataOutPlan::Fail(r) => assert_eq!(sense_of(&r), (0x6, 0x29, 0x00)),
            other => panic!("expected UA, got {other:?}"),
        }
        assert!(matches!(t.plan(raw(0), &read, 1), DataOutPlan::None(_)));
        t.nexus_lost(2);
        assert_eq!(run(&t, 2, &TUR, &[]).await.status, Status::Good);
        assert!(!t.logical_unit_reset(raw(5), 1));
    }

    #[tokio::test]
    async fn missing_lun_behaviour() {
        let (t, _) = target_with(false, false);
        let req = |cdb: &[u8]| ScsiRequest {
            cdb: Bytes::copy_from_slice(cdb),
            data_out: Bytes::new(),
            expected_len: 255,
            nexus: 1,
        };
        let inq = exec(&t, raw(3), req(&[opcode::INQUIRY, 0, 0, 0, 255, 0])).await;
        assert_eq!(inq.status, Status::Good);
        assert_eq!(inq.data_in[0], 0x7F);
        let rs = exec(&t, raw(3), req(&[opcode::REQUEST_SENSE, 0, 0, 0, 18, 0])).await;
        assert_eq!(rs.status, Status::Good);
        assert_eq!((rs.data_in[2], rs.data_in[12]), (0x5, 0x25));
        let mut rl = [0u8; 12];
        rl[0] = opcode::REPORT_LUNS;
        rl[9] = 255;
        let r = exec(&t, raw(3), req(&rl)).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(
            &r.data_in[..],
            &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let r = exec(&t, raw(3), req(&TUR)).await;
        assert_eq!(sense_of(&r), (0x5, 0x25, 0x00));
        assert!(matches!(
            t.plan(raw(3), &[0x02, 0, 0, 0, 0, 0], 1),
            DataOutPlan::Fail(_)
        ));
        // Malformed LUN fields address nothing.
        let r = exec(&t, 0xC000_0000_0000_0000, req(&TUR)).await;
        assert_eq!(sense_of(&r), (0x5, 0x25, 0x00));
    }

    #[tokio::test]
    async fn short_data_out_writes_only_whole_blocks_received() {
        let (t, store) = target_with(false, false);
        run(
            &t,
            1,
            &cdb10(opcode::WRITE_10, 0, 0, 2),
            &[b'a'; 2 * BS as usize],
        )
        .await;
        // Two blocks in the CDB, one block of data (EDTL = one block): only it is written.
        let r = run(
            &t,
            1,
            &cdb10(opcode::WRITE_10, 0, 0, 2),
            &[b'b'; BS as usize],
        )
        .await;
        assert_eq!(r.status, Status::Good);
        let snap = store.snapshot();
        assert!(snap[..BS as usize].iter().all(|&b| b == b'b'));
        assert!(snap[BS as usize..2 * BS as usize]
            .iter()
            .all(|&b| b == b'a'));
        // Less than a block: nothing written, GOOD. Same for WRITE AND VERIFY. (The transport
        // never passes this: it refuses such an EDTL before any data moves, see the module
        // documentation; the SCSI layer still writes no partial block.)
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 1, 1), &[b'c'; 200]).await;
        assert_eq!(r.status, Status::Good);
        let r = run(
            &t,
            1,
            &cdb10(opcode::WRITE_AND_VERIFY_10, 0, 1, 1),
            &[b'c'; 200],
        )
        .await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(store.snapshot()[BS as usize], b'a');
        // More data than the CDB asks for: only the CDB's blocks are written.
        let r = run(
            &t,
            1,
            &cdb10(opcode::WRITE_AND_VERIFY_10, 0x02, 1, 1),
            &[b'd'; 3 * BS as usize],
        )
        .await;
        assert_eq!(r.status, Status::Good);
        let snap = store.snapshot();
        assert_eq!((snap[BS as usize], snap[2 * BS as usize]), (b'd', 0));
    }

    #[tokio::test]
    async fn verify_miscompare_reports_offset() {
        let (t, _) = target_with(false, false);
        let data: Vec<u8> = (0..4 * BS).map(|i| (i % 251) as u8).collect();
        run(&t, 1, &cdb10(opcode::WRITE_10, 0, 20, 4), &data).await;
        let r = run(&t, 1, &cdb10(opcode::VERIFY_10, 0x02, 20, 4), &data).await;
        assert_eq!(r.status, Status::Good);
        let mut bad = data.clone();
        bad[1234] ^= b'X';
        let r = run(&t, 1, &cdb10(opcode::VERIFY_10, 0x02, 20, 4), &bad).await;
        assert_eq!(sense_of(&r), (0xE, 0x1D, 0x00));
        assert_eq!(&r.sense.unwrap()[3..7], &1234u32.to_be_bytes());
        // BYTCHK=0 never compares.
        let r = run(&t, 1, &cdb10(opcode::VERIFY_10, 0, 20, 4), &[]).await;
        assert_eq!(r.status, Status::Good);
        // BYTCHK=11b: one block against every block.
        run(
            &t,
            1,
            &cdb16(opcode::WRITE_SAME_16, 0, 40, 3),
            &data[..BS as usize],
        )
        .await;
        let r = run(
            &t,
            1,
            &cdb10(opcode::VERIFY_10, 0x06, 40, 3),
            &data[..BS as usize],
        )
        .await;
        assert_eq!(r.status, Status::Good);
        let r = run(
            &t,
            1,
            &cdb10(opcode::VERIFY_10, 0x06, 39, 3),
            &data[..BS as usize],
        )
        .await;
        assert_eq!(sense_of(&r).0, 0xE);
    }

    #[tokio::test]
    async fn write_same_and_unmap() {
        let (t, store) = target_with(false, true);
        let pattern = [0x5Au8; BS as usize];
        let r = run(&t, 1, &cdb16(opcode::WRITE_SAME_16, 0, 100, 300), &pattern).await;
        assert_eq!(r.status, Status::Good);
        let snap = store.snapshot();
        let range = 100 * BS as usize..400 * BS as usize;
        assert!(snap[range.clone()].iter().all(|&b| b == 0x5A));
        assert_eq!(snap[400 * BS as usize], 0);
        // Data-Out of the wrong size is refused.
        let r = run_edtl(
            &t,
            1,
            &cdb16(opcode::WRITE_SAME_16, 0, 0, 1),
            &pattern,
            2 * BS,
        )
        .await;
        assert_eq!(sense_of(&r).0, 0x5);
        let r = run(
            &t,
            1,
            &cdb10(opcode::WRITE_SAME_10, 0x08, 0, 1),
            &pattern[..BS as usize / 2],
        )
        .await;
        assert_eq!(sense_of(&r).0, 0x5);
        // UNMAP a descriptor: reads back zero.
        let mut params = vec![0u8, 22, 0, 16, 0, 0, 0, 0];
        params.extend_from_slice(&150u64.to_be_bytes());
        params.extend_from_slice(&10u32.to_be_bytes());
        params.extend_from_slice(&[0; 4]);
        let r = run(&t, 1, &cdb10(opcode::UNMAP, 0, 0, 24), &params).await;
        assert_eq!(r.status, Status::Good);
        let snap = store.snapshot();
        assert!(zeroed(&snap, 150..160));
        assert_eq!(snap[160 * BS as usize], 0x5A);
        // WRITE SAME with UNMAP and a zero block unmaps; NDOB needs no data.
        let r = run(&t, 1, &cdb16(opcode::WRITE_SAME_16, 0x09, 200, 10), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert!(zeroed(&store.snapshot(), 200..210));
        // With UNMAP the range is unmapped whatever the block holds (SBC-4 table 237): the
        // 0x5A blocks read back as zeroes (LBPRZ), as libiscsi's UnmapUntilEnd expects.
        let r = run(
            &t,
            1,
            &cdb10(opcode::WRITE_SAME_10, 0x08, 100, 20),
            &pattern,
        )
        .await;
        assert_eq!(r.status, Status::Good);
        let snap = store.snapshot();
        assert!(zeroed(&snap, 100..120));
        assert_eq!(snap[120 * BS as usize], 0x5A);
        // Not thin: UNMAP is not implemented, WRITE SAME's UNMAP bit is invalid.
        let (t, _) = target_with(false, false);
        let r = run(&t, 1, &cdb10(opcode::UNMAP, 0, 0, 24), &params).await;
        assert_eq!(sense_of(&r), (0x5, 0x20, 0x00));
        let r = run(&t, 1, &cdb10(opcode::WRITE_SAME_10, 0x08, 0, 1), &pattern).await;
        assert_eq!(sense_of(&r), (0x5, 0x24, 0x00));
    }

    #[tokio::test]
    async fn compare_and_write() {
        let (t, store) = target_with(false, false);
        run(
            &t,
            1,
            &cdb10(opcode::WRITE_10, 0, 7, 2),
            &[b'A'; 2 * BS as usize],
        )
        .await;
        let mut caw = [0u8; 16];
        caw[0] = opcode::COMPARE_AND_WRITE;
        caw[2..10].copy_from_slice(&7u64.to_be_bytes());
        caw[13] = 2;
        let mut buf = vec![b'A'; 2 * BS as usize];
        buf.extend_from_slice(&[b'B'; 2 * BS as usize]);
        buf[2 * BS as usize - 27] = b'C';
        let r = run(&t, 1, &caw, &buf).await;
        assert_eq!(sense_of(&r), (0xE, 0x1D, 0x00));
        assert_eq!(&r.sense.unwrap()[3..7], &(2 * BS - 27).to_be_bytes());
        assert!(store.snapshot()[7 * BS as usize..9 * BS as usize]
            .iter()
            .all(|&b| b == b'A'));
        buf[2 * BS as usize - 27] = b'A';
        let r = run(&t, 1, &caw, &buf).await;
        assert_eq!(r.status, Status::Good);
        assert!(store.snapshot()[7 * BS as usize..9 * BS as usize]
            .iter()
            .all(|&b| b == b'B'));
        // Data-Out not matching NUMBER OF LOGICAL BLOCKS.
        let r = run(&t, 1, &caw, &buf[..3 * BS as usize]).await;
        assert_eq!(sense_of(&r).0, 0x5);
        // Zero blocks: nothing to do.
        caw[13] = 0;
        assert_eq!(
            run(&t, 1, &caw, &buf[..BS as usize]).await.status,
            Status::Good
        );
    }

    #[tokio::test]
    async fn synchronize_cache_flushes() {
        let (t, store) = target_with(false, false);
        let r = run(&t, 1, &cdb10(opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(store.flush_count(), 1);
        let r = run(
            &t,
            1,
            &cdb16(opcode::SYNCHRONIZE_CACHE_16, 0, BLOCKS, 1),
            &[],
        )
        .await;
        assert_eq!(sense_of(&r), (0x5, 0x21, 0x00));
        assert_eq!(store.flush_count(), 1);
    }

    #[tokio::test]
    async fn allocation_length_truncates() {
        let (t, _) = target_with(false, true);
        for alloc in [0u8, 1, 5, 36, 95, 96, 255] {
            let r = run(&t, 1, &[opcode::INQUIRY, 0, 0, 0, alloc, 0], &[]).await;
            assert_eq!(r.data_in.len(), usize::from(alloc).min(96));
        }
        let ms = run(&t, 1, &[opcode::MODE_SENSE_6, 0, 0x3F, 0, 4, 0], &[]).await;
        assert_eq!(ms.data_in.len(), 4);
        let mut rc16 = cdb16(opcode::SERVICE_ACTION_IN_16, 0x10, 0, 0);
        for alloc in 0..40u32 {
            rc16[10..14].copy_from_slice(&alloc.to_be_bytes());
            let r = run(&t, 1, &rc16, &[]).await;
            assert_eq!(r.status, Status::Good);
            assert_eq!(r.data_in.len(), (alloc as usize).min(32));
        }
        rc16[10..14].copy_from_slice(&32u32.to_be_bytes());
        let r = run(&t, 1, &rc16, &[]).await;
        assert_eq!(&r.data_in[..8], &(BLOCKS - 1).to_be_bytes());
        assert_eq!(r.data_in[14] & 0x80, 0x80);
        let r = run(
            &t,
            1,
            &[opcode::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
        )
        .await;
        assert_eq!(&r.data_in[..], &[0, 0, 3, 0xFF, 0, 0, 2, 0]);
    }

    #[test]
    fn target_is_shareable_and_execute_is_send() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        fn assert_send<T: Send>(_: T) {}
        let (t, _) = target_with(false, false);
        assert_send_sync(&t);
        let req = ScsiRequest {
            cdb: Bytes::from_static(&TUR),
            data_out: Bytes::new(),
            expected_len: 0,
            nexus: 1,
        };
        let DataOutPlan::None(planned) = t.plan(raw(0), &TUR, 1) else {
            panic!("TEST UNIT READY needs no data");
        };
        assert_send(t.execute(planned, req));
    }

    #[tokio::test]
    async fn mode_select_round_trip_and_supported_opcodes() {
        let (t, _) = target_with(false, true);
        let ms = run(
            &t,
            1,
            &[opcode::MODE_SENSE_10, 0, 0x08, 0, 0, 0, 0, 0, 255, 0],
            &[],
        )
        .await;
        assert_eq!(ms.status, Status::Good);
        let mut params = ms.data_in.to_vec();
        params[..2].fill(0);
        let len = params.len() as u8;
        let sel = [opcode::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, len, 0];
        assert!(
            matches!(t.plan(raw(0), &sel, 1), DataOutPlan::Gather(n, _) if n == u32::from(len))
        );
        assert_eq!(run(&t, 1, &sel, &params).await.status, Status::Good);
        let wce = params.len() - 18;
        params[wce] ^= 0x04;
        assert_eq!(
            sense_of(&run(&t, 1, &sel, &params).await),
            (0x5, 0x26, 0x00)
        );
        let mut rsoc = [0u8; 12];
        rsoc[0] = opcode::MAINTENANCE_IN;
        rsoc[1] = 0x0C;
        rsoc[2] = 0x01;
        rsoc[3] = opcode::WRITE_10;
        rsoc[8] = 0xFF;
        let r = run(&t, 1, &rsoc, &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(
            (r.data_in[1] & 0x07, r.data_in[4], r.data_in[5] & 0x18),
            (3, 0x2A, 0x18)
        );
        rsoc[1] = 0x0A; // REPORT TARGET PORT GROUPS: not implemented
        let r = run(&t, 1, &rsoc, &[]).await;
        assert_eq!(sense_of(&r), (0x5, 0x24, 0x00));
        assert_eq!(&r.sense.unwrap()[15..18], &[0xC0 | 0x08 | 4, 0, 1]);
    }

    #[tokio::test]
    async fn random_cdbs_never_panic() {
        let (t, _) = target_with(false, true);
        let (ro, _) = target_with(true, false);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5C51);
        let opcodes: Vec<u8> = (0..=255u8).collect();
        for i in 0..20_000u32 {
            let mut cdb = [0u8; 16];
            rng.fill(&mut cdb[..]);
            // Bias towards implemented opcodes and small lengths so the I/O paths run.
            cdb[0] = if i % 2 == 0 {
                opcodes[rng.gen_range(0..256)]
            } else {
                [
                    0x08, 0x0A, 0x28, 0x2A, 0x2E, 0x2F, 0x41, 0x42, 0x88, 0x89, 0x8A, 0x8E, 0x8F,
                    0x93, 0x9E, 0x1A, 0x5A, 0x15, 0x55, 0x12, 0xA3, 0xA0, 0x35, 0x91, 0x34, 0x90,
                ][rng.gen_range(0..26)]
            };
            if i % 3 == 0 {
                cdb[2..10].iter_mut().for_each(|b| *b = 0);
                cdb[10..14].copy_from_slice(&rng.gen_range(0u32..8).to_be_bytes());
                cdb[7..9].copy_from_slice(&rng.gen_range(0u16..8).to_be_bytes());
                cdb[15] = 0;
                cdb[9] &= 0xFA;
            }
            let len = rng.gen_range(0..3 * BS as usize);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            for target in [&t, &ro] {
                let _ = target.plan(raw(0), &cdb, 1);
                let r = run_edtl(target, 1, &cdb, &data, rng.gen()).await;
                assert!(r.status == Status::Good || r.sense.is_some());
            }
        }
    }

    fn pr_out_cdb(sa: u8, pr_type: u8, len: u32) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = opcode::PERSISTENT_RESERVE_OUT;
        c[1] = sa;
        c[2] = pr_type;
        c[5..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn pr_params(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut d = vec![0u8; 24];
        d[0..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        d[20] = flags;
        d
    }

    /// Nexus 1 (initiator a) and nexus 2 (initiator b), registered with keys 0xA and 0xB.
    async fn two_registrants(t: &ScsiTarget) {
        t.nexus_established(1, "iqn.2024-01.org.example:a", [0x40, 0, 0, 0, 0, 1]);
        t.nexus_established(2, "iqn.2024-01.org.example:b", [0x40, 0, 0, 0, 0, 2]);
        let reg = pr_out_cdb(0, 0, 24);
        assert_eq!(
            run(t, 1, &reg, &pr_params(0, 0xA, 0)).await.status,
            Status::Good
        );
        assert_eq!(
            run(t, 2, &reg, &pr_params(0, 0xB, 0)).await.status,
            Status::Good
        );
    }

    /// Two initiator ports; a write from the one that is not the Exclusive Access holder
    /// fails in `plan` (no data solicited) with RESERVATION CONFLICT and no sense; PREEMPT
    /// gives the preempted nexus REGISTRATIONS PREEMPTED; SPC-2 RESERVE goes with its nexus.
    #[tokio::test]
    async fn reservation_conflict_before_data_and_unit_attentions() {
        let (t, _) = target_with(false, false);
        two_registrants(&t).await;
        let r = run(&t, 1, &pr_out_cdb(1, 3, 24), &pr_params(0xA, 0, 0)).await;
        assert_eq!(r.status, Status::Good);
        let write = cdb10(opcode::WRITE_10, 0, 0, 1);
        match t.plan(raw(0), &write, 2) {
            DataOutPlan::Fail(r) => {
                assert_eq!(r.status, Status::ReservationConflict);
                assert!(r.sense.is_none());
            }
            _ => panic!("write from a non-holder planned"),
        }
        let r = run(&t, 1, &write, &[0; BS as usize]).await;
        assert_eq!(r.status, Status::Good);
        // READ KEYS through the target, truncated to the allocation length.
        let mut prin = [0u8; 10];
        prin[0] = opcode::PERSISTENT_RESERVE_IN;
        prin[8] = 12;
        let r = run(&t, 2, &prin, &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(&r.data_in[..], &[0, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 0]);
        // 1 preempts 2: 2 is told, and its next command conflicts.
        let r = run(&t, 1, &pr_out_cdb(4, 3, 24), &pr_params(0xA, 0xB, 0)).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 2, &TUR, &[]).await), (0x6, 0x2A, 0x05));
        assert_eq!(run(&t, 2, &TUR, &[]).await.status, Status::Good);
        let r = run(&t, 2, &cdb10(opcode::READ_10, 0, 0, 1), &[]).await;
        assert_eq!(r.status, Status::ReservationConflict);
        // CLEAR, then SPC-2: RESERVE(6) by 2, conflict for 1, gone when 2's session ends.
        let r = run(&t, 1, &pr_out_cdb(3, 0, 24), &pr_params(0xA, 0, 0)).await;
        assert_eq!(r.status, Status::Good);
        let reserve6 = [opcode::RESERVE_6, 0, 0, 0, 0, 0];
        assert_eq!(run(&t, 2, &reserve6, &[]).await.status, Status::Good);
        assert_eq!(
            run(&t, 1, &reserve6, &[]).await.status,
            Status::ReservationConflict
        );
        assert_eq!(
            run(&t, 1, &TUR, &[]).await.status,
            Status::ReservationConflict
        );
        t.nexus_closed(2);
        assert_eq!(run(&t, 1, &reserve6, &[]).await.status, Status::Good);
        let release6 = [opcode::RELEASE_6, 0, 0, 0, 0, 0];
        assert_eq!(run(&t, 1, &release6, &[]).await.status, Status::Good);
    }

    /// APTPL: the state is written when set, reloaded by a new target, and the file removed
    /// once a REGISTER clears APTPL.
    #[tokio::test]
    async fn aptpl_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reservations").join("t-lun0.json");
        let (t, _) = target_with(false, false);
        t.nexus_established(1, "iqn.2024-01.org.example:a", [0x40, 0, 0, 0, 0, 1]);
        let unit = t.logical_unit(0).unwrap().clone();
        unit.persist_reservations_in(file.clone()).unwrap();
        let reg = pr_out_cdb(0, 0, 24);
        assert_eq!(
            run(&t, 1, &reg, &pr_params(0, 0xA, 0)).await.status,
            Status::Good
        );
        assert!(!file.exists(), "no APTPL, no file");
        assert_eq!(
            run(&t, 1, &reg, &pr_params(0xA, 0xA, 1)).await.status,
            Status::Good
        );
        let r = run(&t, 1, &pr_out_cdb(1, 1, 24), &pr_params(0xA, 0, 0)).await;
        assert_eq!(r.status, Status::Good);
        assert!(file.exists());

        let (t2, _) = target_with(false, false);
        t2.nexus_established(7, "iqn.2024-01.org.example:b", [0x40, 0, 0, 0, 0, 2]);
        t2.logical_unit(0)
            .unwrap()
            .persist_reservations_in(file.clone())
            .unwrap();
        {
            let s = t2.logical_unit(0).unwrap().reservations();
            assert!(s.aptpl);
            assert_eq!(s.registrations.len(), 1);
            assert_eq!(s.registrations[0].key, 0xA);
            assert!(s.reservation.is_some());
        }
        // The reloaded Write Exclusive reservation fences the other initiator's writes.
        let r = run(&t2, 7, &cdb10(opcode::WRITE_10, 0, 0, 1), &[0; BS as usize]).await;
        assert_eq!(r.status, Status::ReservationConflict);
        // A REGISTER without APTPL from the holder (same initiator port) removes the file.
        t2.nexus_established(8, "iqn.2024-01.org.example:a", [0x40, 0, 0, 0, 0, 1]);
        assert_eq!(
            run(&t2, 8, &reg, &pr_params(0xA, 0xA, 0)).await.status,
            Status::Good
        );
        assert!(!file.exists());
        // A corrupt file is an error, not an empty state.
        std::fs::write(&file, b"{").unwrap();
        let (t3, _) = target_with(false, false);
        assert!(t3
            .logical_unit(0)
            .unwrap()
            .persist_reservations_in(file)
            .is_err());
    }

    /// PREEMPT AND ABORT asks the transport to abort the preempted nexus's tasks.
    #[tokio::test]
    async fn preempt_and_abort_calls_the_abort_hook() {
        let (t, _) = target_with(false, false);
        let aborted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = aborted.clone();
        t.set_abort_tasks(Box::new(move |nexus, lun| {
            a.lock().unwrap().push((nexus, lun))
        }));
        two_registrants(&t).await;
        let r = run(&t, 2, &pr_out_cdb(1, 1, 24), &pr_params(0xB, 0, 0)).await;
        assert_eq!(r.status, Status::Good);
        let r = run(&t, 1, &pr_out_cdb(5, 1, 24), &pr_params(0xA, 0xB, 0)).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(*aborted.lock().unwrap(), vec![(2, 0)]);
    }

    /// A replicator standing in for the replicated volume: records the states, waits for a
    /// permit per state (the peer's ack), or refuses (not primary).
    struct FakeReplica {
        sent: std::sync::Mutex<Vec<Bytes>>,
        acks: tokio::sync::Semaphore,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl PrReplicator for FakeReplica {
        fn replicate(&self, state: Bytes) -> crate::scsi::PrReplicateFuture<'_> {
            Box::pin(async move {
                if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err("not primary".into());
                }
                self.sent.lock().unwrap().push(state);
                self.acks.acquire().await.unwrap().forget();
                Ok(())
            })
        }
    }

    /// A replicated LUN (SPC-4 5.13, issue 14): a PR OUT completes only once the replica
    /// stored the new state; the replica's logical unit, given that state, fences like the
    /// primary did (WRITE EXCLUSIVE - REGISTRANTS ONLY: the registrant writes, the other
    /// initiator gets RESERVATION CONFLICT) and keeps its APTPL file; a host that may not
    /// change reservations undoes the change and answers NOT READY.
    #[tokio::test]
    async fn replicated_pr_out_waits_for_the_replica_and_the_replica_fences() {
        let (t, _) = target_with(false, false);
        let rep = Arc::new(FakeReplica {
            sent: Default::default(),
            acks: tokio::sync::Semaphore::new(0),
            refuse: false.into(),
        });
        let unit = t.logical_unit(0).unwrap().clone();
        unit.replicate_reservations_through(rep.clone());
        let t = Arc::new(t);
        t.nexus_established(1, "iqn.2024-01.org.example:a", [0x40, 0, 0, 0, 0, 1]);
        t.nexus_established(2, "iqn.2024-01.org.example:b", [0x40, 0, 0, 0, 0, 2]);
        // REGISTER (APTPL) by 1: not done until the replica acks.
        let t1 = t.clone();
        let reg =
            tokio::spawn(
                async move { run(&t1, 1, &pr_out_cdb(0, 0, 24), &pr_params(0, 0xA, 1)).await },
            );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !reg.is_finished(),
            "PR OUT completed before the replica stored it"
        );
        assert_eq!(rep.sent.lock().unwrap().len(), 1);
        rep.acks.add_permits(1);
        assert_eq!(reg.await.unwrap().status, Status::Good);
        // RESERVE, WRITE EXCLUSIVE - REGISTRANTS ONLY.
        rep.acks.add_permits(1);
        let r = run(&t, 1, &pr_out_cdb(1, 5, 24), &pr_params(0xA, 0, 0)).await;
        assert_eq!(r.status, Status::Good);
        let last = rep.sent.lock().unwrap().last().unwrap().clone();

        // The replica (the other host's target) takes the state, as after a failover.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reservations").join("t-lun0.json");
        let (t2, _) = target_with(false, false);
        let unit2 = t2.logical_unit(0).unwrap().clone();
        unit2.persist_reservations_in(file.clone()).unwrap();
        unit2.receive_replicated_reservations(&last).unwrap();
        assert!(file.exists(), "APTPL state persisted on the replica");
        t2.nexus_established(3, "iqn.2024-01.org.example:a", [0x40, 0, 0, 0, 0, 1]);
        t2.nexus_established(4, "iqn.2024-01.org.example:b", [0x40, 0, 0, 0, 0, 2]);
        let write = cdb10(opcode::WRITE_10, 0, 0, 1);
        let r = run(&t2, 4, &write, &[0; BS as usize]).await;
        assert_eq!(r.status, Status::ReservationConflict);
        let r = run(&t2, 3, &write, &[0; BS as usize]).await;
        assert_eq!(r.status, Status::Good);
        assert!(unit2.receive_replicated_reservations(b"{").is_err());

        // Refused (this host is not primary): undone, NOT READY, nothing changed.
        rep.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = unit.reservations().clone();
        let r = run(&t, 2, &pr_out_cdb(0, 0, 24), &pr_params(0, 0xB, 0)).await;
        assert_eq!(sense_of(&r), (0x2, 0x04, 0x0b));
        assert_eq!(*unit.reservations(), before);
    }

    /// A target whose LUN 0 has ALUA as host 2 of a pair; `primary` says its volume's role.
    fn alua_target(primary: Arc<std::sync::atomic::AtomicBool>) -> (ScsiTarget, Arc<MemStore>) {
        use std::sync::atomic::Ordering;
        let store = Arc::new(MemStore::new((BLOCKS * u64::from(BS)) as usize));
        let mut s = settings(false, false);
        s.identity.relative_port = 2;
        s.identity.port_group = Some(2);
        let t = ScsiTarget::new(vec![(0, s, store.clone() as Arc<dyn BlockStore>)]);
        t.logical_unit(0).unwrap().enable_alua(alua::Alua::new(
            alua::PortGroups { own: 2, peer: 1 },
            Box::new(move || {
                let p = primary.load(Ordering::SeqCst);
                alua::PairRoles {
                    local_primary: p,
                    peer_primary: Some(!p),
                }
            }),
        ));
        (t, store)
    }

    fn rtpg_cdb() -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = opcode::MAINTENANCE_IN;
        c[1] = opcode::SA_REPORT_TARGET_PORT_GROUPS as u8;
        c[9] = 255;
        c
    }

    #[tokio::test]
    async fn without_alua_nothing_changes() {
        let (t, _) = target_with(false, false);
        let r = run(&t, 1, &[opcode::INQUIRY, 0, 0, 0, 96, 0], &[]).await;
        assert_eq!(r.data_in[5], 0, "TPGS=0");
        assert_eq!(
            r.data_in[..],
            spc::standard_inquiry(&identity(), false)[..],
            "byte for byte what it was"
        );
        let r = run(&t, 1, &rtpg_cdb(), &[]).await;
        assert_eq!(
            r.sense.unwrap(),
            Sense::invalid_field_in_cdb(1, Some(4)).to_fixed_bytes()
        );
        let mut rsoc = [0u8; 12];
        rsoc[0] = opcode::MAINTENANCE_IN;
        rsoc[1] = 0x0C;
        rsoc[2] = 0x02;
        rsoc[3] = opcode::MAINTENANCE_IN;
        rsoc[5] = 0x0A;
        rsoc[9] = 64;
        let r = run(&t, 1, &rsoc, &[]).await;
        assert_eq!(r.data_in[1] & 0x07, 0x01, "RTPG not supported");
    }

    #[tokio::test]
    async fn standby_refuses_media_access_and_a_role_change_is_announced() {
        use std::sync::atomic::Ordering;
        let primary = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (t, store) = alua_target(primary.clone());
        let r = run(&t, 1, &[opcode::INQUIRY, 0, 0, 0, 96, 0], &[]).await;
        assert_eq!(r.data_in[5], 0x10, "TPGS=01b, implicit");
        let r = run(&t, 1, &[opcode::INQUIRY, 1, 0x83, 0, 255, 0], &[]).await;
        let page = r.data_in.to_vec();
        let tail = &page[page.len() - 16..];
        assert_eq!(
            tail,
            &[0x51, 0x94, 0, 4, 0, 0, 0, 2, 0x51, 0x95, 0, 4, 0, 0, 0, 2]
        );
        let r = run(&t, 2, &TUR, &[]).await;
        assert_eq!(sense_of(&r), (0x02, 0x04, 0x0B));
        let data = vec![0xAB; BS as usize];
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 3, 1), &data).await;
        assert_eq!(sense_of(&r), (0x02, 0x04, 0x0B));
        let r = run(&t, 1, &cdb10(opcode::READ_10, 0, 3, 1), &[]).await;
        assert_eq!(sense_of(&r), (0x02, 0x04, 0x0B));
        let block = store.read(3 * u64::from(BS), BS as usize).await.unwrap();
        assert!(block.iter().all(|&b| b == 0), "nothing written");
        let r = run(&t, 1, &rtpg_cdb(), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(
            (r.data_in[4], r.data_in[7]),
            (0x02, 2),
            "own group 2 standby"
        );
        assert_eq!((r.data_in[16], r.data_in[19]), (0x00, 1), "group 1 active");

        primary.store(true, Ordering::SeqCst);
        for nexus in [1, 2] {
            let r = run(&t, nexus, &TUR, &[]).await;
            assert_eq!(sense_of(&r), (0x06, 0x2A, 0x06), "nexus {nexus}");
            let r = run(&t, nexus, &TUR, &[]).await;
            assert_eq!(r.status, Status::Good);
        }
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 3, 1), &data).await;
        assert_eq!(r.status, Status::Good);
        // A nexus whose first command comes after a change gets no unit attention for it.
        primary.store(false, Ordering::SeqCst);
        let r = run(&t, 3, &TUR, &[]).await;
        assert_eq!(
            sense_of(&r),
            (0x02, 0x04, 0x0B),
            "standby, no unit attention"
        );
        let r = run(&t, 1, &TUR, &[]).await;
        assert_eq!(
            sense_of(&r),
            (0x06, 0x2A, 0x06),
            "nexus 1 had seen the old state"
        );
        primary.store(true, Ordering::SeqCst);
        let r = run(&t, 1, &TUR, &[]).await;
        assert_eq!(sense_of(&r), (0x06, 0x2A, 0x06));
        let r = run(&t, 1, &rtpg_cdb(), &[]).await;
        assert_eq!(
            (r.data_in[4], r.data_in[9]),
            (0x00, 0x02),
            "active, altered implicitly"
        );

        // Planned as primary, demoted while the Data-Out came in: not written.
        let DataOutPlan::Gather(_, planned) = t.plan(raw(0), &cdb10(opcode::WRITE_10, 0, 4, 1), 1)
        else {
            panic!("a write on the primary gathers its data");
        };
        primary.store(false, Ordering::SeqCst);
        let req = ScsiRequest {
            cdb: Bytes::copy_from_slice(&cdb10(opcode::WRITE_10, 0, 4, 1)),
            data_out: Bytes::from(data.clone()),
            expected_len: BS,
            nexus: 1,
        };
        let r = t.execute(planned, req).await;
        assert_eq!(sense_of(&r), (0x02, 0x04, 0x0B));
        let block = store.read(4 * u64::from(BS), BS as usize).await.unwrap();
        assert!(block.iter().all(|&b| b == 0), "nothing written");
    }

    fn sanitize_cdb(flags: u8, param_len: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = opcode::SANITIZE;
        c[1] = flags;
        c[7..9].copy_from_slice(&param_len.to_be_bytes());
        c
    }

    fn overwrite_params(byte0: u8, pattern: &[u8]) -> Vec<u8> {
        let mut p = vec![byte0, 0];
        p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
        p.extend_from_slice(pattern);
        p
    }

    fn sanitize_target(thin: bool, rate: u64) -> (ScsiTarget, Arc<MemStore>) {
        let store = Arc::new(MemStore::new((BLOCKS * u64::from(BS)) as usize));
        let mut s = settings(false, thin);
        s.sanitize_rate = rate;
        let t = ScsiTarget::new(vec![(0, s, store.clone() as Arc<dyn BlockStore>)]);
        (t, store)
    }

    /// Waits (polling TEST UNIT READY on `nexus`) until the sanitize is over.
    async fn until_ready(t: &ScsiTarget, nexus: NexusId) -> ScsiResponse {
        for _ in 0..400 {
            let r = run(t, nexus, &TUR, &[]).await;
            if r.status == Status::Good || sense_of(&r) != (0x2, 0x04, 0x1B) {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the sanitize did not end");
    }

    /// SANITIZE OVERWRITE with IMMED: the unit answers NOT READY, SANITIZE IN PROGRESS with
    /// the progress indication (INQUIRY and REQUEST SENSE still work), the job goes on across
    /// a logical unit reset and the end of the nexus that sent it, is paced to
    /// `sanitize_rate`, and leaves the last pass's pattern in every block.
    #[tokio::test]
    async fn sanitize_overwrite_runs_in_background_across_reset() {
        // 512 KiB at 1 MiB/s: each pass one chunk, the second and third 0.5 s apart.
        let (t, store) = sanitize_target(false, 1 << 20);
        for nexus in [1, 2] {
            assert_eq!(run(&t, nexus, &TUR, &[]).await.status, Status::Good);
        }
        let data = vec![0x77u8; BS as usize];
        assert_eq!(
            run(&t, 1, &cdb10(opcode::WRITE_10, 0, 9, 1), &data)
                .await
                .status,
            Status::Good
        );
        let params = overwrite_params(0x80 | 3, &[0xA5, 0x0F, 0x00]);
        let started = Instant::now();
        let r = run(
            &t,
            2,
            &sanitize_cdb(0x80 | 0x01, params.len() as u16),
            &params,
        )
        .await;
        assert_eq!(
            r.status,
            Status::Good,
            "IMMED: status once the list is checked"
        );
        let r = run(&t, 2, &TUR, &[]).await;
        assert_eq!(sense_of(&r), (0x2, 0x04, 0x1B));
        assert_eq!(
            r.sense.as_ref().unwrap()[15],
            0x80,
            "SKSV with the progress indication"
        );
        let r = run(&t, 1, &cdb16(opcode::READ_16, 0, 0, 1), &[]).await;
        assert_eq!(sense_of(&r), (0x2, 0x04, 0x1B));
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 0, 1), &data).await;
        assert_eq!(sense_of(&r), (0x2, 0x04, 0x1B));
        let r = run(&t, 1, &[opcode::INQUIRY, 0, 0, 0, 96, 0], &[]).await;
        assert_eq!(r.status, Status::Good);
        let rs = run(&t, 1, &[opcode::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]).await;
        assert_eq!(rs.status, Status::Good);
        assert_eq!(
            (
                rs.data_in[2],
                rs.data_in[12],
                rs.data_in[13],
                rs.data_in[15]
            ),
            (0x2, 0x04, 0x1B, 0x80)
        );
        // A second SANITIZE while one runs.
        let r = run(&t, 1, &sanitize_cdb(0x01, params.len() as u16), &params).await;
        assert_eq!(sense_of(&r), (0x2, 0x04, 0x1B));
        // The job belongs to the unit: a reset and the sender's nexus ending leave it be.
        assert!(t.logical_unit_reset(raw(0), 1));
        t.nexus_lost(2);
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x6, 0x29, 0x03));
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x2, 0x04, 0x1B));
        let r = until_ready(&t, 1).await;
        assert_eq!(r.status, Status::Good);
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(950),
            "paced: three 512 KiB passes at 1 MiB/s take a second, took {:?}",
            started.elapsed()
        );
        // Passes 1 and 3 write the pattern, pass 2 its inverse: the pattern stays.
        let expect: Vec<u8> = [0xA5u8, 0x0F, 0x00]
            .iter()
            .cycle()
            .take(BS as usize)
            .copied()
            .collect();
        let snap = store.snapshot();
        assert!(snap.chunks(BS as usize).all(|b| b == expect.as_slice()));
        let r = run(&t, 1, &cdb16(opcode::READ_16, 0, 9, 1), &[]).await;
        assert_eq!(&r.data_in[..], expect.as_slice());
    }

    /// A sanitize that fails leaves the unit in failure mode (medium access is MEDIUM ERROR,
    /// SANITIZE COMMAND FAILED; TEST UNIT READY and INQUIRY work); EXIT FAILURE MODE ends it
    /// only after a sanitize with AUSE set; a sanitize that succeeds ends it too.
    #[tokio::test]
    async fn sanitize_failure_mode_and_exit() {
        let (t, store) = sanitize_target(true, 0);
        store.inject_fault(100 * u64::from(BS), 101 * u64::from(BS));
        let params = overwrite_params(0x01, &[0x5A]);
        let ow = |ause: u8| sanitize_cdb(ause | 0x01, params.len() as u16);
        let exit = sanitize_cdb(0x1F, 0);
        let read0 = cdb16(opcode::READ_16, 0, 0, 1);
        let r = run(&t, 1, &ow(0), &params).await;
        assert_eq!(sense_of(&r), (0x3, 0x31, 0x03));
        assert_eq!(sense_of(&run(&t, 1, &read0, &[]).await), (0x3, 0x31, 0x03));
        let r = run(&t, 1, &cdb10(opcode::WRITE_10, 0, 0, 1), &[0; BS as usize]).await;
        assert_eq!(sense_of(&r), (0x3, 0x31, 0x03));
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        // AUSE was clear: EXIT FAILURE MODE is refused.
        assert_eq!(sense_of(&run(&t, 1, &exit, &[]).await), (0x5, 0x24, 0x00));
        assert_eq!(sense_of(&run(&t, 1, &read0, &[]).await), (0x3, 0x31, 0x03));
        // AUSE set: the next failure can be exited.
        assert_eq!(
            sense_of(&run(&t, 1, &ow(0x20), &params).await),
            (0x3, 0x31, 0x03)
        );
        assert_eq!(run(&t, 1, &exit, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 1, &read0, &[]).await.status, Status::Good);
        // Outside failure mode EXIT FAILURE MODE has nothing to do.
        assert_eq!(run(&t, 1, &exit, &[]).await.status, Status::Good);
        // A failure, then a sanitize that succeeds.
        assert_eq!(
            sense_of(&run(&t, 1, &ow(0), &params).await),
            (0x3, 0x31, 0x03)
        );
        store.inject_fault(0, 0);
        assert_eq!(run(&t, 1, &ow(0), &params).await.status, Status::Good);
        let r = run(&t, 1, &read0, &[]).await;
        assert!(r.data_in.iter().all(|&b| b == 0x5A));
        // Parameter list errors move nothing.
        let r = run(&t, 1, &sanitize_cdb(0x01, 4), &params[..4]).await;
        assert_eq!(sense_of(&r), (0x5, 0x24, 0x00));
        let bad = overwrite_params(0x00, &[1]);
        let r = run(&t, 1, &sanitize_cdb(0x01, bad.len() as u16), &bad).await;
        assert_eq!(sense_of(&r), (0x5, 0x26, 0x00));
        assert_eq!(
            sense_of(&run(&t, 1, &sanitize_cdb(0x03, 0), &[]).await),
            (0x5, 0x24, 0x00)
        );
    }

    /// BLOCK ERASE deallocates every block (they read back as zeroes) and GET LBA STATUS says
    /// so until something writes; without thin provisioning it is not offered.
    #[tokio::test]
    async fn sanitize_block_erase_deallocates() {
        let (t, store) = sanitize_target(true, 0);
        let data = vec![0x61u8; 4 * BS as usize];
        assert_eq!(
            run(&t, 1, &cdb10(opcode::WRITE_10, 0, 0, 4), &data)
                .await
                .status,
            Status::Good
        );
        let mut gls = [0u8; 16];
        gls[0] = opcode::SERVICE_ACTION_IN_16;
        gls[1] = 0x12;
        gls[13] = 64;
        assert_eq!(
            run(&t, 1, &gls, &[]).await.data_in[20],
            0,
            "mapped or unknown"
        );
        assert_eq!(
            run(&t, 1, &sanitize_cdb(0x02, 0), &[]).await.status,
            Status::Good
        );
        assert!(store.snapshot().iter().all(|&b| b == 0));
        let d = run(&t, 1, &gls, &[]).await.data_in;
        assert_eq!(
            (&d[16..20], d[20]),
            (&(BLOCKS as u32).to_be_bytes()[..], 1),
            "deallocated"
        );
        assert_eq!(
            run(
                &t,
                1,
                &cdb10(opcode::WRITE_10, 0, 7, 1),
                &data[..BS as usize]
            )
            .await
            .status,
            Status::Good
        );
        assert_eq!(run(&t, 1, &gls, &[]).await.data_in[20], 0);
        // REPORT SUPPORTED OPERATION CODES, one command with service action.
        let rsoc = |sa: u8| {
            let mut c = [0u8; 12];
            c[0] = opcode::MAINTENANCE_IN;
            c[1] = 0x0C;
            c[2] = 0x02;
            c[3] = opcode::SANITIZE;
            c[5] = sa;
            c[9] = 64;
            c
        };
        assert_eq!(run(&t, 1, &rsoc(0x02), &[]).await.data_in[1] & 0x07, 3);
        let (plain, _) = sanitize_target(false, 0);
        assert_eq!(
            sense_of(&run(&plain, 1, &sanitize_cdb(0x02, 0), &[]).await),
            (0x5, 0x24, 0x00)
        );
        assert_eq!(run(&plain, 1, &rsoc(0x02), &[]).await.data_in[1] & 0x07, 1);
        for sa in [0x01, 0x1F] {
            assert_eq!(run(&plain, 1, &rsoc(sa), &[]).await.data_in[1] & 0x07, 3);
        }
    }

    /// SWP set by MODE SELECT on one nexus: write protection for every nexus (DATA PROTECT,
    /// LOGICAL UNIT SOFTWARE WRITE PROTECTED on every command that writes, SANITIZE
    /// included), WP in MODE SENSE, MODE PARAMETERS CHANGED for the other nexuses only.
    #[tokio::test]
    async fn software_write_protect_is_per_unit() {
        let (t, _) = sanitize_target(true, 0);
        for nexus in [1, 2] {
            assert_eq!(run(&t, nexus, &TUR, &[]).await.status, Status::Good);
        }
        let ch = run(
            &t,
            2,
            &[opcode::MODE_SENSE_6, 0x08, 0x40 | 0x0A, 0, 255, 0],
            &[],
        )
        .await;
        assert_eq!(ch.data_in[4 + 4] & 0x08, 0x08, "SWP changeable");
        let select = |swp: bool| {
            let mut page = run_sync_control_page(swp);
            page.splice(0..0, [0u8, 0, 0, 0]);
            page
        };
        let params = select(true);
        let cdb = [opcode::MODE_SELECT_6, 0x10, 0, 0, params.len() as u8, 0];
        assert_eq!(run(&t, 2, &cdb, &params).await.status, Status::Good);
        assert_eq!(
            run(&t, 2, &TUR, &[]).await.status,
            Status::Good,
            "no UA to the sender"
        );
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x6, 0x2A, 0x01));
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        let data = vec![1u8; BS as usize];
        let params_ow = overwrite_params(0x01, &[1]);
        for (cdb, out) in [
            (cdb10(opcode::WRITE_10, 0, 0, 1).to_vec(), data.clone()),
            (
                cdb16(opcode::WRITE_SAME_16, 0x08, 0, 1).to_vec(),
                data.clone(),
            ),
            (cdb10(opcode::UNMAP, 0, 0, 24).to_vec(), vec![0; 24]),
            (
                sanitize_cdb(0x01, params_ow.len() as u16).to_vec(),
                params_ow.clone(),
            ),
            (sanitize_cdb(0x02, 0).to_vec(), vec![]),
        ] {
            assert_eq!(
                sense_of(&run(&t, 1, &cdb, &out).await),
                (0x7, 0x27, 0x02),
                "{cdb:02x?}"
            );
        }
        assert_eq!(
            run(&t, 1, &sanitize_cdb(0x1F, 0), &[]).await.status,
            Status::Good
        );
        assert_eq!(
            run(&t, 1, &cdb16(opcode::READ_16, 0, 0, 1), &[])
                .await
                .status,
            Status::Good
        );
        let ms = run(&t, 1, &[opcode::MODE_SENSE_6, 0x08, 0x0A, 0, 255, 0], &[]).await;
        assert_eq!(
            (ms.data_in[2] & 0x80, ms.data_in[4 + 4] & 0x08),
            (0x80, 0x08)
        );
        // Cleared from nexus 1: nexus 2 is told, writes work again.
        let params = select(false);
        assert_eq!(run(&t, 1, &cdb, &params).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 2, &TUR, &[]).await), (0x6, 0x2A, 0x01));
        assert_eq!(
            run(&t, 2, &cdb10(opcode::WRITE_10, 0, 0, 1), &data)
                .await
                .status,
            Status::Good
        );
        // Selecting the same value again changes nothing: no unit attention.
        assert_eq!(run(&t, 1, &cdb, &params).await.status, Status::Good);
        assert_eq!(run(&t, 2, &TUR, &[]).await.status, Status::Good);
    }

    fn removable_target() -> (ScsiTarget, Arc<MemStore>) {
        let store = Arc::new(MemStore::new((BLOCKS * u64::from(BS)) as usize));
        let t = ScsiTarget::new(vec![(
            0,
            LunSettings {
                removable: true,
                ..settings(false, true)
            },
            store.clone() as Arc<dyn BlockStore>,
        )]);
        (t, store)
    }

    const PREVENT: [u8; 6] = [opcode::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0];
    const ALLOW: [u8; 6] = [opcode::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0, 0];
    const EJECT: [u8; 6] = [opcode::START_STOP_UNIT, 0, 0, 0, 0x02, 0];
    const LOAD: [u8; 6] = [opcode::START_STOP_UNIT, 0, 0, 0, 0x03, 0];
    /// REPORT SUPPORTED OPERATION CODES, one command: PREVENT ALLOW MEDIUM REMOVAL.
    const RSOC_PREVENT_ALLOW: [u8; 12] = [
        opcode::MAINTENANCE_IN,
        0x0C,
        0x01,
        opcode::PREVENT_ALLOW_MEDIUM_REMOVAL,
        0,
        0,
        0,
        0,
        0,
        64,
        0,
        0,
    ];
    const NOT_PRESENT: (u8, u8, u8) = (0x2, 0x3A, 0x00);
    const PREVENTED: (u8, u8, u8) = (0x5, 0x53, 0x02);

    #[tokio::test]
    async fn removable_medium_prevent_eject_and_load() {
        let (t, _) = removable_target();
        for nexus in [1, 2] {
            assert_eq!(run(&t, nexus, &TUR, &[]).await.status, Status::Good);
        }
        let inq = run(&t, 1, &[opcode::INQUIRY, 0, 0, 0, 96, 0], &[]).await;
        assert_eq!(inq.data_in[1] & 0x80, 0x80, "RMB");
        // A prevention from nexus 1 holds against both nexuses until nexus 1 allows.
        assert_eq!(run(&t, 1, &PREVENT, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 2, &EJECT, &[]).await), PREVENTED);
        assert_eq!(sense_of(&run(&t, 1, &EJECT, &[]).await), PREVENTED);
        assert_eq!(run(&t, 2, &ALLOW, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 2, &EJECT, &[]).await), PREVENTED);
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 1, &ALLOW, &[]).await.status, Status::Good);
        // Obsolete PREVENT values are refused.
        let mut bad = PREVENT;
        bad[4] = 2;
        assert_eq!(sense_of(&run(&t, 1, &bad, &[]).await), (0x5, 0x24, 0x00));
        assert_eq!(run(&t, 2, &EJECT, &[]).await.status, Status::Good);
        // Unloaded: medium access is NOT READY, MEDIUM NOT PRESENT, before any data.
        let data = vec![7u8; BS as usize];
        for (cdb, out) in [
            (TUR.to_vec(), vec![]),
            (cdb10(opcode::READ_10, 0, 0, 1).to_vec(), vec![]),
            (cdb10(opcode::WRITE_10, 0, 0, 1).to_vec(), data.clone()),
            (
                cdb16(opcode::WRITE_SAME_16, 0x08, 0, 1).to_vec(),
                data.clone(),
            ),
            (
                cdb10(opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0).to_vec(),
                vec![],
            ),
            (cdb10(opcode::VERIFY_10, 0, 0, 1).to_vec(), vec![]),
            (cdb10(opcode::UNMAP, 0, 0, 24).to_vec(), vec![0; 24]),
            (cdb10(opcode::READ_CAPACITY_10, 0, 0, 0).to_vec(), vec![]),
            (
                cdb16(opcode::SERVICE_ACTION_IN_16, 0x10, 0, 32).to_vec(),
                vec![],
            ),
            (
                cdb16(opcode::SERVICE_ACTION_IN_16, 0x12, 0, 32).to_vec(),
                vec![],
            ),
            (sanitize_cdb(0x02, 0).to_vec(), vec![]),
        ] {
            assert_eq!(
                sense_of(&run(&t, 1, &cdb, &out).await),
                NOT_PRESENT,
                "{cdb:02x?}"
            );
            let plan = t.plan(raw(0), &cdb, 1);
            assert!(matches!(plan, DataOutPlan::Fail(_)), "{cdb:02x?}");
        }
        // What works without a medium.
        for cdb in [
            vec![opcode::INQUIRY, 0, 0, 0, 96, 0],
            vec![opcode::MODE_SENSE_6, 0x08, 0x3F, 0, 255, 0],
            vec![opcode::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
            PREVENT.to_vec(),
            ALLOW.to_vec(),
            EJECT.to_vec(),
        ] {
            assert_eq!(
                run(&t, 1, &cdb, &[]).await.status,
                Status::Good,
                "{cdb:02x?}"
            );
        }
        let rs = run(&t, 1, &[opcode::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]).await;
        assert_eq!((rs.data_in[2], rs.data_in[12]), (0x02, 0x3A));
        // Loading while prevented is refused; once allowed it loads, and the other nexus
        // learns of it by NOT READY TO READY CHANGE, the loading one does not.
        assert_eq!(run(&t, 2, &PREVENT, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 1, &LOAD, &[]).await), PREVENTED);
        assert_eq!(run(&t, 2, &ALLOW, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 1, &LOAD, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 2, &TUR, &[]).await), (0x6, 0x28, 0x00));
        assert_eq!(run(&t, 2, &TUR, &[]).await.status, Status::Good);
        // Loading a loaded medium is no change: no unit attention.
        assert_eq!(run(&t, 2, &LOAD, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        // A POWER CONDITION other than 0 ignores LOEJ (SBC-3 5.25).
        for pc in 1..16u8 {
            let cdb = [opcode::START_STOP_UNIT, 1, 0, 0, (pc << 4) | 0x02, 0];
            assert_eq!(run(&t, 1, &cdb, &[]).await.status, Status::Good);
            assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        }
        // REPORT SUPPORTED OPERATION CODES lists PREVENT ALLOW MEDIUM REMOVAL.
        let r = run(&t, 1, &RSOC_PREVENT_ALLOW, &[]).await;
        assert_eq!(&r.data_in[..], &[0, 0x03, 0, 6, 0x1E, 0, 0, 0, 0x03, 0]);
    }

    #[tokio::test]
    async fn preventions_end_with_the_nexus_and_with_resets() {
        let (t, _) = removable_target();
        // I_T nexus loss (session closed).
        assert_eq!(run(&t, 1, &PREVENT, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 2, &EJECT, &[]).await), PREVENTED);
        t.nexus_closed(1);
        assert_eq!(run(&t, 2, &EJECT, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 2, &LOAD, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x6, 0x28, 0x00));
        // Logical unit reset.
        assert_eq!(run(&t, 1, &PREVENT, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 2, &PREVENT, &[]).await.status, Status::Good);
        assert!(t.logical_unit_reset(raw(0), 1));
        for nexus in [1, 2] {
            assert_eq!(
                sense_of(&run(&t, nexus, &TUR, &[]).await),
                (0x6, 0x29, 0x03)
            );
        }
        assert_eq!(run(&t, 2, &EJECT, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), NOT_PRESENT);
        assert_eq!(run(&t, 2, &LOAD, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x6, 0x28, 0x00));
        // Target (hard) reset.
        assert_eq!(run(&t, 1, &PREVENT, &[]).await.status, Status::Good);
        t.target_reset(1);
        for nexus in [1, 2] {
            assert_eq!(
                sense_of(&run(&t, nexus, &TUR, &[]).await),
                (0x6, 0x29, 0x00)
            );
        }
        assert_eq!(run(&t, 1, &EJECT, &[]).await.status, Status::Good);
        // The target forgetting the nexus (nexus_lost) ends it too; the medium stays
        // unloaded through it all.
        assert_eq!(run(&t, 3, &PREVENT, &[]).await.status, Status::Good);
        assert_eq!(sense_of(&run(&t, 1, &LOAD, &[]).await), PREVENTED);
        t.nexus_lost(3);
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), NOT_PRESENT);
        assert_eq!(run(&t, 1, &LOAD, &[]).await.status, Status::Good);
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
    }

    /// SBC-3 5.25: an unload waits for the reads and writes using the medium; a write
    /// planned before the unload and run after it finds the medium gone and writes nothing.
    #[tokio::test]
    async fn an_unload_waits_for_medium_access_in_progress() {
        let (t, store) = removable_target();
        let t = Arc::new(t);
        let unit = t.logical_unit(0).unwrap().clone();
        let using = unit.medium_gate.read().await;
        let eject = {
            let t = t.clone();
            tokio::spawn(async move { run(&t, 1, &EJECT, &[]).await })
        };
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !eject.is_finished(),
            "unloaded under a command using the medium"
        );
        assert!(unit.medium.present());
        let cdb = cdb10(opcode::WRITE_10, 0, 0, 1);
        let DataOutPlan::Gather(_, planned) = t.plan(raw(0), &cdb, 2) else {
            panic!("the write is planned while the medium is there");
        };
        drop(using);
        assert_eq!(eject.await.unwrap().status, Status::Good);
        let req = ScsiRequest {
            cdb: Bytes::copy_from_slice(&cdb),
            data_out: Bytes::from(vec![9u8; BS as usize]),
            expected_len: BS,
            nexus: 2,
        };
        assert_eq!(sense_of(&t.execute(planned, req).await), NOT_PRESENT);
        assert!(store.snapshot()[..BS as usize].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn a_fixed_medium_is_unchanged() {
        let (t, _) = target_with(false, true);
        let inq = run(&t, 1, &[opcode::INQUIRY, 0, 0, 0, 96, 0], &[]).await;
        assert_eq!(inq.data_in[1], 0, "RMB clear");
        assert_eq!(
            sense_of(&run(&t, 1, &PREVENT, &[]).await),
            (0x5, 0x20, 0x00)
        );
        assert_eq!(sense_of(&run(&t, 1, &ALLOW, &[]).await), (0x5, 0x20, 0x00));
        assert_eq!(sense_of(&run(&t, 1, &EJECT, &[]).await), (0x5, 0x24, 0x00));
        assert_eq!(sense_of(&run(&t, 1, &LOAD, &[]).await), (0x5, 0x24, 0x00));
        let reserved_pc = [opcode::START_STOP_UNIT, 0, 0, 0, 0x40, 0];
        assert_eq!(
            sense_of(&run(&t, 1, &reserved_pc, &[]).await),
            (0x5, 0x24, 0x00)
        );
        t.nexus_closed(1);
        t.target_reset(1);
        assert_eq!(sense_of(&run(&t, 1, &TUR, &[]).await), (0x6, 0x29, 0x00));
        assert_eq!(run(&t, 1, &TUR, &[]).await.status, Status::Good);
        let r = run(&t, 1, &RSOC_PREVENT_ALLOW, &[]).await;
        assert_eq!(&r.data_in[..], &[0, 0x01, 0, 0], "not supported");
    }

    /// The current Control mode page with SWP as given (MODE SELECT's page).
    fn run_sync_control_page(swp: bool) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p[0] = 0x0A;
        p[1] = 0x0A;
        p[3] = 0x10;
        if swp {
            p[4] = 0x08;
        }
        p[8..10].copy_from_slice(&[0xFF, 0xFF]);
        p
    }
}

#[cfg(test)]
mod xcopy_tests {
    use super::*;
    use crate::scsi::xcopy::tests::{b2b, cscd, list};
    use crate::scsi::{LunIdentity, Status};
    use crate::store::MemStore;

    const BS: u32 = 512;
    const BLOCKS: u64 = 8192;

    fn naa(n: u8) -> Vec<u8> {
        vec![0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, n]
    }

    fn settings(n: u8, read_only: bool) -> LunSettings {
        LunSettings {
            block_size: BS,
            physical_block_size: 4096,
            read_only,
            identity: LunIdentity {
                vendor: "TWINSAN".into(),
                product: "Virtual disk".into(),
                revision: "0.1".into(),
                serial: format!("SN{n}"),
                naa: naa(n),
                t10_vendor_specific: "uuid".into(),
                target_port_name: "iqn.2024-01.org.example:t,t,0x0001".into(),
                relative_port: 1,
                port_group: None,
                compat: None,
            },
            write_cache: true,
            thin_provisioning: false,
            thin_threshold: None,
            sanitize_rate: 0,
            removable: false,
        }
    }

    /// LUN 0 and LUN 1 (LUN 2 read-only), each with its own NAA designator.
    fn two_luns() -> ScsiTarget {
        let store =
            || Arc::new(MemStore::new((BLOCKS * u64::from(BS)) as usize)) as Arc<dyn BlockStore>;
        ScsiTarget::new(vec![
            (0, settings(0, false), store()),
            (1, settings(1, false), store()),
            (2, settings(2, true), store()),
        ])
    }

    async fn run(t: &ScsiTarget, lun: u64, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        let req = ScsiRequest {
            cdb: Bytes::copy_from_slice(cdb),
            data_out: Bytes::copy_from_slice(data),
            expected_len: data.len() as u32,
            nexus: 1,
        };
        let raw = u64::from_be_bytes(spc::encode_lun(lun).unwrap());
        match t.plan(raw, &req.cdb, req.nexus) {
            DataOutPlan::Fail(r) => r,
            DataOutPlan::None(p) | DataOutPlan::Gather(_, p) => t.execute(p, req).await,
        }
    }

    fn xcopy_cdb(len: usize) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode::EXTENDED_COPY;
        c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
        c
    }

    fn rcr_cdb(sa: u8, list_id: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode::RECEIVE_COPY_RESULTS;
        c[1] = sa;
        c[2] = list_id;
        c[10..14].copy_from_slice(&1024u32.to_be_bytes());
        c
    }

    fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
        assert_eq!(r.status, Status::CheckCondition, "expected CHECK CONDITION");
        let s = r.sense.as_ref().unwrap();
        (s[2] & 0x0F, s[12], s[13])
    }

    #[tokio::test]
    async fn copy_between_luns_is_byte_identical() {
        let t = two_luns();
        // 3000 blocks (more than one 1 MiB chunk) of a pattern on LUN 0 at LBA 100.
        let pattern: Vec<u8> = (0..3000 * BS as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let r = run(&t, 0, &rw16(opcode::WRITE_16, 100, 3000), &pattern).await;
        assert_eq!(r.status, Status::Good);
        // Sent to LUN 0, copying LUN 0 → LUN 1 (CSCD 0 = LUN 0, CSCD 1 = LUN 1).
        let p = list(
            5,
            &[cscd(&naa(0), BS), cscd(&naa(1), BS)],
            &[b2b(0, 1, 3000, 100, 4000)],
        );
        let r = run(&t, 0, &xcopy_cdb(p.len()), &p).await;
        assert_eq!(r.status, Status::Good, "{:?}", r.sense);
        let r = run(&t, 1, &rw16(opcode::READ_16, 4000, 3000), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert!(r.data_in[..] == pattern[..], "copied data differs");
        // RECEIVE COPY RESULTS: COPY STATUS of list 5, completed, 1 segment, all bytes.
        let r = run(&t, 1, &rcr_cdb(0, 5), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(r.data_in[4], 1);
        assert_eq!(&r.data_in[5..7], &[0, 1]);
        assert_eq!(&r.data_in[8..12], &(3000 * BS).to_be_bytes());
        // Unknown list identifier.
        assert_eq!(
            sense_of(&run(&t, 0, &rcr_cdb(0, 6), &[]).await),
            (0x05, 0x24, 0)
        );
        // Operating parameters.
        let r = run(&t, 0, &rcr_cdb(3, 0), &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(r.data_in[37], 9);
    }

    #[tokio::test]
    async fn copy_failures_are_copy_aborted() {
        let t = two_luns();
        let cs = [cscd(&naa(0), BS), cscd(&naa(1), BS)];
        // Destination range beyond the end of LUN 1.
        let p = list(1, &cs, &[b2b(0, 1, 2048, 0, BLOCKS - 1)]);
        let r = run(&t, 0, &xcopy_cdb(p.len()), &p).await;
        assert_eq!(sense_of(&r), (0x0A, 0x00, 0x00));
        assert_eq!(&r.sense.as_ref().unwrap()[8..12], &[0, 0, 0, 0]);
        // Source range beyond the end, in the second segment: the first was copied.
        let p = list(2, &cs, &[b2b(0, 1, 8, 0, 0), b2b(0, 1, 8, BLOCKS, 0)]);
        let r = run(&t, 0, &xcopy_cdb(p.len()), &p).await;
        assert_eq!(sense_of(&r), (0x0A, 0x00, 0x00));
        assert_eq!(&r.sense.as_ref().unwrap()[8..12], &[0, 0, 0, 1]);
        let s = run(&t, 0, &rcr_cdb(0, 2), &[]).await;
        assert_eq!((s.data_in[4], s.data_in[6]), (2, 1));
        // A designator naming no LUN of this target; a CSCD index past the list; NUL.
        let p = list(3, &[cscd(&naa(9), BS)], &[b2b(0, 0, 1, 0, 1)]);
        assert_eq!(
            sense_of(&run(&t, 0, &xcopy_cdb(p.len()), &p).await),
            (0x0A, 0x0D, 0x02)
        );
        let p = list(3, &cs[..1], &[b2b(0, 1, 1, 0, 1)]);
        assert_eq!(
            sense_of(&run(&t, 0, &xcopy_cdb(p.len()), &p).await),
            (0x0A, 0x0D, 0x02)
        );
        let mut nul = cs[0].clone();
        nul[1] |= 0x20;
        let p = list(3, &[nul], &[b2b(0, 0, 1, 0, 1)]);
        assert_eq!(
            sense_of(&run(&t, 0, &xcopy_cdb(p.len()), &p).await),
            (0x0A, 0x0D, 0x02)
        );
        // Wrong disk block length.
        let p = list(3, &[cscd(&naa(0), 4096)], &[b2b(0, 0, 1, 0, 1)]);
        assert_eq!(
            sense_of(&run(&t, 0, &xcopy_cdb(p.len()), &p).await),
            (0x0A, 0x0D, 0x03)
        );
        // Read-only destination.
        let p = list(
            3,
            &[cscd(&naa(0), BS), cscd(&naa(2), BS)],
            &[b2b(0, 1, 1, 0, 1)],
        );
        assert_eq!(
            sense_of(&run(&t, 0, &xcopy_cdb(p.len()), &p).await),
            (0x0A, 0x00, 0x00)
        );
        // Parameter list errors are ILLEGAL REQUEST; an empty list is GOOD.
        let p = list(3, &cs, &[b2b(0, 1, 1, 0, 1)]);
        assert_eq!(
            sense_of(&run(&t, 0, &xcopy_cdb(p.len() - 1), &p[..p.len() - 1]).await),
            (0x05, 0x1A, 0x00)
        );
        assert_eq!(run(&t, 0, &xcopy_cdb(0), &[]).await.status, Status::Good);
    }

    #[tokio::test]
    async fn write_same_zero_blocks_writes_through_the_last_lba() {
        let t = two_luns();
        let mut ws = [0u8; 16];
        ws[0] = opcode::WRITE_SAME_16;
        ws[2..10].copy_from_slice(&(BLOCKS - 10).to_be_bytes());
        let block = vec![0xA5u8; BS as usize];
        let r = run(&t, 0, &ws, &block).await;
        assert_eq!(r.status, Status::Good, "{:?}", r.sense);
        let r = run(&t, 0, &rw16(opcode::READ_16, BLOCKS - 11, 11), &[]).await;
        assert!(r.data_in[..BS as usize].iter().all(|&b| b == 0));
        assert!(r.data_in[BS as usize..].iter().all(|&b| b == 0xA5));
        // Block Limits: WSNZ clear.
        let r = run(&t, 0, &[opcode::INQUIRY, 1, 0xB0, 0, 64, 0], &[]).await;
        assert_eq!(r.data_in[4] & 0x01, 0);
    }

    #[tokio::test]
    async fn orwrite_ors_into_the_medium() {
        let t = two_luns();
        let r = run(
            &t,
            0,
            &rw16(opcode::WRITE_16, 7, 2),
            &vec![0x0Fu8; 2 * BS as usize],
        )
        .await;
        assert_eq!(r.status, Status::Good);
        let r = run(
            &t,
            0,
            &rw16(opcode::ORWRITE_16, 7, 2),
            &vec![0xA0u8; 2 * BS as usize],
        )
        .await;
        assert_eq!(r.status, Status::Good, "{:?}", r.sense);
        let r = run(&t, 0, &rw16(opcode::READ_16, 6, 4), &[]).await;
        let b = BS as usize;
        assert!(r.data_in[..b].iter().all(|&x| x == 0));
        assert!(r.data_in[b..3 * b].iter().all(|&x| x == 0xAF));
        assert!(r.data_in[3 * b..].iter().all(|&x| x == 0));
        // Beyond the end, ORPROTECT, write protection.
        let r = run(
            &t,
            0,
            &rw16(opcode::ORWRITE_16, BLOCKS - 1, 2),
            &vec![0u8; 2 * b],
        )
        .await;
        assert_eq!(sense_of(&r), (0x05, 0x21, 0x00));
        let mut c = rw16(opcode::ORWRITE_16, 0, 1);
        c[1] = 0x20;
        assert_eq!(
            sense_of(&run(&t, 0, &c, &vec![0u8; b]).await),
            (0x05, 0x24, 0x00)
        );
        let r = run(&t, 2, &rw16(opcode::ORWRITE_16, 0, 1), &vec![0u8; b]).await;
        assert_eq!(sense_of(&r), (0x07, 0x27, 0x00));
    }

    fn atomic16(lba: u64, blocks: u16) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode::WRITE_ATOMIC_16;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[12..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[tokio::test]
    async fn write_atomic_follows_the_block_limits_atomic_fields() {
        let t = two_luns();
        let b = BS as usize;
        // Block Limits (SBC-4 6.6.4): 1 MiB at most, whole 4 KiB pages, no boundaries.
        let r = run(&t, 0, &[opcode::INQUIRY, 1, 0xB0, 0, 64, 0], &[]).await;
        let field = |at: usize| u32::from_be_bytes(r.data_in[at..at + 4].try_into().unwrap());
        assert_eq!(field(44), (1 << 20) / BS);
        assert_eq!((field(48), field(52)), (8, 8));
        assert_eq!((field(56), field(60)), (0, 0));

        let r = run(&t, 0, &atomic16(8, 16), &vec![0xA6u8; 16 * b]).await;
        assert_eq!(r.status, Status::Good, "{:?}", r.sense);
        let r = run(&t, 0, &rw16(opcode::READ_16, 7, 18), &[]).await;
        assert!(r.data_in[..b].iter().all(|&x| x == 0));
        assert!(r.data_in[b..17 * b].iter().all(|&x| x == 0xA6));
        assert!(r.data_in[17 * b..].iter().all(|&x| x == 0));
        assert_eq!(run(&t, 0, &atomic16(0, 0), &[]).await.status, Status::Good);

        let refused = [
            (atomic16(4, 8), (0x05, 0x24, 0x00)),    // LBA not aligned
            (atomic16(0, 4), (0x05, 0x24, 0x00)),    // not whole granules
            (atomic16(0, 2056), (0x05, 0x24, 0x00)), // above MAXIMUM ATOMIC TRANSFER LENGTH
            (atomic16(BLOCKS - 8, 16), (0x05, 0x21, 0x00)),
        ];
        for (cdb, want) in refused {
            let len = usize::from(u16::from_be_bytes([cdb[12], cdb[13]])) * b;
            assert_eq!(sense_of(&run(&t, 0, &cdb, &vec![1u8; len]).await), want);
        }
        let mut boundary = atomic16(0, 8);
        boundary[11] = 8;
        assert_eq!(
            sense_of(&run(&t, 0, &boundary, &vec![1u8; 8 * b]).await),
            (0x05, 0x24, 0x00)
        );
        let r = run(&t, 2, &atomic16(0, 8), &vec![1u8; 8 * b]).await;
        assert_eq!(sense_of(&r), (0x07, 0x27, 0x00));
        // Less Data-Out than the transfer (EDTL below it): nothing written.
        let r = run(&t, 0, &atomic16(0, 8), &vec![0xEEu8; 7 * b]).await;
        assert_eq!(sense_of(&r), (0x05, 0x0E, 0x03));
        let r = run(&t, 0, &rw16(opcode::READ_16, 0, 8), &[]).await;
        assert!(r.data_in.iter().all(|&x| x == 0));
    }

    /// SBC-4 4.29: no read sees an atomic write half done. A read in progress (the gate held
    /// shared) keeps the atomic write from starting; once it ends the write goes in whole.
    #[tokio::test]
    async fn write_atomic_waits_for_reads_in_progress() {
        let t = Arc::new(two_luns());
        let unit = t.logical_unit(0).unwrap().clone();
        let reading = unit.write_gate.read().await;
        let writer = {
            let t = t.clone();
            tokio::spawn(async move {
                run(&t, 0, &atomic16(0, 8), &vec![0x5Au8; 8 * BS as usize]).await
            })
        };
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished());
        let medium = unit.store.read(0, 8 * BS as usize).await.unwrap();
        assert!(medium.iter().all(|&x| x == 0), "written under a read");
        drop(reading);
        assert_eq!(writer.await.unwrap().status, Status::Good);
        let medium = unit.store.read(0, 8 * BS as usize).await.unwrap();
        assert!(medium.iter().all(|&x| x == 0x5A));
    }

    #[tokio::test]
    async fn read_defect_data_is_an_empty_list() {
        let t = two_luns();
        let r = run(&t, 0, &[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]).await;
        assert_eq!(
            (r.status, &r.data_in[..]),
            (Status::Good, &[0, 0x18, 0, 0][..])
        );
        let mut c12 = [0u8; 12];
        c12[0] = 0xB7;
        c12[1] = 0x13;
        c12[9] = 32;
        let r = run(&t, 0, &c12, &[]).await;
        assert_eq!(r.data_in[..], [0, 0x13, 0, 0, 0, 0, 0, 0]);
        // 111b is a reserved DEFECT LIST FORMAT.
        let r = run(&t, 0, &[0x37, 0, 0x07, 0, 0, 0, 0, 0, 32, 0], &[]).await;
        assert_eq!(sense_of(&r), (0x05, 0x24, 0x00));
    }

    #[tokio::test]
    async fn list_identifier_in_use_is_operation_in_progress() {
        let t = two_luns();
        t.copies_in_progress.lock().unwrap().insert((1, 9));
        let p = list(9, &[cscd(&naa(0), BS)], &[b2b(0, 0, 1, 0, 1)]);
        let r = run(&t, 0, &xcopy_cdb(p.len()), &p).await;
        assert_eq!(sense_of(&r), (0x05, 0x00, 0x16));
        let r = run(&t, 0, &rcr_cdb(0, 9), &[]).await;
        assert_eq!((r.status, r.data_in[4]), (Status::Good, 0));
        t.copies_in_progress.lock().unwrap().clear();
        let r = run(&t, 0, &xcopy_cdb(p.len()), &p).await;
        assert_eq!(r.status, Status::Good);
        assert!(t.copies_in_progress.lock().unwrap().is_empty());
        let r = run(&t, 0, &rcr_cdb(0, 9), &[]).await;
        assert_eq!(r.data_in[4], 1);
    }

    #[tokio::test]
    async fn third_party_copy_vpd_is_listed() {
        let t = two_luns();
        let r = run(&t, 0, &[opcode::INQUIRY, 1, 0x00, 0, 255, 0], &[]).await;
        assert!(r.data_in[4..].contains(&0x8F));
        let r = run(&t, 0, &[opcode::INQUIRY, 1, 0x8F, 4, 0, 0], &[]).await;
        assert_eq!(r.status, Status::Good);
        assert_eq!(r.data_in[1], 0x8F);
    }
}
