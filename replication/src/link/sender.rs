//! The sending half of a peer connection: frames from many tasks, in order, bounded.
//!
//! A sender that finds the socket free writes a small frame straight to it, as much as the
//! socket takes without blocking: a replicated 4 KiB write leaves from the task that made
//! it, and the secondary's ack from the task that wrote the block, with no hop through a
//! writer task. Everything else (large frames, frames sent while another write is going on,
//! what a direct write left over) is queued, and the connection's [`LinkWriter`] sends the
//! queue in vectored writes until it is empty. One owner of the socket at a time keeps the
//! frames whole and in the order they were queued.
//!
//! At most `capacity` frames wait in the queue: [`LinkSender::send`] then waits for space
//! (a peer that stops reading stalls the senders instead of growing memory),
//! [`LinkSender::try_send`] fails. Payloads are never copied ([`FrameQueue`]); the CRC is
//! computed before the lock is taken.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Buf;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::proto::{EncodedFrame, FrameError, FrameQueue, Message};

/// Frames whose payload is at most this long are written directly by their sender; larger
/// ones go through the writer task, so encoding and copying a 1 MiB frame into the socket
/// runs beside the sender's own work (the local write) instead of before it.
pub const DIRECT_MAX: usize = 64 * 1024;

/// Why a frame was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the peer connection is closed")]
    Closed,
    #[error("the link queue is full")]
    Full,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Who may write to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nobody: the next sender of a small frame writes directly.
    Free,
    /// A sender is writing directly (without blocking).
    Direct,
    /// The writer task, until the queue is empty.
    Writer,
}

#[derive(Debug)]
struct State {
    queue: FrameQueue,
    /// Whole frames in `queue` (what the capacity counts).
    frames: usize,
    owner: Owner,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    sock: OwnedWriteHalf,
    capacity: usize,
    state: Mutex<State>,
    wake_writer: Notify,
    space: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.space.notify_waiters();
        self.wake_writer.notify_one();
    }
}

/// Queues frames for one connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkSender(Arc<Shared>);

/// Sends what the senders queued; run it in the connection's writer task.
#[derive(Debug)]
pub struct LinkWriter(Arc<Shared>);

/// A sender and its writer over `sock`, at most `capacity` frames queued.
pub fn link_channel(sock: OwnedWriteHalf, capacity: usize) -> (LinkSender, LinkWriter) {
    let sh = Arc::new(Shared {
        sock,
        capacity: capacity.max(1),
        state: Mutex::new(State {
            queue: FrameQueue::default(),
            frames: 0,
            owner: Owner::Free,
            closed: false,
        }),
        wake_writer: Notify::new(),
        space: Notify::new(),
    });
    (LinkSender(sh.clone()), LinkWriter(sh))
}

impl LinkSender {
    /// Queues `msg`, waiting while the queue is full; fails once the connection is closed.
    /// A small frame is written right away by this task when nobody else is writing: for
    /// a request that is alone on the link.
    pub async fn send(&self, msg: Message) -> Result<(), SendError> {
        self.send_routed(msg, true).await
    }

    /// Like [`LinkSender::send`], but the frame always goes through the writer task, which
    /// gathers what several senders queue into one write: for a busy link, where more
    /// frames are about to follow (one system call for many instead of one each).
    pub async fn send_batched(&self, msg: Message) -> Result<(), SendError> {
        self.send_routed(msg, false).await
    }

    async fn send_routed(&self, msg: Message, direct_ok: bool) -> Result<(), SendError> {
        let frame = EncodedFrame::new(&msg)?;
        loop {
            // Before the check; `space` is only `notify_waiters`, which reaches a Notified
            // from its creation (no `enable`, which would lock the Notify twice per frame).
            let space = self.0.space.notified();
            tokio::pin!(space);
            {
                let st = self.0.lock();
                if st.closed {
                    return Err(SendError::Closed);
                }
                if st.frames < self.0.capacity {
                    self.push(st, frame, direct_ok);
                    return Ok(());
                }
            }
            space.await;
        }
    }

    /// Queues `msg` if there is room now.
    pub fn try_send(&self, msg: Message) -> Result<(), SendError> {
        let frame = EncodedFrame::new(&msg)?;
        let st = self.0.lock();
        if st.closed {
            return Err(SendError::Closed);
        }
        if st.frames >= self.0.capacity {
            return Err(SendError::Full);
        }
        self.push(st, frame, true);
        Ok(())
    }

    /// Closes the connection's sending side: queued frames are dropped, senders fail, the
    /// writer ends.
    pub fn close(&self) {
        self.0.close();
    }

    fn push(&self, mut st: MutexGuard<'_, State>, frame: EncodedFrame, direct_ok: bool) {
        let sh = &*self.0;
        let direct = direct_ok && frame.payload_len() <= DIRECT_MAX;
        st.queue.push_encoded(frame);
        st.frames += 1;
        if st.owner != Owner::Free {
            return;
        }
        if !direct {
            st.owner = Owner::Writer;
            drop(st);
            sh.wake_writer.notify_one();
            return;
        }
        st.owner = Owner::Direct;
        let mut batch = std::mem::take(&mut st.queue);
        st.frames = 0;
        drop(st);
        let result = write_now(&sh.sock, &mut batch);
        let mut st = sh.lock();
        if result.is_err() {
            st.closed = true;
        }
        if !batch.has_remaining() && !st.queue.has_remaining() && !st.closed {
            st.owner = Owner::Free;
            return;
        }
        // The rest of the batch goes first, then what others queued meanwhile.
        let later = std::mem::take(&mut st.queue);
        batch.append(later);
        st.queue = batch;
        st.owner = Owner::Writer;
        drop(st);
        sh.wake_writer.notify_one();
        if result.is_err() {
            sh.space.notify_waiters();
        }
    }
}

/// Writes as much of `q` as the socket takes without blocking.
fn write_now(sock: &OwnedWriteHalf, q: &mut FrameQueue) -> std::io::Result<()> {
    while q.has_remaining() {
        let mut io = [std::io::IoSlice::new(&[]); 64];
        let n = q.chunks_vectored(&mut io);
        match sock.try_write_vectored(&io[..n]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => q.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl LinkWriter {
    /// Sends queued frames until the connection is closed or a write fails (which closes
    /// it), then shuts the socket's sending side down. A peer that stops reading blocks
    /// this for good: run it under the connection's kill switch, then call
    /// [`LinkWriter::finish`].
    pub async fn run(&self) {
        let sh = &*self.0;
        loop {
            let wake = sh.wake_writer.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let batch = {
                let mut st = sh.lock();
                if st.closed {
                    return;
                }
                if st.owner == Owner::Writer {
                    if st.queue.has_remaining() {
                        st.frames = 0;
                        Some(std::mem::take(&mut st.queue))
                    } else {
                        st.owner = Owner::Free;
                        None
                    }
                } else {
                    None
                }
            };
            match batch {
                Some(mut q) => {
                    sh.space.notify_waiters();
                    if write_all(&sh.sock, &mut q).await.is_err() {
                        sh.close();
                        return;
                    }
                }
                None => {
                    wake.await;
                    // Woken by the first of a burst of small frames (the secondary's acks of
                    // writes completed together, 4 KiB writes of a busy primary): let the
                    // other tasks that are ready now queue theirs first, so one vectored write
                    // carries them all instead of one write each. A large frame leaves at
                    // once: its copy into the socket dwarfs a system call, and waiting only
                    // delays the peer's work on it.
                    if sh.lock().queue.remaining() < DIRECT_MAX {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }

    /// Closes the sending side for good (senders fail from now on) and shuts the socket's
    /// write direction down.
    pub fn finish(&self) {
        self.0.close();
        let _ = socket2::SockRef::from(self.0.sock.as_ref()).shutdown(std::net::Shutdown::Write);
    }
}

async fn write_all(sock: &OwnedWriteHalf, q: &mut FrameQueue) -> std::io::Result<()> {
    while q.has_remaining() {
        write_now(sock, q)?;
        if q.has_remaining() {
            sock.writable().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::FrameCodec;
    use bytes::Bytes;
    use futures::StreamExt;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::codec::FramedRead;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn write(seq: u64, len: usize) -> Message {
        Message::Write {
            seq,
            offset: seq * 4096,
            data: Bytes::from(vec![seq as u8; len]),
            fua: false,
        }
    }

    /// Many tasks, small and large frames mixed: every frame arrives whole, and each
    /// task's frames in the order it sent them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders_keep_frames_whole_and_in_order() {
        let (a, b) = pair().await;
        let (_ra, wa) = a.into_split();
        let (tx, writer) = link_channel(wa, 8);
        let w = tokio::spawn(async move {
            writer.run().await;
            writer.finish();
        });
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    let len = if i % 17 == 0 { 300_000 } else { 4096 };
                    tx.send(write(t * 1000 + i, len)).await.unwrap();
                }
            }));
        }
        let reader = tokio::spawn(async move {
            let mut r = FramedRead::new(b, FrameCodec);
            let mut last = [None::<u64>; 4];
            for _ in 0..800 {
                let Some(Ok(Message::Write { seq, data, .. })) = r.next().await else {
                    panic!("bad frame");
                };
                let t = (seq / 1000) as usize;
                assert!(last[t].is_none_or(|l| l < seq), "out of order");
                last[t] = Some(seq);
                assert!(data.iter().all(|&x| x == seq as u8));
            }
        });
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("frames lost")
            .unwrap();
        tx.close();
        w.await.unwrap();
    }

    /// A peer that does not read: the queue fills to its capacity, `try_send` fails,
    /// `send` waits, and closing fails the waiting sender.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_waits_and_close_releases_the_waiters() {
        let (a, _b) = pair().await;
        let (_ra, wa) = a.into_split();
        let (tx, writer) = link_channel(wa, 4);
        let w = tokio::spawn(async move { writer.run().await });
        // Fill the socket buffers and the queue with large frames nobody reads.
        let mut full = false;
        for i in 0..400u64 {
            match tx.try_send(write(i, 1 << 20)) {
                Ok(()) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(SendError::Full) => {
                    full = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(full, "the queue never filled");
        let tx2 = tx.clone();
        let mut waiting = tokio::spawn(async move { tx2.send(Message::Ping).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut waiting)
                .await
                .is_err(),
            "send did not wait for space"
        );
        tx.close();
        let r = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("close did not release the waiting sender")
            .unwrap();
        assert!(matches!(r, Err(SendError::Closed)));
        w.abort();
    }
}
