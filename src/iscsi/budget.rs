//! Memory for in-flight command data: one budget for the whole server and one per session.
//!
//! A READ or WRITE holds a buffer of its transfer length (up to the 32 MiB the Block Limits
//! page allows) from the moment the target commits to it until its response has left: a
//! write's buffer from its first R2T, a read's data until the socket took it. Without a
//! bound one initiator could pin queue depth x 32 MiB per session, and any number of
//! sessions. Here a command is charged its bytes before its buffer exists; a command that
//! does not fit waits (and the session's CmdSN window stops opening, RFC 7143 §4.2.2.1)
//! until charges are released. Commands without bulk data (INQUIRY, TEST UNIT READY...)
//! are never charged, so a new session is served even while the budget is spent.
//!
//! A command that waits already holds what came with it: immediate data and unsolicited
//! Data-Out, at most FirstBurstLength. The window bounds how many commands a session can
//! have waiting (queue depth), and [`HeldData`] bounds the sum over the server at a quarter
//! of the budget: a command that would pass it is answered TASK SET FULL (SAM-5 §5.3.1: the
//! task set lacks resources; initiators retry and lower their queue depth) and its data freed.
//!
//! A session that has nothing charged may always take one command, however large, as long
//! as the server as a whole has room for it or has nothing charged at all: a limit below
//! the largest command slows a session down to one command at a time, it never stalls it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The server-wide budget.
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
    /// Sessions with commands waiting for room; releases wake them only when there are any.
    waiting: AtomicUsize,
    /// Bumped when a charge is released while someone waits.
    freed: watch::Sender<u64>,
    /// Data held by commands that wait (immediate and unsolicited), and its bound.
    held: AtomicU64,
    held_limit: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            freed: watch::channel(0).0,
            held: AtomicU64::new(0),
            held_limit: (limit / 4).max(16 << 20),
        })
    }

    /// Data waiting commands hold now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now, over every session.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// A per-session budget of `limit` bytes drawing on this one.
    pub fn session(self: &Arc<Self>, limit: u64) -> Arc<SessionBudget> {
        Arc::new(SessionBudget {
            global: self.clone(),
            limit,
            used: AtomicU64::new(0),
            waiting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Takes `bytes` from `counter` unless that would pass `limit` while something is already
/// charged there.
fn take(counter: &AtomicU64, limit: u64, bytes: u64) -> bool {
    let mut cur = counter.load(Ordering::Acquire);
    loop {
        if cur != 0 && cur.saturating_add(bytes) > limit {
            return false;
        }
        match counter.compare_exchange_weak(cur, cur + bytes, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(c) => cur = c,
        }
    }
}

/// One session's share of the [`MemoryBudget`].
pub struct SessionBudget {
    global: Arc<MemoryBudget>,
    limit: u64,
    used: AtomicU64,
    /// Whether this session is counted in the global `waiting`.
    waiting: std::sync::atomic::AtomicBool,
}

impl SessionBudget {
    /// A budget that never refuses (unit tests, and sessions that move no bulk data).
    pub fn unlimited() -> Arc<SessionBudget> {
        MemoryBudget::new(u64::MAX).session(u64::MAX)
    }

    /// Charges `bytes` to this session and the server, or None when either is full.
    pub fn try_charge(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        if bytes == 0 {
            return Some(Charge {
                owner: None,
                bytes: 0,
            });
        }
        if !take(&self.used, self.limit, bytes) {
            return None;
        }
        if !take(&self.global.used, self.global.limit, bytes) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        Some(Charge {
            owner: Some(self.clone()),
            bytes,
        })
    }

    /// Bytes this session has charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Marks this session as waiting for room (or not): releases anywhere wake it through
    /// [`SessionBudget::freed`]. Call before retrying, so a release in between is not missed.
    pub fn set_waiting(&self, waiting: bool) {
        if self.waiting.swap(waiting, Ordering::SeqCst) != waiting {
            if waiting {
                self.global.waiting.fetch_add(1, Ordering::SeqCst);
            } else {
                self.global.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Changes when a charge is released while some session waits.
    pub fn freed(&self) -> watch::Receiver<u64> {
        self.global.freed.subscribe()
    }

    /// Accounts `bytes` a waiting command holds; None when waiting commands of the whole
    /// server would then hold more than their bound.
    pub fn hold(&self, bytes: u64) -> Option<HeldData> {
        let mut h = HeldData {
            global: self.global.clone(),
            bytes: 0,
        };
        h.grow(bytes).then_some(h)
    }
}

/// Bytes a waiting command holds (immediate data, early unsolicited Data-Out); released
/// when dropped.
pub struct HeldData {
    global: Arc<MemoryBudget>,
    bytes: u64,
}

impl HeldData {
    /// Adds `bytes`; false (nothing added) when that would pass the server's bound.
    pub fn grow(&mut self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let g = &self.global;
        let mut cur = g.held.load(Ordering::Acquire);
        loop {
            if cur.saturating_add(bytes) > g.held_limit {
                return false;
            }
            match g.held.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.bytes += bytes;
                    return true;
                }
                Err(c) => cur = c,
            }
        }
    }
}

impl HeldData {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Sets the bytes held to `bytes` when that is less (data that left).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.global
                .held
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }
}

impl Drop for HeldData {
    fn drop(&mut self) {
        self.global.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Drop for SessionBudget {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

/// Bytes charged to a session; released when dropped.
#[must_use = "the bytes are released when the charge is dropped"]
pub struct Charge {
    owner: Option<Arc<SessionBudget>>,
    bytes: u64,
}

impl Charge {
    /// A charge of nothing, for commands that move no bulk data.
    pub fn none() -> Charge {
        Charge {
            owner: None,
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({})", self.bytes)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(s) = self.owner.take() {
            s.used.fetch_sub(self.bytes, Ordering::AcqRel);
            s.global.release(self.bytes);
        }
    }
}

/// Refusals an attacker can repeat at will (connections over the login limit, commands
/// over the bound on held data): counted, and logged once per ten seconds with the count.
#[derive(Default)]
pub struct Occurrences(Mutex<(Option<Instant>, u64)>);

impl Occurrences {
    pub const fn new() -> Occurrences {
        Occurrences(Mutex::new((None, 0)))
    }

    /// Counts one; returns the number to log now (those since the last line), if a line is
    /// due.
    pub fn count(&self, now: Instant) -> Option<u64> {
        let mut g = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.1 += 1;
        match g.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(10) => None,
            _ => {
                g.0 = Some(now);
                Some(std::mem::take(&mut g.1))
            }
        }
    }
}

/// The default server-wide budget: an eighth of the host's memory, between 256 MiB and
/// 8 GiB (a dom0 with 4 GiB gets 512 MiB: 16 sessions of 32 MiB in flight).
pub fn default_limit() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(4 << 30);
    (total / 8).clamp(256 << 20, 8 << 30)
}

/// The default per-session budget: 256 MiB (a queue of 128 commands of 2 MiB), never more
/// than the server's.
pub fn default_session_limit(server: u64) -> u64 {
    server.min(256 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_by_the_session_and_the_server_and_released_on_drop() {
        let g = MemoryBudget::new(100);
        let a = g.session(60);
        let b = g.session(60);
        let a1 = a.try_charge(50).unwrap();
        assert!(a.try_charge(20).is_none(), "over the session's 60");
        let a2 = a.try_charge(10).unwrap();
        assert_eq!((a.used(), g.used()), (60, 60));
        let b1 = b.try_charge(40).unwrap();
        assert!(b.try_charge(1).is_none(), "the server's 100 is spent");
        drop(a1);
        assert_eq!((a.used(), g.used()), (10, 50));
        let b2 = b.try_charge(20).unwrap();
        assert_eq!(b.used(), 60);
        drop((a2, b1, b2));
        assert_eq!(g.used(), 0);
    }

    #[test]
    fn an_idle_session_may_take_one_command_larger_than_its_limit() {
        let g = MemoryBudget::new(100);
        let s = g.session(10);
        let big = s
            .try_charge(80)
            .expect("nothing charged: one command always fits");
        assert!(s.try_charge(1).is_none());
        let other = g.session(10);
        assert!(other.try_charge(30).is_none(), "the server has 20 left");
        let small = other.try_charge(20).unwrap();
        drop((big, small));
        let huge = g.session(10).try_charge(500).expect("the server is idle");
        assert_eq!(huge.bytes(), 500);
    }

    #[test]
    fn data_held_by_waiting_commands_is_bounded_at_a_quarter_of_the_budget() {
        let g = MemoryBudget::new(256 << 20);
        let s = g.session(1 << 20);
        let mut a = s.hold(60 << 20).unwrap();
        assert!(s.hold(5 << 20).is_none(), "64 MiB is the bound");
        assert!(a.grow(4 << 20));
        assert!(!a.grow(1));
        assert_eq!(g.held(), 64 << 20);
        a.shrink_to(10 << 20);
        assert_eq!((a.bytes(), g.held()), (10 << 20, 10 << 20));
        a.shrink_to(20 << 20);
        assert_eq!(a.bytes(), 10 << 20, "shrink never grows");
        drop(a);
        assert_eq!(g.held(), 0);
        assert!(s.hold(0).is_some());
    }

    #[test]
    fn occurrences_are_logged_once_per_ten_seconds_with_the_count() {
        let r = Occurrences::default();
        let t0 = Instant::now();
        assert_eq!(r.count(t0), Some(1));
        assert_eq!(r.count(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.count(t0 + Duration::from_secs(2)), None);
        assert_eq!(r.count(t0 + Duration::from_secs(11)), Some(3));
    }

    #[test]
    fn zero_bytes_never_wait_and_charge_nothing() {
        let g = MemoryBudget::new(10);
        let s = g.session(10);
        let _full = s.try_charge(10).unwrap();
        let zero = s.try_charge(0).expect("no bulk data: never waits");
        assert_eq!(zero.bytes(), 0);
        assert_eq!(g.used(), 10);
    }

    #[test]
    fn a_release_wakes_a_waiting_session() {
        let g = MemoryBudget::new(10);
        let s = g.session(10);
        let c = s.try_charge(10).unwrap();
        let mut rx = s.freed();
        rx.borrow_and_update();
        s.set_waiting(true);
        drop(c);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        s.set_waiting(false);
        drop(s.try_charge(5).unwrap());
        assert!(!rx.has_changed().unwrap(), "nobody waits: no wake-up");
    }
}
