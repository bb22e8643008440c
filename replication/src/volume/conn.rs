//! Connection management: accept and dial loops with back-off, the sync handshake
//! (`drbd_receiver.c` `drbd_sync_handshake`), the receive loop with keepalive, and teardown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use twinsan_throttle::{Admitted, Attempt, LogAction};

use super::machine::{Action, Event};
use super::{
    lock, LinkHandle, PendingKind, ReplicatedVolume, Reply, Role, LINK_QUEUE, LINK_READ_BUF,
};
use crate::drbd::{GenerationUuids, MdFlags};
use crate::link::proto::{VERIFY_BLOCK, WIRE_CRASHED_PRIMARY, WIRE_DISCARD_MY_DATA};
use crate::link::{
    establish, link_channel, DiskState, Established, FrameCodec, LinkError, LinkSender, LocalHello,
    Message,
};
use crate::policy::{Outcome, Side};
use crate::store::{check_range, WriteMode};

type Est = Established<TcpStream>;

/// What link refusals are counted by: the direction ("incoming", "outgoing") and the peer's
/// address.
pub(super) type LinkKey = (&'static str, std::net::IpAddr);
type Stream = FramedRead<OwnedReadHalf, FrameCodec>;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl ReplicatedVolume {
    pub(super) fn start_tasks(self: &Arc<Self>, listener: TcpListener) {
        let (tx, rx) = mpsc::channel::<Est>(4);
        self.spawn(accept_loop(self.clone(), listener, tx.clone()));
        self.spawn(dial_loop(self.clone(), tx));
        self.spawn(manager(self.clone(), rx));
    }

    fn local_hello(&self) -> LocalHello {
        let st = lock(&self.st);
        let uuids = lock(&self.md).md.uuids();
        LocalHello {
            volume_name: self.cfg.name.clone(),
            size_bytes: self.usable,
            secret: self.cfg.secret.clone(),
            node_id: self.node_id,
            role: st.m.role(),
            uuids,
            flags: Self::wire_flags(&st),
        }
    }

    fn wants_dial(&self) -> bool {
        let st = lock(&self.st);
        st.link.is_none() && st.m.wants_dial()
    }

    /// Logs a failed connection. Refusals (wrong secret, mismatched configuration, refused by
    /// the peer) repeat with every retry of a misconfigured pair: the first of a burst is an
    /// error, then a count now and then, and the total when the link authenticates.
    /// `attempt`: the throttle's slot of an incoming connection, which the refusal is the
    /// verdict of (dropped without one for other errors).
    fn log_link_error(
        &self,
        e: &LinkError,
        addr: SocketAddr,
        dir: &'static str,
        attempt: Option<Attempt<'_, LinkKey>>,
    ) {
        let action = if e.is_refusal() {
            let key = (dir, addr.ip());
            let now = Instant::now();
            let action = match attempt {
                Some(a) => a.failed(now),
                None => self.link_throttle.lock().failed(&key, now),
            };
            for ended in self.link_throttle.lock().expire(now) {
                info!(volume = %self.cfg.name, peer = %ended.key.1,
                    "{} peer connections: {} refusals in {:.0?}, then none for a while",
                    ended.key.0, ended.burst.failures, ended.burst.lasted);
            }
            action
        } else {
            LogAction::First
        };
        match (e, action) {
            (LinkError::WrongDirection, _) => {
                debug!(volume = %self.cfg.name, %addr, "{dir} connection dropped: {e}")
            }
            (_, LogAction::Quiet) => {
                debug!(volume = %self.cfg.name, %addr, "{dir} peer connection refused again: {e}")
            }
            (_, LogAction::Ongoing(b)) => error!(
                volume = %self.cfg.name, %addr,
                "{dir} peer connections still refused ({} refusals in {:.0?}; the last: {e})",
                b.failures, b.lasted
            ),
            (LinkError::Refused(reason), LogAction::First) => {
                error!(volume = %self.cfg.name, %addr, "peer refused our {dir} connection: {reason} (repeats are counted, not logged)")
            }
            (e, LogAction::First) if e.is_refusal() => {
                error!(volume = %self.cfg.name, %addr, "refused {dir} peer connection: {e} (repeats are counted, not logged)")
            }
            (e, LogAction::First) => {
                warn!(volume = %self.cfg.name, %addr, "{dir} peer connection failed: {e}")
            }
        }
    }

    /// A connection authenticated: ends the refusal burst of its direction and address.
    fn link_authenticated(
        &self,
        addr: SocketAddr,
        dir: &'static str,
        attempt: Option<Attempt<'_, LinkKey>>,
    ) {
        let now = Instant::now();
        let burst = match attempt {
            Some(a) => a.succeeded(now),
            None => self.link_throttle.lock().succeeded(&(dir, addr.ip()), now),
        };
        if let Some(b) = burst {
            info!(volume = %self.cfg.name, %addr,
                "{dir} peer connection authenticated after {} refusals in {:.0?}",
                b.failures, b.lasted);
        }
    }

    pub(super) fn epoch_alive(&self, epoch: u64) -> bool {
        let st = lock(&self.st);
        st.m.epoch_alive(epoch) && st.link.is_some()
    }

    /// Runs one authenticated connection until it ends; returns a newer connection that
    /// replaced it, if any.
    async fn run_connection(
        self: &Arc<Self>,
        est: Est,
        rx_new: &mut mpsc::Receiver<Est>,
    ) -> Option<Est> {
        let dialer = est.dialer;
        let parts = est.framed.into_parts();
        // `establish` sends with `SinkExt::send`, which flushes: nothing is left to write.
        debug_assert!(parts.write_buf.is_empty());
        let (read_half, write_half) = parts.io.into_split();
        let mut stream = FramedRead::with_capacity(read_half, FrameCodec, LINK_READ_BUF);
        stream.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let kill = self.shutdown.child_token();
        let (tx, writer) = link_channel(write_half, LINK_QUEUE);
        let k = kill.clone();
        tokio::spawn(async move {
            // A black-holed peer blocks the writer for good: the kill (ping timeout,
            // teardown) must interrupt it, not only the wait for the next frame.
            tokio::select! {
                _ = writer.run() => {}
                _ = k.cancelled() => {}
            }
            k.cancel();
            // Senders waiting for space fail now (teardown has answered their requests).
            writer.finish();
        });
        // Until the verdict is applied, no role change or invalidate runs (see the field).
        let serial = tokio::select! {
            g = self.state_change.lock() => g,
            _ = kill.cancelled() => return None,
        };
        let epoch = {
            let mut st = lock(&self.st);
            // LinkUp cannot be refused and leaves nothing to do after the lock.
            let _ = self.run_step(&mut st, Event::LinkUp, None);
            st.m.epoch()
        };
        self.notify();

        let hs = tokio::select! {
            r = self.handshake(epoch, &tx, &mut stream, dialer) => r,
            _ = kill.cancelled() => Err("connection closed during the handshake".to_string()),
        };
        let (actions, peer_runs) = match hs {
            Ok(x) => x,
            Err(reason) => {
                warn!(volume = %self.cfg.name, "sync handshake failed: {reason}");
                self.teardown(epoch, &reason, false, &kill).await;
                return None;
            }
        };
        let mut sends_pr = false;
        for a in actions {
            match a {
                Action::RefusePeer { why, standalone } => {
                    let _ = tokio::time::timeout(
                        self.cfg.timeout,
                        tx.send(Message::Disconnect { reason: why }),
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.teardown(epoch, "sync handshake refused the peer", standalone, &kill)
                        .await;
                    return None;
                }
                Action::PersistVerdict {
                    outcome,
                    uuids,
                    peer_disk,
                } => {
                    sends_pr = matches!(outcome, Outcome::Source { .. });
                    let r = self
                        .apply_verdict(
                            epoch,
                            outcome,
                            uuids,
                            peer_disk,
                            peer_runs.clone(),
                            &tx,
                            &kill,
                        )
                        .await;
                    if let Err(reason) = r {
                        self.teardown(epoch, &reason, false, &kill).await;
                        return None;
                    }
                }
                other => debug!(volume = %self.cfg.name, "unexpected handshake action {other:?}"),
            }
        }
        drop(serial);
        // The reservation state follows the data's winner: the primary's, or with no primary
        // on either side the sync source's (split brain resolved in its favour).
        {
            let st = lock(&self.st);
            let primary = st.m.role() == Role::Primary;
            let peer_primary = st.m.peer().is_some_and(|p| p.role == Role::Primary);
            if primary || (sends_pr && !peer_primary) {
                self.spawn(self.clone().send_pr_at_connect());
            }
        }

        let mut ping = tokio::time::interval(self.cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut last_rx = Instant::now();
        // One wait for the kill switch for the connection's life, not one registered and
        // dropped per frame.
        let killed = kill.cancelled();
        tokio::pin!(killed);
        let (reason, next) = loop {
            tokio::select! {
                _ = &mut killed => break ("connection closed locally".to_string(), None),
                e = rx_new.recv() => match e {
                    Some(e) => break ("replaced by a new connection from the peer".to_string(), Some(e)),
                    None => break ("shutting down".to_string(), None),
                },
                _ = ping.tick() => {
                    if last_rx.elapsed() > self.cfg.timeout {
                        break (format!("peer timed out (nothing received for {:?})", self.cfg.timeout), None);
                    }
                    // Never wait here: this loop drains the acks that free the queue. A full
                    // queue means frames are going out anyway.
                    let _ = tx.try_send(Message::Ping);
                }
                m = stream.next() => match m {
                    None => break ("peer closed the connection".to_string(), None),
                    Some(Err(e)) => {
                        error!(volume = %self.cfg.name, "dropping connection: bad frame from peer: {e}");
                        break (format!("bad frame: {e}"), None);
                    }
                    Some(Ok(m)) => {
                        last_rx = Instant::now();
                        // More of a burst already read: replies can wait for one write.
                        let more = !stream.read_buffer().is_empty();
                        if let Err(reason) = self.handle(m, epoch, &tx, more) {
                            if !reason.starts_with("peer disconnected") {
                                error!(volume = %self.cfg.name, "dropping connection: {reason}");
                            }
                            break (reason, None);
                        }
                    }
                },
            }
        };
        self.teardown(epoch, &reason, false, &kill).await;
        next
    }

    /// Exchanges state and bitmaps and decides (the machine runs
    /// [`crate::policy::decide`]); returns the decision's actions and the peer's bitmap runs.
    async fn handshake(
        &self,
        epoch: u64,
        tx: &LinkSender,
        stream: &mut Stream,
        dialer: bool,
    ) -> Result<(Vec<Action>, Vec<(u64, u64)>), String> {
        let (local, runs, flags) = {
            let st = lock(&self.st);
            let m = lock(&self.md);
            let local = st.m.local_side(m.md.uuids(), m.md.bitmap().count());
            let runs: Vec<(u64, u64)> =
                m.md.bitmap().runs().map(|r| (r.first_bit, r.len)).collect();
            (local, runs, Self::wire_flags(&st))
        };
        let bits = lock(&self.md).md.bitmap().bits();
        let mut out = vec![Message::StateChange {
            role: local.role,
            disk: local.disk,
            uuids: local.uuids.clone(),
            flags,
            bm_weight: local.bm_weight,
        }];
        let mut chunks = runs.chunks(crate::link::proto::MAX_RUNS_PER_MSG).peekable();
        if chunks.peek().is_none() {
            out.push(Message::Bitmap {
                runs: Vec::new(),
                last: true,
            });
        }
        while let Some(c) = chunks.next() {
            out.push(Message::Bitmap {
                runs: c.to_vec(),
                last: chunks.peek().is_none(),
            });
        }
        // Send while receiving: both sides send their bitmaps first, and with a bounded
        // queue a large bitmap must not wait for a peer that is itself still sending.
        let send_all = async {
            for m in out {
                tx.send(m)
                    .await
                    .map_err(|_| "connection writer is gone".to_string())?;
            }
            Ok::<(), String>(())
        };
        let receive = async {
            let mut peer: Option<Side> = None;
            let mut peer_runs: Vec<(u64, u64)> = Vec::new();
            let mut covered = 0u64;
            loop {
                match self.recv(stream, tx).await? {
                    Message::StateChange {
                        role,
                        disk,
                        uuids,
                        flags,
                        bm_weight,
                    } if peer.is_none() => {
                        peer = Some(Side {
                            role,
                            disk,
                            uuids,
                            crashed_primary: flags & WIRE_CRASHED_PRIMARY != 0,
                            discard_my_data: flags & WIRE_DISCARD_MY_DATA != 0,
                            bm_weight,
                        })
                    }
                    Message::Bitmap { runs, last } if peer.is_some() => {
                        for (s, l) in runs {
                            let end = s.checked_add(l).filter(|&e| e <= bits && l > 0);
                            if end.is_none() {
                                return Err(format!(
                                    "peer sent a bitmap run {s}+{l} outside {bits} bits"
                                ));
                            }
                            covered += l;
                            if covered > bits {
                                return Err("peer's bitmap has more bits than the volume".into());
                            }
                            peer_runs.push((s, l));
                        }
                        if last {
                            break;
                        }
                    }
                    other => {
                        return Err(format!("unexpected {} during the handshake", other.name()))
                    }
                }
            }
            let peer = peer.ok_or("no state from peer")?;
            Ok::<_, String>((peer, peer_runs))
        };
        let ((), (peer, peer_runs)) = tokio::try_join!(send_all, receive)?;
        let decision = {
            let mut st = lock(&self.st);
            st.m.step(Event::PeerState { epoch, peer })
                .and_then(|_| {
                    st.m.step(Event::Decide {
                        epoch,
                        local,
                        dialer,
                        policies: self.cfg.policies(),
                    })
                })
                .map_err(|r| r.to_string())?
        };
        for a in decision {
            if let Action::SendDecision(hg) = a {
                tx.send(Message::Decision { hg })
                    .await
                    .map_err(|_| "connection writer is gone".to_string())?;
            }
        }
        let peer_hg = match self.recv(stream, tx).await? {
            Message::Decision { hg } => hg,
            other => return Err(format!("unexpected {} instead of Decision", other.name())),
        };
        let actions = {
            let mut st = lock(&self.st);
            self.run_step(&mut st, Event::PeerDecision { epoch, hg: peer_hg }, None)
                .map_err(|r| r.to_string())?
        };
        let actions = actions
            .into_iter()
            .filter_map(|d| match d {
                super::Deferred::Act(a) => Some(a),
                super::Deferred::Send(..) => None,
            })
            .collect();
        Ok((actions, peer_runs))
    }

    async fn recv(&self, stream: &mut Stream, tx: &LinkSender) -> Result<Message, String> {
        loop {
            match tokio::time::timeout(self.cfg.timeout, stream.next()).await {
                Err(_) => return Err("peer timed out during the handshake".into()),
                Ok(None) => return Err("peer closed the connection during the handshake".into()),
                Ok(Some(Err(e))) => return Err(format!("bad frame from peer: {e}")),
                Ok(Some(Ok(Message::Ping))) => {
                    let _ = tx.try_send(Message::Pong);
                }
                Ok(Some(Ok(Message::Pong))) => {}
                Ok(Some(Ok(Message::Disconnect { reason }))) => {
                    return Err(format!("peer disconnected: {reason}"))
                }
                Ok(Some(Ok(m))) => return Ok(m),
            }
        }
    }

    /// Writes the decision's UUIDs and bitmap durably, then attaches the link.
    #[allow(clippy::too_many_arguments)]
    async fn apply_verdict(
        self: &Arc<Self>,
        epoch: u64,
        outcome: Outcome,
        corrected: GenerationUuids,
        peer_disk: DiskState,
        runs: Vec<(u64, u64)>,
        tx: &LinkSender,
        kill: &CancellationToken,
    ) -> Result<(), String> {
        let name = self.cfg.name.clone();
        // Tests stop a handshake here, between its state snapshot and the attached link.
        super::fail_point("verdict-metadata").await;
        // Bitmap and UUIDs per decision, durably, before any data moves.
        let sync_uuid = self
            .md_blocking(move |m| {
                m.md.set_uuids(&corrected)?;
                let mut f = m.md.flags();
                f.remove(MdFlags::CRASHED_PRIMARY);
                let bm = m.md.bitmap_mut();
                let mut sync_uuid = None;
                match outcome {
                    Outcome::Source { full } | Outcome::Target { full } => {
                        if full {
                            bm.set_all();
                        } else {
                            for (s, l) in &runs {
                                bm.set_bits(*s, s + l)?;
                            }
                        }
                        if let Outcome::Source { .. } = outcome {
                            let mut u = m.md.uuids();
                            sync_uuid = Some(u.start_resync_as_source());
                            m.md.set_uuids(&u)?;
                        } else {
                            f.remove(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
                        }
                    }
                    Outcome::NoSync => {
                        let n = m.md.bitmap().count();
                        if n > 0 {
                            warn!(volume = %name, "no resync, but {n} blocks are marked out of sync in the bitmap");
                        }
                        if peer_disk == DiskState::UpToDate && f.contains(MdFlags::CONSISTENT) {
                            f.insert(MdFlags::WAS_UP_TO_DATE);
                        }
                    }
                    Outcome::Refuse { .. } => {}
                }
                m.md.set_flags(f);
                m.md.write_bitmap(true)?;
                m.md.write_superblock()?;
                Ok(sync_uuid)
            })
            .await
            .map_err(|e| format!("metadata update after the handshake failed: {e}"))?;
        let weight = lock(&self.md).md.bitmap().count();
        let deferred = {
            let mut st = lock(&self.st);
            let link = LinkHandle {
                epoch,
                tx: tx.clone(),
                pending: HashMap::new(),
                next_seq: 1,
                kill: kill.clone(),
            };
            let ev = Event::VerdictPersisted {
                epoch,
                sync_uuid,
                oos_bytes: weight * 4096,
                killed: kill.is_cancelled(),
            };
            self.run_step(&mut st, ev, Some(link))
                .map_err(|r| r.to_string())?
        };
        self.notify();
        let left = self.perform(deferred).await;
        self.spawn_tasks(left);
        Ok(())
    }

    /// A step for a frame from the peer; a refusal is the reason to drop the link.
    fn step_link(&self, ev: Event) -> Result<(), String> {
        let mut st = lock(&self.st);
        let d = self
            .run_step(&mut st, ev, None)
            .map_err(|r| r.to_string())?;
        debug_assert!(d.is_empty(), "deferred actions dropped: {d:?}");
        Ok(())
    }

    fn complete(&self, epoch: u64, seq: u64, reply: Reply) -> Result<(), String> {
        let p = {
            let mut st = lock(&self.st);
            match st.link.as_mut() {
                Some(l) if l.epoch == epoch => l.pending.remove(&seq),
                _ => None,
            }
        };
        match p {
            Some(p) => {
                let _ = p.tx.send(reply);
                Ok(())
            }
            None => Err(format!("peer answered unknown request {seq}")),
        }
    }

    /// Handles one message after the handshake. Returns `Err(reason)` to drop the link.
    /// `more`: further frames are already read (a burst), so a reply may go out with the
    /// replies to those in one write.
    fn handle(
        self: &Arc<Self>,
        m: Message,
        epoch: u64,
        tx: &LinkSender,
        more: bool,
    ) -> Result<(), String> {
        // This loop must never wait for queue space: replies that would wait go out from
        // spawned tasks.
        match m {
            Message::Ping => {
                let _ = tx.try_send(Message::Pong);
            }
            Message::Pong => {}
            Message::Write {
                seq,
                offset,
                data,
                fua,
            } => {
                self.step_link(Event::PeerWrite)?;
                let len = data.len() as u64;
                self.ctr.received.fetch_add(len, Ordering::Relaxed);
                self.ctr
                    .peer_writes_inflight
                    .fetch_add(1, Ordering::Relaxed);
                let v = self.clone();
                let tx = tx.clone();
                let mut apply = Box::pin(async move {
                    let mode = if fua {
                        WriteMode::Durable
                    } else {
                        WriteMode::Cached
                    };
                    let res = match check_range(offset, len, v.usable) {
                        Ok(()) => v.data.write(offset, data, mode).await,
                        Err(e) => Err(e),
                    };
                    let (ok, err) = match res {
                        Ok(()) => (true, String::new()),
                        Err(e) => {
                            v.ctr.write_errors.fetch_add(1, Ordering::Relaxed);
                            error!(volume = %v.cfg.name, offset, len, "applying the peer's write failed: {e}");
                            let _ = v.step_sync(Event::LocalWriteFailed { offset, len });
                            (false, e.to_string())
                        }
                    };
                    let ack = Message::WriteAck { seq, ok, err };
                    // Other peer writes still running or already received: their acks
                    // follow, one write for all.
                    if v.ctr.peer_writes_inflight.fetch_sub(1, Ordering::Relaxed) > 1 || more {
                        let _ = tx.send_batched(ack).await;
                    } else {
                        let _ = tx.send(ack).await;
                    }
                });
                // A write the store completes at once (a page-cache write done inline) is
                // acked from here, without a task and its wake-up; one still pending goes
                // on in its own task. The no-op waker is safe: that task's first poll
                // registers its own waker wherever the write (or a full queue) waits.
                if apply
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                    .is_pending()
                {
                    tokio::spawn(apply);
                }
            }
            Message::Flush { seq } => {
                let v = self.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let ok = match v.data.flush().await {
                        Ok(()) => true,
                        Err(e) => {
                            error!(volume = %v.cfg.name, "flush for the peer failed: {e}");
                            false
                        }
                    };
                    let _ = tx.send(Message::FlushAck { seq, ok }).await;
                });
            }
            Message::WriteAck { seq, ok, err } => {
                self.complete(epoch, seq, if ok { Reply::Ok } else { Reply::Failed(err) })?
            }
            Message::FlushAck { seq, ok } => self.complete(
                epoch,
                seq,
                if ok {
                    Reply::Ok
                } else {
                    Reply::Failed("peer flush failed".into())
                },
            )?,
            Message::ResyncAck { seq, ok } => self.complete(
                epoch,
                seq,
                if ok {
                    Reply::Ok
                } else {
                    Reply::Failed("peer failed to write resync data".into())
                },
            )?,
            Message::VerifyReply {
                seq, mismatched, ..
            } => self.complete(epoch, seq, Reply::Verify(mismatched))?,
            Message::PrState { seq, blob } => self.receive_pr(seq, blob, tx)?,
            Message::PrStateAck { seq, ok } => self.complete(
                epoch,
                seq,
                if ok {
                    Reply::Ok
                } else {
                    Reply::Failed("peer failed to store the reservation state".into())
                },
            )?,
            Message::SyncUuid { uuid } => {
                let deferred = {
                    let mut st = lock(&self.st);
                    let oos_bytes = lock(&self.md).md.bitmap().count() * 4096;
                    self.run_step(&mut st, Event::SyncUuid { uuid, oos_bytes }, None)
                        .map_err(|r| r.to_string())?
                };
                self.notify();
                let v = self.clone();
                tokio::spawn(async move { v.perform(deferred).await });
            }
            Message::ResyncData { seq, offset, data } => {
                self.step_link(Event::ResyncData)?;
                let len = data.len() as u64;
                self.ctr.received.fetch_add(len, Ordering::Relaxed);
                self.ctr.resync_received.fetch_add(len, Ordering::Relaxed);
                let v = self.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let res = match check_range(offset, len, v.usable) {
                        Ok(()) => v.data.write(offset, data, WriteMode::Cached).await,
                        Err(e) => Err(e),
                    };
                    let ok = match res {
                        Ok(()) => {
                            let _ = lock(&v.md).md.bitmap_mut().clear_range(offset, len);
                            let _ = v.step_sync(Event::ResyncBlockDone { bytes: len });
                            true
                        }
                        Err(e) => {
                            v.ctr.write_errors.fetch_add(1, Ordering::Relaxed);
                            error!(volume = %v.cfg.name, offset, len, "writing resync data failed: {e}");
                            false
                        }
                    };
                    let _ = tx.send(Message::ResyncAck { seq, ok }).await;
                });
            }
            Message::ResyncDone { uuids } => {
                let v = self.clone();
                tokio::spawn(async move { v.finish_resync_target(epoch, uuids).await });
            }
            Message::VerifyRequest {
                seq,
                offset,
                len,
                alg,
                digests,
            } => {
                let blocks = u64::from(len).div_ceil(VERIFY_BLOCK);
                if check_range(offset, u64::from(len), self.usable).is_err()
                    || digests.len() as u64 != blocks * alg.len() as u64
                    || offset % VERIFY_BLOCK != 0
                {
                    return Err(format!("malformed verify request at {offset}+{len}"));
                }
                let v = self.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut mismatched = Vec::new();
                    match v.data.read(offset, len as usize).await {
                        Ok(data) => {
                            for (i, block) in data.chunks(VERIFY_BLOCK as usize).enumerate() {
                                let d = alg.digest(block);
                                let want = &digests[i * alg.len()..(i + 1) * alg.len()];
                                if d != want {
                                    mismatched.push(offset + i as u64 * VERIFY_BLOCK);
                                }
                            }
                        }
                        Err(e) => {
                            error!(volume = %v.cfg.name, offset, len, "verify: local read failed: {e}");
                            mismatched.extend((0..blocks).map(|i| offset + i * VERIFY_BLOCK));
                        }
                    }
                    for &off in &mismatched {
                        let l = VERIFY_BLOCK.min(v.usable - off);
                        let _ = lock(&v.md).md.bitmap_mut().set_range(off, l);
                        warn!(volume = %v.cfg.name, offset = off, "online verify: block differs from the peer; marked out of sync");
                    }
                    let _ = tx
                        .send(Message::VerifyReply {
                            seq,
                            offset,
                            len,
                            equal: mismatched.is_empty(),
                            mismatched,
                        })
                        .await;
                });
            }
            Message::StateChange { role, disk, .. } => {
                self.step_link(Event::PeerStateChange { role, disk })?;
            }
            Message::Disconnect { reason } => return Err(format!("peer disconnected: {reason}")),
            other => return Err(format!("unexpected {} after the handshake", other.name())),
        }
        Ok(())
    }

    async fn finish_resync_target(
        self: Arc<Self>,
        epoch: u64,
        source: crate::drbd::GenerationUuids,
    ) {
        if let Err(e) = self.data.flush().await {
            error!(volume = %self.cfg.name, "flush at resync end failed: {e}; staying Inconsistent");
            return;
        }
        let name = self.cfg.name.clone();
        let r = self
            .md_blocking(move |m| {
                let left = m.md.bitmap().count();
                if left > 0 {
                    debug!(volume = %name, "{left} bits left at resync end were covered by replicated writes");
                }
                m.md.bitmap_mut().clear_all();
                let mut u = m.md.uuids();
                u.resync_finished_as_target(&source, false);
                m.md.set_uuids(&u)?;
                let mut f = m.md.flags();
                f.insert(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE);
                m.md.set_flags(f);
                m.md.write_bitmap(true)?;
                m.md.write_superblock()
            })
            .await;
        if let Err(e) = r {
            error!(volume = %self.cfg.name, "metadata update at resync end failed: {e}");
            return;
        }
        let deferred = {
            let mut st = lock(&self.st);
            match self.run_step(&mut st, Event::ResyncFinishedTarget { epoch }, None) {
                Ok(d) => d,
                Err(_) => return,
            }
        };
        self.notify();
        self.perform(deferred).await;
    }

    /// Ends connection `epoch`: writes in flight are marked out of sync, a primary starts a
    /// new data generation (`drbd_state.c`: a primary losing its peer calls
    /// `drbd_uuid_new_current`), state goes to Connecting (or StandAlone).
    async fn teardown(&self, epoch: u64, reason: &str, standalone: bool, kill: &CancellationToken) {
        kill.cancel();
        {
            let mut st = lock(&self.st);
            let mut lost = 0u64;
            if let Some(link) = st.link.take() {
                if link.epoch == epoch {
                    link.kill.cancel();
                    let mut m = lock(&self.md);
                    for (_, p) in link.pending {
                        if p.kind == PendingKind::Write {
                            let _ = m.md.bitmap_mut().set_range(p.offset, p.len);
                            lost += 1;
                        }
                        let _ = p.tx.send(Reply::Lost);
                    }
                } else {
                    st.link = Some(link);
                }
            }
            let ev = Event::LinkLost {
                reason: reason.to_string(),
                standalone,
            };
            // LinkLost is never refused; what it asks for (logs, a new current UUID) is done
            // under the lock and the metadata is persisted below.
            let _ = self.run_step(&mut st, ev, None);
            if lost > 0 {
                warn!(volume = %self.cfg.name, "{lost} replicated writes were in flight when the link dropped; marked out of sync");
            }
        }
        self.notify();
        self.persist("connection lost").await;
    }
}

async fn accept_loop(vol: Arc<ReplicatedVolume>, listener: TcpListener, tx: mpsc::Sender<Est>) {
    loop {
        let r = tokio::select! {
            r = listener.accept() => r,
            _ = vol.shutdown.cancelled() => return,
        };
        match r {
            Err(e) => {
                warn!(volume = %vol.cfg.name, "accept failed: {e}");
                tokio::time::sleep(BACKOFF_MIN).await;
            }
            Ok((s, addr)) => {
                let v = vol.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    // An address whose connections keep being refused waits for its slot
                    // before the handshake (twinsan_throttle): a guesser gets one try per
                    // back-off delay; the real peer is never slowed by another address.
                    let max_wait = v.link_throttle.lock().params().max_delay;
                    let (wait, attempt) = match v.link_throttle.admit(
                        ("incoming", addr.ip()),
                        Instant::now(),
                        max_wait,
                    ) {
                        Admitted::Go { wait, attempt } => (wait, attempt),
                        Admitted::Refused { after } => {
                            debug!(volume = %v.cfg.name, %addr, "incoming connection dropped: too many refused connections from this address");
                            tokio::select! {
                                _ = tokio::time::sleep(after) => {}
                                _ = v.shutdown.cancelled() => {}
                            }
                            return;
                        }
                    };
                    if !wait.is_zero() {
                        debug!(volume = %v.cfg.name, %addr, ?wait, "incoming connection held back after refusals");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = v.shutdown.cancelled() => return,
                        }
                    }
                    let _ = s.set_nodelay(true);
                    let hello = v.local_hello();
                    let r = tokio::select! {
                        r = establish(s, &hello, false, v.cfg.timeout) => r,
                        _ = v.shutdown.cancelled() => return,
                    };
                    match r {
                        Ok(est) => {
                            v.link_authenticated(addr, "incoming", Some(attempt));
                            let _ = tx.send(est).await;
                        }
                        Err(e) => v.log_link_error(&e, addr, "incoming", Some(attempt)),
                    }
                });
            }
        }
    }
}

async fn dial_loop(vol: Arc<ReplicatedVolume>, tx: mpsc::Sender<Est>) {
    let mut backoff = BACKOFF_MIN;
    let peer = vol.cfg.peer;
    loop {
        if vol.shutdown.is_cancelled() {
            return;
        }
        if !vol.wants_dial() {
            backoff = BACKOFF_MIN;
            let n = vol.changed.notified();
            tokio::select! {
                _ = n => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = vol.shutdown.cancelled() => return,
            }
            continue;
        }
        let attempt = async {
            let s = tokio::time::timeout(vol.cfg.timeout, TcpStream::connect(peer))
                .await
                .map_err(|_| None)?
                .map_err(|e| {
                    debug!(volume = %vol.cfg.name, %peer, "connect failed: {e}");
                    None
                })?;
            let _ = s.set_nodelay(true);
            establish(s, &vol.local_hello(), true, vol.cfg.timeout)
                .await
                .map_err(Some)
        };
        let r = tokio::select! {
            r = attempt => r,
            _ = vol.shutdown.cancelled() => return,
        };
        match r {
            Ok(est) => {
                vol.link_authenticated(peer, "outgoing", None);
                if tx.send(est).await.is_err() {
                    return;
                }
            }
            Err(Some(e)) => vol.log_link_error(&e, peer, "outgoing", None),
            Err(None) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = vol.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn manager(vol: Arc<ReplicatedVolume>, mut rx: mpsc::Receiver<Est>) {
    let mut next: Option<Est> = None;
    loop {
        let est = match next.take() {
            Some(e) => e,
            None => tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                _ = vol.shutdown.cancelled() => return,
            },
        };
        if lock(&vol.st).m.standalone() {
            debug!(volume = %vol.cfg.name, "StandAlone: dropping an authenticated connection");
            continue;
        }
        next = vol.run_connection(est, &mut rx).await;
    }
}
