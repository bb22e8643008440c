//! Fuzz targets, run for a bounded time by the test command (issue 13 item 6).
//!
//! | target              | code under test                                                 |
//! |---------------------|-----------------------------------------------------------------|
//! | `pdu_codec`         | `PduCodec` decode (with and without digests), the typed views   |
//! | `login`             | the sans-IO login state machine fed login PDUs (text included)  |
//! | `text`              | FFP Text Requests, `parse_text`, the operational `Negotiator`   |
//! | `replication_frame` | `FrameCodec` decode and `Message::decode_body`                  |
//! | `heartbeat`         | `heartbeat::decode` and the `ReplayGuard`                       |
//! | `config`            | `Config::parse` (TOML + validation) of arbitrary text           |
//!
//! Each target asserts no panic and, where cheap, that re-encoding what was decoded decodes
//! to the same value. The seeds are in `tests/fuzz/corpus/<target>/` (made by the encoders:
//! `cargo test --release --test fuzz -- --ignored write_corpus` rewrites the generated ones).
//! `TWINSAN_FUZZ_SECS` sets each target's time (default 10 s): see `driver.rs`.
//!
//! The login and text targets take a sequence of requests, each a 48-byte BHS followed by
//! its data segment, separated by [`RECORD_SEP`]; the data segment length in the BHS is
//! filled in from the record, so that edits of the text keep the framing.

#[path = "fuzz/driver.rs"]
mod driver;
#[path = "fuzz/seeds.rs"]
mod seeds;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio_util::codec::{Decoder, Encoder};

use twinsan::config::Config;
use twinsan::iscsi::chap::{ChapAlgorithm, ChapCredentials};
use twinsan::iscsi::login::{
    ExistingSession, LoginConfig, LoginNegotiation, LoginStep, SessionDirectory, SessionQuery,
    TargetAuth,
};
use twinsan::iscsi::negotiation::{
    self, encode_hex, encode_text, parse_binary, parse_numeric, parse_text, Negotiator,
    SessionParams, SessionType, TargetLimits,
};
use twinsan::iscsi::pdu::{
    encode_pdu, DataIn, DataOut, LoginRequest, LoginResponse, LogoutRequest, NopOut, Opcode, Pdu,
    PduCodec, R2t, ScsiCommand, ScsiResponse, TaskMgmtRequest, TextRequest, TextResponse,
    WireBatch, BHS_LEN,
};
use twinsan::iscsi::text::{TextContext, TextNegotiation, TextOutcome};
use twinsan_ha::heartbeat::{self, ReplayGuard};
use twinsan_replication::link::proto::{
    encode_frame, FrameCodec, FrameQueue, Message, PROTOCOL_VERSION,
};

use driver::Target;

/// Separates the requests of a login or text input.
pub const RECORD_SEP: &[u8] = b"\n@@next-pdu@@\n";

/// The secret of the heartbeat target's datagrams.
pub const HB_SECRET: &[u8] = b"fuzz-heartbeat-secret";

/// The CHAP secret of every CHAP-protected target of the login target's configuration.
pub const CHAP_SECRET: &str = "fuzz-chap-secret-1234";
pub const CHAP_USER: &str = "fuzz-user";
pub const TGT_OPEN: &str = "iqn.2024-01.org.example:disk1";
pub const TGT_CHAP: &str = "iqn.2024-01.org.example:secure";
pub const TGT_ACL: &str = "iqn.2024-01.org.example:private";
pub const INITIATOR: &str = "iqn.2024-01.org.example:ini";

// ---------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------

/// Keys the login and text generators and dictionaries use: every key of the negotiation
/// table, plus the CHAP keys, `SendTargets` and unknown ones.
fn keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut k: Vec<&'static str> = negotiation::KEYS.iter().map(|d| d.name).collect();
        for extra in [
            "CHAP_A",
            "CHAP_N",
            "CHAP_R",
            "CHAP_I",
            "CHAP_C",
            "SendTargets",
            "X-com.example.vendor",
            "X#private",
        ] {
            if !k.contains(&extra) {
                k.push(extra);
            }
        }
        k
    })
}

const VALUES: &[&str] = &[
    INITIATOR,
    TGT_OPEN,
    TGT_CHAP,
    TGT_ACL,
    "Normal",
    "Discovery",
    "None",
    "CHAP",
    "CHAP,None",
    "None,CHAP",
    "5",
    "6",
    "7",
    "128",
    "5,6,7,128",
    "130",
    CHAP_USER,
    "@",
    "0x00",
    "0x0123456789abcdef",
    "0b",
    "0bAAAA",
    "CRC32C",
    "None,CRC32C",
    "CRC32C,None",
    "Yes",
    "No",
    "0",
    "1",
    "2",
    "511",
    "512",
    "8192",
    "65536",
    "262144",
    "16777215",
    "16777216",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "0x7fffffff",
    "Irrelevant",
    "Reject",
    "NotUnderstood",
    "All",
    "",
    "2048~8192",
    "0~4294967295",
];

/// Dictionary of the text-carrying targets: keys with '=', values, separators.
fn text_dict() -> &'static [&'static [u8]] {
    static DICT: OnceLock<Vec<&'static [u8]>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d: Vec<&'static [u8]> = vec![b"\0", b"=", b",", b"\0\0", RECORD_SEP];
        for k in keys() {
            d.push(Box::leak(format!("{k}=").into_bytes().into_boxed_slice()));
        }
        for v in VALUES {
            d.push(v.as_bytes());
        }
        d
    })
}

/// A key=value text from the key and value lists, or a random value.
fn text_strategy() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        4 => proptest::sample::select(VALUES).prop_map(str::to_string),
        1 => "[ -~]{0,40}",
        1 => (1usize..600).prop_map(|n| "a".repeat(n)),
    ];
    vec((proptest::sample::select(keys()), value), 0..10).prop_map(|pairs| {
        let pairs: Vec<(String, String)> =
            pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        encode_text(&pairs)
    })
}

/// Splits a login / text input into PDUs (see the module comment).
fn records(input: &[u8]) -> Vec<Pdu> {
    let mut out = Vec::new();
    let mut rest = input;
    loop {
        let (rec, next) = match find(rest, RECORD_SEP) {
            Some(i) => (&rest[..i], Some(&rest[i + RECORD_SEP.len()..])),
            None => (rest, None),
        };
        let mut bhs = [0u8; BHS_LEN];
        let n = rec.len().min(BHS_LEN);
        bhs[..n].copy_from_slice(&rec[..n]);
        let data = &rec[n..];
        let len = data.len().min((1 << 24) - 1) as u32;
        bhs[4] = 0;
        bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        out.push(Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::copy_from_slice(&data[..len as usize]),
        });
        match next {
            Some(n) if out.len() < 256 => rest = n,
            _ => break,
        }
    }
    out
}

/// Joins requests into a login / text input.
pub fn join_records(pdus: &[Pdu]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in pdus.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(RECORD_SEP);
        }
        out.extend_from_slice(&p.bhs);
        out.extend_from_slice(&p.data);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Pairs of a text that may repeat keys (SendTargets answers do).
fn loose_pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = std::str::from_utf8(s).ok()?;
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// pdu_codec
// ---------------------------------------------------------------------------------------

/// Reads every field of every typed view (they must not panic on any PDU).
fn touch_views(p: &Pdu) {
    use std::hint::black_box as bb;
    bb((
        p.opcode(),
        p.raw_opcode(),
        p.immediate(),
        p.flags(),
        p.final_bit(),
    ));
    bb((
        p.total_ahs_len(),
        p.data_segment_len(),
        p.wire_len(),
        p.lun(),
        p.itt(),
    ));
    bb((
        p.field20(),
        p.field24(),
        p.field28(),
        p.field32(),
        p.cmd_sn(),
    ));
    bb(Opcode::from_u8(p.bhs[0]));
    let c = ScsiCommand(p);
    bb((
        c.final_bit(),
        c.read(),
        c.write(),
        c.attr(),
        c.lun(),
        c.itt(),
    ));
    bb((
        c.expected_data_transfer_length(),
        c.cmd_sn(),
        c.exp_stat_sn(),
    ));
    bb((c.cdb(), c.ahs()));
    let d = DataOut(p);
    bb((
        d.final_bit(),
        d.lun(),
        d.itt(),
        d.target_transfer_tag(),
        d.exp_stat_sn(),
    ));
    bb((d.data_sn(), d.buffer_offset(), d.data()));
    let t = TextRequest(p);
    bb((
        t.final_bit(),
        t.continue_bit(),
        t.itt(),
        t.target_transfer_tag(),
    ));
    bb((t.cmd_sn(), t.exp_stat_sn()));
    let l = LoginRequest(p);
    bb((
        l.transit(),
        l.continue_bit(),
        l.csg(),
        l.nsg(),
        l.version_max(),
    ));
    bb((
        l.version_min(),
        l.isid(),
        l.tsih(),
        l.itt(),
        l.cid(),
        l.cmd_sn(),
    ));
    bb(l.exp_stat_sn());
    let r = LoginResponse(p);
    bb((
        r.tsih(),
        r.isid(),
        r.version_max(),
        r.version_active(),
        r.stat_sn(),
    ));
    bb((r.exp_cmd_sn(), r.max_cmd_sn(), r.status()));
    let o = LogoutRequest(p);
    bb((
        o.reason_code(),
        o.itt(),
        o.cid(),
        o.cmd_sn(),
        o.exp_stat_sn(),
    ));
    let m = TaskMgmtRequest(p);
    bb((
        m.function(),
        m.lun(),
        m.itt(),
        m.referenced_task_tag(),
        m.cmd_sn(),
    ));
    bb((m.exp_stat_sn(), m.ref_cmd_sn(), m.exp_data_sn()));
    let n = NopOut(p);
    bb((
        n.lun(),
        n.itt(),
        n.target_transfer_tag(),
        n.cmd_sn(),
        n.exp_stat_sn(),
    ));
    let s = ScsiResponse(p);
    bb((
        s.response(),
        s.status(),
        s.underflow(),
        s.overflow(),
        s.itt(),
    ));
    bb((s.stat_sn(), s.exp_data_sn(), s.residual_count()));
    let i = DataIn(p);
    bb((
        i.final_bit(),
        i.status_bit(),
        i.underflow(),
        i.overflow(),
        i.status(),
    ));
    bb((
        i.itt(),
        i.target_transfer_tag(),
        i.data_sn(),
        i.buffer_offset(),
    ));
    bb(i.residual_count());
    let q = R2t(p);
    bb((
        q.lun(),
        q.itt(),
        q.target_transfer_tag(),
        q.r2t_sn(),
        q.buffer_offset(),
    ));
    bb(q.desired_data_transfer_length());
    let x = TextResponse(p);
    bb((
        x.final_bit(),
        x.continue_bit(),
        x.itt(),
        x.target_transfer_tag(),
    ));
    bb((x.stat_sn(), x.exp_cmd_sn(), x.max_cmd_sn()));
}

/// Encodes `p` with `codec`'s digests (through the codec and through a `WireBatch`, which
/// must agree) and decodes it again: the same PDU must come back.
fn pdu_round_trip(p: &Pdu, codec: &PduCodec) {
    let mut wire = BytesMut::new();
    codec.clone().encode(p.clone(), &mut wire).unwrap();
    let mut alt = BytesMut::new();
    encode_pdu(p, codec.header_digest, codec.data_digest, &mut alt);
    assert_eq!(wire, alt, "Encoder and encode_pdu differ");
    let mut batch = WireBatch::default();
    batch.push(p, codec.header_digest, codec.data_digest);
    let batched: Vec<u8> = batch
        .take()
        .iter()
        .flat_map(|b| b.iter().copied())
        .collect();
    assert_eq!(&wire[..], &batched[..], "WireBatch and encode_pdu differ");
    let mut dec = PduCodec {
        max_recv_data_segment: (1 << 24) - 1,
        ..codec.clone()
    };
    match dec.decode(&mut wire) {
        Ok(Some(Ok(back))) => assert_eq!(&back, p, "PDU changed in a round trip"),
        other => panic!("re-encoded PDU does not decode: {other:?}"),
    }
    assert!(
        wire.is_empty(),
        "{} bytes left after a round trip",
        wire.len()
    );
}

/// Decodes a byte stream to the end; returns the PDUs.
fn decode_stream(codec: &mut PduCodec, input: &[u8]) -> Vec<Pdu> {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    for _ in 0..4096 {
        let before = buf.len();
        match codec.decode_eof(&mut buf) {
            Ok(Some(Ok(p))) => {
                touch_views(&p);
                out.push(p);
            }
            Ok(Some(Err(_bad))) => {}
            Ok(None) | Err(_) => break,
        }
        assert!(
            buf.len() < before,
            "decode returned a PDU without consuming input"
        );
    }
    out
}

fn check_pdu_codec(input: &[u8]) {
    let plain = PduCodec::default();
    let digests = PduCodec {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment: 262_144,
    };
    for codec in [&plain, &digests] {
        for p in decode_stream(&mut codec.clone(), input) {
            pdu_round_trip(&p, codec);
        }
    }
    // The same PDUs with correct digests: framed without digests, sent with them.
    let mut lax = PduCodec {
        max_recv_data_segment: (1 << 24) - 1,
        ..PduCodec::default()
    };
    for p in decode_stream(&mut lax, input) {
        pdu_round_trip(&p, &digests);
        let hd_only = PduCodec {
            data_digest: false,
            ..digests.clone()
        };
        pdu_round_trip(&p, &hd_only);
    }
}

fn pdu_strategy() -> BoxedStrategy<Vec<u8>> {
    let one = (
        proptest::sample::select(vec![
            0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25,
            0x26, 0x31, 0x32, 0x3f, 0x1c, 0x3e,
        ]),
        any::<bool>(),
        proptest::array::uniform32(any::<u8>()),
        proptest::array::uniform8(any::<u8>()),
        vec(any::<u8>(), 0..5).prop_map(|w| w.repeat(4)),
        prop_oneof![3 => vec(any::<u8>(), 0..64), 1 => vec(any::<u8>(), 0..9000)],
    )
        .prop_map(|(op, imm, a, b, ahs, data)| {
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = op | if imm { 0x40 } else { 0 };
            bhs[1..4].copy_from_slice(&a[..3]);
            bhs[8..40].copy_from_slice(&a);
            bhs[40..48].copy_from_slice(&b);
            Pdu {
                bhs,
                ahs: Bytes::from(ahs),
                data: Bytes::from(data),
            }
        });
    (vec(one, 1..4), any::<bool>(), any::<bool>())
        .prop_map(|(pdus, hd, dd)| {
            let mut out = BytesMut::new();
            for p in &pdus {
                encode_pdu(p, hd, dd, &mut out);
            }
            out.to_vec()
        })
        .boxed()
}

const PDU_DICT: &[&[u8]] = &[
    &[0; 48],
    &[0xff; 4],
    b"\x00\x00\x20\x00",
    b"\x00\x00\x00\x30",
];

#[test]
fn fuzz_pdu_codec() {
    driver::run(
        Target {
            name: "pdu_codec",
            dict: PDU_DICT,
            structured: pdu_strategy(),
            max_random: 256,
        },
        check_pdu_codec,
    );
}

// ---------------------------------------------------------------------------------------
// login
// ---------------------------------------------------------------------------------------

pub fn login_config() -> Arc<LoginConfig> {
    static CFG: OnceLock<Arc<LoginConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let creds = |u: &str, s: &str| ChapCredentials {
            user: u.into(),
            secret: s.into(),
        };
        let mut open = TargetAuth::new(TGT_OPEN);
        open.alias = Some("disk one".into());
        let mut chap = TargetAuth::new(TGT_CHAP);
        chap.chap = Some(creds(CHAP_USER, CHAP_SECRET));
        chap.mutual_chap = Some(creds("tgt-user", "tgt-secret-67890"));
        let mut acl = TargetAuth::new(TGT_ACL);
        acl.allowed_initiators = vec!["iqn.2024-01.org.example:other".into()];
        Arc::new(LoginConfig {
            portal_group_tag: 7,
            targets: vec![open, chap, acl],
            ..LoginConfig::default()
        })
    })
    .clone()
}

#[derive(Default)]
struct Dir {
    next: u16,
    queries: u32,
}

impl SessionDirectory for Dir {
    fn allocate_tsih(&mut self, _: &str, _: [u8; 6]) -> Option<u16> {
        self.next = self.next.wrapping_add(1);
        (self.next != 5).then_some(self.next)
    }
    fn find_session(&mut self, q: &SessionQuery<'_>) -> ExistingSession {
        self.queries += 1;
        match q.tsih % 3 {
            0 => ExistingSession::NotFound,
            1 => ExistingSession::Reinstate {
                params: SessionParams::default(),
            },
            _ => ExistingSession::TooManyConnections,
        }
    }
}

/// The CHAP challenge of the last response, to answer `CHAP_R=@` correctly.
#[derive(Default)]
struct ChapOracle {
    alg: Option<ChapAlgorithm>,
    id: Option<u8>,
    challenge: Option<Vec<u8>>,
}

impl ChapOracle {
    fn learn(&mut self, response: &Pdu) {
        for (k, v) in loose_pairs(&response.data) {
            match k.as_str() {
                "CHAP_A" => self.alg = parse_numeric(&v).and_then(ChapAlgorithm::from_code),
                "CHAP_I" => self.id = parse_numeric(&v).and_then(|n| u8::try_from(n).ok()),
                "CHAP_C" => self.challenge = parse_binary(&v),
                _ => {}
            }
        }
    }

    /// Replaces `CHAP_R=@` with the right answer, if a challenge was seen.
    fn answer(&self, data: &Bytes) -> Bytes {
        const PLACEHOLDER: &[u8] = b"CHAP_R=@";
        let (Some(alg), Some(id), Some(c)) = (self.alg, self.id, &self.challenge) else {
            return data.clone();
        };
        let Some(i) = find(data, PLACEHOLDER) else {
            return data.clone();
        };
        let r = alg.response(id, CHAP_SECRET.as_bytes(), c);
        let mut v = data[..i].to_vec();
        v.extend_from_slice(b"CHAP_R=");
        v.extend_from_slice(encode_hex(&r).as_bytes());
        v.extend_from_slice(&data[i + PLACEHOLDER.len()..]);
        Bytes::from(v)
    }
}

fn check_login_response(p: &Pdu) {
    assert_eq!(
        p.opcode(),
        Some(Opcode::LoginResponse),
        "login answered with {p:?}"
    );
    assert!(
        p.data.len() <= 8192,
        "login response of {} bytes",
        p.data.len()
    );
    touch_views(p);
}

fn check_login(input: &[u8]) {
    let mut m =
        LoginNegotiation::with_rng(login_config(), 1000, Box::new(StdRng::seed_from_u64(7)));
    let mut dir = Dir::default();
    let mut oracle = ChapOracle::default();
    let mut ended = false;
    for mut pdu in records(input) {
        pdu.data = oracle.answer(&pdu.data);
        let step = m.handle(&pdu, &mut dir);
        match step {
            LoginStep::Continue(p) => {
                assert!(!ended, "login went on after it ended");
                check_login_response(&p);
                oracle.learn(&p);
            }
            LoginStep::Complete { response, result } => {
                assert!(!ended, "login completed after it ended");
                check_login_response(&response);
                assert_eq!(LoginResponse(&response).status(), 0);
                let _ = format!("{result:?}");
                ended = true;
            }
            LoginStep::Fail {
                response, status, ..
            } => {
                check_login_response(&response);
                assert_ne!(status as u16, 0, "a failure with status success");
                ended = true;
            }
        }
    }
}

/// One login request: mostly valid stage transitions, some anything.
fn login_strategy() -> BoxedStrategy<Vec<u8>> {
    let flags = prop_oneof![
        4 => proptest::sample::select(vec![0x00u8, 0x81, 0x83, 0x04, 0x87, 0x40, 0xc1, 0x01]),
        1 => any::<u8>(),
    ];
    let req = (
        flags,
        prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
        prop_oneof![4 => Just(1u16), 1 => any::<u16>()],
        any::<u32>(),
        text_strategy(),
    )
        .prop_map(|(flags, tsih, cid, cmd_sn, text)| {
            twinsan::iscsi::pdu::LoginRequestBuilder::new(flags, 0x1234)
                .isid([0x80, 0, 0x12, 0x34, 0, 1])
                .tsih(tsih)
                .cid(cid)
                .cmd_sn(cmd_sn)
                .exp_stat_sn(1000)
                .data(Bytes::from(text))
                .build()
        })
        .prop_map(move |mut p| {
            p.bhs[0] |= 0x40; // immediate
            p
        });
    (vec(req, 1..7), vec(any::<u8>(), 2))
        .prop_map(|(mut pdus, v)| {
            for p in &mut pdus {
                p.bhs[2] = if v[0] < 240 { 0 } else { v[0] };
                p.bhs[3] = if v[1] < 240 { 0 } else { v[1] };
            }
            join_records(&pdus)
        })
        .boxed()
}

#[test]
fn fuzz_login() {
    driver::run(
        Target {
            name: "login",
            dict: text_dict(),
            structured: login_strategy(),
            max_random: 512,
        },
        check_login,
    );
}

// ---------------------------------------------------------------------------------------
// text
// ---------------------------------------------------------------------------------------

fn check_text_session(input: &[u8], st: SessionType) {
    let targets = login_config().targets.clone();
    let portals: Vec<std::net::SocketAddr> = vec![
        "0.0.0.0:3260".parse().unwrap(),
        "[2001:db8::1]:3261".parse().unwrap(),
    ];
    let mut params = SessionParams {
        max_xmit_data_segment_length: 512,
        ..SessionParams::default()
    };
    let mut n = TextNegotiation::new();
    let mut neg = Negotiator::new(TargetLimits::default(), st, true, SessionParams::default());
    let mut neg_ok = true;
    for pdu in records(input) {
        let ctx = TextContext {
            targets: &targets,
            portal_group_tag: 7,
            portals: &portals,
            local_addr: Some("192.0.2.10:3260".parse().unwrap()),
            session_type: st,
            initiator_name: INITIATOR,
            target_name: match st {
                SessionType::Normal => Some(TGT_OPEN),
                SessionType::Discovery => None,
            },
            params: &params,
        };
        match n.handle(&pdu, &ctx) {
            TextOutcome::Respond { response, update } => {
                assert_eq!(response.opcode(), Some(Opcode::TextResponse));
                assert!(
                    response.data.len() <= params.max_xmit_data_segment_length as usize,
                    "text response of {} bytes above MaxRecvDataSegmentLength {}",
                    response.data.len(),
                    params.max_xmit_data_segment_length
                );
                touch_views(&response);
                if let Some(m) = update.max_xmit_data_segment_length {
                    params.max_xmit_data_segment_length = m;
                }
            }
            TextOutcome::Reject { .. } => {}
        }
        // The text parser: what parses re-encodes to the same pairs.
        if let Ok(kv) = parse_text(&pdu.data) {
            let pairs: Vec<(&str, &str)> = kv
                .iter()
                .map(|p| (p.key.as_str(), p.value.as_str()))
                .collect();
            assert_eq!(parse_text(&encode_text(&pairs)).as_ref(), Ok(&kv));
            // Login-time operational negotiation of the same keys.
            if neg_ok {
                match neg.respond(&kv) {
                    Ok(answers) => {
                        std::hint::black_box(answers);
                        std::hint::black_box(neg.declarations(pdu.bhs[1] & 0x80 != 0));
                    }
                    Err(_) => neg_ok = false,
                }
            }
        }
    }
    if neg_ok {
        let _ = neg.finish();
    }
}

fn check_text(input: &[u8]) {
    check_text_session(input, SessionType::Discovery);
    check_text_session(input, SessionType::Normal);
}

fn text_req_strategy() -> BoxedStrategy<Vec<u8>> {
    let req = (
        prop_oneof![4 => proptest::sample::select(vec![0x80u8, 0xc0, 0x40, 0x00]), 1 => any::<u8>()],
        prop_oneof![3 => Just(0xffff_ffffu32), 2 => 0u32..4, 1 => any::<u32>()],
        prop_oneof![3 => Just(7u32), 1 => any::<u32>()],
        prop_oneof![
            2 => proptest::sample::select(vec![
                b"SendTargets=All\0".to_vec(),
                format!("SendTargets={TGT_OPEN}\0").into_bytes(),
                b"SendTargets=\0".to_vec(),
                b"MaxRecvDataSegmentLength=512\0".to_vec(),
            ]),
            3 => text_strategy(),
        ],
    )
        .prop_map(|(flags, ttt, itt, text)| {
            twinsan::iscsi::pdu::TextRequestBuilder::new(itt, ttt, flags)
                .data(Bytes::from(text))
                .build()
        });
    vec(req, 1..6).prop_map(|p| join_records(&p)).boxed()
}

#[test]
fn fuzz_text() {
    driver::run(
        Target {
            name: "text",
            dict: text_dict(),
            structured: text_req_strategy(),
            max_random: 512,
        },
        check_text,
    );
}

// ---------------------------------------------------------------------------------------
// replication_frame
// ---------------------------------------------------------------------------------------

/// Decodes a frame stream; every message must re-encode to a frame that decodes to the same
/// message (history UUIDs are padded to two, so the bytes may differ), and a `FrameQueue`
/// must put the same bytes on the wire as `encode_frame`.
fn decode_frames(input: &[u8]) {
    let mut buf = BytesMut::from(input);
    for _ in 0..4096 {
        match FrameCodec.decode_eof(&mut buf) {
            Ok(Some(msg)) => frame_round_trip(&msg),
            Ok(None) | Err(_) => break,
        }
    }
}

fn frame_round_trip(msg: &Message) {
    let mut again = encode_frame(msg).expect("a decoded message re-encodes");
    let mut q = FrameQueue::default();
    q.push(msg).unwrap();
    let queued = q.copy_to_bytes(q.remaining());
    assert_eq!(
        &queued[..],
        &again[..],
        "FrameQueue and encode_frame differ"
    );
    match FrameCodec.decode(&mut again) {
        Ok(Some(back)) => assert_eq!(&back, msg, "{} changed in a round trip", msg.name()),
        other => panic!("re-encoded {} does not decode: {other:?}", msg.name()),
    }
    assert!(again.is_empty(), "bytes left after a frame round trip");
}

fn check_replication_frame(input: &[u8]) {
    decode_frames(input);
    // The whole input as a frame body (no length / CRC to get past).
    if let Ok(msg) = Message::decode_body(Bytes::copy_from_slice(input)) {
        frame_round_trip(&msg);
    }
    // The same frames with their CRCs made right, so that edits reach the message parser.
    let mut fixed = input.to_vec();
    let mut pos = 0;
    while pos + 4 <= fixed.len() {
        let len = u32::from_be_bytes(fixed[pos..pos + 4].try_into().unwrap()) as usize;
        if len < 5 || pos + 4 + len > fixed.len() {
            break;
        }
        let body = pos + 4..pos + len;
        let crc = crc32c::crc32c(&fixed[body.clone()]);
        fixed[body.end..body.end + 4].copy_from_slice(&crc.to_be_bytes());
        pos += 4 + len;
    }
    if fixed != input {
        decode_frames(&fixed);
    }
}

fn message_strategy() -> impl Strategy<Value = Message> {
    use twinsan_replication::drbd::{GenerationUuids, Role};
    use twinsan_replication::link::proto::{DiskState, VerifyDigest};
    let s = || "[ -~]{0,20}";
    let role = prop_oneof![Just(Role::Primary), Just(Role::Secondary)];
    let uuids = (any::<u64>(), any::<u64>(), vec(any::<u64>(), 0..4)).prop_map(
        |(current, bitmap, history)| GenerationUuids {
            current,
            bitmap,
            history,
        },
    );
    let disk = proptest::sample::select(vec![
        DiskState::Diskless,
        DiskState::Inconsistent,
        DiskState::Outdated,
        DiskState::Consistent,
        DiskState::UpToDate,
    ]);
    let data = || vec(any::<u8>(), 0..600).prop_map(Bytes::from);
    let alg = prop_oneof![Just(VerifyDigest::Crc32c), Just(VerifyDigest::Sha256)];
    prop_oneof![
        (
            any::<u32>(),
            s(),
            any::<u64>(),
            role.clone(),
            uuids.clone(),
            any::<u32>(),
            any::<u64>(),
            any::<[u8; 32]>()
        )
            .prop_map(
                |(
                    protocol_version,
                    volume_name,
                    size_bytes,
                    role,
                    uuids,
                    flags,
                    node_id,
                    challenge,
                )| {
                    Message::Hello {
                        protocol_version,
                        volume_name,
                        size_bytes,
                        role,
                        uuids,
                        flags,
                        node_id,
                        challenge,
                    }
                }
            ),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
        Just(Message::AuthOk),
        s().prop_map(|reason| Message::AuthFailed { reason }),
        (role, disk, uuids.clone(), any::<u32>(), any::<u64>()).prop_map(
            |(role, disk, uuids, flags, bm_weight)| Message::StateChange {
                role,
                disk,
                uuids,
                flags,
                bm_weight
            }
        ),
        (vec((any::<u64>(), any::<u64>()), 0..20), any::<bool>())
            .prop_map(|(runs, last)| Message::Bitmap { runs, last }),
        any::<i32>().prop_map(|hg| Message::Decision { hg }),
        any::<u64>().prop_map(|uuid| Message::SyncUuid { uuid }),
        (any::<u64>(), any::<u64>(), data(), any::<bool>()).prop_map(|(seq, offset, data, fua)| {
            Message::Write {
                seq,
                offset,
                data,
                fua,
            }
        }),
        (any::<u64>(), any::<bool>(), s()).prop_map(|(seq, ok, err)| Message::WriteAck {
            seq,
            ok,
            err
        }),
        any::<u64>().prop_map(|seq| Message::Flush { seq }),
        (any::<u64>(), any::<bool>()).prop_map(|(seq, ok)| Message::FlushAck { seq, ok }),
        (any::<u64>(), any::<u64>(), data()).prop_map(|(seq, offset, data)| Message::ResyncData {
            seq,
            offset,
            data
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(seq, ok)| Message::ResyncAck { seq, ok }),
        uuids.prop_map(|uuids| Message::ResyncDone { uuids }),
        (any::<u64>(), any::<u64>(), any::<u32>(), alg, data()).prop_map(
            |(seq, offset, len, alg, digests)| Message::VerifyRequest {
                seq,
                offset,
                len,
                alg,
                digests
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            vec(any::<u64>(), 0..10)
        )
            .prop_map(
                |(seq, offset, len, equal, mismatched)| Message::VerifyReply {
                    seq,
                    offset,
                    len,
                    equal,
                    mismatched
                }
            ),
        (any::<u64>(), data()).prop_map(|(seq, blob)| Message::PrState { seq, blob }),
        (any::<u64>(), any::<bool>()).prop_map(|(seq, ok)| Message::PrStateAck { seq, ok }),
        Just(Message::Ping),
        Just(Message::Pong),
        s().prop_map(|reason| Message::Disconnect { reason }),
    ]
}

fn frame_strategy() -> BoxedStrategy<Vec<u8>> {
    vec(message_strategy(), 1..4)
        .prop_map(|msgs| {
            let mut out = Vec::new();
            for m in &msgs {
                out.extend_from_slice(&encode_frame(m).unwrap());
            }
            out
        })
        .boxed()
}

const FRAME_DICT: &[&[u8]] = &[
    &[0; 4],
    &[0xff; 4],
    b"\x00\x00\x04\x00",
    b"\x00\x00\x00\x05",
];

#[test]
fn fuzz_replication_frame() {
    driver::run(
        Target {
            name: "replication_frame",
            dict: FRAME_DICT,
            structured: frame_strategy(),
            max_random: 256,
        },
        check_replication_frame,
    );
}

// ---------------------------------------------------------------------------------------
// heartbeat
// ---------------------------------------------------------------------------------------

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().into()
}

fn check_heartbeat(input: &[u8]) {
    let mut guard = ReplayGuard::new(10_000);
    let now = 1_750_000_000_000u64;
    let mut decode = |p: &[u8]| {
        if let Ok(beat) = heartbeat::decode(p, HB_SECRET) {
            assert_eq!(
                heartbeat::encode(&beat, HB_SECRET),
                p,
                "heartbeat re-encodes differently"
            );
            let _ = guard.accept(&beat, now);
            let _ = guard.accept(&beat, beat.unix_ms);
        }
    };
    decode(input);
    // The same datagram with a right MAC, so that edits reach the field checks.
    if input.len() >= 32 {
        let body = &input[..input.len() - 32];
        let mut p = body.to_vec();
        p.extend_from_slice(&hmac_sha256(HB_SECRET, body));
        decode(&p);
    }
}

fn beat_strategy() -> BoxedStrategy<Vec<u8>> {
    use twinsan_ha::role::PeerState;
    (
        "[ -~]{0,40}",
        prop_oneof![Just(PeerState::Primary), Just(PeerState::Secondary)],
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(1_750_000_000_000u64), any::<u64>()],
    )
        .prop_map(|(node, state, manual, boot_id, seq, unix_ms)| {
            heartbeat::encode(
                &heartbeat::Beat {
                    node,
                    state,
                    manual,
                    boot_id,
                    seq,
                    unix_ms,
                },
                HB_SECRET,
            )
        })
        .boxed()
}

const HB_DICT: &[&[u8]] = &[b"TSHB", &[0xff; 8], &[0; 8]];

#[test]
fn fuzz_heartbeat() {
    driver::run(
        Target {
            name: "heartbeat",
            dict: HB_DICT,
            structured: beat_strategy(),
            max_random: 400,
        },
        check_heartbeat,
    );
}

// ---------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------

fn check_config(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    match Config::parse(&text, Path::new("fuzz.toml")) {
        Ok(c) => {
            std::hint::black_box(c.masked_json());
            std::hint::black_box(c.server.effective_worker_threads());
            std::hint::black_box(c.server.control_socket_path());
            if let Some(ha) = &c.ha {
                std::hint::black_box(ha.role_config());
                std::hint::black_box(ha.vip_list());
                std::hint::black_box(ha.vip_lifetime());
                std::hint::black_box(ha.replug_schedule());
            }
        }
        Err(e) => {
            std::hint::black_box(e.to_string());
        }
    }
}

/// Values the config generator puts in place of a seed's.
const CONFIG_VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"abc\"",
    "\"0\"",
    "\"18446744073709551615\"",
    "\"999999999999PiB\"",
    "\"1K\"",
    "\"-1M\"",
    "\"100M\"",
    "\"internal\"",
    "\"/dev/null[4294967296]\"",
    "\"[::1]:0\"",
    "\"0.0.0.0:65535\"",
    "\"256.1.1.1:1\"",
    "\"10.0.0.1/33\"",
    "\"fe80::1/129\"",
    "[]",
    "[\"\"]",
    "{}",
    "{ user = \"u\", secret = \"\" }",
    "1979-05-27T07:32:00Z",
];

/// Seeds with some `key = value` lines given other values, and commented-out lines of the
/// example configuration switched on.
fn config_strategy(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    (
        proptest::sample::select(seeds),
        vec(
            (
                any::<proptest::sample::Index>(),
                proptest::sample::select(CONFIG_VALUES),
                any::<bool>(),
            ),
            1..5,
        ),
    )
        .prop_map(|(seed, edits)| {
            let text = String::from_utf8_lossy(&seed).into_owned();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains(" = "))
                .collect();
            if assignments.is_empty() {
                return seed;
            }
            for (i, value, uncomment) in edits {
                let n = assignments[i.index(assignments.len())];
                let line = lines[n].trim_start().to_string();
                let line = if uncomment {
                    line.trim_start_matches('#').trim_start().to_string()
                } else {
                    line
                };
                if let Some((key, _)) = line.split_once(" = ") {
                    lines[n] = format!("{key} = {value}");
                }
            }
            let mut out = lines.join("\n");
            out.push('\n');
            out.into_bytes()
        })
        .boxed()
}

const CONFIG_DICT: &[&[u8]] = &[
    b"\n",
    b" = ",
    b"\"",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b"#",
    b"\n[server]\n",
    b"\n[[target]]\n",
    b"\n[[target.lun]]\n",
    b"\n[target.lun.replication]\n",
    b"\n[ha]\n",
    b"\n[[ha.vip]]\n",
    b"\n[ha.alerts]\n",
    b"\n[ha.xapi]\n",
    b"9223372036854775807",
    b"18446744073709551616",
    b"-1",
    b"0",
];

#[test]
fn fuzz_config() {
    let seeds = driver::load_corpus("config")
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    driver::run(
        Target {
            name: "config",
            dict: CONFIG_DICT,
            structured: config_strategy(seeds),
            max_random: 256,
        },
        check_config,
    );
}

/// Not a fuzz target: writes the generated seed files of `tests/fuzz/corpus/`.
#[test]
#[ignore = "rewrites the generated corpus files; run by hand"]
fn write_corpus() {
    seeds::write_all();
}

/// The seeds must get where they are meant to: the logins to Full Feature Phase (the CHAP one
/// through the `CHAP_R=@` oracle), the configurations through validation.
#[test]
fn corpus_seeds_are_valid() {
    for name in ["gen-none", "gen-chap", "gen-discovery", "gen-continue"] {
        let input = std::fs::read(driver::corpus_dir("login").join(name)).unwrap();
        let mut m =
            LoginNegotiation::with_rng(login_config(), 1, Box::new(StdRng::seed_from_u64(7)));
        let mut dir = Dir::default();
        let mut oracle = ChapOracle::default();
        let mut complete = false;
        for mut pdu in records(&input) {
            pdu.data = oracle.answer(&pdu.data);
            match m.handle(&pdu, &mut dir) {
                LoginStep::Continue(p) => oracle.learn(&p),
                LoginStep::Complete { .. } => complete = true,
                LoginStep::Fail { reason, .. } => panic!("login seed {name} fails: {reason}"),
            }
        }
        assert!(
            complete,
            "login seed {name} does not reach Full Feature Phase"
        );
    }
    // The generated replication frames are the current peer protocol's: every one decodes,
    // the Hello speaks PROTOCOL_VERSION, and the reservation messages are there.
    let mut names = Vec::new();
    let generated = driver::load_corpus("replication_frame")
        .into_iter()
        .filter(|(p, _)| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("gen-"))
        });
    for (path, bytes) in generated {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoded = 0;
        while let Some(msg) = FrameCodec
            .decode_eof(&mut buf)
            .unwrap_or_else(|e| panic!("frame seed {} does not decode: {e}", path.display()))
        {
            if let Message::Hello {
                protocol_version, ..
            } = &msg
            {
                assert_eq!(*protocol_version, PROTOCOL_VERSION, "{}", path.display());
            }
            names.push(msg.name());
            decoded += 1;
        }
        assert!(decoded > 0, "frame seed {} is empty", path.display());
    }
    for name in ["Hello", "PrState", "PrStateAck"] {
        assert!(names.contains(&name), "no {name} frame seed");
    }
    for (path, text) in driver::load_corpus("config") {
        if let Err(e) = Config::parse(&String::from_utf8_lossy(&text), &path) {
            panic!("config seed {} is invalid: {e}", path.display());
        }
    }
}
