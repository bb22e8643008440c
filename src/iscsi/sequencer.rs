//! The full-feature phase rules of one connection, without I/O: CmdSN ordering (RFC 7143
//! §3.2.2, §4.2.2.1), held commands and their early unsolicited Data-Out, Data-Out gathering
//! (§11.7-11.8), task management (§11.5), Text (§11.10), Logout (§11.14) and the NOP-In ping
//! (§11.18-11.19).
//!
//! [`Sequencer::handle`] takes one [`Event`] (a PDU, a PDU that failed its checks, the timer)
//! and answers through an [`Env`]: the environment answers the questions the rules ask of the
//! SCSI target (`plan`, `has_lun`, the target's other sessions) and performs each [`Action`]
//! at once, in the order the rules emit them (so a response never overtakes one emitted
//! before it). The connection driver (`connection.rs`) implements [`Env`] over the socket and
//! the target; the tests here implement it with a recording fake.
//!
//! The CmdSN window and the task table live in [`Session`] (atomics and a mutex, no I/O)
//! because command tasks read them when they stamp their responses.

use super::budget::{Charge, HeldData, Occurrences};
use super::ffp::{build_response, reject, DataInLimits, Residual, ScsiCommandHeader, WriteGather};
use super::negotiation::SessionType;
use super::pdu::{
    serial, BadPdu, DataOut, LogoutRequest, LogoutResponseBuilder, NopInBuilder, NopOut, Opcode,
    Pdu, RejectReason, TaskMgmtRequest, TaskMgmtResponseBuilder, RESERVED_TAG,
};
use super::session::{Session, Task, TaskState};
use super::text::{TextContext, TextNegotiation, TextOutcome};
use crate::scsi::{DataOutPlan, PlannedCommand, ScsiResponse, Sense};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Negotiated values the full-feature phase works with.
#[derive(Debug, Clone, Copy)]
pub struct FeatureParams {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_recv_segment: u32,
    pub max_xmit_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub cid: u16,
}

/// Resolves once an aborted task has stopped touching the store.
pub type Waiter = watch::Receiver<bool>;

/// What the rules ask of the connection's surroundings, and where their actions go.
pub trait Env {
    /// What the target's plan hands to its execution ([`PlannedCommand`] for the real one).
    type Planned;
    /// The SCSI target's checks before any data moves (`ScsiTarget::plan`).
    fn plan(&mut self, lun: u64, cdb: &[u8]) -> DataOutPlan<Self::Planned>;
    /// Whether the session's target has logical unit `lun`.
    fn has_lun(&self, lun: u64) -> bool;
    /// Aborts the tasks of every session logged in to this session's target, only those for
    /// `lun` if given: the task set is shared by all I_T nexuses (TST=000, SAM-5 §8.6).
    fn abort_target_tasks(&mut self, lun: Option<u64>) -> Vec<Waiter>;
    /// Targets, portals and names a Text Request is answered from.
    fn text_context(&self) -> TextContext<'_>;
    /// Bytes of Data-In a planned command produces at most (a READ's transfer length); 0 for
    /// commands without bulk data. Charged to the memory budget before it runs.
    fn data_in_len(&self, planned: &Self::Planned) -> u64;
    /// The unit a Data-Out shorter than the planned length must come in to be used (a
    /// WRITE's block size, else 1): `PlannedCommand::data_out_unit`.
    fn data_out_unit(&self, planned: &Self::Planned) -> u32;
    /// Performs `action` now.
    fn act(&mut self, action: Action<Self::Planned>);
}

/// A command whose Data-Out is complete and that may run.
pub struct Command<P = PlannedCommand> {
    pub task: Arc<Task>,
    pub hdr: ScsiCommandHeader,
    /// The command as the target planned it (routed once, run by its execution).
    pub planned: P,
    pub data_out: Bytes,
    /// ExpectedDataTransferLength against what the CDB transfers (§11.4.5).
    pub residual: Option<Residual>,
    pub limits: DataInLimits,
    /// The command's bytes in the memory budget: released once its response has left.
    pub charge: Charge,
}

/// What the rules want done.
pub enum Action<P = PlannedCommand> {
    /// Stamp StatSN, ExpCmdSN and MaxCmdSN into these PDUs and send them, in order.
    Send(Vec<Pdu>),
    /// Send a command's response unless the task was aborted meanwhile
    /// ([`Task::complete_with`]), then mark the task finished. The task has left the table.
    Respond { task: Arc<Task>, pdus: Vec<Pdu> },
    /// Execute the command (the task is already marked running) and send its response.
    Execute(Command<P>),
    /// LOGICAL UNIT RESET of `lun` in the SCSI target (unit attentions, SAM-5 §5.14).
    LogicalUnitReset { lun: u64 },
    /// TARGET WARM/COLD RESET in the SCSI target.
    TargetReset,
    /// Send the Task Management Response once every aborted task has stopped, so no response
    /// of an aborted task can follow it (§11.5.1); then, after a TARGET COLD RESET, close
    /// every connection of the target.
    TmfResponse {
        response: Pdu,
        waiters: Vec<Waiter>,
        close_target_sessions: bool,
    },
}

/// An input to the machine.
pub enum Event {
    /// A PDU that passed framing and digest checks.
    Pdu(Pdu),
    /// A PDU whose header is usable but that must be rejected (§7.8, §11.17).
    Bad(BadPdu),
    /// The deadline from [`Sequencer::deadline`] has passed.
    Timer,
    /// Memory was released somewhere: commands waiting for it may run now.
    BudgetFreed,
}

/// Why the connection must end.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    /// Our NOP-In ping went unanswered (§11.19): the initiator or the path is dead.
    #[error("initiator did not answer NOP-In within {0:?}: dropping dead connection")]
    NopTimeout(Duration),
}

/// The NOP-In ping timer: quiet for `idle`, then a ping that must be answered in `timeout`.
struct NopTimer {
    idle: Duration,
    timeout: Duration,
    quiet_until: Instant,
    /// Deadline for the answer to our ping.
    ping: Option<Instant>,
}

/// `now + d`, or `now` + [`NO_PING`] when that does not fit in an [`Instant`]: a timer the
/// configuration did not bound must not panic the connection.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now + NO_PING)
}

/// Pings are off: the quiet time is long enough never to end.
const NO_PING: Duration = Duration::from_secs(365 * 86400);

/// Target transfer tags for R2Ts and NOP-In pings; never the reserved value.
struct TransferTags(u32);

impl TransferTags {
    fn next(&mut self) -> u32 {
        let t = self.0;
        self.0 = self.0.wrapping_add(1);
        if self.0 == RESERVED_TAG || self.0 == 0 {
            self.0 = 1;
        }
        t
    }
}

/// A write waiting for its Data-Out.
struct PendingWrite<P> {
    gather: WriteGather,
    hdr: ScsiCommandHeader,
    task: Arc<Task>,
    /// ExpectedDataTransferLength against what the CDB transfers (§11.4.5).
    residual: Residual,
    planned: P,
    charge: Charge,
}

/// A command accepted in CmdSN order that waits for room in the memory budget before its
/// buffer is taken (no R2T, no execution yet). Its task is registered, so task management
/// finds it and the window counts it.
struct BudgetWait<P> {
    task: Arc<Task>,
    hdr: ScsiCommandHeader,
    planned: P,
    /// `Some(need)`: a write that gathers `need` bytes (the CDB's); None: no Data-Out.
    gather: Option<u32>,
    /// Immediate data that came with the command.
    immediate: Bytes,
    bytes: u64,
}

/// The full-feature phase of one connection.
pub struct Sequencer<P = PlannedCommand> {
    session: Arc<Session>,
    params: FeatureParams,
    /// Writes waiting for Data-Out, by ITT.
    gathers: HashMap<u32, PendingWrite<P>>,
    /// Commands waiting for memory, in the order they arrived (big ones do not starve).
    budget_wait: VecDeque<BudgetWait<P>>,
    /// Commands that arrived ahead of ExpCmdSN (§4.2.2.1), delivered in order.
    held: Vec<Pdu>,
    /// CmdSNs ahead of ExpCmdSN whose commands an ABORT TASK aborted (held or not yet
    /// arrived): consumed in order without running. Bounded by the window (in_window).
    aborted_ahead: Vec<u32>,
    /// Unsolicited Data-Out that arrived for a held command, by ITT; replayed when the
    /// command is dispatched. At most FirstBurstLength bytes per command.
    early_data_out: HashMap<u32, Vec<Pdu>>,
    /// The data in `held`, `early_data_out` and `budget_wait`, in the server's bound on
    /// data held by commands that cannot run yet.
    held_data: HeldData,
    tags: TransferTags,
    text_negotiation: TextNegotiation,
    /// Sent once running commands have answered, then the connection closes.
    logout_response: Option<Pdu>,
    nop: NopTimer,
    closing: bool,
}

impl<P> Sequencer<P> {
    /// `nop_in_interval` None: never ping. The quiet time starts at `now`.
    pub fn new(
        session: Arc<Session>,
        params: FeatureParams,
        nop_in_interval: Option<Duration>,
        nop_in_timeout: Duration,
        now: Instant,
    ) -> Self {
        let idle = nop_in_interval.unwrap_or(NO_PING);
        let held_data = session.budget.hold(0).expect("nothing to hold");
        Sequencer {
            session,
            params,
            gathers: HashMap::new(),
            budget_wait: VecDeque::new(),
            held: Vec::new(),
            aborted_ahead: Vec::new(),
            early_data_out: HashMap::new(),
            held_data,
            tags: TransferTags(1),
            text_negotiation: TextNegotiation::new(),
            logout_response: None,
            nop: NopTimer {
                idle,
                timeout: nop_in_timeout,
                quiet_until: later(now, idle),
                ping: None,
            },
            closing: false,
        }
    }

    /// When to feed [`Event::Timer`]: the ping's answer deadline, or the end of the quiet time.
    pub fn deadline(&self) -> Instant {
        self.nop.ping.unwrap_or(self.nop.quiet_until)
    }

    /// Whether commands wait for memory: feed [`Event::BudgetFreed`] when some is released.
    pub fn waiting_for_budget(&self) -> bool {
        !self.budget_wait.is_empty()
    }

    /// A Logout was accepted: read no more PDUs.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// The accepted Logout's response, to send once running commands have answered.
    pub fn take_logout_response(&mut self) -> Option<Pdu> {
        self.logout_response.take()
    }

    /// Runs the rules for one event.
    pub fn handle(
        &mut self,
        event: Event,
        now: Instant,
        env: &mut impl Env<Planned = P>,
    ) -> Result<(), SequencerError> {
        let pdu = match event {
            Event::Timer => return self.timer(now, env),
            Event::BudgetFreed => {
                self.run_waiting(env);
                return Ok(());
            }
            Event::Pdu(pdu) => Ok(pdu),
            Event::Bad(bad) => Err(bad),
        };
        // Any traffic proves the initiator alive.
        self.nop.ping = None;
        self.nop.quiet_until = later(now, self.nop.idle);
        match pdu {
            Ok(pdu) => self.pdu(pdu, env),
            Err(BadPdu::DataDigest { bhs }) => {
                warn!("data digest error: rejecting the PDU (RFC 7143 §7.8)");
                send_one(env, reject(RejectReason::DataDigestError, &bhs));
            }
            Err(BadPdu::DataSegmentOverLimit { bhs, len, limit }) => {
                warn!(
                    len,
                    limit, "data segment over MaxRecvDataSegmentLength: rejecting the PDU"
                );
                send_one(env, reject(RejectReason::ProtocolError, &bhs));
            }
        }
        if !self.budget_wait.is_empty() {
            // Aborts and this session's own completions may have made room.
            self.run_waiting(env);
        } else if self.held_data.bytes() > 0 {
            self.recount_held();
        }
        Ok(())
    }

    /// NOP-In ping (§11.19): after `idle` without traffic the target pings; no answer within
    /// `timeout` ends the connection.
    fn timer(
        &mut self,
        now: Instant,
        env: &mut impl Env<Planned = P>,
    ) -> Result<(), SequencerError> {
        if let Some(due) = self.nop.ping {
            if now >= due {
                return Err(SequencerError::NopTimeout(self.nop.timeout));
            }
            return Ok(());
        }
        if now >= self.nop.quiet_until {
            let ttt = self.tags.next();
            send_one(env, NopInBuilder::new(RESERVED_TAG, ttt).build());
            self.nop.ping = Some(later(now, self.nop.timeout));
        }
        Ok(())
    }

    fn pdu(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        let discovery = self.session.target.is_none();
        match pdu.opcode() {
            Some(Opcode::NopOut) => self.nop_out(pdu, env),
            Some(Opcode::ScsiCommand) if !discovery => self.ordered(pdu, env),
            Some(Opcode::DataOut) if !discovery => self.data_out(pdu, env),
            Some(Opcode::TaskMgmtRequest) if !discovery => self.ordered(pdu, env),
            Some(Opcode::TextRequest) => self.ordered(pdu, env),
            Some(Opcode::LogoutRequest) => self.ordered(pdu, env),
            Some(Opcode::Snack) => {
                debug!("SNACK with ErrorRecoveryLevel 0: rejected");
                send_one(env, reject(RejectReason::ProtocolError, &pdu.bhs));
            }
            Some(op) => {
                warn!(?op, "PDU not allowed in this session: rejected");
                send_one(env, reject(RejectReason::ProtocolError, &pdu.bhs));
            }
            None => {
                warn!(opcode = pdu.raw_opcode(), "unknown opcode: rejected");
                send_one(env, reject(RejectReason::CommandNotSupported, &pdu.bhs));
            }
        }
    }

    /// CmdSN ordering for commands (§4.2.2.1): immediate ones run at once, the next expected
    /// one runs and releases any held successors, ones ahead of it wait, others are ignored.
    fn ordered(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        if pdu.immediate() {
            self.dispatch(pdu, env);
            // An immediate ABORT TASK may have consumed a CmdSN that held commands wait behind.
            self.release_in_order(env);
            return;
        }
        let sn = pdu.cmd_sn();
        if let Some(i) = self.aborted_ahead.iter().position(|&a| a == sn) {
            // Aborted before it arrived (§11.5.1): it counts as received, and never runs.
            self.aborted_ahead.swap_remove(i);
            if self.session.advance(sn) {
                self.release_in_order(env);
            } else {
                self.aborted_ahead.push(sn);
            }
            debug!(
                cmd_sn = sn,
                itt = pdu.itt(),
                "command aborted before it arrived: dropped"
            );
            return;
        }
        if self.session.advance(sn) {
            self.dispatch(pdu, env);
            self.release_in_order(env);
        } else if self.session.in_window(sn)
            && self.held.len() < self.session.queue_depth as usize
            && self.take_held(pdu.data.len())
        {
            debug!(
                cmd_sn = sn,
                exp = self.session.exp_cmd_sn(),
                "command ahead of ExpCmdSN: held"
            );
            self.held.push(own_data(pdu));
        } else {
            debug!(
                cmd_sn = sn,
                exp = self.session.exp_cmd_sn(),
                "CmdSN outside the window: ignored (§4.2.2.1)"
            );
        }
    }

    /// Accounts `bytes` more data held for commands that cannot run yet (after recounting
    /// what is still held); false when the server's bound would be passed.
    fn take_held(&mut self, bytes: usize) -> bool {
        self.recount_held();
        let ok = self.held_data.grow(bytes as u64);
        if !ok {
            if let Some(n) = HELD_BOUND_REFUSALS.count(std::time::Instant::now()) {
                warn!(
                    refused = n,
                    "data of commands that cannot run yet is at the server's bound \
                     (a quarter of server.max_inflight_bytes): TASK SET FULL or ignored"
                );
            }
        }
        ok
    }

    /// Gives back to the server's bound what left `held`, `early_data_out` and `budget_wait`.
    fn recount_held(&mut self) {
        let now: usize = self.held.iter().map(|p| p.data.len()).sum::<usize>()
            + self
                .early_data_out
                .values()
                .flatten()
                .map(|p| p.data.len())
                .sum::<usize>()
            + self
                .budget_wait
                .iter()
                .map(|w| w.immediate.len())
                .sum::<usize>();
        self.held_data.shrink_to(now as u64);
    }

    /// Runs the held commands whose turn has come, in CmdSN order, and consumes the CmdSNs of
    /// commands aborted before they arrived (§4.2.2.1, §11.5.1): the window never stalls on
    /// a hole an ABORT TASK left.
    fn release_in_order(&mut self, env: &mut impl Env<Planned = P>) {
        loop {
            let exp = self.session.exp_cmd_sn();
            if let Some(i) = self.aborted_ahead.iter().position(|&a| a == exp) {
                self.aborted_ahead.swap_remove(i);
                self.session.advance(exp);
            } else if let Some(i) = self.held.iter().position(|p| p.cmd_sn() == exp) {
                let next = self.held.swap_remove(i);
                self.session.advance(exp);
                self.dispatch(next, env);
            } else {
                break;
            }
        }
    }

    fn dispatch(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        match pdu.opcode() {
            Some(Opcode::ScsiCommand) => self.scsi_command(pdu, env),
            Some(Opcode::TaskMgmtRequest) => self.task_management(pdu, env),
            Some(Opcode::TextRequest) => self.text(pdu, env),
            Some(Opcode::LogoutRequest) => self.logout(pdu, env),
            _ => unreachable!("only ordered opcodes are dispatched"),
        }
    }

    /// NOP-Out (§11.18): a ping from the initiator is echoed in a NOP-In; the answer to our
    /// own ping (ITT 0xffffffff) needs none.
    fn nop_out(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        if pdu.itt() == RESERVED_TAG {
            return;
        }
        if !pdu.immediate() && self.session.advance(NopOut(&pdu).cmd_sn()) {
            self.release_in_order(env);
        }
        let echo = pdu.data.len().min(self.params.max_xmit_segment as usize);
        let p = NopInBuilder::new(pdu.itt(), RESERVED_TAG)
            .lun(NopOut(&pdu).lun())
            .data(pdu.data.slice(..echo))
            .build();
        send_one(env, p);
    }

    /// SCSI Command (§11.3): header and immediate data checks (§10.3 ImmediateData,
    /// FirstBurstLength), task registration (unique ITT, §11.2.1.8), then the target's plan.
    fn scsi_command(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        let early = self.early_data_out.remove(&pdu.itt()).unwrap_or_default();
        let hdr = match ScsiCommandHeader::parse(&pdu) {
            Ok(h) => h,
            Err(why) => {
                warn!("malformed SCSI command: {why}");
                send_one(env, reject(RejectReason::InvalidPduField, &pdu.bhs));
                return;
            }
        };
        if !pdu.data.is_empty() && (!self.params.immediate_data || !hdr.write) {
            warn!("immediate data not allowed here: rejected");
            send_one(env, reject(RejectReason::ProtocolError, &pdu.bhs));
            return;
        }
        if pdu.data.len() as u64 > self.params.first_burst.min(hdr.expected_len) as u64 {
            warn!(
                len = pdu.data.len(),
                "immediate data beyond FirstBurstLength/expected length: rejected"
            );
            send_one(env, reject(RejectReason::ProtocolError, &pdu.bhs));
            return;
        }
        let Some(task) = self
            .session
            .add_task(hdr.itt, hdr.lun, hdr.cmd_sn, pdu.immediate())
        else {
            warn!(
                itt = hdr.itt,
                "ITT already in use by an outstanding task: rejected"
            );
            send_one(env, reject(RejectReason::TaskInProgress, &pdu.bhs));
            return;
        };
        if hdr.read && hdr.write {
            self.finish_now(
                &task,
                &hdr,
                ScsiResponse::check(Sense::invalid_field_in_cdb(0, None)),
                env,
            );
            return;
        }
        let waiting = match env.plan(hdr.lun, &hdr.cdb) {
            DataOutPlan::Fail(resp) => return self.finish_now(&task, &hdr, resp, env),
            DataOutPlan::None(planned) => BudgetWait {
                bytes: env.data_in_len(&planned),
                task,
                hdr,
                planned,
                gather: None,
                immediate: Bytes::new(),
            },
            DataOutPlan::Gather(need, planned)
                if hdr.expected_len < need
                    && hdr.expected_len % env.data_out_unit(&planned).max(1) != 0 =>
            {
                // FCP-4, FCP_DL overflow: the initiator allows less than the CDB transfers, and not a
                // whole number of blocks, so "transfer only EDTL" cannot be honoured: transfer
                // and write nothing, CHECK CONDITION, residual overflow (libiscsi
                // iSCSIResiduals accepts this or GOOD with exactly EDTL bytes written).
                debug!(
                    itt = hdr.itt,
                    edtl = hdr.expected_len,
                    need,
                    "EDTL below the CDB's transfer length and not whole blocks: refused"
                );
                let resp = ScsiResponse::check(Sense::invalid_field_in_command_iu());
                return self.finish_now_used(&task, &hdr, resp, u64::from(need), env);
            }
            DataOutPlan::Gather(need, planned) => BudgetWait {
                // The buffer WriteGather takes: what both the CDB and the initiator move.
                bytes: u64::from(need.min(hdr.expected_len)),
                task,
                hdr,
                planned,
                gather: Some(need),
                immediate: pdu.data.clone(),
            },
        };
        self.admit(waiting, early, env);
    }

    /// Starts a command if the memory budget has room for its data, else queues it (behind
    /// any command already waiting, so a large one is not overtaken for ever) and closes
    /// the CmdSN window until it runs.
    fn admit(&mut self, mut w: BudgetWait<P>, early: Vec<Pdu>, env: &mut impl Env<Planned = P>) {
        let budget = self.session.budget.clone();
        if w.bytes == 0 {
            return self.start(w, Charge::none(), early, env);
        }
        if self.budget_wait.is_empty() {
            if let Some(charge) = budget.try_charge(w.bytes) {
                return self.start(w, charge, early, env);
            }
            // Announce the wait before the last try: a release in between then wakes us.
            budget.set_waiting(true);
            if let Some(charge) = budget.try_charge(w.bytes) {
                budget.set_waiting(false);
                return self.start(w, charge, early, env);
            }
        }
        let carried = w.immediate.len() + early.iter().map(|p| p.data.len()).sum::<usize>();
        if !self.take_held(carried) {
            // SAM-5 §5.3.1: the task set lacks resources; the initiator retries.
            return self.finish_now(&w.task, &w.hdr, task_set_full(), env);
        }
        debug!(
            itt = w.hdr.itt,
            bytes = w.bytes,
            session_used = budget.used(),
            "memory budget spent: command waits, CmdSN window closed"
        );
        if !early.is_empty() {
            self.early_data_out
                .insert(w.hdr.itt, early.into_iter().map(own_data).collect());
        }
        w.immediate = Bytes::copy_from_slice(&w.immediate);
        self.budget_wait.push_back(w);
        budget.set_waiting(true);
        self.session.close_window(true);
    }

    /// Starts the waiting commands that fit now, in order; drops those aborted meanwhile.
    fn run_waiting(&mut self, env: &mut impl Env<Planned = P>) {
        let budget = self.session.budget.clone();
        while let Some(front) = self.budget_wait.front() {
            if front.task.state() != TaskState::Gathering {
                let w = self.budget_wait.pop_front().expect("front");
                self.early_data_out.remove(&w.hdr.itt);
                w.task.finished();
                continue;
            }
            let Some(charge) = budget.try_charge(front.bytes) else {
                break;
            };
            let w = self.budget_wait.pop_front().expect("front");
            let early = self.early_data_out.remove(&w.hdr.itt).unwrap_or_default();
            self.start(w, charge, early, env);
        }
        if self.budget_wait.is_empty() {
            budget.set_waiting(false);
            self.session.close_window(false);
        }
        if self.held_data.bytes() > 0 {
            self.recount_held();
        }
    }

    /// Runs a command that has its memory: executes it, or solicits its Data-Out.
    fn start(
        &mut self,
        w: BudgetWait<P>,
        charge: Charge,
        early: Vec<Pdu>,
        env: &mut impl Env<Planned = P>,
    ) {
        let BudgetWait {
            task,
            hdr,
            planned,
            gather,
            immediate,
            ..
        } = w;
        let Some(need) = gather else {
            let residual = hdr.write.then(|| Residual::of(hdr.expected_len, 0));
            return self.execute(task, hdr, planned, Bytes::new(), residual, charge, env);
        };
        let residual = Residual::of(hdr.expected_len, need as u64);
        let mut g = WriteGather::new(
            &hdr,
            need,
            immediate,
            self.params.first_burst,
            self.params.initial_r2t,
            self.params.max_burst,
            self.params.max_outstanding_r2t,
        );
        if g.complete() {
            let data = g.take_data();
            self.execute(task, hdr, planned, data, Some(residual), charge, env);
            return;
        }
        let tags = &mut self.tags;
        let r2ts = g.next_r2ts(|| tags.next());
        if !r2ts.is_empty() {
            env.act(Action::Send(r2ts));
        }
        let itt = hdr.itt;
        self.gathers.insert(
            itt,
            PendingWrite {
                gather: g,
                hdr,
                task,
                residual,
                planned,
                charge,
            },
        );
        for p in early {
            self.data_out(p, env);
        }
    }

    /// SCSI Data-Out (§11.7): feeds the write it belongs to; a bad one fails the command
    /// (ERL 0, §7.1); a complete write runs, an incomplete one may solicit more (R2T, §11.8).
    fn data_out(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        let itt = pdu.itt();
        let Some(pending) = self.gathers.get_mut(&itt) else {
            if self.hold_early_data_out(&pdu, env) {
                return;
            }
            debug!(
                itt,
                "Data-Out for no pending write (completed or aborted): ignored"
            );
            return;
        };
        if pending.task.state() != TaskState::Gathering {
            self.gathers.remove(&itt);
            return;
        }
        if let Err(e) = pending.gather.data_out(&pdu) {
            warn!(
                itt,
                "bad Data-Out: {e}; failing the command (RFC 7143 §7.1, ERL 0)"
            );
            let p = self.gathers.remove(&itt).expect("present");
            self.finish_now(
                &p.task,
                &p.hdr,
                ScsiResponse::check(Sense::data_phase_error()),
                env,
            );
            return;
        }
        if pending.gather.complete() {
            let p = self.gathers.remove(&itt).expect("present");
            let data = p.gather.take_data();
            self.execute(
                p.task,
                p.hdr,
                p.planned,
                data,
                Some(p.residual),
                p.charge,
                env,
            );
        } else {
            let tags = &mut self.tags;
            let r2ts = pending.gather.next_r2ts(|| tags.next());
            if !r2ts.is_empty() {
                env.act(Action::Send(r2ts));
            }
        }
    }

    /// Keeps unsolicited Data-Out for a command still held for CmdSN order or waiting for
    /// memory: the initiator sends it right behind the command (§4.2.2.1 only orders
    /// commands), so it can arrive before the command may run. Returns whether the PDU was
    /// taken. Past the server's bound on such data a waiting command is answered TASK SET
    /// FULL (its later Data-Out is ignored).
    fn hold_early_data_out(&mut self, pdu: &Pdu, env: &mut impl Env<Planned = P>) -> bool {
        let itt = pdu.itt();
        let waiting = self.budget_wait.iter().position(|w| w.hdr.itt == itt);
        if DataOut(pdu).target_transfer_tag() != RESERVED_TAG
            || !(waiting.is_some()
                || self
                    .held
                    .iter()
                    .any(|c| c.itt() == itt && c.opcode() == Some(Opcode::ScsiCommand)))
        {
            return false;
        }
        let bytes: usize = self
            .early_data_out
            .get(&itt)
            .map(|k| k.iter().map(|p| p.data.len()).sum())
            .unwrap_or(0);
        if bytes + pdu.data.len() > self.params.first_burst as usize {
            warn!(
                itt,
                "unsolicited Data-Out beyond FirstBurstLength for a command not running yet: dropped"
            );
            return true;
        }
        if !self.take_held(pdu.data.len()) {
            if let Some(i) = waiting {
                let w = self.budget_wait.remove(i).expect("found above");
                self.early_data_out.remove(&itt);
                self.finish_now(&w.task, &w.hdr, task_set_full(), env);
                self.run_waiting(env);
            } else {
                warn!(itt, "unsolicited Data-Out for a held command: dropped");
            }
            return true;
        }
        debug!(
            itt,
            "unsolicited Data-Out for a command not running yet: kept"
        );
        self.early_data_out
            .entry(itt)
            .or_default()
            .push(own_data(pdu.clone()));
        true
    }

    /// Answers a command without executing it (a write's residual: nothing transferred).
    fn finish_now(
        &self,
        task: &Arc<Task>,
        hdr: &ScsiCommandHeader,
        resp: ScsiResponse,
        env: &mut impl Env<Planned = P>,
    ) {
        self.finish_now_used(task, hdr, resp, 0, env)
    }

    /// Answers a command without executing it; a write's residual compares EDTL with `need`,
    /// the bytes its CDB transfers (§11.4.5.2), as for an executed write.
    fn finish_now_used(
        &self,
        task: &Arc<Task>,
        hdr: &ScsiCommandHeader,
        resp: ScsiResponse,
        need: u64,
        env: &mut impl Env<Planned = P>,
    ) {
        let pdus = build_response(
            hdr,
            resp,
            self.limits(),
            Some(Residual::of(hdr.expected_len, need)).filter(|_| hdr.write),
        );
        self.session.remove_task(hdr.itt);
        env.act(Action::Respond {
            task: task.clone(),
            pdus,
        });
    }

    fn limits(&self) -> DataInLimits {
        DataInLimits {
            max_xmit_segment: self.params.max_xmit_segment,
            max_burst: self.params.max_burst,
        }
    }

    /// Hands a command to the target unless it was aborted while it gathered its data.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        task: Arc<Task>,
        hdr: ScsiCommandHeader,
        planned: P,
        data_out: Bytes,
        residual: Option<Residual>,
        charge: Charge,
        env: &mut impl Env<Planned = P>,
    ) {
        if !task.set_running() {
            task.finished();
            return;
        }
        env.act(Action::Execute(Command {
            task,
            hdr,
            planned,
            data_out,
            residual,
            limits: self.limits(),
            charge,
        }));
    }

    /// Task management (§11.5, SAM-5 §7). The response is sent once every affected task has
    /// stopped, so no response of an aborted task can follow it.
    fn task_management(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        let req = TaskMgmtRequest(&pdu);
        let function = req.function();
        let lun = req.lun();
        let ref_itt = req.referenced_task_tag();
        let ref_cmd_sn = req.ref_cmd_sn();
        let lun_exists = env.has_lun(lun);
        let mut waiters = Vec::new();
        let mut cold_reset = false;
        let response = match function {
            TMF_ABORT_TASK => {
                self.gathers.remove(&ref_itt);
                self.budget_wait.retain(|w| w.hdr.itt != ref_itt);
                match self.session.abort_task(ref_itt) {
                    Some(w) => {
                        info!(ref_itt, "ABORT TASK: task aborted");
                        waiters.push(w);
                        TMF_COMPLETE
                    }
                    None => {
                        // §11.5.1: a command not received yet but inside the window counts as
                        // received and aborted.
                        let tmf_sn = req.cmd_sn();
                        if self.session.in_window(ref_cmd_sn) && serial::lt(ref_cmd_sn, tmf_sn) {
                            self.held.retain(|p| p.cmd_sn() != ref_cmd_sn);
                            let (held, waiting) = (&self.held, &self.budget_wait);
                            self.early_data_out.retain(|itt, _| {
                                held.iter().any(|p| p.itt() == *itt)
                                    || waiting.iter().any(|w| w.hdr.itt == *itt)
                            });
                            if self.session.advance(ref_cmd_sn) {
                                debug!(
                                    ref_cmd_sn,
                                    "ABORT TASK for a command never received: CmdSN consumed"
                                );
                            } else if !self.aborted_ahead.contains(&ref_cmd_sn) {
                                // Ahead of ExpCmdSN: consumed when its turn comes
                                // (release_in_order), whether or not it arrives first.
                                self.aborted_ahead.push(ref_cmd_sn);
                            }
                            TMF_COMPLETE
                        } else {
                            debug!(ref_itt, "ABORT TASK: no such task (already completed?)");
                            TMF_NO_TASK
                        }
                    }
                }
            }
            TMF_ABORT_TASK_SET | TMF_CLEAR_TASK_SET if !lun_exists => TMF_NO_LUN,
            TMF_ABORT_TASK_SET => {
                self.gathers.retain(|_, p| p.hdr.lun != lun);
                waiters = self.session.abort_where(|t| t.lun == lun);
                info!(lun, aborted = waiters.len(), "ABORT TASK SET");
                TMF_COMPLETE
            }
            TMF_CLEAR_TASK_SET => {
                // One task set shared by all I_T nexuses (TST=000): clears every session's.
                self.gathers.retain(|_, p| p.hdr.lun != lun);
                waiters = env.abort_target_tasks(Some(lun));
                info!(lun, aborted = waiters.len(), "CLEAR TASK SET");
                TMF_COMPLETE
            }
            TMF_LOGICAL_UNIT_RESET if !lun_exists => TMF_NO_LUN,
            TMF_LOGICAL_UNIT_RESET => {
                self.gathers.retain(|_, p| p.hdr.lun != lun);
                waiters = env.abort_target_tasks(Some(lun));
                env.act(Action::LogicalUnitReset { lun });
                info!(lun, aborted = waiters.len(), "LOGICAL UNIT RESET");
                TMF_COMPLETE
            }
            TMF_TARGET_WARM_RESET | TMF_TARGET_COLD_RESET => {
                self.gathers.clear();
                waiters = env.abort_target_tasks(None);
                env.act(Action::TargetReset);
                cold_reset = function == TMF_TARGET_COLD_RESET;
                info!(aborted = waiters.len(), cold = cold_reset, "TARGET RESET");
                TMF_COMPLETE
            }
            TMF_TASK_REASSIGN => TMF_REASSIGN_UNSUPPORTED,
            _ => {
                debug!(function, "task management function not supported");
                TMF_NOT_SUPPORTED
            }
        };
        env.act(Action::TmfResponse {
            response: TaskMgmtResponseBuilder::new(req.itt(), response).build(),
            waiters,
            close_target_sessions: cold_reset,
        });
    }

    /// Text Request (§11.10): SendTargets and the keys negotiable in full-feature phase.
    fn text(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        let outcome = self.text_negotiation.handle(&pdu, &env.text_context());
        match outcome {
            TextOutcome::Respond { response, update } => {
                if let Some(m) = update.max_xmit_data_segment_length {
                    info!(max = m, "initiator re-declared MaxRecvDataSegmentLength");
                    self.params.max_xmit_segment = m;
                }
                send_one(env, response);
            }
            TextOutcome::Reject { reason, detail } => {
                warn!("text request rejected: {detail}");
                send_one(env, reject(reason, &pdu.bhs));
            }
        }
    }

    /// Logout (§11.14). Outstanding commands finish before the response (the driver waits
    /// for them); connection recovery is not offered at ErrorRecoveryLevel 0.
    fn logout(&mut self, pdu: Pdu, env: &mut impl Env<Planned = P>) {
        let req = LogoutRequest(&pdu);
        let reason = req.reason_code();
        let cid = req.cid();
        let response = match reason {
            0 => 0,
            1 if cid == self.params.cid => 0,
            1 => 1,
            _ => 2,
        };
        let p = LogoutResponseBuilder::new(req.itt(), response).build();
        info!(reason, response, "logout");
        if response != 0 {
            send_one(env, p);
            return;
        }
        self.closing = true;
        self.gathers.clear();
        self.budget_wait.clear();
        self.early_data_out.clear();
        self.logout_response = Some(p);
    }
}

impl<P> Drop for Sequencer<P> {
    fn drop(&mut self) {
        // Commands still waiting die with the connection; releases need not wake it.
        self.session.budget.set_waiting(false);
    }
}

/// The session type a Text Request is answered for.
pub fn session_type(session: &Session) -> SessionType {
    if session.target.is_some() {
        SessionType::Normal
    } else {
        SessionType::Discovery
    }
}

/// Commands refused at the bound on held data, over all sessions, for the log.
static HELD_BOUND_REFUSALS: Occurrences = Occurrences::new();

/// TASK SET FULL (SAM-5 §5.3.1): no resources for the command now; the initiator retries.
fn task_set_full() -> ScsiResponse {
    ScsiResponse {
        status: crate::scsi::Status::TaskSetFull,
        sense: None,
        data_in: Bytes::new(),
    }
}

fn send_one<P>(env: &mut impl Env<Planned = P>, p: Pdu) {
    env.act(Action::Send(vec![p]));
}

const TMF_ABORT_TASK: u8 = 1;
const TMF_ABORT_TASK_SET: u8 = 2;
const TMF_CLEAR_TASK_SET: u8 = 4;
const TMF_LOGICAL_UNIT_RESET: u8 = 5;
const TMF_TARGET_WARM_RESET: u8 = 6;
const TMF_TARGET_COLD_RESET: u8 = 7;
const TMF_TASK_REASSIGN: u8 = 8;

const TMF_COMPLETE: u8 = 0;
const TMF_NO_TASK: u8 = 1;
const TMF_NO_LUN: u8 = 2;
const TMF_REASSIGN_UNSUPPORTED: u8 = 4;
const TMF_NOT_SUPPORTED: u8 = 5;

/// `pdu` with its AHS and data in their own allocations. A PDU kept while its command cannot
/// run would otherwise pin the whole receive block it was read into (up to the connection's
/// `READ_BUF`), beyond what the held-data bound counts. Only the holding paths copy.
fn own_data(mut pdu: Pdu) -> Pdu {
    pdu.ahs = Bytes::copy_from_slice(&pdu.ahs);
    pdu.data = Bytes::copy_from_slice(&pdu.data);
    pdu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_pdu_owns_its_bytes_and_keeps_them() {
        let block = bytes::Bytes::from(vec![7u8; 64 * 1024]);
        let pdu = Pdu {
            bhs: [0; crate::iscsi::pdu::BHS_LEN],
            ahs: block.slice(0..16),
            data: block.slice(16..16 + 4096),
        };
        let owned = own_data(pdu);
        assert_eq!(owned.ahs, block.slice(0..16));
        assert_eq!(owned.data, block.slice(16..16 + 4096));
        // Neither points into the receive block any more.
        let range = block.as_ptr_range();
        assert!(!range.contains(&owned.ahs.as_ptr()));
        assert!(!range.contains(&owned.data.as_ptr()));
    }
    use crate::iscsi::budget::{MemoryBudget, SessionBudget};
    use crate::iscsi::login::TargetAuth;
    use crate::iscsi::negotiation::SessionParams;
    use crate::iscsi::session::{NewSession, SessionRegistry, TargetEntry};
    use crate::scsi::ScsiTarget;
    use std::net::SocketAddr;

    const WRITE_10: u8 = 0x2a;
    const READ_10: u8 = 0x28;
    const TEST_UNIT_READY: u8 = 0x00;
    /// A CDB the fake target refuses before any data moves.
    const REFUSED: u8 = 0xff;
    const LUN: u64 = 0;
    const OTHER_LUN: u64 = 1 << 48;
    /// The fake target's logical block: a WRITE(10) moves whole ones.
    const BLOCK: u32 = 512;

    /// Records every action; plans writes as `Gather(expected length)`.
    struct Fake {
        session: Arc<Session>,
        luns: Vec<u64>,
        actions: Vec<Action<()>>,
        target_aborts: Vec<Option<u64>>,
        targets: Vec<TargetAuth>,
        portals: Vec<SocketAddr>,
        params: SessionParams,
        write_len: u32,
        /// Data-In a READ(10) is planned to produce (other commands: none).
        read_len: u64,
        last_planned_read: bool,
    }

    impl Env for Fake {
        type Planned = ();

        fn plan(&mut self, _lun: u64, cdb: &[u8]) -> DataOutPlan<()> {
            self.last_planned_read = cdb[0] == READ_10;
            match cdb[0] {
                WRITE_10 => DataOutPlan::Gather(self.write_len, ()),
                REFUSED => {
                    DataOutPlan::Fail(ScsiResponse::check(Sense::invalid_field_in_cdb(0, None)))
                }
                _ => DataOutPlan::None(()),
            }
        }
        fn has_lun(&self, lun: u64) -> bool {
            self.luns.contains(&lun)
        }
        fn abort_target_tasks(&mut self, lun: Option<u64>) -> Vec<Waiter> {
            self.target_aborts.push(lun);
            self.session.abort_where(|t| lun.is_none_or(|l| t.lun == l))
        }
        fn text_context(&self) -> TextContext<'_> {
            TextContext {
                targets: &self.targets,
                portal_group_tag: 1,
                portals: &self.portals,
                local_addr: None,
                session_type: session_type(&self.session),
                initiator_name: &self.session.initiator,
                target_name: Some("iqn.x:t"),
                params: &self.params,
            }
        }
        fn data_in_len(&self, _planned: &()) -> u64 {
            if self.last_planned_read {
                self.read_len
            } else {
                0
            }
        }
        fn data_out_unit(&self, _planned: &()) -> u32 {
            BLOCK
        }
        fn act(&mut self, action: Action<()>) {
            self.actions.push(action);
        }
    }

    impl Fake {
        /// The CmdSNs of the commands handed to the target, in order.
        fn executed(&self) -> Vec<u32> {
            self.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Execute(c) => Some(c.hdr.cmd_sn),
                    _ => None,
                })
                .collect()
        }
        /// PDUs sent, in order.
        fn sent(&self) -> Vec<&Pdu> {
            self.actions
                .iter()
                .flat_map(|a| match a {
                    Action::Send(p) => p.iter().collect(),
                    _ => Vec::new(),
                })
                .collect()
        }
        /// The response code of the last Task Management Response, with its waiters.
        fn tmf(&self) -> (u8, &[Waiter], bool) {
            self.actions
                .iter()
                .rev()
                .find_map(|a| match a {
                    Action::TmfResponse {
                        response,
                        waiters,
                        close_target_sessions,
                    } => Some((response.bhs[2], &waiters[..], *close_target_sessions)),
                    _ => None,
                })
                .expect("a TMF response")
        }
        fn clear(&mut self) {
            self.actions.clear();
            self.target_aborts.clear();
        }
    }

    fn params() -> FeatureParams {
        FeatureParams {
            header_digest: false,
            data_digest: false,
            max_recv_segment: 8192,
            max_xmit_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 1,
            cid: 7,
        }
    }

    /// A normal session with ExpCmdSN `exp` and a window of `depth` commands.
    fn setup(exp: u32, depth: u32, now: Instant) -> (Sequencer<()>, Fake) {
        setup_with_budget(exp, depth, now, SessionBudget::unlimited())
    }

    fn setup_with_budget(
        exp: u32,
        depth: u32,
        now: Instant,
        budget: Arc<SessionBudget>,
    ) -> (Sequencer<()>, Fake) {
        let reg = SessionRegistry::default();
        let target = Arc::new(TargetEntry {
            iqn: "iqn.x:t".into(),
            scsi: Arc::new(ScsiTarget::new(vec![])),
        });
        let (session, _) = reg.register(
            reg.allocate_tsih(),
            NewSession {
                initiator: "iqn.x:i".into(),
                isid: [1, 2, 3, 4, 5, 6],
                target: Some(target),
                exp_cmd_sn: exp,
                queue_depth: depth,
                params: SessionParams::default(),
                cid: 7,
                budget,
            },
        );
        let seq = Sequencer::<()>::new(
            session.clone(),
            params(),
            Some(Duration::from_secs(10)),
            Duration::from_secs(15),
            now,
        );
        let fake = Fake {
            session,
            luns: vec![LUN, OTHER_LUN],
            actions: Vec::new(),
            target_aborts: Vec::new(),
            targets: Vec::new(),
            portals: Vec::new(),
            params: SessionParams::default(),
            write_len: 4096,
            read_len: 0,
            last_planned_read: false,
        };
        (seq, fake)
    }

    fn cmd(itt: u32, cmd_sn: u32, op: u8) -> Pdu {
        let mut p = Pdu::new(Opcode::ScsiCommand);
        let write = op == WRITE_10;
        p.set_flags(0x80 | if write { 0x20 } else { 0 });
        p.set_lun(LUN);
        p.set_itt(itt);
        p.set_u32_at(20, if write { 4096 } else { 0 });
        p.set_u32_at(24, cmd_sn);
        p.bhs[32] = op;
        p
    }

    /// A WRITE(10) of 4096 bytes whose data follows as unsolicited Data-Out (F=0).
    fn write_unsolicited(itt: u32, cmd_sn: u32) -> Pdu {
        let mut p = cmd(itt, cmd_sn, WRITE_10);
        p.set_flags(0x20);
        p
    }

    fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, len: usize) -> Pdu {
        let mut p = Pdu::new(Opcode::DataOut);
        p.set_flags(0x80);
        p.set_lun(LUN);
        p.set_itt(itt);
        p.set_u32_at(20, ttt);
        p.set_u32_at(36, data_sn);
        p.set_u32_at(40, offset);
        p.set_data(Bytes::from(vec![0xab; len]));
        p
    }

    fn tmf(function: u8, lun: u64, ref_itt: u32, ref_cmd_sn: u32, cmd_sn: u32) -> Pdu {
        let mut p = Pdu::new(Opcode::TaskMgmtRequest);
        p.set_immediate(true);
        p.set_flags(0x80 | function);
        p.set_lun(lun);
        p.set_itt(0x1000 + u32::from(function));
        p.set_u32_at(20, ref_itt);
        p.set_u32_at(24, cmd_sn);
        p.set_u32_at(32, ref_cmd_sn);
        p
    }

    /// Whether `wait_stopped` would return at once: the task said it stopped, or it is gone.
    fn stopped(w: &Waiter) -> bool {
        *w.borrow() || w.has_changed().is_err()
    }

    fn feed(seq: &mut Sequencer<()>, fake: &mut Fake, pdu: Pdu) {
        seq.handle(Event::Pdu(pdu), Instant::now(), fake)
            .expect("a PDU never ends the connection");
    }

    /// The commands handed to the target, by ITT, taking them out of the recorded actions
    /// (dropping a `Command` releases its memory charge, as its response leaving does).
    fn take_executed(f: &mut Fake) -> Vec<Command<()>> {
        let mut out = Vec::new();
        for a in std::mem::take(&mut f.actions) {
            match a {
                Action::Execute(c) => out.push(c),
                other => f.actions.push(other),
            }
        }
        out
    }

    fn r2t_itts(f: &Fake) -> Vec<u32> {
        f.sent()
            .iter()
            .filter(|p| p.opcode() == Some(Opcode::R2t))
            .map(|p| p.itt())
            .collect()
    }

    #[test]
    fn over_the_memory_budget_writes_wait_without_r2t_and_the_window_closes() {
        // Room for two 4 KiB writes per session.
        let budget = MemoryBudget::new(1 << 20).session(8192);
        let (mut seq, mut f) = setup_with_budget(10, 8, Instant::now(), budget.clone());
        for (itt, sn) in [(1, 10), (2, 11), (3, 12)] {
            feed(&mut seq, &mut f, cmd(itt, sn, WRITE_10));
        }
        assert_eq!(
            r2t_itts(&f),
            vec![1, 2],
            "the third write takes no buffer yet"
        );
        assert_eq!(budget.used(), 8192);
        assert!(seq.waiting_for_budget());
        let max = f.session.max_cmd_sn();
        // A command without bulk data still runs, and the window stays where it was.
        feed(&mut seq, &mut f, cmd(4, 13, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![13]);
        assert_eq!(f.session.max_cmd_sn(), max, "MaxCmdSN stops advancing");
        // Write 1 gets its data and runs; its response leaving releases its buffer.
        feed(&mut seq, &mut f, data_out(1, 1, 0, 0, 4096));
        let done = take_executed(&mut f);
        assert_eq!(
            done.iter().map(|c| c.hdr.itt).collect::<Vec<_>>(),
            vec![4, 1]
        );
        assert_eq!((done[0].charge.bytes(), done[1].charge.bytes()), (0, 4096));
        f.session.remove_task(1);
        f.session.remove_task(4);
        drop(done);
        f.clear();
        seq.handle(Event::BudgetFreed, Instant::now(), &mut f)
            .unwrap();
        assert_eq!(
            r2t_itts(&f),
            vec![3],
            "the waiting write solicits its data now"
        );
        assert!(!seq.waiting_for_budget());
        assert!(
            serial::gt(f.session.max_cmd_sn(), max),
            "the window opens again"
        );
    }

    #[test]
    fn reads_wait_for_memory_and_an_aborted_waiting_command_never_runs() {
        let budget = MemoryBudget::new(1 << 20).session(1 << 16);
        let (mut seq, mut f) = setup_with_budget(10, 8, Instant::now(), budget.clone());
        f.read_len = 1 << 16;
        feed(&mut seq, &mut f, cmd(1, 10, READ_10));
        feed(&mut seq, &mut f, cmd(2, 11, READ_10));
        feed(&mut seq, &mut f, cmd(3, 12, READ_10));
        assert_eq!(
            f.executed(),
            vec![10],
            "one 64 KiB read fills the session's share"
        );
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 2, 11, 13));
        assert_eq!(f.tmf().0, TMF_COMPLETE);
        assert!(
            f.tmf().1.iter().all(stopped),
            "a waiting task has nothing to stop"
        );
        let first = take_executed(&mut f);
        f.session.remove_task(1);
        drop(first);
        f.clear();
        seq.handle(Event::BudgetFreed, Instant::now(), &mut f)
            .unwrap();
        assert_eq!(f.executed(), vec![12], "the aborted read never runs");
        assert!(!seq.waiting_for_budget());
    }

    #[test]
    fn past_the_bound_on_data_of_waiting_commands_the_next_is_task_set_full() {
        // Server budget 1 MiB: waiting commands may hold 16 MiB (the floor of the bound).
        let budget = MemoryBudget::new(1 << 20).session(65536);
        let (mut seq, mut f) = setup_with_budget(10, 300, Instant::now(), budget);
        f.write_len = 65536;
        let write = |itt: u32, sn: u32| {
            let mut p = cmd(itt, sn, WRITE_10);
            p.set_u32_at(20, 65536);
            p.set_data(Bytes::from(vec![7u8; 65536]));
            p
        };
        // The first runs (its immediate data completes it); 256 wait with 64 KiB each.
        for i in 0..258u32 {
            feed(&mut seq, &mut f, write(i + 1, 10 + i));
        }
        assert_eq!(f.executed(), vec![10]);
        assert_eq!(seq.budget_wait.len(), 256);
        let responses: Vec<_> = f
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Respond { pdus, .. } => Some((pdus[0].itt(), pdus[0].bhs[3])),
                _ => None,
            })
            .collect();
        assert_eq!(
            responses,
            vec![(258, 0x28)],
            "TASK SET FULL for the one too many"
        );
        assert_eq!(seq.held_data.bytes(), 256 * 65536);
        // Once the first's charge is gone the waiting ones run and hold nothing more.
        let first = take_executed(&mut f);
        f.session.remove_task(1);
        drop(first);
        seq.handle(Event::BudgetFreed, Instant::now(), &mut f)
            .unwrap();
        assert_eq!(f.executed(), vec![11], "one at a time: 64 KiB per session");
        assert_eq!(seq.held_data.bytes(), 255 * 65536);
    }

    #[test]
    fn unsolicited_data_for_a_write_waiting_for_memory_is_kept_for_it() {
        let budget = MemoryBudget::new(1 << 20).session(4096);
        let (mut seq, mut f) = setup_with_budget(10, 8, Instant::now(), budget);
        feed(&mut seq, &mut f, cmd(1, 10, WRITE_10));
        feed(&mut seq, &mut f, write_unsolicited(2, 11));
        feed(&mut seq, &mut f, data_out(2, RESERVED_TAG, 0, 0, 4096));
        assert!(f.executed().is_empty());
        feed(&mut seq, &mut f, data_out(1, 1, 0, 0, 4096));
        let first = take_executed(&mut f);
        f.session.remove_task(1);
        drop(first);
        seq.handle(Event::BudgetFreed, Instant::now(), &mut f)
            .unwrap();
        assert_eq!(f.executed(), vec![11], "its early Data-Out completed it");
    }

    #[test]
    fn window_edges_max_cmd_sn_is_accepted_one_past_and_stale_are_ignored() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        // Window [10, 13].
        feed(&mut seq, &mut f, cmd(1, 13, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(2, 14, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(3, 9, TEST_UNIT_READY));
        assert!(f.actions.is_empty(), "held or ignored: nothing runs yet");
        assert_eq!(seq.held.len(), 1, "only MaxCmdSN itself is held");
        for sn in 10..=12 {
            feed(&mut seq, &mut f, cmd(10 + sn, sn, TEST_UNIT_READY));
        }
        assert_eq!(f.executed(), vec![10, 11, 12, 13]);
        assert_eq!(f.session.exp_cmd_sn(), 14);
        assert!(seq.held.is_empty());
    }

    #[test]
    fn held_commands_run_in_cmd_sn_order_whatever_order_they_arrive_in() {
        let (mut seq, mut f) = setup(10, 8, Instant::now());
        for sn in [14, 12, 13, 11] {
            feed(&mut seq, &mut f, cmd(sn, sn, TEST_UNIT_READY));
        }
        assert!(f.executed().is_empty());
        feed(&mut seq, &mut f, cmd(10, 10, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![10, 11, 12, 13, 14]);
        assert_eq!(f.session.exp_cmd_sn(), 15);
    }

    #[test]
    fn the_window_wraps_at_2_pow_32_by_serial_number_arithmetic() {
        // RFC 1982 / RFC 7143 §4.2.2.1: ExpCmdSN 2^32-2 with 4 slots covers 2^32-2..=1.
        let (mut seq, mut f) = setup(u32::MAX - 1, 4, Instant::now());
        feed(&mut seq, &mut f, cmd(1, 1, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(2, 0, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(3, 2, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(4, u32::MAX - 2, TEST_UNIT_READY));
        assert_eq!(
            seq.held.len(),
            2,
            "0 and 1 are in the window, 2 and 2^32-3 are not"
        );
        feed(&mut seq, &mut f, cmd(5, u32::MAX, TEST_UNIT_READY));
        assert!(f.executed().is_empty(), "2^32-1 waits for 2^32-2");
        feed(&mut seq, &mut f, cmd(6, u32::MAX - 1, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![u32::MAX - 1, u32::MAX, 0, 1]);
        assert_eq!(f.session.exp_cmd_sn(), 2);
    }

    #[test]
    fn immediate_commands_run_at_once_and_consume_no_cmd_sn() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        let mut p = cmd(1, 10, TEST_UNIT_READY);
        p.set_immediate(true);
        feed(&mut seq, &mut f, p);
        // Even with a CmdSN outside the window (§3.2.2.1: immediate delivery).
        let mut p = cmd(2, 99, TEST_UNIT_READY);
        p.set_immediate(true);
        feed(&mut seq, &mut f, p);
        assert_eq!(f.executed(), vec![10, 99]);
        assert_eq!(f.session.exp_cmd_sn(), 10);
        assert!(f.session.task(1).is_some_and(|t| t.immediate));
    }

    #[test]
    fn a_command_the_target_refuses_is_answered_without_running() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, cmd(1, 10, REFUSED));
        assert!(f.executed().is_empty());
        assert!(matches!(&f.actions[..], [Action::Respond { task, pdus }]
            if task.itt == 1 && pdus[0].opcode() == Some(Opcode::ScsiResponse)
                && pdus[0].bhs[3] == 0x02));
        assert!(f.session.task(1).is_none(), "left the task table");
    }

    #[test]
    fn a_reused_itt_is_rejected_as_task_in_progress() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, cmd(1, 10, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(1, 11, TEST_UNIT_READY));
        let sent = f.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].opcode(), Some(Opcode::Reject));
        assert_eq!(sent[0].bhs[2], RejectReason::TaskInProgress as u8);
    }

    #[test]
    fn early_data_out_waits_with_its_held_command_and_is_replayed_in_order() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, write_unsolicited(5, 11));
        feed(&mut seq, &mut f, data_out(5, RESERVED_TAG, 0, 0, 4096));
        // More than FirstBurstLength in total is dropped, not kept.
        feed(&mut seq, &mut f, data_out(5, RESERVED_TAG, 1, 0, 65_536));
        assert_eq!(seq.early_data_out[&5].len(), 1);
        // Data-Out for a command neither held nor pending is ignored.
        feed(&mut seq, &mut f, data_out(6, RESERVED_TAG, 0, 0, 512));
        assert!(f.actions.is_empty());
        feed(&mut seq, &mut f, cmd(1, 10, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![10, 11]);
        let Some(Action::Execute(c)) = f.actions.last() else {
            panic!("the write runs");
        };
        assert_eq!(c.data_out.len(), 4096);
        assert!(c.data_out.iter().all(|&b| b == 0xab));
        assert!(seq.early_data_out.is_empty());
    }

    #[test]
    fn solicited_data_completes_a_write_and_bad_data_out_fails_it() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        f.params = SessionParams::default();
        let mut p = cmd(5, 10, WRITE_10);
        p.set_flags(0xa0);
        feed(&mut seq, &mut f, p);
        let r2t = f.sent()[0].clone();
        assert_eq!(r2t.opcode(), Some(Opcode::R2t));
        let ttt = r2t.field20();
        assert_ne!(ttt, RESERVED_TAG);
        feed(&mut seq, &mut f, data_out(5, ttt, 0, 0, 4096));
        assert_eq!(f.executed(), vec![10]);

        f.clear();
        let mut p = cmd(6, 11, WRITE_10);
        p.set_flags(0xa0);
        feed(&mut seq, &mut f, p);
        let ttt = f.sent()[0].field20();
        // DataSN 1 where 0 is due: data-phase error, the command fails (ERL 0).
        feed(&mut seq, &mut f, data_out(6, ttt, 1, 0, 4096));
        assert!(f.executed().is_empty());
        assert!(matches!(f.actions.last(), Some(Action::Respond { task, .. }) if task.itt == 6));
        assert!(!seq.gathers.contains_key(&6));
    }

    #[test]
    fn abort_task_of_a_held_command_drops_it_and_its_early_data() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, write_unsolicited(5, 11));
        feed(&mut seq, &mut f, data_out(5, RESERVED_TAG, 0, 0, 4096));
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 5, 11, 12));
        assert_eq!(f.tmf().0, TMF_COMPLETE);
        assert!(seq.held.is_empty() && seq.early_data_out.is_empty());
        // CmdSN 11 was not the next expected one: the window still waits for 10.
        assert_eq!(f.session.exp_cmd_sn(), 10);
        f.clear();
        feed(&mut seq, &mut f, cmd(1, 10, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![10], "the aborted write never runs");
        // Its CmdSN is consumed in turn: the window does not stall on the hole.
        assert_eq!(f.session.exp_cmd_sn(), 12);
        feed(&mut seq, &mut f, cmd(3, 12, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![10, 12]);
    }

    #[test]
    fn abort_task_of_a_command_ahead_that_arrives_later_never_runs_it() {
        let (mut seq, mut f) = setup(10, 8, Instant::now());
        // The initiator sent CmdSN 10 to 12 (none arrived yet) and then the immediate TMF.
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 7, 12, 13));
        assert_eq!(f.tmf().0, TMF_COMPLETE);
        f.clear();
        feed(&mut seq, &mut f, cmd(7, 12, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(5, 10, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(6, 11, TEST_UNIT_READY));
        feed(&mut seq, &mut f, cmd(8, 13, TEST_UNIT_READY));
        assert_eq!(f.executed(), vec![10, 11, 13], "CmdSN 12 was aborted");
        assert_eq!(f.session.exp_cmd_sn(), 14);
        assert!(seq.held.is_empty() && seq.aborted_ahead.is_empty());
    }

    #[test]
    fn abort_task_of_a_command_never_received_consumes_its_cmd_sn() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, cmd(2, 11, TEST_UNIT_READY));
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 1, 10, 12));
        assert_eq!(f.tmf().0, TMF_COMPLETE);
        // CmdSN 10 counts as received and aborted, so the held CmdSN 11 runs now.
        assert_eq!(f.session.exp_cmd_sn(), 12);
        assert_eq!(f.executed(), vec![11]);
    }

    #[test]
    fn abort_task_of_a_write_waiting_for_data_out_stops_it_at_once() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        let mut p = cmd(5, 10, WRITE_10);
        p.set_flags(0xa0);
        feed(&mut seq, &mut f, p);
        let ttt = f.sent()[0].field20();
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 5, 10, 11));
        let (code, waiters, _) = f.tmf();
        assert_eq!(code, TMF_COMPLETE);
        assert_eq!(waiters.len(), 1);
        assert!(seq.gathers.is_empty());
        assert!(
            stopped(&waiters[0]),
            "a gathering task has nothing to wait for"
        );
        f.clear();
        feed(&mut seq, &mut f, data_out(5, ttt, 0, 0, 4096));
        assert!(f.actions.is_empty(), "its Data-Out is ignored");
    }

    #[test]
    fn abort_task_of_an_executing_command_waits_for_it_to_stop() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, cmd(5, 10, TEST_UNIT_READY));
        let task = f.session.task(5).expect("registered");
        assert_eq!(task.state(), TaskState::Running);
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 5, 10, 11));
        let (code, waiters, _) = f.tmf();
        assert_eq!(code, TMF_COMPLETE);
        assert!(!stopped(&waiters[0]), "still running");
        assert_eq!(task.state(), TaskState::Aborted);
        assert!(!task.complete_with(|| panic!("an aborted task is not answered")));
        task.finished();
        assert!(stopped(&f.tmf().1[0]));
    }

    #[test]
    fn abort_task_of_a_completed_or_unknown_task_is_no_such_task() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        feed(&mut seq, &mut f, cmd(5, 10, TEST_UNIT_READY));
        let task = f.session.task(5).expect("registered");
        f.session.remove_task(5);
        assert!(task.complete_with(|| {}));
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 5, 10, 11));
        assert_eq!(f.tmf().0, TMF_NO_TASK);
        // Unknown ITT whose RefCmdSN is outside the window.
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK, LUN, 77, 500, 11));
        assert_eq!(f.tmf().0, TMF_NO_TASK);
    }

    /// One task per state on LUN: held (CmdSN 12), waiting for Data-Out (ITT 2),
    /// executing (ITT 3), completed (ITT 4); and one executing task on OTHER_LUN (ITT 5).
    fn every_state(seq: &mut Sequencer<()>, f: &mut Fake) -> Vec<Arc<Task>> {
        let mut w = cmd(2, 10, WRITE_10);
        w.set_flags(0xa0);
        feed(seq, f, w);
        feed(seq, f, cmd(3, 11, TEST_UNIT_READY));
        feed(seq, f, cmd(1, 13, TEST_UNIT_READY));
        let mut other = cmd(5, 0, TEST_UNIT_READY);
        other.set_lun(OTHER_LUN);
        other.set_immediate(true);
        feed(seq, f, other);
        let mut done = cmd(4, 0, TEST_UNIT_READY);
        done.set_immediate(true);
        feed(seq, f, done);
        let t4 = f.session.task(4).unwrap();
        f.session.remove_task(4);
        t4.complete_with(|| {});
        f.clear();
        [2, 3, 5]
            .iter()
            .map(|i| f.session.task(*i).unwrap())
            .collect()
    }

    #[test]
    fn abort_task_set_aborts_the_lun_s_tasks_of_this_session_only() {
        let (mut seq, mut f) = setup(10, 8, Instant::now());
        let tasks = every_state(&mut seq, &mut f);
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK_SET, LUN, 0, 0, 12));
        let (code, waiters, _) = f.tmf();
        assert_eq!(code, TMF_COMPLETE);
        assert_eq!(waiters.len(), 2, "the gathering and the executing task");
        assert!(f.target_aborts.is_empty(), "no other session is touched");
        assert_eq!(tasks[0].state(), TaskState::Aborted);
        assert_eq!(tasks[1].state(), TaskState::Aborted);
        assert_eq!(tasks[2].state(), TaskState::Running, "other LUN untouched");
        assert!(seq.gathers.is_empty());
        // A held command is not a task yet: it stays held for its turn.
        assert_eq!(seq.held.len(), 1);
        feed(&mut seq, &mut f, tmf(TMF_ABORT_TASK_SET, 9 << 48, 0, 0, 12));
        assert_eq!(f.tmf().0, TMF_NO_LUN);
    }

    #[test]
    fn clear_task_set_aborts_the_lun_in_every_session_of_the_target() {
        let (mut seq, mut f) = setup(10, 8, Instant::now());
        let tasks = every_state(&mut seq, &mut f);
        feed(&mut seq, &mut f, tmf(TMF_CLEAR_TASK_SET, LUN, 0, 0, 12));
        assert_eq!(f.tmf().0, TMF_COMPLETE);
        assert_eq!(f.tmf().1.len(), 2);
        assert_eq!(f.target_aborts, vec![Some(LUN)]);
        assert_eq!(tasks[2].state(), TaskState::Running);
        assert!(seq.gathers.is_empty());
        f.clear();
        feed(&mut seq, &mut f, tmf(TMF_CLEAR_TASK_SET, 9 << 48, 0, 0, 12));
        assert_eq!(f.tmf().0, TMF_NO_LUN);
        assert!(f.target_aborts.is_empty());
    }

    #[test]
    fn logical_unit_reset_aborts_the_lun_everywhere_then_resets_it() {
        let (mut seq, mut f) = setup(10, 8, Instant::now());
        let tasks = every_state(&mut seq, &mut f);
        feed(&mut seq, &mut f, tmf(TMF_LOGICAL_UNIT_RESET, LUN, 0, 0, 12));
        assert!(matches!(
            &f.actions[..],
            [
                Action::LogicalUnitReset { lun: LUN },
                Action::TmfResponse { .. }
            ]
        ));
        assert_eq!(f.tmf().0, TMF_COMPLETE);
        assert_eq!(f.tmf().1.len(), 2);
        assert_eq!(f.target_aborts, vec![Some(LUN)]);
        assert_eq!(tasks[1].state(), TaskState::Aborted);
        assert_eq!(tasks[2].state(), TaskState::Running);
        f.clear();
        feed(
            &mut seq,
            &mut f,
            tmf(TMF_LOGICAL_UNIT_RESET, 9 << 48, 0, 0, 12),
        );
        assert!(matches!(&f.actions[..], [Action::TmfResponse { .. }]));
        assert_eq!(f.tmf().0, TMF_NO_LUN);
    }

    #[test]
    fn target_resets_abort_every_task_and_a_cold_one_closes_the_sessions() {
        for (function, cold) in [
            (TMF_TARGET_WARM_RESET, false),
            (TMF_TARGET_COLD_RESET, true),
        ] {
            let (mut seq, mut f) = setup(10, 8, Instant::now());
            let tasks = every_state(&mut seq, &mut f);
            feed(&mut seq, &mut f, tmf(function, LUN, 0, 0, 12));
            assert!(matches!(
                &f.actions[..],
                [Action::TargetReset, Action::TmfResponse { .. }]
            ));
            let (code, waiters, close) = f.tmf();
            assert_eq!((code, waiters.len(), close), (TMF_COMPLETE, 3, cold));
            assert_eq!(f.target_aborts, vec![None]);
            assert!(tasks.iter().all(|t| t.state() == TaskState::Aborted));
            assert!(seq.gathers.is_empty());
        }
    }

    #[test]
    fn task_reassign_and_unknown_functions_are_refused_without_touching_tasks() {
        let (mut seq, mut f) = setup(10, 8, Instant::now());
        let tasks = every_state(&mut seq, &mut f);
        feed(&mut seq, &mut f, tmf(TMF_TASK_REASSIGN, LUN, 3, 11, 12));
        assert_eq!(f.tmf().0, TMF_REASSIGN_UNSUPPORTED);
        for function in [3, 9, 14] {
            feed(&mut seq, &mut f, tmf(function, LUN, 3, 11, 12));
            assert_eq!(f.tmf().0, TMF_NOT_SUPPORTED);
            assert!(f.tmf().1.is_empty());
        }
        assert!(f.target_aborts.is_empty());
        assert!(tasks.iter().all(|t| t.state() != TaskState::Aborted));
        assert_eq!(seq.gathers.len(), 1);
    }

    #[test]
    fn nop_in_ping_after_idle_and_drop_after_its_timeout() {
        let t0 = Instant::now();
        let (mut seq, mut f) = setup(10, 4, t0);
        assert_eq!(seq.deadline(), t0 + Duration::from_secs(10));
        // A timer firing early does nothing.
        seq.handle(Event::Timer, t0 + Duration::from_secs(5), &mut f)
            .unwrap();
        assert!(f.actions.is_empty());
        let t1 = t0 + Duration::from_secs(10);
        seq.handle(Event::Timer, t1, &mut f).unwrap();
        let ping = f.sent()[0].clone();
        assert_eq!(ping.opcode(), Some(Opcode::NopIn));
        assert_eq!(ping.itt(), RESERVED_TAG);
        assert_ne!(ping.field20(), RESERVED_TAG, "a ping asks for an answer");
        assert_eq!(seq.deadline(), t1 + Duration::from_secs(15));
        let e = seq
            .handle(Event::Timer, t1 + Duration::from_secs(15), &mut f)
            .expect_err("no answer: the connection is dead");
        assert_eq!(
            e.to_string(),
            "initiator did not answer NOP-In within 15s: dropping dead connection"
        );
    }

    #[test]
    fn any_pdu_answers_the_ping_and_restarts_the_quiet_time() {
        let t0 = Instant::now();
        let (mut seq, mut f) = setup(10, 4, t0);
        let t1 = t0 + Duration::from_secs(10);
        seq.handle(Event::Timer, t1, &mut f).unwrap();
        let ttt = f.sent()[0].field20();
        f.clear();
        let mut answer = Pdu::new(Opcode::NopOut);
        answer.set_immediate(true);
        answer.set_flags(0x80);
        answer.set_itt(RESERVED_TAG);
        answer.set_u32_at(20, ttt);
        let t2 = t1 + Duration::from_secs(1);
        seq.handle(Event::Pdu(answer), t2, &mut f).unwrap();
        assert!(f.actions.is_empty(), "the answer to our ping needs none");
        assert_eq!(seq.deadline(), t2 + Duration::from_secs(10));
        seq.handle(Event::Timer, t2 + Duration::from_secs(15), &mut f)
            .expect("answered: no drop");
    }

    #[test]
    fn pings_off_means_no_deadline_within_a_year() {
        let t0 = Instant::now();
        let (_, f) = setup(10, 4, t0);
        let seq = Sequencer::<()>::new(
            f.session.clone(),
            params(),
            None,
            Duration::from_secs(15),
            t0,
        );
        assert!(seq.deadline() >= t0 + Duration::from_secs(364 * 86400));
    }

    #[test]
    fn unbounded_nop_timers_do_not_overflow_the_instant() {
        let t0 = Instant::now();
        let (_, mut f) = setup(10, 4, t0);
        let huge = Duration::from_secs(i64::MAX as u64);
        let mut seq = Sequencer::<()>::new(f.session.clone(), params(), Some(huge), huge, t0);
        assert!(seq.deadline() >= t0 + Duration::from_secs(364 * 86400));
        // The quiet time restarts on traffic and the ping's deadline is set at the timer.
        let mut p = Pdu::new(Opcode::NopOut);
        p.set_flags(0x80);
        p.set_immediate(true);
        p.set_itt(RESERVED_TAG);
        seq.handle(Event::Pdu(p), t0, &mut f).unwrap();
        let late = seq.deadline();
        seq.handle(Event::Timer, late, &mut f).unwrap();
        assert!(seq.deadline() >= late);
    }

    #[test]
    fn nop_out_is_echoed_within_max_xmit_and_a_non_immediate_one_takes_a_cmd_sn() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        let mut p = Pdu::new(Opcode::NopOut);
        p.set_flags(0x80);
        p.set_itt(9);
        p.set_u32_at(20, RESERVED_TAG);
        p.set_u32_at(24, 10);
        p.set_data(Bytes::from(vec![1u8; 10_000]));
        feed(&mut seq, &mut f, p);
        let echo = f.sent()[0].clone();
        assert_eq!(echo.opcode(), Some(Opcode::NopIn));
        assert_eq!((echo.itt(), echo.field20()), (9, RESERVED_TAG));
        assert_eq!(echo.data.len(), 8192);
        assert_eq!(f.session.exp_cmd_sn(), 11);
    }

    #[test]
    fn bad_pdus_and_forbidden_opcodes_are_rejected() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        let bhs = cmd(1, 10, TEST_UNIT_READY).bhs;
        seq.handle(
            Event::Bad(BadPdu::DataDigest { bhs }),
            Instant::now(),
            &mut f,
        )
        .unwrap();
        feed(&mut seq, &mut f, Pdu::new(Opcode::Snack));
        let mut unknown = Pdu::new(Opcode::NopOut);
        unknown.bhs[0] = 0x1f;
        feed(&mut seq, &mut f, unknown);
        let reasons: Vec<u8> = f.sent().iter().map(|p| p.bhs[2]).collect();
        assert_eq!(
            reasons,
            vec![
                RejectReason::DataDigestError as u8,
                RejectReason::ProtocolError as u8,
                RejectReason::CommandNotSupported as u8
            ]
        );
        assert_eq!(f.session.exp_cmd_sn(), 10, "a rejected PDU takes no CmdSN");
    }

    /// A WRITE(10) with ExpectedDataTransferLength `edtl` and `imm` bytes of immediate data
    /// (F=1: no unsolicited Data-Out follows), as libiscsi's iSCSIResiduals sends it.
    fn write_edtl(itt: u32, cmd_sn: u32, edtl: u32, imm: usize) -> Pdu {
        let mut p = cmd(itt, cmd_sn, WRITE_10);
        p.set_u32_at(20, edtl);
        if imm > 0 {
            p.set_data(Bytes::from(vec![b'b'; imm]));
        }
        p
    }

    /// The SCSI Response a command was answered with without running: (status, sense key,
    /// ASC, ASCQ, residual).
    fn answered(f: &Fake, itt: u32) -> Option<(u8, u8, u8, u8, Residual)> {
        f.actions.iter().find_map(|a| match a {
            Action::Respond { pdus, .. } if pdus[0].itt() == itt => {
                let r = &pdus[0];
                assert_eq!(r.opcode(), Some(Opcode::ScsiResponse));
                let sense = &r.data[2..];
                let residual = match r.flags() & 0x06 {
                    0x04 => Residual::Overflow(r.u32_at(44)),
                    0x02 => Residual::Underflow(r.u32_at(44)),
                    _ => Residual::None,
                };
                Some((r.bhs[3], sense[2] & 0x0f, sense[12], sense[13], residual))
            }
            _ => None,
        })
    }

    /// libiscsi iSCSIResiduals.Write10Residuals / WriteVerify10Residuals, on 512-byte blocks:
    /// an EDTL of whole blocks runs with min(EDTL, CDB) bytes and the residual; EDTL 200 for
    /// one block (not whole blocks, below the CDB) is refused before any data moves: CHECK
    /// CONDITION, ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT, residual
    /// overflow 312, no R2T, nothing executed (so nothing written).
    #[test]
    fn write_edtl_against_the_cdb_transfer_length() {
        struct Case {
            blocks: u32,
            edtl: u32,
            imm: usize,
            /// Bytes handed to the target, or None when refused.
            runs_with: Option<usize>,
            residual: Residual,
        }
        let cases = [
            // One block, EDTL 0: nothing to write, GOOD with overflow (libiscsi accepts).
            Case {
                blocks: 1,
                edtl: 0,
                imm: 0,
                runs_with: Some(0),
                residual: Residual::Overflow(512),
            },
            Case {
                blocks: 1,
                edtl: 1024,
                imm: 1024,
                runs_with: Some(512),
                residual: Residual::Underflow(512),
            },
            Case {
                blocks: 2,
                edtl: 512,
                imm: 512,
                runs_with: Some(512),
                residual: Residual::Overflow(512),
            },
            Case {
                blocks: 1,
                edtl: 10_000,
                imm: 8192,
                runs_with: Some(512),
                residual: Residual::Underflow(9488),
            },
            Case {
                blocks: 1,
                edtl: 200,
                imm: 200,
                runs_with: None,
                residual: Residual::Overflow(312),
            },
            // Without immediate data: refused without soliciting the 200 bytes.
            Case {
                blocks: 1,
                edtl: 200,
                imm: 0,
                runs_with: None,
                residual: Residual::Overflow(312),
            },
            Case {
                blocks: 2,
                edtl: 768,
                imm: 768,
                runs_with: None,
                residual: Residual::Overflow(256),
            },
            // More than the CDB and not whole blocks: the CDB's blocks are all there.
            Case {
                blocks: 2,
                edtl: 1500,
                imm: 1500,
                runs_with: Some(1024),
                residual: Residual::Underflow(476),
            },
        ];
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        for (i, c) in cases.iter().enumerate() {
            let itt = i as u32 + 1;
            f.write_len = c.blocks * BLOCK;
            feed(&mut seq, &mut f, write_edtl(itt, 9 + itt, c.edtl, c.imm));
            let what = format!("{} block(s), EDTL {}", c.blocks, c.edtl);
            assert!(r2t_itts(&f).is_empty(), "{what}: nothing solicited");
            match c.runs_with {
                Some(len) => {
                    let run = take_executed(&mut f);
                    assert_eq!(run.len(), 1, "{what}");
                    assert_eq!(run[0].data_out.len(), len, "{what}");
                    assert!(run[0].data_out.iter().all(|&b| b == b'b'), "{what}");
                    assert_eq!(run[0].residual, Some(c.residual), "{what}");
                }
                None => {
                    assert!(take_executed(&mut f).is_empty(), "{what}: never runs");
                    assert_eq!(
                        answered(&f, itt),
                        Some((0x02, 0x05, 0x0e, 0x03, c.residual)),
                        "{what}"
                    );
                    assert!(f.session.task(itt).is_none(), "{what}: task gone");
                }
            }
            f.clear();
        }
    }

    /// A Text Request as libiscsi's iSCSI.iSCSISendTargets.Invalid sends it: immediate,
    /// F=1, TTT 0xffffffff, CmdSN = the next CmdSN, the text NUL-terminated.
    fn text_request(itt: u32, cmd_sn: u32, text: &[u8]) -> Pdu {
        let mut p = crate::iscsi::pdu::TextRequestBuilder::new(itt, RESERVED_TAG, 0x80)
            .data(Bytes::copy_from_slice(text))
            .build();
        p.set_immediate(true);
        p.set_u32_at(24, cmd_sn);
        p
    }

    /// libiscsi's iSCSI.iSCSISendTargets.Invalid on a normal session: every request is
    /// answered, each bad one by a Reject carrying its header (libiscsi finds the request by
    /// the ITT in it), then `SendTargets=All` by a final Text Response naming the target.
    #[test]
    fn every_sendtargets_text_request_of_a_normal_session_is_answered() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        f.targets = vec![TargetAuth::new("iqn.x:t")];
        let bad: [&[u8]; 4] = [
            b"SendTargetsPlease=All\0",
            b"SendTargets=Alle\0",
            b"SendTargets=A\0",
            b"sENDtARGETS=aLL\0",
        ];
        for (i, text) in bad.into_iter().enumerate() {
            f.clear();
            let req = text_request(i as u32 + 1, 10, text);
            feed(&mut seq, &mut f, req.clone());
            let sent = f.sent();
            assert_eq!(sent.len(), 1, "{text:?}: exactly one answer");
            let r = sent[0];
            assert_eq!(r.opcode(), Some(Opcode::Reject), "{text:?}");
            assert_eq!(r.bhs[2], RejectReason::ProtocolError as u8);
            assert_eq!(&r.data[..48], &req.bhs[..], "the rejected header");
            assert_eq!(r.data[16..20], (i as u32 + 1).to_be_bytes());
        }
        f.clear();
        feed(&mut seq, &mut f, text_request(5, 10, b"SendTargets=All\0"));
        let sent = f.sent();
        assert_eq!(sent.len(), 1);
        let r = sent[0];
        assert_eq!(
            (r.opcode(), r.flags(), r.itt()),
            (Some(Opcode::TextResponse), 0x80, 5)
        );
        assert_eq!(
            crate::iscsi::pdu::TextResponse(r).target_transfer_tag(),
            RESERVED_TAG
        );
        assert_eq!(&r.data[..], b"TargetName=iqn.x:t\0");
        assert_eq!(f.session.exp_cmd_sn(), 10, "immediate: no CmdSN taken");
    }

    #[test]
    fn logout_closes_after_the_commands_and_another_cid_is_refused() {
        let (mut seq, mut f) = setup(10, 4, Instant::now());
        let logout = |reason: u8, cid: u16, sn: u32| {
            let mut p = Pdu::new(Opcode::LogoutRequest);
            p.set_flags(0x80 | reason);
            p.set_itt(0x55);
            p.bhs[20..22].copy_from_slice(&cid.to_be_bytes());
            p.set_u32_at(24, sn);
            p
        };
        feed(&mut seq, &mut f, logout(1, 8, 10));
        assert_eq!(f.sent()[0].bhs[2], 1, "CID not found");
        assert!(!seq.closing());
        feed(&mut seq, &mut f, logout(0, 7, 11));
        assert!(seq.closing());
        let p = seq
            .take_logout_response()
            .expect("kept for after the commands");
        assert_eq!((p.opcode(), p.bhs[2]), (Some(Opcode::LogoutResponse), 0));
    }
}
