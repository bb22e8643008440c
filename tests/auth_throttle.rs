//! Issue 13, authentication throttling: a real `twinsan serve` with a CHAP target, guessed at
//! by 200 logins with the wrong secret from one initiator. The guesses are spaced out (the
//! 200th waits the throttle's cap), another initiator logging in meanwhile is not delayed, the
//! right secret works after the back-off, and the daemon logs the burst once, not 200 times.
//!
//! The daemon's constants (twinsan_throttle::Params::DEFAULT): three free failures, then 100 ms
//! doubling up to 5 s; attempts whose slot would be more than 5 s away are refused (status
//! 0x0301) after 5 s. The 200 attempts overlap (each starts once the previous one asked for
//! its challenge), so the whole run takes about one cap, not 200.

mod common;

use bytes::BytesMut;
use common::{scratch_dir, Server, INIT1, INIT2, IQN};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};
use twinsan::iscsi::chap::ChapAlgorithm;
use twinsan::iscsi::negotiation::encode_text;
use twinsan::iscsi::pdu::{Opcode, Pdu, PduCodec};

const USER: &str = "ini-user";
const SECRET: &str = "right-secret-12345";
const WRONG: &str = "wrong-secret-00000";
/// The daemon's longest back-off delay and refusal wait.
const CAP: Duration = Duration::from_secs(5);
const AUTH_FAILURE: u16 = 0x0201;
const SERVICE_UNAVAILABLE: u16 = 0x0301;

/// How one CHAP login went.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// 0: logged in; else the failing login response's status class and detail.
    status: u16,
    /// From asking for the challenge (CHAP_A) to the target's answer: the throttle's wait.
    challenge_wait: Duration,
    /// The whole login.
    total: Duration,
}

/// A blocking login connection speaking just enough iSCSI for a CHAP login.
struct Conn {
    stream: TcpStream,
    codec: PduCodec,
    buf: BytesMut,
    isid: [u8; 6],
    exp_stat_sn: u32,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let [a, b]: [u8; 2] = rand::random::<u16>().to_be_bytes();
        Conn {
            stream,
            codec: PduCodec::default(),
            buf: BytesMut::new(),
            isid: [0x80, 0, 0x12, 0x34, a, b],
            exp_stat_sn: 0,
        }
    }

    /// Sends a Login Request (CSG `csg`, transit to `nsg` if given) and returns the response
    /// status and its keys.
    fn step(
        &mut self,
        csg: u8,
        nsg: Option<u8>,
        keys: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, u8) {
        let mut p = Pdu::new(Opcode::LoginRequest);
        p.set_immediate(true);
        let flags = (csg << 2) | nsg.map_or(0, |n| 0x80 | n);
        p.set_flags(flags);
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.set_itt(0);
        p.set_u32_at(24, 1);
        p.set_u32_at(28, self.exp_stat_sn);
        p.set_data(encode_text(keys).into());
        let mut out = BytesMut::new();
        self.codec.encode(p, &mut out).unwrap();
        self.stream.write_all(&out).expect("send login request");
        let r = self.recv();
        assert_eq!(r.opcode(), Some(Opcode::LoginResponse), "{r:?}");
        self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
        let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
        (status, pairs(&r.data), r.flags())
    }

    fn recv(&mut self) -> Pdu {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).expect("framing") {
                return frame.expect("well-formed PDU");
            }
            let mut tmp = [0u8; 8192];
            let n = self.stream.read(&mut tmp).expect("read login response");
            assert!(n > 0, "target closed the connection during login");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

fn key<'a>(kv: &'a [(String, String)], k: &str) -> &'a str {
    kv.iter()
        .find(|(x, _)| x == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {k} in {kv:?}"))
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim_start_matches("0x").trim_start_matches("0X");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A CHAP (MD5) login to [`IQN`] as `initiator` answering with `secret`. `asking` is told
/// just after the challenge was asked for.
fn chap_login(
    port: u16,
    initiator: &str,
    secret: &str,
    asking: Option<mpsc::Sender<()>>,
) -> Outcome {
    let start = Instant::now();
    let mut c = Conn::open(port);
    let done = |status, challenge_wait| Outcome {
        status,
        challenge_wait,
        total: start.elapsed(),
    };
    let (st, _, _) = c.step(
        0,
        Some(1),
        &[
            ("InitiatorName", initiator),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP"),
        ],
    );
    assert_eq!(st, 0, "AuthMethod=CHAP refused");
    let asked = Instant::now();
    // The request goes out before `step` waits for the answer; tell the caller right away.
    let mut p = Pdu::new(Opcode::LoginRequest);
    p.set_immediate(true);
    p.set_flags(0);
    p.bhs[8..14].copy_from_slice(&c.isid);
    p.set_u32_at(24, 1);
    p.set_u32_at(28, c.exp_stat_sn);
    p.set_data(encode_text(&[("CHAP_A", "5")]).into());
    let mut out = BytesMut::new();
    c.codec.encode(p, &mut out).unwrap();
    c.stream.write_all(&out).unwrap();
    if let Some(tx) = asking {
        let _ = tx.send(());
    }
    let r = c.recv();
    let challenge_wait = asked.elapsed();
    c.exp_stat_sn = r.u32_at(24).wrapping_add(1);
    let st = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
    if st != 0 {
        return done(st, challenge_wait);
    }
    let kv = pairs(&r.data);
    let id: u8 = key(&kv, "CHAP_I").parse().unwrap();
    let challenge = unhex(key(&kv, "CHAP_C"));
    let resp = ChapAlgorithm::Md5.response(id, secret.as_bytes(), &challenge);
    let resp: String = resp.iter().map(|b| format!("{b:02x}")).collect();
    let (st, _, _) = c.step(
        0,
        Some(1),
        &[("CHAP_N", USER), ("CHAP_R", &format!("0x{resp}"))],
    );
    if st != 0 {
        return done(st, challenge_wait);
    }
    // Operational stage: ask for full feature phase until the target grants it.
    for _ in 0..4 {
        let (st, _, flags) = c.step(
            1,
            Some(3),
            &[("HeaderDigest", "None"), ("DataDigest", "None")],
        );
        if st != 0 {
            return done(st, challenge_wait);
        }
        if flags & 0x80 != 0 && flags & 3 == 3 {
            return done(0, challenge_wait);
        }
    }
    panic!("login did not reach full feature phase");
}

#[test]
fn two_hundred_wrong_chap_logins_are_throttled_per_initiator() {
    let dir = scratch_dir();
    let server = Server::start(
        dir.path(),
        &format!("chap = {{ user = \"{USER}\", secret = \"{SECRET}\" }}"),
        None,
        "",
    );
    let port = server.port;

    // Both initiators log in at once with the right secret before anything failed.
    for ini in [INIT1, INIT2] {
        let o = chap_login(port, ini, SECRET, None);
        assert_eq!(o.status, 0, "{ini}: {o:?}");
    }

    // 200 wrong logins from INIT1, each started once the previous one has asked for its
    // challenge, so the target sees them in order.
    let storm = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..200 {
        let (tx, rx) = mpsc::channel();
        handles.push(std::thread::spawn(move || {
            chap_login(port, INIT1, WRONG, Some(tx))
        }));
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a login of the storm did not get to ask for its challenge");
    }
    // Meanwhile another initiator, from the same address, logs in undelayed.
    let other = chap_login(port, INIT2, SECRET, None);
    let other_at = storm.elapsed();
    let results: Vec<Outcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let storm_took = storm.elapsed();

    assert_eq!(other.status, 0, "INIT2's right secret: {other:?}");
    assert!(
        other.total < Duration::from_secs(1),
        "INIT2 was delayed by INIT1's failures: {other:?}"
    );
    for (i, o) in results.iter().enumerate() {
        assert!(
            o.status == AUTH_FAILURE || o.status == SERVICE_UNAVAILABLE,
            "attempt {}: {o:?}",
            i + 1
        );
    }
    let heard = results.iter().filter(|o| o.status == AUTH_FAILURE).count();
    let prompt = results
        .iter()
        .filter(|o| o.challenge_wait < Duration::from_millis(50))
        .count();
    // Three free attempts, then 100 ms doubling: within one 5 s cap only a handful of
    // guesses are checked (0 + 0 + 0 + 0.1 + 0.3 + 0.7 + 1.5 + 3.1 s); the rest are refused.
    assert!(heard <= 10, "{heard} of 200 guesses were checked");
    assert!(prompt <= 3, "{prompt} attempts were answered without delay");
    let last = results[199];
    assert!(
        last.challenge_wait >= CAP - Duration::from_millis(500),
        "the 200th attempt was not delayed: {last:?}"
    );
    eprintln!(
        "storm: {heard} guesses checked, {} refused, 200th waited {:?}, took {storm_took:?}; \
         INIT2 logged in after {:?} (at {other_at:?})",
        200 - heard,
        last.challenge_wait,
        other.total
    );

    // After the back-off, INIT1's right secret logs in (waiting at most one cap for its slot).
    let back = chap_login(port, INIT1, SECRET, None);
    assert_eq!(
        back.status, 0,
        "INIT1's right secret after the back-off: {back:?}"
    );
    assert!(back.total < CAP + Duration::from_secs(2), "{back:?}");
    // And the throttle forgot INIT1: another wrong guess is answered at once.
    let again = chap_login(port, INIT1, WRONG, None);
    assert_eq!(again.status, AUTH_FAILURE);
    assert!(again.challenge_wait < Duration::from_secs(1), "{again:?}");

    // Logged once per burst: one warning for the 200, and one line when the right secret
    // ended the burst.
    let log = server.log_text();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("CHAP authentication failed"))
        .count();
    // The burst's first failure, and the first of the new burst after the success.
    assert_eq!(warned, 2, "log:\n{}", common::tail(&log, 40));
    assert!(
        log.lines().any(|l| l.contains("CHAP login succeeded after")
            && l.contains(&format!("{heard} failed attempts"))),
        "no closing line for the burst; log:\n{}",
        common::tail(&log, 40)
    );
}

/// The `key=value` pairs of a login response's text.
fn pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}
