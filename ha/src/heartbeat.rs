//! Peer heartbeats: small authenticated UDP datagrams over the replication link and the
//! management path. Each host tells the other its role (as
//! [`crate::role::HostRole::as_peer_state`]), whether it is in manual mode, and its name; silence
//! for `peer_timeout` makes the path Unreachable.
//!
//! Wire format (all integers big-endian), 44 bytes + name + 32 bytes of MAC:
//!
//! ```text
//! "TSHB" | version (1) | flags (bit 0 = manual) | state (1 = secondary, 2 = primary) | name len
//! boot id (u64) | sequence (u64) | sender wall clock, ms since the Unix epoch (u64)
//! name (UTF-8) | HMAC-SHA256(secret, everything before) (RFC 2104)
//! ```
//!
//! Replay protection: within one boot id (random per daemon start) the sequence must grow; a new
//! boot id is accepted only with a timestamp close to our clock and newer than the last accepted
//! one, so a datagram recorded earlier cannot be replayed to fake a role.

use crate::role::{PeerPath, PeerState};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use twinsan_throttle::{Admission, Burst, Ended, LogAction, Params, Throttle};

const MAGIC: &[u8; 4] = b"TSHB";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 4 + 24;
const MAC_LEN: usize = 32;
/// Largest datagram we send or accept.
pub const MAX_DATAGRAM: usize = HEADER + 255 + MAC_LEN;

type HmacSha256 = Hmac<Sha256>;

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Sender's node name.
    pub node: String,
    /// Sender's role as its peer must see it (Primary or Secondary).
    pub state: PeerState,
    /// Sender is in manual mode.
    pub manual: bool,
    /// Random per daemon start.
    pub boot_id: u64,
    /// Grows with every datagram of one boot.
    pub seq: u64,
    /// Sender's wall clock, ms since the Unix epoch.
    pub unix_ms: u64,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeatError {
    #[error("too short or too long ({0} bytes)")]
    Length(usize),
    #[error("not a twinsan heartbeat")]
    Magic,
    #[error("heartbeat version {0} not supported")]
    Version(u8),
    #[error("bad MAC (wrong secret or forged)")]
    Mac,
    #[error("bad field: {0}")]
    Field(&'static str),
    #[error("replayed or out of order (boot {boot:016x} seq {seq})")]
    Replay { boot: u64, seq: u64 },
    #[error("timestamp {skew_ms} ms away from our clock")]
    Stale { skew_ms: i64 },
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length (RFC 2104 §3).
    <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key length")
}

/// Encodes and authenticates a heartbeat. Names longer than 255 bytes are cut.
pub fn encode(b: &Beat, secret: &[u8]) -> Vec<u8> {
    let mut name = b.node.as_bytes();
    if name.len() > 255 {
        name = &name[..255];
    }
    let mut out = Vec::with_capacity(HEADER + name.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(u8::from(b.manual));
    out.push(match b.state {
        PeerState::Secondary => 1,
        _ => 2,
    });
    out.push(name.len() as u8);
    out.extend_from_slice(&b.boot_id.to_be_bytes());
    out.extend_from_slice(&b.seq.to_be_bytes());
    out.extend_from_slice(&b.unix_ms.to_be_bytes());
    out.extend_from_slice(name);
    let mut m = mac(secret);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Checks the MAC and decodes. Never panics on arbitrary input.
pub fn decode(p: &[u8], secret: &[u8]) -> Result<Beat, BeatError> {
    if p.len() < HEADER + MAC_LEN || p.len() > MAX_DATAGRAM {
        return Err(BeatError::Length(p.len()));
    }
    if &p[0..4] != MAGIC {
        return Err(BeatError::Magic);
    }
    if p[4] != VERSION {
        return Err(BeatError::Version(p[4]));
    }
    let name_len = p[7] as usize;
    if p.len() != HEADER + name_len + MAC_LEN {
        return Err(BeatError::Length(p.len()));
    }
    let (body, tag) = p.split_at(HEADER + name_len);
    let mut m = mac(secret);
    m.update(body);
    m.verify_slice(tag).map_err(|_| BeatError::Mac)?;
    let state = match p[6] {
        1 => PeerState::Secondary,
        2 => PeerState::Primary,
        _ => return Err(BeatError::Field("state")),
    };
    if p[5] & !1 != 0 {
        return Err(BeatError::Field("flags"));
    }
    let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let node = std::str::from_utf8(&p[HEADER..HEADER + name_len])
        .map_err(|_| BeatError::Field("name"))?
        .to_string();
    Ok(Beat {
        node,
        state,
        manual: p[5] & 1 != 0,
        boot_id: u64_at(8),
        seq: u64_at(16),
        unix_ms: u64_at(24),
    })
}

/// Replay filter for one path.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    window_ms: u64,
    last: Option<(u64, u64, u64)>,
}

impl ReplayGuard {
    /// `window_ms`: how far a new boot's timestamp may be from our clock.
    pub fn new(window_ms: u64) -> Self {
        ReplayGuard {
            window_ms,
            last: None,
        }
    }

    /// Accepts `b` (and remembers it) or says why not.
    pub fn accept(&mut self, b: &Beat, now_ms: u64) -> Result<(), BeatError> {
        match self.last {
            Some((boot, seq, _)) if boot == b.boot_id => {
                if b.seq <= seq {
                    return Err(BeatError::Replay {
                        boot: b.boot_id,
                        seq: b.seq,
                    });
                }
            }
            last => {
                // i128: any two u64 timestamps (a forged one may be anything) have a difference.
                let skew = i128::from(b.unix_ms) - i128::from(now_ms);
                if skew.unsigned_abs() > u128::from(self.window_ms) {
                    return Err(BeatError::Stale {
                        skew_ms: skew.clamp(i64::MIN.into(), i64::MAX.into()) as i64,
                    });
                }
                if let Some((_, _, ts)) = last {
                    if b.unix_ms <= ts {
                        return Err(BeatError::Replay {
                            boot: b.boot_id,
                            seq: b.seq,
                        });
                    }
                }
            }
        }
        self.last = Some((b.boot_id, b.seq, b.unix_ms));
        Ok(())
    }
}

/// Per-source screening of incoming datagrams (issue 13). A source address whose datagrams
/// fail the MAC check is throttled ([`twinsan_throttle`]): after a few bad datagrams, its
/// datagrams are dropped unread, without computing the HMAC, for the back-off delay, which
/// doubles with every further bad one (up to 5 s). Bad MACs are logged once per burst with
/// counts.
///
/// The configured peer address is never throttled, only logged: UDP source addresses are
/// trivially spoofed, so an attacker sending bad datagrams in the peer's name would otherwise
/// make us drop the real peer's heartbeats and declare it unreachable. (An attacker forging
/// the peer's address still costs us one HMAC per datagram, as before.) Datagrams from other
/// addresses never delay the peer's.
#[derive(Debug)]
pub struct SourceScreen {
    peer: IpAddr,
    throttle: Throttle<IpAddr>,
}

/// What to log about a datagram that was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacLog {
    /// Nothing (a good datagram, or one dropped for another reason).
    Nothing,
    /// A bad MAC: the first of a burst (warn), a later one (debug), or a reminder with the
    /// count so far (warn).
    Bad(LogAction),
    /// A good MAC from a source that had sent bad ones: the burst's total.
    Recovered(Burst),
}

impl SourceScreen {
    pub fn new(peer: IpAddr, params: Params) -> SourceScreen {
        SourceScreen {
            peer,
            throttle: Throttle::new(params),
        }
    }

    /// Whether to look at a datagram from `from` at all (`false`: drop it unread).
    pub fn admit(&mut self, from: IpAddr, now: Instant) -> bool {
        // The peer's address is exempt (see the type's docs). A datagram cannot wait for a
        // slot: one that would have to is dropped.
        from == self.peer
            || !matches!(
                self.throttle.admit(&from, now, Duration::ZERO),
                Admission::Refuse { .. }
            )
    }

    /// Records what came of an admitted datagram from `from`.
    pub fn outcome(&mut self, from: IpAddr, r: &Result<Beat, BeatError>, now: Instant) -> MacLog {
        match r {
            Err(BeatError::Mac) => MacLog::Bad(self.throttle.failed(&from, now)),
            // The MAC was right: the sender has the secret (a field error is a bug, not a guess).
            Ok(_) | Err(BeatError::Field(_)) => match self.throttle.succeeded(&from, now) {
                Some(b) => MacLog::Recovered(b),
                None => MacLog::Nothing,
            },
            // Junk, a replay or a stale timestamp: no verdict on the secret.
            Err(_) => {
                self.throttle.released(&from);
                MacLog::Nothing
            }
        }
    }

    /// Bursts that ended with their sources going quiet, with counts not yet logged.
    pub fn expire(&mut self, now: Instant) -> Vec<Ended<IpAddr>> {
        self.throttle.expire(now)
    }
}

/// Wall clock in ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What this host announces; the sender tasks send at once when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalBeat {
    pub state: PeerState,
    pub manual: bool,
}

/// What the heartbeat tasks report to the role loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReport {
    pub path: PeerPath,
    pub state: PeerState,
    pub manual: bool,
    pub node: String,
}

/// One heartbeat path (socket pair of addresses) with its settings.
#[derive(Debug, Clone)]
pub struct PathConfig {
    pub path: PeerPath,
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub node: String,
    pub secret: Arc<Vec<u8>>,
    pub boot_id: u64,
    pub seq: Arc<AtomicU64>,
}

/// Runs one path until `stop`: sends our beat every interval and at once when `local` changes,
/// receives the peer's, and reports each change of the peer's state (Unreachable after
/// `timeout` of silence, counted from the start: a fresh node waits that long for an answer).
pub async fn run_path(
    cfg: PathConfig,
    mut local: watch::Receiver<LocalBeat>,
    tx: mpsc::Sender<PeerReport>,
    stop: tokio_util::sync::CancellationToken,
) {
    let sock = loop {
        match UdpSocket::bind(cfg.listen).await {
            Ok(s) => break s,
            Err(e) => {
                warn!(path = ?cfg.path, listen = %cfg.listen, "cannot bind heartbeat socket: {e}; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    info!(path = ?cfg.path, listen = %cfg.listen, peer = %cfg.peer, "heartbeats running");
    let mut guard = ReplayGuard::new(cfg.timeout.as_millis() as u64 + 60_000);
    let mut last_heard = Instant::now();
    let mut reported: Option<(PeerState, bool)> = None;
    let mut peer_state = PeerState::Unknown;
    let mut peer_manual = false;
    let mut peer_node = String::new();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    let mut stale_warned = false;
    let mut screen = SourceScreen::new(cfg.peer.ip(), Params::DEFAULT);
    loop {
        let mut send_now = false;
        tokio::select! {
            _ = stop.cancelled() => {
                // A last beat so the peer sees our final role without waiting for a timeout.
                let last = *local.borrow();
                send(&sock, &cfg, last).await;
                return;
            }
            _ = tick.tick() => send_now = true,
            r = local.changed() => {
                if r.is_err() {
                    return;
                }
                send_now = true;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok((_, from)) if !screen.admit(from.ip(), Instant::now()) => {
                    // Dropped unread: this source keeps sending bad MACs (counted in the
                    // burst's next line).
                }
                Ok((n, from)) => {
                    let r = decode(&buf[..n], &cfg.secret)
                        .and_then(|b| guard.accept(&b, unix_ms()).map(|()| b));
                    let now = Instant::now();
                    log_mac(&cfg, from, screen.outcome(from.ip(), &r, now));
                    for e in screen.expire(now) {
                        info!(path = ?cfg.path, from = %e.key, "heartbeats with a bad MAC stopped: {} bad, {} dropped unread in {:.0?}", e.burst.failures, e.burst.refused, e.burst.lasted);
                    }
                    match r {
                        Ok(b) if b.node == cfg.node => {
                            warn!(path = ?cfg.path, %from, "heartbeat carries our own node name: reflected or misconfigured; ignored");
                        }
                        Ok(b) => {
                            last_heard = Instant::now();
                            peer_state = b.state;
                            peer_manual = b.manual;
                            peer_node = b.node;
                        }
                        Err(BeatError::Mac) => {} // logged by log_mac
                        Err(e @ BeatError::Stale { .. }) => {
                            // A clock problem an operator must see (once).
                            if !stale_warned {
                                stale_warned = true;
                                warn!(path = ?cfg.path, %from, "heartbeat dropped: {e} (check the clocks of both hosts)");
                            }
                        }
                        Err(e) => debug!(path = ?cfg.path, %from, "heartbeat dropped: {e}"),
                    }
                }
                Err(e) => {
                    debug!(path = ?cfg.path, "heartbeat receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
        if send_now {
            let beat = *local.borrow_and_update();
            send(&sock, &cfg, beat).await;
        }
        if last_heard.elapsed() >= cfg.timeout {
            peer_state = PeerState::Unreachable;
        }
        if reported != Some((peer_state, peer_manual)) && peer_state != PeerState::Unknown {
            reported = Some((peer_state, peer_manual));
            let r = PeerReport {
                path: cfg.path,
                state: peer_state,
                manual: peer_manual,
                node: peer_node.clone(),
            };
            if tx.send(r).await.is_err() {
                return;
            }
        }
    }
}

/// Logs a datagram's MAC outcome as the [`SourceScreen`] says: once per burst of bad ones.
fn log_mac(cfg: &PathConfig, from: SocketAddr, log: MacLog) {
    match log {
        MacLog::Nothing => {}
        MacLog::Bad(LogAction::First) => {
            warn!(path = ?cfg.path, %from, "heartbeat dropped: {} (check `secret` on both hosts); further bad ones from this address are counted, not logged", BeatError::Mac)
        }
        MacLog::Bad(LogAction::Quiet) => {
            debug!(path = ?cfg.path, %from, "heartbeat dropped: {}", BeatError::Mac)
        }
        MacLog::Bad(LogAction::Ongoing(b)) => {
            warn!(path = ?cfg.path, %from, "heartbeats with a bad MAC go on: {} bad, {} dropped unread in {:.0?}", b.failures, b.refused, b.lasted)
        }
        MacLog::Recovered(b) => {
            info!(path = ?cfg.path, %from, "good heartbeat after {} with a bad MAC ({} dropped unread) in {:.0?}", b.failures, b.refused, b.lasted)
        }
    }
}

async fn send(sock: &UdpSocket, cfg: &PathConfig, local: LocalBeat) {
    let beat = Beat {
        node: cfg.node.clone(),
        state: local.state,
        manual: local.manual,
        boot_id: cfg.boot_id,
        seq: cfg.seq.fetch_add(1, Ordering::Relaxed) + 1,
        unix_ms: unix_ms(),
    };
    if let Err(e) = sock.send_to(&encode(&beat, &cfg.secret), cfg.peer).await {
        debug!(path = ?cfg.path, peer = %cfg.peer, "heartbeat send: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(seq: u64, ts: u64) -> Beat {
        Beat {
            node: "host-a".into(),
            state: PeerState::Primary,
            manual: true,
            boot_id: 7,
            seq,
            unix_ms: ts,
        }
    }

    #[test]
    fn bad_mac_sources_are_dropped_unread_and_logged_once_but_the_peer_never_is() {
        let peer: IpAddr = [10, 0, 0, 2].into();
        let attacker: IpAddr = [10, 0, 0, 66].into();
        let p = Params::DEFAULT;
        let mut s = SourceScreen::new(peer, p);
        let now = Instant::now();
        let bad: Result<Beat, BeatError> = Err(BeatError::Mac);
        let good: Result<Beat, BeatError> = Ok(beat(1, 5));
        // The attacker: the first bad MAC is logged, the next ones counted; after the free
        // ones its datagrams are dropped before the HMAC is computed.
        let mut logs = Vec::new();
        let mut checked = 0;
        for _ in 0..100 {
            if s.admit(attacker, now) {
                checked += 1;
                logs.push(s.outcome(attacker, &bad, now));
            }
        }
        assert_eq!(checked, p.free_failures, "HMACs computed for the attacker");
        assert_eq!(logs[0], MacLog::Bad(LogAction::First));
        assert!(logs[1..]
            .iter()
            .all(|l| *l == MacLog::Bad(LogAction::Quiet)));
        // Dropped for the back-off only: after it, one more datagram is looked at.
        let later = now + p.delay(p.free_failures);
        assert!(s.admit(attacker, later));
        assert_eq!(
            s.outcome(attacker, &bad, later),
            MacLog::Bad(LogAction::Quiet)
        );
        assert!(!s.admit(attacker, later));

        // The configured peer is never dropped, even sending bad MACs (an attacker spoofing
        // its address must not silence it); its bad MACs are logged once per burst too.
        for i in 0..100 {
            assert!(s.admit(peer, now), "peer datagram {i} dropped");
            let want = if i == 0 {
                LogAction::First
            } else {
                LogAction::Quiet
            };
            assert_eq!(s.outcome(peer, &bad, now), MacLog::Bad(want));
        }
        assert!(s.admit(peer, now));
        match s.outcome(peer, &good, now) {
            MacLog::Recovered(b) => assert_eq!(b.failures, 100),
            other => panic!("{other:?}"),
        }
        // A third address is not affected by the attacker.
        let other: IpAddr = [10, 0, 0, 3].into();
        assert!(s.admit(other, now));
        assert_eq!(s.outcome(other, &good, now), MacLog::Nothing);
        // Junk without a verdict on the secret costs nothing.
        for _ in 0..100 {
            assert!(s.admit(other, now));
            assert_eq!(
                s.outcome(other, &Err(BeatError::Magic), now),
                MacLog::Nothing
            );
        }
        // The attacker's burst is reported once it has been quiet long enough.
        let ended = s.expire(later + p.forget_after);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].key, attacker);
        assert_eq!(ended[0].burst.failures, 4);
        assert!(ended[0].burst.refused > 90);
    }

    #[test]
    fn round_trip() {
        let b = beat(1, 1_000_000);
        let p = encode(&b, b"secret-1");
        assert_eq!(p.len(), HEADER + 6 + MAC_LEN);
        assert_eq!(decode(&p, b"secret-1"), Ok(b.clone()));
        let s = Beat {
            state: PeerState::Secondary,
            manual: false,
            ..b
        };
        assert_eq!(decode(&encode(&s, b"k"), b"k"), Ok(s));
    }

    #[test]
    fn wrong_secret_and_tampering_fail() {
        let p = encode(&beat(1, 5), b"secret-1");
        assert_eq!(decode(&p, b"secret-2"), Err(BeatError::Mac));
        for i in 0..p.len() {
            let mut q = p.clone();
            q[i] ^= 0x01;
            assert!(
                decode(&q, b"secret-1").is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert!(matches!(
            decode(&p[..p.len() - 1], b"secret-1"),
            Err(BeatError::Length(_))
        ));
        assert!(decode(&[], b"x").is_err());
        assert!(decode(&[0u8; MAX_DATAGRAM + 1], b"x").is_err());
    }

    /// Found by the fuzz target: a timestamp more than i64::MAX ms from ours overflowed the
    /// skew (a panic in a debug build, a wrapped skew in a release one).
    #[test]
    fn far_timestamps_are_stale_without_overflow() {
        let mut g = ReplayGuard::new(10_000);
        let now = 1_750_000_000_000;
        for ts in [u64::MAX, 1 << 63, (1 << 63) + now, 0] {
            assert!(
                matches!(g.accept(&beat(1, ts), now), Err(BeatError::Stale { .. })),
                "timestamp {ts}"
            );
        }
        assert_eq!(
            g.accept(&beat(1, u64::MAX), 0),
            Err(BeatError::Stale { skew_ms: i64::MAX })
        );
        assert_eq!(g.accept(&beat(1, now + 5), now), Ok(()));
    }

    #[test]
    fn replays_are_refused() {
        let now = 10_000_000;
        let mut g = ReplayGuard::new(60_000);
        assert!(g.accept(&beat(5, now), now).is_ok());
        assert!(matches!(
            g.accept(&beat(5, now), now),
            Err(BeatError::Replay { .. })
        ));
        assert!(matches!(
            g.accept(&beat(4, now + 1), now),
            Err(BeatError::Replay { .. })
        ));
        assert!(g.accept(&beat(6, now + 1), now).is_ok());
        // A restarted peer: new boot id, newer clock, sequence from 1 again.
        let restarted = Beat {
            boot_id: 8,
            ..beat(1, now + 500)
        };
        assert!(g.accept(&restarted, now + 500).is_ok());
        // An old boot's datagram recorded earlier is refused (older timestamp).
        assert!(matches!(
            g.accept(&beat(7, now + 2), now + 600),
            Err(BeatError::Replay { .. })
        ));
        // A first datagram far from our clock is refused.
        let mut fresh = ReplayGuard::new(60_000);
        assert!(matches!(
            fresh.accept(&beat(1, now - 120_000), now),
            Err(BeatError::Stale { .. })
        ));
    }

    #[tokio::test]
    async fn two_paths_see_each_other_and_time_out() {
        let secret = Arc::new(b"loopback-secret".to_vec());
        let a_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Reserve two ports.
        let pa = std::net::UdpSocket::bind(a_addr).unwrap();
        let pb = std::net::UdpSocket::bind(a_addr).unwrap();
        let (la, lb) = (pa.local_addr().unwrap(), pb.local_addr().unwrap());
        drop((pa, pb));
        let mk = |node: &str, listen, peer| PathConfig {
            path: PeerPath::Replication,
            listen,
            peer,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            node: node.into(),
            secret: secret.clone(),
            boot_id: rand::random(),
            seq: Arc::new(AtomicU64::new(0)),
        };
        let (txa, mut rxa) = mpsc::channel(16);
        let (txb, mut rxb) = mpsc::channel(16);
        let (wa, ra) = watch::channel(LocalBeat {
            state: PeerState::Secondary,
            manual: false,
        });
        let (_wb, rb) = watch::channel(LocalBeat {
            state: PeerState::Secondary,
            manual: true,
        });
        let stop_a = tokio_util::sync::CancellationToken::new();
        let stop_b = tokio_util::sync::CancellationToken::new();
        let ta = tokio::spawn(run_path(mk("a", la, lb), ra, txa, stop_a.clone()));
        let tb = tokio::spawn(run_path(mk("b", lb, la), rb, txb, stop_b.clone()));
        async fn next(rx: &mut mpsc::Receiver<PeerReport>) -> PeerReport {
            tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("report in time")
                .expect("channel open")
        }
        let r = next(&mut rxa).await;
        assert_eq!(
            (r.state, r.manual, r.node.as_str()),
            (PeerState::Secondary, true, "b")
        );
        let r = next(&mut rxb).await;
        assert_eq!((r.state, r.manual), (PeerState::Secondary, false));
        // A role change reaches the peer at once, not after the next tick.
        let t0 = Instant::now();
        wa.send(LocalBeat {
            state: PeerState::Primary,
            manual: false,
        })
        .unwrap();
        let r = next(&mut rxb).await;
        assert_eq!(r.state, PeerState::Primary);
        assert!(t0.elapsed() < Duration::from_millis(100));
        // A stops: B reports it Primary (the final beat), then Unreachable after the timeout.
        stop_a.cancel();
        ta.await.unwrap();
        let t0 = Instant::now();
        loop {
            let r = next(&mut rxb).await;
            if r.state == PeerState::Unreachable {
                break;
            }
        }
        assert!(t0.elapsed() >= Duration::from_millis(150));
        stop_b.cancel();
        tb.await.unwrap();
    }
}
