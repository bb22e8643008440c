//! One iSCSI connection: login phase, then the full-feature phase (RFC 7143 §4, §7, §11).
//!
//! The reader half runs the protocol; commands execute in their own tasks; one writer task
//! owns the socket's write half and stamps StatSN, ExpCmdSN and MaxCmdSN into every PDU as it
//! is sent, so responses leave in StatSN order whatever order commands finish in.

use super::ffp::{build_response, reject, DataInLimits, Residual, ScsiCommandHeader, WriteGather};
use super::negotiation::SessionType;
use super::pdu::{serial, BadPdu, Opcode, Pdu, PduCodec, RejectReason, WireBatch, RESERVED_TAG};
use super::session::{wait_stopped, Session, Task, TaskState};
use super::text::{TextContext, TextNegotiation, TextOutcome};
use crate::scsi::{DataOutPlan, ScsiRequest, ScsiResponse, Sense};
use crate::server::ServerState;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn, Instrument};

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

/// Messages to the writer task.
enum Out {
    Pdus(Vec<Pdu>),
    /// Flush what is queued, then shut the socket down.
    Close,
}

#[derive(Clone)]
struct Outbox(mpsc::UnboundedSender<Out>);

impl Outbox {
    fn send(&self, pdus: Vec<Pdu>) {
        let _ = self.0.send(Out::Pdus(pdus));
    }
    fn one(&self, pdu: Pdu) {
        self.send(vec![pdu]);
    }
    fn close(&self) {
        let _ = self.0.send(Out::Close);
    }
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve(stream: TcpStream, state: Arc<ServerState>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = stream.local_addr().ok();
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("conn", peer = %peer);
    async move {
        debug!("connection accepted");
        match run(stream, local, state).await {
            Ok(()) => debug!("connection closed"),
            Err(e) => info!("connection ended: {e}"),
        }
    }
    .instrument(span)
    .await
}

async fn run(
    stream: TcpStream,
    local: Option<std::net::SocketAddr>,
    state: Arc<ServerState>,
) -> anyhow::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, PduCodec::default());
    let login_timeout = Duration::from_secs(state.settings.login_timeout_secs);
    let login = tokio::time::timeout(
        login_timeout,
        super::login_driver::drive_login(&mut reader, &mut wr, &state, local),
    )
    .await
    .map_err(|_| anyhow::anyhow!("login did not complete within {login_timeout:?}"))??;
    let Some(logged_in) = login else {
        return Ok(());
    };
    let params = logged_in.params;
    let codec = reader.decoder_mut();
    codec.header_digest = params.header_digest;
    codec.data_digest = params.data_digest;
    codec.max_recv_data_segment = params.max_recv_segment as usize;
    let session = logged_in.session;
    let span = tracing::info_span!("session", tsih = session.tsih, initiator = %session.initiator,
        target = session.target.as_ref().map(|t| t.iqn.as_str()).unwrap_or("discovery"));
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(
        write_loop(wr, rx, session.clone(), params, logged_in.next_stat_sn)
            .instrument(span.clone()),
    );
    let mut conn = FeatureConnection {
        local,
        state: state.clone(),
        session: session.clone(),
        params,
        out: Outbox(tx),
        gathers: HashMap::new(),
        held: Vec::new(),
        tags: TransferTags(1),
        text_negotiation: TextNegotiation::new(),
        logout_response: None,
        ping: None,
        closing: false,
    };
    let result = conn.run(&mut reader).instrument(span.clone()).await;
    if let Some(p) = conn.logout_response.take() {
        // §11.14: commands still running answer before the Logout Response; bounded so a
        // hung backing device cannot hold the logout forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        while session.active_tasks() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        conn.out.one(p);
    }
    // Tasks of a connection that is gone can never be answered: stop them.
    let waiters = session.abort_where(|_| true);
    state.sessions.unregister(&session);
    conn.out.close();
    drop(conn);
    let _ = writer.await;
    wait_stopped(waiters).await;
    let _g = span.enter();
    match &result {
        Ok(()) => info!("session connection closed"),
        Err(e) => warn!("session connection dropped: {e}"),
    }
    result
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    session: Arc<Session>,
    params: FeatureParams,
    mut stat_sn: u32,
) {
    let mut batch = WireBatch::default();
    let mut closing = false;
    while !closing {
        let Some(first) = rx.recv().await else { break };
        // Everything already queued goes out in one vectored write.
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Out::Pdus(pdus) => {
                    for mut p in pdus {
                        stamp(&mut p, &session, &mut stat_sn);
                        batch.push(&p, params.header_digest, params.data_digest);
                    }
                }
                Out::Close => closing = true,
            }
            if batch.len() < 4 << 20 && !closing {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = write_segments(&mut wr, batch.take()).await {
            debug!("write failed: {e}");
            break;
        }
    }
    let _ = wr.shutdown().await;
}

async fn write_segments(wr: &mut OwnedWriteHalf, segments: Vec<Bytes>) -> std::io::Result<()> {
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < segments.len() {
        let mut slices = Vec::with_capacity((segments.len() - idx).min(64));
        slices.push(std::io::IoSlice::new(&segments[idx][off..]));
        for s in segments.iter().skip(idx + 1).take(63) {
            slices.push(std::io::IoSlice::new(s));
        }
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = segments[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Fills StatSN (§4.2.2.2), ExpCmdSN and MaxCmdSN as the PDU leaves.
fn stamp(p: &mut Pdu, session: &Session, stat_sn: &mut u32) {
    let advance = match p.opcode() {
        Some(Opcode::DataIn) => {
            if p.flags() & 0x01 == 0 {
                None
            } else {
                Some(true)
            }
        }
        Some(Opcode::R2t) => Some(false),
        Some(Opcode::NopIn) => Some(p.itt() != RESERVED_TAG),
        _ => Some(true),
    };
    if let Some(adv) = advance {
        p.set_u32_at(24, *stat_sn);
        if adv {
            *stat_sn = stat_sn.wrapping_add(1);
        }
    }
    p.set_u32_at(28, session.exp_cmd_sn());
    p.set_u32_at(32, session.max_cmd_sn());
}

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
struct PendingWrite {
    gather: WriteGather,
    hdr: ScsiCommandHeader,
    task: Arc<Task>,
    /// ExpectedDataTransferLength against what the CDB transfers (§11.4.5).
    residual: Residual,
}

struct FeatureConnection {
    local: Option<std::net::SocketAddr>,
    state: Arc<ServerState>,
    session: Arc<Session>,
    params: FeatureParams,
    out: Outbox,
    /// Writes waiting for Data-Out, by ITT.
    gathers: HashMap<u32, PendingWrite>,
    /// Commands that arrived ahead of ExpCmdSN (§4.2.2.1), delivered in order.
    held: Vec<Pdu>,
    tags: TransferTags,
    text_negotiation: TextNegotiation,
    /// Sent once running commands have answered, then the connection closes.
    logout_response: Option<Pdu>,
    /// Deadline for the answer to our NOP-In ping.
    ping: Option<Instant>,
    closing: bool,
}

impl FeatureConnection {
    async fn run(
        &mut self,
        reader: &mut FramedRead<OwnedReadHalf, PduCodec>,
    ) -> anyhow::Result<()> {
        let interval = self.state.settings.nop_in_interval_secs;
        let idle = if interval == 0 {
            Duration::from_secs(365 * 86400)
        } else {
            Duration::from_secs(interval)
        };
        let timeout = Duration::from_secs(self.state.settings.nop_in_timeout_secs.max(1));
        let shutdown = self.session.shutdown.clone();
        let mut quiet_until = Instant::now() + idle;
        while !self.closing {
            let wake = self.ping.unwrap_or(quiet_until);
            let frame = tokio::select! {
                _ = shutdown.cancelled() => {
                    info!("session closed by the target (reinstatement or reset)");
                    return Ok(());
                }
                _ = tokio::time::sleep_until(wake) => {
                    if self.ping.is_some() {
                        anyhow::bail!("initiator did not answer NOP-In within {timeout:?}: dropping dead connection");
                    }
                    let ttt = self.tags.next();
                    let mut p = Pdu::new(Opcode::NopIn);
                    p.set_flags(0x80);
                    p.set_itt(RESERVED_TAG);
                    p.set_u32_at(20, ttt);
                    self.out.one(p);
                    self.ping = Some(Instant::now() + timeout);
                    continue;
                }
                f = reader.next() => f,
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            // Any traffic proves the initiator alive.
            self.ping = None;
            quiet_until = Instant::now() + idle;
            match frame? {
                Ok(pdu) => self.handle(pdu)?,
                Err(BadPdu::DataDigest { bhs }) => {
                    warn!("data digest error: rejecting the PDU (RFC 7143 §7.8)");
                    self.out.one(reject(RejectReason::DataDigestError, &bhs));
                }
                Err(BadPdu::DataSegmentOverLimit { bhs, len, limit }) => {
                    warn!(
                        len,
                        limit, "data segment over MaxRecvDataSegmentLength: rejecting the PDU"
                    );
                    self.out.one(reject(RejectReason::ProtocolError, &bhs));
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, pdu: Pdu) -> anyhow::Result<()> {
        let discovery = self.session.target.is_none();
        match pdu.opcode() {
            Some(Opcode::NopOut) => self.nop_out(pdu),
            Some(Opcode::ScsiCommand) if !discovery => self.ordered(pdu),
            Some(Opcode::DataOut) if !discovery => self.data_out(pdu),
            Some(Opcode::TaskMgmtRequest) if !discovery => self.ordered(pdu),
            Some(Opcode::TextRequest) => self.ordered(pdu),
            Some(Opcode::LogoutRequest) => self.ordered(pdu),
            Some(Opcode::Snack) => {
                debug!("SNACK with ErrorRecoveryLevel 0: rejected");
                self.out.one(reject(RejectReason::ProtocolError, &pdu.bhs));
            }
            Some(op) => {
                warn!(?op, "PDU not allowed in this session: rejected");
                self.out.one(reject(RejectReason::ProtocolError, &pdu.bhs));
            }
            None => {
                warn!(opcode = pdu.raw_opcode(), "unknown opcode: rejected");
                self.out
                    .one(reject(RejectReason::CommandNotSupported, &pdu.bhs));
            }
        }
        Ok(())
    }

    /// CmdSN ordering for commands (§4.2.2.1): immediate ones run at once, the next expected
    /// one runs and releases any held successors, ones ahead of it wait, others are ignored.
    fn ordered(&mut self, pdu: Pdu) {
        if pdu.immediate() {
            self.dispatch(pdu);
            return;
        }
        let sn = pdu.field24();
        if self.session.advance(sn) {
            self.dispatch(pdu);
            while let Some(i) = self
                .held
                .iter()
                .position(|p| p.field24() == self.session.exp_cmd_sn())
            {
                let next = self.held.swap_remove(i);
                self.session.advance(next.field24());
                self.dispatch(next);
            }
        } else if self.session.in_window(sn) && self.held.len() < self.session.queue_depth as usize
        {
            debug!(
                cmd_sn = sn,
                exp = self.session.exp_cmd_sn(),
                "command ahead of ExpCmdSN: held"
            );
            self.held.push(pdu);
        } else {
            debug!(
                cmd_sn = sn,
                exp = self.session.exp_cmd_sn(),
                "CmdSN outside the window: ignored (§4.2.2.1)"
            );
        }
    }

    fn dispatch(&mut self, pdu: Pdu) {
        match pdu.opcode() {
            Some(Opcode::ScsiCommand) => self.scsi_command(pdu),
            Some(Opcode::TaskMgmtRequest) => self.task_management(pdu),
            Some(Opcode::TextRequest) => self.text(pdu),
            Some(Opcode::LogoutRequest) => self.logout(pdu),
            _ => unreachable!("only ordered opcodes are dispatched"),
        }
    }

    fn nop_out(&mut self, pdu: Pdu) {
        if pdu.itt() == RESERVED_TAG {
            // Answer to our ping (§11.18): nothing to send.
            return;
        }
        if !pdu.immediate() {
            self.session.advance(pdu.field24());
        }
        let mut p = Pdu::new(Opcode::NopIn);
        p.set_flags(0x80);
        p.set_lun(pdu.lun());
        p.set_itt(pdu.itt());
        p.set_u32_at(20, RESERVED_TAG);
        let echo = pdu.data.len().min(self.params.max_xmit_segment as usize);
        p.set_data(pdu.data.slice(..echo));
        self.out.one(p);
    }

    fn scsi_command(&mut self, pdu: Pdu) {
        let hdr = match ScsiCommandHeader::parse(&pdu) {
            Ok(h) => h,
            Err(why) => {
                warn!("malformed SCSI command: {why}");
                self.out
                    .one(reject(RejectReason::InvalidPduField, &pdu.bhs));
                return;
            }
        };
        if !pdu.data.is_empty() && (!self.params.immediate_data || !hdr.write) {
            warn!("immediate data not allowed here: rejected");
            self.out.one(reject(RejectReason::ProtocolError, &pdu.bhs));
            return;
        }
        if pdu.data.len() as u64 > self.params.first_burst.min(hdr.expected_len) as u64 {
            warn!(
                len = pdu.data.len(),
                "immediate data beyond FirstBurstLength/expected length: rejected"
            );
            self.out.one(reject(RejectReason::ProtocolError, &pdu.bhs));
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
            self.out.one(reject(RejectReason::TaskInProgress, &pdu.bhs));
            return;
        };
        let target = self.session.target.clone().expect("normal session");
        if hdr.read && hdr.write {
            self.finish_now(
                &task,
                &hdr,
                ScsiResponse::check(Sense::invalid_field_in_cdb(0, None)),
            );
            return;
        }
        match target.scsi.plan(hdr.lun, &hdr.cdb, self.session.nexus) {
            DataOutPlan::Fail(resp) => self.finish_now(&task, &hdr, resp),
            DataOutPlan::None => {
                let residual = if hdr.write {
                    Some(Residual::of(hdr.expected_len, 0))
                } else {
                    None
                };
                self.execute(task, hdr, Bytes::new(), residual);
            }
            DataOutPlan::Gather(need) => {
                let residual = Residual::of(hdr.expected_len, need as u64);
                let mut g = WriteGather::new(
                    &hdr,
                    need,
                    pdu.data.clone(),
                    self.params.first_burst,
                    self.params.initial_r2t,
                    self.params.max_burst,
                    self.params.max_outstanding_r2t,
                );
                if g.complete() {
                    let data = g.take_data();
                    self.execute(task, hdr, data, Some(residual));
                } else {
                    let tags = &mut self.tags;
                    let r2ts = g.next_r2ts(|| tags.next());
                    if !r2ts.is_empty() {
                        self.out.send(r2ts);
                    }
                    self.gathers.insert(
                        hdr.itt,
                        PendingWrite {
                            gather: g,
                            hdr,
                            task,
                            residual,
                        },
                    );
                }
            }
        }
    }

    fn data_out(&mut self, pdu: Pdu) {
        let itt = pdu.itt();
        let Some(pending) = self.gathers.get_mut(&itt) else {
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
            );
            return;
        }
        if pending.gather.complete() {
            let mut p = self.gathers.remove(&itt).expect("present");
            let data = p.gather.take_data();
            self.execute(p.task, p.hdr, data, Some(p.residual));
        } else {
            let tags = &mut self.tags;
            let r2ts = pending.gather.next_r2ts(|| tags.next());
            if !r2ts.is_empty() {
                self.out.send(r2ts);
            }
        }
    }

    /// Answers a command without executing it.
    fn finish_now(&self, task: &Arc<Task>, hdr: &ScsiCommandHeader, resp: ScsiResponse) {
        let pdus = build_response(
            hdr,
            resp,
            self.limits(),
            Some(Residual::of(hdr.expected_len, 0)).filter(|_| hdr.write),
        );
        self.session.remove_task(hdr.itt);
        task.complete_with(|| self.out.send(pdus));
        task.finished();
    }

    fn limits(&self) -> DataInLimits {
        DataInLimits {
            max_xmit_segment: self.params.max_xmit_segment,
            max_burst: self.params.max_burst,
        }
    }

    fn execute(
        &self,
        task: Arc<Task>,
        hdr: ScsiCommandHeader,
        data_out: Bytes,
        residual: Option<Residual>,
    ) {
        if !task.set_running() {
            task.finished();
            return;
        }
        let target = self.session.target.clone().expect("normal session");
        let session = self.session.clone();
        let out = self.out.clone();
        let limits = self.limits();
        tokio::spawn(async move {
            let req = ScsiRequest {
                cdb: hdr.cdb.clone(),
                data_out,
                expected_len: hdr.expected_len,
                nexus: session.nexus,
            };
            let resp = target.scsi.execute(hdr.lun, req).await;
            let pdus = build_response(&hdr, resp, limits, residual);
            session.remove_task(hdr.itt);
            task.complete_with(|| out.send(pdus));
            task.finished();
        });
    }

    /// Task management (§11.5, SAM-5 §7). The response is sent once every affected task has
    /// stopped, so no response of an aborted task can follow it.
    fn task_management(&mut self, pdu: Pdu) {
        let function = pdu.flags() & 0x7f;
        let lun = pdu.lun();
        let ref_itt = pdu.field20();
        let ref_cmd_sn = pdu.u32_at(32);
        let target = self.session.target.clone().expect("normal session");
        let lun_exists = target.scsi.has_lun(lun);
        let mut waiters = Vec::new();
        let mut cold_reset = false;
        let response = match function {
            TMF_ABORT_TASK => {
                self.drop_gather(ref_itt);
                match self.session.abort_task(ref_itt) {
                    Some(w) => {
                        info!(ref_itt, "ABORT TASK: task aborted");
                        waiters.push(w);
                        TMF_COMPLETE
                    }
                    None => {
                        // §11.5.1: a command not received yet but inside the window counts as
                        // received and aborted.
                        let tmf_sn = pdu.field24();
                        if self.session.in_window(ref_cmd_sn) && serial::lt(ref_cmd_sn, tmf_sn) {
                            self.held.retain(|p| p.field24() != ref_cmd_sn);
                            if self.session.advance(ref_cmd_sn) {
                                debug!(
                                    ref_cmd_sn,
                                    "ABORT TASK for a command never received: CmdSN consumed"
                                );
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
                self.drop_gathers_where(|p| p.hdr.lun == lun);
                waiters = self.session.abort_where(|t| t.lun == lun);
                info!(lun, aborted = waiters.len(), "ABORT TASK SET");
                TMF_COMPLETE
            }
            TMF_CLEAR_TASK_SET => {
                // One task set shared by all I_T nexuses (TST=000): clears every session's.
                self.drop_gathers_where(|p| p.hdr.lun == lun);
                for s in self.state.sessions.of_target(&target.iqn) {
                    waiters.extend(s.abort_where(|t| t.lun == lun));
                }
                info!(lun, aborted = waiters.len(), "CLEAR TASK SET");
                TMF_COMPLETE
            }
            TMF_LOGICAL_UNIT_RESET if !lun_exists => TMF_NO_LUN,
            TMF_LOGICAL_UNIT_RESET => {
                self.drop_gathers_where(|p| p.hdr.lun == lun);
                for s in self.state.sessions.of_target(&target.iqn) {
                    waiters.extend(s.abort_where(|t| t.lun == lun));
                }
                target.scsi.logical_unit_reset(lun, self.session.nexus);
                info!(lun, aborted = waiters.len(), "LOGICAL UNIT RESET");
                TMF_COMPLETE
            }
            TMF_TARGET_WARM_RESET | TMF_TARGET_COLD_RESET => {
                self.drop_gathers_where(|_| true);
                for s in self.state.sessions.of_target(&target.iqn) {
                    waiters.extend(s.abort_where(|_| true));
                }
                target.scsi.target_reset(self.session.nexus);
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
        let mut p = Pdu::new(Opcode::TaskMgmtResponse);
        p.set_flags(0x80);
        p.bhs[2] = response;
        p.set_itt(pdu.itt());
        let out = self.out.clone();
        let state = self.state.clone();
        let iqn = target.iqn.clone();
        tokio::spawn(async move {
            wait_stopped(waiters).await;
            out.one(p);
            if cold_reset {
                // §11.5.1: a cold reset closes every connection of the target after the response.
                for s in state.sessions.of_target(&iqn) {
                    s.shutdown.cancel();
                }
            }
        });
    }

    /// Text Request (§11.10): SendTargets and the keys negotiable in full-feature phase.
    fn text(&mut self, pdu: Pdu) {
        let session_type = if self.session.target.is_some() {
            SessionType::Normal
        } else {
            SessionType::Discovery
        };
        let ctx = TextContext {
            targets: &self.state.login.targets,
            portal_group_tag: self.state.login.portal_group_tag,
            portals: &self.state.portals,
            local_addr: self.local,
            session_type,
            initiator_name: &self.session.initiator,
            target_name: self.session.target.as_ref().map(|t| t.iqn.as_str()),
            params: &self.session.params,
        };
        match self.text_negotiation.handle(&pdu, &ctx) {
            TextOutcome::Respond { response, update } => {
                if let Some(m) = update.max_xmit_data_segment_length {
                    info!(max = m, "initiator re-declared MaxRecvDataSegmentLength");
                    self.params.max_xmit_segment = m;
                }
                self.out.one(response);
            }
            TextOutcome::Reject { reason, detail } => {
                warn!("text request rejected: {detail}");
                self.out.one(reject(reason, &pdu.bhs));
            }
        }
    }

    fn drop_gather(&mut self, itt: u32) {
        self.gathers.remove(&itt);
    }

    fn drop_gathers_where(&mut self, pred: impl Fn(&PendingWrite) -> bool) {
        self.gathers.retain(|_, p| !pred(p));
    }

    /// Logout (§11.14). Outstanding commands finish before the response (§6.3.? close session
    /// semantics); connection recovery is not offered at ErrorRecoveryLevel 0.
    fn logout(&mut self, pdu: Pdu) {
        let reason = pdu.flags() & 0x7f;
        let cid = u16::from_be_bytes([pdu.bhs[20], pdu.bhs[21]]);
        let response = match reason {
            0 => 0,
            1 if cid == self.params.cid => 0,
            1 => 1,
            _ => 2,
        };
        let mut p = Pdu::new(Opcode::LogoutResponse);
        p.set_flags(0x80);
        p.bhs[2] = response;
        p.set_itt(pdu.itt());
        info!(reason, response, "logout");
        if response != 0 {
            self.out.one(p);
            return;
        }
        self.closing = true;
        self.gathers.clear();
        self.logout_response = Some(p);
    }
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
