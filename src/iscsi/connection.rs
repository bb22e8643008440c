//! One iSCSI connection: login phase, then the full-feature phase (RFC 7143 §4, §7, §11).
//!
//! The reader half runs the protocol. A command is first polled once right in the reader
//! (a page-cache read completes there, with no task hop); one that has to wait for the
//! store continues in its own task. Responses go through the [`Outbox`]: StatSN, ExpCmdSN
//! and MaxCmdSN are stamped into every PDU in the order the PDUs are queued, so responses
//! leave in StatSN order whatever order commands finish in. When nothing is queued the
//! sender writes to the socket itself; a writer task takes over whatever the socket did not
//! accept at once and everything queued meanwhile.

use super::context::IscsiContext;
use super::ffp::{build_response, reject, DataInLimits, Residual, ScsiCommandHeader, WriteGather};
use super::negotiation::SessionType;
use super::pdu::{
    serial, BadPdu, FramingError, Opcode, Pdu, PduCodec, RejectReason, WireBatch, RESERVED_TAG,
};
use super::session::{wait_stopped, Session, Task, TaskState};
use super::text::{TextContext, TextNegotiation, TextOutcome};
use crate::scsi::{DataOutPlan, ScsiRequest, ScsiResponse, Sense};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
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

/// Bytes the writer task gathers into one vectored write at most.
const MAX_WRITE_BATCH: usize = 4 << 20;

/// The sending side of a connection, shared by the reader, command tasks and the writer task.
#[derive(Clone)]
struct Outbox(Arc<OutboxShared>);

struct OutboxShared {
    wr: OwnedWriteHalf,
    session: Arc<Session>,
    params: FeatureParams,
    state: Mutex<OutState>,
    /// Hands the socket to the writer task.
    wake_writer: Notify,
}

struct OutState {
    stat_sn: u32,
    /// Encoded PDUs not yet handed to the socket, in StatSN order.
    queued: WireBatch,
    /// What a direct write left over (the socket was full), sent before `queued`.
    leftover: Vec<Bytes>,
    /// Someone (a direct sender or the writer task) owns the socket; others only queue.
    busy: bool,
    /// The socket was handed to the writer task (it stays `busy` until the task is done).
    writer_owns: bool,
    /// Flush what is queued, then shut the socket down; later PDUs are dropped.
    closing: bool,
    /// The socket failed; nothing more is sent.
    failed: bool,
}

impl OutboxShared {
    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Outbox {
    fn new(
        wr: OwnedWriteHalf,
        session: Arc<Session>,
        params: FeatureParams,
        stat_sn: u32,
    ) -> Outbox {
        Outbox(Arc::new(OutboxShared {
            wr,
            session,
            params,
            state: Mutex::new(OutState {
                stat_sn,
                queued: WireBatch::default(),
                leftover: Vec::new(),
                busy: false,
                writer_owns: false,
                closing: false,
                failed: false,
            }),
            wake_writer: Notify::new(),
        }))
    }

    /// Stamps and queues `pdus`. If the socket is free and no other command is outstanding
    /// (so no other response is about to follow), writes them right away, as much as the
    /// socket takes without blocking; the writer task sends the rest.
    fn send(&self, pdus: Vec<Pdu>) {
        let sh = &*self.0;
        let mut st = sh.lock();
        if st.closing || st.failed {
            return;
        }
        for mut p in pdus {
            stamp(&mut p, &sh.session, &mut st.stat_sn);
            st.queued
                .push(&p, sh.params.header_digest, sh.params.data_digest);
        }
        if st.busy {
            return;
        }
        st.busy = true;
        if sh.session.active_tasks() > 0 {
            // More responses are coming: let the writer task gather them into one write
            // (one syscall for many PDUs at high queue depth).
            st.writer_owns = true;
            drop(st);
            sh.wake_writer.notify_one();
            return;
        }
        let segments = st.queued.take();
        drop(st);
        let result = write_now(&sh.wr, segments);
        let mut st = sh.lock();
        match result {
            Ok(rest) => st.leftover = rest,
            Err(e) => {
                debug!("write failed: {e}");
                st.failed = true;
            }
        }
        if st.leftover.is_empty() && st.queued.is_empty() && !st.closing && !st.failed {
            st.busy = false;
        } else {
            // Stays busy: the writer task owns the socket until everything is out.
            st.writer_owns = true;
            drop(st);
            sh.wake_writer.notify_one();
        }
    }

    fn one(&self, pdu: Pdu) {
        self.send(vec![pdu]);
    }

    /// Flushes what is queued, then shuts the socket down (the writer task ends).
    fn close(&self) {
        let mut st = self.0.lock();
        st.closing = true;
        if !st.busy {
            st.busy = true;
            st.writer_owns = true;
            drop(st);
            self.0.wake_writer.notify_one();
        }
    }
}

/// Writes as much of `segments` as the socket takes without blocking; returns the rest.
fn write_now(wr: &OwnedWriteHalf, mut segments: Vec<Bytes>) -> std::io::Result<Vec<Bytes>> {
    while !segments.is_empty() {
        let n = {
            let slices: Vec<std::io::IoSlice<'_>> = segments
                .iter()
                .take(64)
                .map(|s| std::io::IoSlice::new(s))
                .collect();
            match wr.try_write_vectored(&slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(segments),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            }
        };
        consume(&mut segments, n);
    }
    Ok(segments)
}

/// Drops the first `n` bytes of `segments`.
fn consume(segments: &mut Vec<Bytes>, mut n: usize) {
    let mut whole = 0;
    for s in segments.iter_mut() {
        if n >= s.len() {
            n -= s.len();
            whole += 1;
        } else {
            let _ = s.split_to(n);
            break;
        }
    }
    segments.drain(..whole);
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve(stream: TcpStream, ctx: Arc<IscsiContext>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = stream.local_addr().ok();
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("conn", peer = %peer);
    async move {
        debug!("connection accepted");
        match run(stream, local, ctx).await {
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
    ctx: Arc<IscsiContext>,
) -> anyhow::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, PduCodec::default());
    let login_timeout = ctx.timers.login_timeout;
    let login = tokio::time::timeout(
        login_timeout,
        super::login_driver::drive_login(&mut reader, &mut wr, &ctx, local),
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
    let out = Outbox::new(wr, session.clone(), params, logged_in.next_stat_sn);
    let writer = tokio::spawn(write_loop(out.clone()).instrument(span.clone()));
    let mut conn = FeatureConnection {
        local,
        ctx: ctx.clone(),
        session: session.clone(),
        params,
        out,
        gathers: HashMap::new(),
        held: Vec::new(),
        early_data_out: HashMap::new(),
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
    ctx.sessions.unregister(&session);
    conn.out.close();
    drop(conn);
    let _ = writer.await;
    wait_stopped(waiters).await;
    let _g = span.enter();
    match &result {
        Ok(()) => info!("session connection closed"),
        // open-iscsi ends every discovery session with a TCP reset once it has the
        // SendTargets answer: its normal close, not a fault.
        Err(e) if session.target.is_none() && closed_by_peer(e) => {
            info!("discovery session closed by the initiator ({e})")
        }
        Err(e) => warn!("session connection dropped: {e}"),
    }
    result
}

/// Whether `e` is the peer closing or resetting the TCP connection.
fn closed_by_peer(e: &anyhow::Error) -> bool {
    let peer_close = |io: &std::io::Error| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
        )
    };
    e.chain().any(|c| match c.downcast_ref::<FramingError>() {
        Some(FramingError::Io(io)) => peer_close(io),
        Some(_) => false,
        None => c.downcast_ref::<std::io::Error>().is_some_and(peer_close),
    })
}

/// The writer task: owns the socket while a direct send could not finish (socket full) and
/// until everything queued meanwhile is out; then gives it back (`busy = false`).
async fn write_loop(out: Outbox) {
    let sh = &*out.0;
    loop {
        sh.wake_writer.notified().await;
        if !sh.lock().writer_owns {
            continue;
        }
        loop {
            let mut segments = {
                let mut st = sh.lock();
                if st.failed {
                    return;
                }
                let mut segments = std::mem::take(&mut st.leftover);
                if st.queued.len() < MAX_WRITE_BATCH || segments.is_empty() {
                    segments.extend(st.queued.take());
                }
                if segments.is_empty() {
                    if st.closing {
                        drop(st);
                        // SAFETY: shutdown(2) on the socket this half refers to; it stays
                        // open as long as `out` holds the write half.
                        unsafe { libc::shutdown(sh.wr.as_ref().as_raw_fd(), libc::SHUT_WR) };
                        return;
                    }
                    st.busy = false;
                    st.writer_owns = false;
                    break;
                }
                segments
            };
            while !segments.is_empty() {
                let result = match sh.wr.writable().await {
                    Ok(()) => write_now(&sh.wr, segments),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(rest) => segments = rest,
                    Err(e) => {
                        debug!("write failed: {e}");
                        sh.lock().failed = true;
                        return;
                    }
                }
            }
        }
    }
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
    ctx: Arc<IscsiContext>,
    session: Arc<Session>,
    params: FeatureParams,
    out: Outbox,
    /// Writes waiting for Data-Out, by ITT.
    gathers: HashMap<u32, PendingWrite>,
    /// Commands that arrived ahead of ExpCmdSN (§4.2.2.1), delivered in order.
    held: Vec<Pdu>,
    /// Unsolicited Data-Out that arrived for a held command, by ITT; replayed when the
    /// command is dispatched. At most FirstBurstLength bytes per command.
    early_data_out: HashMap<u32, Vec<Pdu>>,
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
        let idle = self
            .ctx
            .timers
            .nop_in_interval
            .unwrap_or(Duration::from_secs(365 * 86400));
        let timeout = self.ctx.timers.nop_in_timeout;
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
        let early = self.early_data_out.remove(&pdu.itt()).unwrap_or_default();
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
                    let itt = hdr.itt;
                    self.gathers.insert(
                        itt,
                        PendingWrite {
                            gather: g,
                            hdr,
                            task,
                            residual,
                        },
                    );
                    for p in early {
                        self.data_out(p);
                    }
                }
            }
        }
    }

    fn data_out(&mut self, pdu: Pdu) {
        let itt = pdu.itt();
        let Some(pending) = self.gathers.get_mut(&itt) else {
            if self.hold_early_data_out(&pdu) {
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
            );
            return;
        }
        if pending.gather.complete() {
            let p = self.gathers.remove(&itt).expect("present");
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

    /// Keeps unsolicited Data-Out for a command still held for CmdSN order: the initiator
    /// sends it right behind the command (§4.2.2.1 only orders commands), so it can arrive
    /// before the command may run. Returns whether the PDU was kept.
    fn hold_early_data_out(&mut self, pdu: &Pdu) -> bool {
        let itt = pdu.itt();
        if pdu.field20() != RESERVED_TAG
            || !self
                .held
                .iter()
                .any(|c| c.itt() == itt && c.opcode() == Some(Opcode::ScsiCommand))
        {
            return false;
        }
        let kept = self.early_data_out.entry(itt).or_default();
        let bytes: usize = kept.iter().map(|p| p.data.len()).sum();
        if bytes + pdu.data.len() > self.params.first_burst as usize {
            warn!(
                itt,
                "unsolicited Data-Out beyond FirstBurstLength for a held command: dropped"
            );
            return true;
        }
        debug!(
            itt,
            "unsolicited Data-Out for a command held for CmdSN order: kept"
        );
        kept.push(pdu.clone());
        true
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
        let mut command = Box::pin(async move {
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
        // One poll right here: a command the store finishes at once (a page-cache hit)
        // answers without a task hop. The no-op waker is safe because a command still
        // pending is spawned, and the task's first poll registers its own waker everywhere
        // the command waits.
        if command
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
        {
            tokio::spawn(command);
        }
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
                            self.early_data_out
                                .retain(|itt, _| self.held.iter().any(|p| p.itt() == *itt));
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
                for s in self.ctx.sessions.of_target(&target.iqn) {
                    waiters.extend(s.abort_where(|t| t.lun == lun));
                }
                info!(lun, aborted = waiters.len(), "CLEAR TASK SET");
                TMF_COMPLETE
            }
            TMF_LOGICAL_UNIT_RESET if !lun_exists => TMF_NO_LUN,
            TMF_LOGICAL_UNIT_RESET => {
                self.drop_gathers_where(|p| p.hdr.lun == lun);
                for s in self.ctx.sessions.of_target(&target.iqn) {
                    waiters.extend(s.abort_where(|t| t.lun == lun));
                }
                target.scsi.logical_unit_reset(lun, self.session.nexus);
                info!(lun, aborted = waiters.len(), "LOGICAL UNIT RESET");
                TMF_COMPLETE
            }
            TMF_TARGET_WARM_RESET | TMF_TARGET_COLD_RESET => {
                self.drop_gathers_where(|_| true);
                for s in self.ctx.sessions.of_target(&target.iqn) {
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
        let ctx = self.ctx.clone();
        let iqn = target.iqn.clone();
        tokio::spawn(async move {
            wait_stopped(waiters).await;
            out.one(p);
            if cold_reset {
                // §11.5.1: a cold reset closes every connection of the target after the response.
                for s in ctx.sessions.of_target(&iqn) {
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
            targets: &self.ctx.login.targets,
            portal_group_tag: self.ctx.login.portal_group_tag,
            portals: &self.ctx.portals,
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
        self.early_data_out.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_or_eof_is_the_peer_closing_and_other_errors_are_not() {
        let io = |k| std::io::Error::new(k, "x");
        for k in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::BrokenPipe,
        ] {
            assert!(closed_by_peer(&anyhow::Error::from(FramingError::Io(io(
                k
            )))));
            assert!(closed_by_peer(
                &anyhow::Error::from(io(k)).context("reading a PDU")
            ));
        }
        assert!(!closed_by_peer(&anyhow::Error::from(FramingError::Io(io(
            std::io::ErrorKind::TimedOut
        )))));
        assert!(!closed_by_peer(&anyhow::Error::from(
            FramingError::DataSegmentTooLarge(1 << 30)
        )));
        assert!(!closed_by_peer(&anyhow::anyhow!(
            "initiator did not answer NOP-In within 5s"
        )));
    }
}
