//! One iSCSI connection: login phase, then the full-feature phase (RFC 7143 §4, §7, §11).
//!
//! The reader half feeds every PDU and the ping timer to the sans-IO [`Sequencer`], which
//! holds the protocol rules, and carries out the actions it emits at once. A command is first
//! polled once right in the reader (a page-cache read completes there, with no task hop);
//! one that has to wait for the store continues in its own task. Responses go through the [`Outbox`]: StatSN, ExpCmdSN
//! and MaxCmdSN are stamped into every PDU in the order the PDUs are queued, so responses
//! leave in StatSN order whatever order commands finish in. When nothing is queued the
//! sender writes to the socket itself; a writer task takes over whatever the socket did not
//! accept at once and everything queued meanwhile.

use super::budget::Charge;
use super::context::IscsiContext;
use super::ffp::build_response;
use super::pdu::{FramingError, Opcode, Pdu, PduCodec, WireBatch, RESERVED_TAG};
use super::sequencer::{session_type, Action, Command, Env, Event, Sequencer, Waiter};
use super::session::{wait_stopped, Session, TargetEntry};
use super::text::TextContext;
use crate::scsi::{DataOutPlan, PlannedCommand, ScsiRequest};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn, Instrument};

pub use super::sequencer::FeatureParams;

/// Bytes the writer task gathers into one vectored write at most.
const MAX_WRITE_BATCH: usize = 4 << 20;

/// Below this many queued bytes the woken writer task lets the other ready tasks run first
/// (see [`write_loop`]); a larger response leaves at once.
const WRITER_YIELD_BELOW: usize = 64 * 1024;

/// Room for received PDUs per read of the socket. With tokio-util's default (8 KiB) one `recv`
/// took at most one 4 KiB WRITE with its immediate data, so a busy connection paid a system
/// call per command; 64 KiB (the most `BytesMut` keeps as its refill size) takes a burst.
/// Write data is copied out at once (into the gather buffer), and PDUs kept for commands that
/// cannot run yet get their own allocation (`sequencer::own_data`), so a block is not pinned
/// for long.
pub(crate) const READ_BUF: usize = 64 * 1024;

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

/// Who may write to the socket. One owner at a time keeps the bytes of PDUs from
/// interleaving and keeps them in StatSN order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketOwner {
    /// Nobody: the next sender writes directly.
    Free,
    /// A sender is writing directly (without blocking) from its own thread.
    Direct,
    /// The writer task owns the socket until everything queued (and any leftover) is out.
    Writer,
}

struct OutState {
    stat_sn: u32,
    /// Encoded PDUs not yet handed to the socket, in StatSN order.
    queued: WireBatch,
    /// What a direct write left over (the socket was full), sent before `queued`.
    leftover: Vec<Bytes>,
    /// Who writes to the socket now; while someone does, others only queue.
    socket: SocketOwner,
    /// Flush what is queued, then shut the socket down; later PDUs are dropped.
    closing: bool,
    /// The socket failed; nothing more is sent.
    failed: bool,
    /// Bytes ever queued, and ever accepted by the socket: positions in the byte stream.
    queued_total: u64,
    written_total: u64,
    /// Memory charges of responses not yet out, with the stream position where each ends:
    /// a read's Data-In stays charged until the socket has taken it.
    charges: VecDeque<(u64, Charge)>,
}

impl OutState {
    /// The socket took `n` more bytes: release the charges of responses now fully out.
    fn written(&mut self, n: usize) {
        self.written_total += n as u64;
        while self
            .charges
            .front()
            .is_some_and(|(end, _)| *end <= self.written_total)
        {
            self.charges.pop_front();
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.charges.clear();
    }
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
                socket: SocketOwner::Free,
                closing: false,
                failed: false,
                queued_total: 0,
                written_total: 0,
                charges: VecDeque::new(),
            }),
            wake_writer: Notify::new(),
        }))
    }

    /// Stamps and queues `pdus`. If the socket is free and no other command is outstanding
    /// (so no other response is about to follow), writes them right away, as much as the
    /// socket takes without blocking; the writer task sends the rest.
    fn send(&self, pdus: Vec<Pdu>) {
        self.send_charged(pdus, Charge::none());
    }

    /// [`Outbox::send`], keeping `charge` until the socket has taken these PDUs.
    fn send_charged(&self, pdus: Vec<Pdu>, charge: Charge) {
        let sh = &*self.0;
        let mut st = sh.lock();
        if st.closing || st.failed {
            return;
        }
        let before = st.queued.len();
        for mut p in pdus {
            stamp(&mut p, &sh.session, &mut st.stat_sn);
            st.queued
                .push(&p, sh.params.header_digest, sh.params.data_digest);
        }
        st.queued_total += (st.queued.len() - before) as u64;
        if charge.bytes() > 0 {
            let end = st.queued_total;
            st.charges.push_back((end, charge));
        }
        if st.socket != SocketOwner::Free {
            return;
        }
        if sh.session.active_tasks() > 0 {
            // More responses are coming: let the writer task gather them into one write
            // (one syscall for many PDUs at high queue depth).
            st.socket = SocketOwner::Writer;
            drop(st);
            sh.wake_writer.notify_one();
            return;
        }
        st.socket = SocketOwner::Direct;
        let segments = st.queued.take();
        drop(st);
        let result = write_now(&sh.wr, segments);
        let mut st = sh.lock();
        match result {
            Ok((rest, n)) => {
                st.leftover = rest;
                st.written(n);
            }
            Err(e) => {
                debug!("write failed: {e}");
                st.fail();
            }
        }
        if st.leftover.is_empty() && st.queued.is_empty() && !st.closing && !st.failed {
            st.socket = SocketOwner::Free;
        } else {
            // The writer task takes the socket over until everything is out.
            st.socket = SocketOwner::Writer;
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
        if st.socket == SocketOwner::Free {
            st.socket = SocketOwner::Writer;
            drop(st);
            self.0.wake_writer.notify_one();
        }
    }
}

/// Writes as much of `segments` as the socket takes without blocking; returns the rest and
/// the number of bytes written.
fn write_now(
    wr: &OwnedWriteHalf,
    mut segments: Vec<Bytes>,
) -> std::io::Result<(Vec<Bytes>, usize)> {
    let mut written = 0;
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
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok((segments, written))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            }
        };
        consume(&mut segments, n);
        written += n;
    }
    Ok((segments, written))
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
    let peer_addr = stream.peer_addr().ok();
    let peer = peer_addr.map(|a| a.to_string()).unwrap_or_default();
    let local = stream.local_addr().ok();
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("conn", peer = %peer);
    async move {
        debug!("connection accepted");
        match run(stream, local, peer_addr, ctx).await {
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
    peer: Option<std::net::SocketAddr>,
    ctx: Arc<IscsiContext>,
) -> anyhow::Result<()> {
    // Connections in the login phase hold buffers and a timer each: bounded, and one more
    // is closed at once rather than queued.
    let Ok(login_permit) = ctx.logins.clone().try_acquire_owned() else {
        if let Some(n) = ctx.login_refusals.count(std::time::Instant::now()) {
            warn!(
                refused = n,
                max = ctx.limits.max_logins,
                "connection closed: too many connections in the login phase \
                 (server.max_logins_in_progress)"
            );
        }
        return Ok(());
    };
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::with_capacity(rd, PduCodec::default(), READ_BUF);
    // The login timeout bounds a login held back by the authentication throttle too (its
    // longest wait, 5 s, is well below the default 15 s).
    let login_timeout = ctx.timers.login_timeout;
    let login = tokio::time::timeout(
        login_timeout,
        super::login_driver::drive_login(&mut reader, &mut wr, &ctx, peer),
    )
    .await
    .map_err(|_| anyhow::anyhow!("login did not complete within {login_timeout:?}"))??;
    drop(login_permit);
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
    let mut seq = Sequencer::<PlannedCommand>::new(
        session.clone(),
        params,
        ctx.timers.nop_in_interval,
        ctx.timers.nop_in_timeout,
        Instant::now(),
    );
    let mut io = Io {
        ctx: &ctx,
        session: &session,
        out: &out,
        local,
    };
    let result = feature_phase(&mut seq, &mut io, &mut reader)
        .instrument(span.clone())
        .await;
    if let Some(p) = seq.take_logout_response() {
        // §11.14: commands still running answer before the Logout Response; bounded so a
        // hung backing device cannot hold the logout forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        while session.active_tasks() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.one(p);
    }
    // Tasks of a connection that is gone can never be answered: stop them.
    let waiters = session.abort_where(|_| true);
    if ctx.sessions.unregister(&session) {
        // The I_T nexus is gone (a reinstated session's nexus lives on in the new one).
        if let Some(t) = &session.target {
            t.scsi.nexus_closed(session.nexus);
        }
    }
    out.close();
    drop(seq);
    drop(out);
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
/// until everything queued meanwhile is out; then gives it back ([`SocketOwner::Free`]).
async fn write_loop(out: Outbox) {
    let sh = &*out.0;
    loop {
        sh.wake_writer.notified().await;
        let small = {
            let st = sh.lock();
            if st.socket != SocketOwner::Writer {
                continue;
            }
            st.queued.len() < WRITER_YIELD_BELOW
        };
        // Woken by the first of a burst of responses (commands that a batch of the peer's
        // acks completed together): tokio runs a task woken by a running one next, so
        // without this each response left in its own write. The other ready tasks queue
        // theirs first and one vectored write carries them all.
        if small {
            tokio::task::yield_now().await;
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
                        // FIN after the last byte; the socket stays open while `out` holds
                        // the write half. A socket already reset has nothing to shut down.
                        let _ = socket2::SockRef::from(sh.wr.as_ref())
                            .shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    st.socket = SocketOwner::Free;
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
                    Ok((rest, n)) => {
                        segments = rest;
                        if n > 0 {
                            sh.lock().written(n);
                        }
                    }
                    Err(e) => {
                        debug!("write failed: {e}");
                        sh.lock().fail();
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
        p.set_stat_sn(*stat_sn);
        if adv {
            *stat_sn = stat_sn.wrapping_add(1);
        }
    }
    p.set_exp_cmd_sn(session.exp_cmd_sn());
    p.set_max_cmd_sn(session.max_cmd_sn());
}

/// The [`Env`] of a connection's [`Sequencer`]: the SCSI target, the other sessions of the
/// target, and the [`Outbox`]. Every action is carried out the moment the rules emit it.
struct Io<'a> {
    ctx: &'a Arc<IscsiContext>,
    session: &'a Arc<Session>,
    out: &'a Outbox,
    local: Option<std::net::SocketAddr>,
}

impl Io<'_> {
    fn target(&self) -> &Arc<TargetEntry> {
        self.session.target.as_ref().expect("normal session")
    }
}

impl Env for Io<'_> {
    type Planned = PlannedCommand;

    fn plan(&mut self, lun: u64, cdb: &[u8]) -> DataOutPlan {
        self.target().scsi.plan(lun, cdb, self.session.nexus)
    }

    fn has_lun(&self, lun: u64) -> bool {
        self.target().scsi.has_lun(lun)
    }

    fn abort_target_tasks(&mut self, lun: Option<u64>) -> Vec<Waiter> {
        let mut waiters = Vec::new();
        for s in self.ctx.sessions.of_target(&self.target().iqn) {
            waiters.extend(s.abort_where(|t| lun.is_none_or(|l| t.lun == l)));
        }
        waiters
    }

    fn data_in_len(&self, planned: &PlannedCommand) -> u64 {
        planned.data_in_len()
    }

    fn data_out_unit(&self, planned: &PlannedCommand) -> u32 {
        planned.data_out_unit()
    }

    fn text_context(&self) -> TextContext<'_> {
        TextContext {
            targets: &self.ctx.login.targets,
            portal_group_tag: self.ctx.login.portal_group_tag,
            portals: &self.ctx.portals,
            local_addr: self.local,
            session_type: session_type(self.session),
            initiator_name: &self.session.initiator,
            target_name: self.session.target.as_ref().map(|t| t.iqn.as_str()),
            params: &self.session.params,
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Send(pdus) => self.out.send(pdus),
            Action::Respond { task, pdus } => {
                task.complete_with(|| self.out.send(pdus));
                task.finished();
            }
            Action::Execute(command) => self.execute(command),
            Action::LogicalUnitReset { lun } => {
                self.target()
                    .scsi
                    .logical_unit_reset(lun, self.session.nexus);
            }
            Action::TargetReset => self.target().scsi.target_reset(self.session.nexus),
            Action::TmfResponse {
                response,
                waiters,
                close_target_sessions,
            } => {
                let out = self.out.clone();
                let close =
                    close_target_sessions.then(|| (self.ctx.clone(), self.target().iqn.clone()));
                tokio::spawn(async move {
                    wait_stopped(waiters).await;
                    out.one(response);
                    if let Some((ctx, iqn)) = close {
                        // §11.5.1: a cold reset closes every connection of the target after
                        // the response.
                        for s in ctx.sessions.of_target(&iqn) {
                            s.shutdown.cancel();
                        }
                    }
                });
            }
        }
    }
}

impl Io<'_> {
    /// Runs a command: one poll right here, so a command the store finishes at once (a
    /// page-cache hit) answers without a task hop; one still pending continues in its own
    /// task. The no-op waker is safe because a pending command is spawned, and the task's
    /// first poll registers its own waker everywhere the command waits.
    fn execute(&self, c: Command) {
        let target = self.target().clone();
        let session = self.session.clone();
        let out = self.out.clone();
        let mut command = Box::pin(async move {
            let req = ScsiRequest {
                cdb: c.hdr.cdb.clone(),
                data_out: c.data_out,
                expected_len: c.hdr.expected_len,
                nexus: session.nexus,
            };
            // A command whose work the logical unit owns (SANITIZE) only waits for it: an
            // abort ends the wait (no response), the work goes on. Any other command runs to
            // its end, so the abort's response follows its last store access.
            let resp = if c.planned.owned_by_unit() {
                tokio::select! {
                    r = target.scsi.execute(c.planned, req) => r,
                    () = c.task.aborted() => {
                        session.remove_task(c.hdr.itt);
                        c.task.finished();
                        return;
                    }
                }
            } else {
                target.scsi.execute(c.planned, req).await
            };
            let pdus = build_response(&c.hdr, resp, c.limits, c.residual);
            session.remove_task(c.hdr.itt);
            let charge = c.charge;
            c.task.complete_with(|| out.send_charged(pdus, charge));
            c.task.finished();
        });
        if command
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
        {
            tokio::spawn(command);
        }
    }
}

/// Feeds PDUs, rejected PDUs and the ping timer to the sequencer until the connection ends:
/// the initiator closes it, a Logout is accepted, or the target closes the session.
async fn feature_phase(
    seq: &mut Sequencer,
    io: &mut Io<'_>,
    reader: &mut FramedRead<OwnedReadHalf, PduCodec>,
) -> anyhow::Result<()> {
    let shutdown = io.session.shutdown.clone();
    let mut freed = io.session.budget.freed();
    // One cancellation wait and one timer for the whole phase, not one each per PDU (each
    // would register and deregister itself on every round). Activity moves the deadline
    // later on nearly every PDU: the timer is re-armed only when it fires early or the
    // deadline moves earlier.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let timer = tokio::time::sleep_until(seq.deadline());
    tokio::pin!(timer);
    while !seq.closing() {
        let event = tokio::select! {
            _ = &mut cancelled => {
                info!("session closed by the target (reinstatement or reset)");
                return Ok(());
            }
            _ = &mut timer => {
                let deadline = seq.deadline();
                if deadline > Instant::now() {
                    timer.as_mut().reset(deadline);
                    continue;
                }
                Event::Timer
            }
            _ = freed.changed(), if seq.waiting_for_budget() => Event::BudgetFreed,
            f = reader.next() => match f {
                None => return Ok(()),
                Some(f) => match f? {
                    Ok(pdu) => Event::Pdu(pdu),
                    Err(bad) => Event::Bad(bad),
                },
            },
        };
        // Seen before the rules run: a release while they run wakes the next round.
        freed.borrow_and_update();
        seq.handle(event, Instant::now(), io)?;
        let deadline = seq.deadline();
        if deadline < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(deadline);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::negotiation::SessionParams;
    use crate::iscsi::session::{NewSession, SessionRegistry};
    use crate::scsi::ScsiTarget;
    use tokio::net::TcpListener;

    fn nop_in(itt: u32, len: usize) -> Pdu {
        let mut p = Pdu::new(Opcode::NopIn);
        p.set_flags(0x80);
        p.set_itt(itt);
        p.set_u32_at(20, RESERVED_TAG);
        p.set_data(Bytes::from(vec![itt as u8; len]));
        p
    }

    /// Both send paths (direct, and the writer task when commands are outstanding or the
    /// socket is full) deliver every PDU once, in StatSN order, and close flushes first.
    #[tokio::test]
    async fn outbox_keeps_stat_sn_order_on_both_paths_and_flushes_before_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_rd, wr) = accepted.unwrap().0.into_split();
        let reg = SessionRegistry::default();
        let target = Arc::new(TargetEntry {
            iqn: "iqn.x:t".into(),
            scsi: Arc::new(ScsiTarget::new(vec![])),
        });
        let (session, _) = reg.register(
            reg.allocate_tsih(),
            NewSession {
                initiator: "iqn.x:i".into(),
                isid: [1; 6],
                target: Some(target),
                exp_cmd_sn: 1,
                queue_depth: 8,
                params: SessionParams::default(),
                cid: 0,
                budget: crate::iscsi::budget::SessionBudget::unlimited(),
            },
        );
        let params = FeatureParams {
            header_digest: false,
            data_digest: false,
            max_recv_segment: 8192,
            max_xmit_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 1,
            cid: 0,
        };
        let out = Outbox::new(wr, session.clone(), params, 100);
        let writer = tokio::spawn(write_loop(out.clone()));
        // Direct: nothing outstanding.
        out.one(nop_in(1, 16));
        // Larger than a socket buffer takes at once: the writer task sends the rest.
        out.one(nop_in(2, 8 << 20));
        out.one(nop_in(3, 16));
        // A command outstanding: the writer task batches.
        session.add_task(9, 0, 1, false).unwrap();
        out.send(vec![nop_in(4, 16), nop_in(5, 16)]);
        session.remove_task(9);
        out.close();
        out.one(nop_in(6, 16));
        let mut reader = FramedRead::new(
            client.unwrap(),
            PduCodec {
                max_recv_data_segment: 16 << 20,
                ..PduCodec::default()
            },
        );
        let mut got = Vec::new();
        while let Some(frame) = reader.next().await {
            let p = frame.unwrap().unwrap();
            got.push((p.itt(), p.u32_at(24), p.data.len()));
        }
        writer.await.unwrap();
        assert_eq!(
            got,
            vec![
                (1, 100, 16),
                (2, 101, 8 << 20),
                (3, 102, 16),
                (4, 103, 16),
                (5, 104, 16)
            ],
            "every PDU once, in StatSN order; nothing after close"
        );
    }

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
