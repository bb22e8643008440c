//! The generated part of the fuzz corpus: valid inputs made by the encoders, so that
//! mutations start from inputs that get past the first checks. `write_all` rewrites the
//! `gen-*` files of `tests/fuzz/corpus/<target>/`; other files there (copied fixtures,
//! inputs that once failed) are kept.

use bytes::{Bytes, BytesMut};

use twinsan::iscsi::negotiation::encode_text;
use twinsan::iscsi::pdu::{
    encode_pdu, offset, AsyncMessageBuilder, DataInBuilder, DataOutBuilder, LoginRequestBuilder,
    LoginResponseBuilder, LogoutResponseBuilder, NopInBuilder, Opcode, Pdu, R2tBuilder,
    RejectBuilder, RejectReason, Residual, ScsiResponseBuilder, TaskMgmtResponseBuilder,
    TextRequestBuilder, TextResponseBuilder, RESERVED_TAG,
};
use twinsan::scsi::pr::{InitiatorPort, PrState, PrType, Registration, Reservation};
use twinsan::scsi::LogicalUnit;
use twinsan_replication::drbd::{GenerationUuids, Role};
use twinsan_replication::link::proto::{
    encode_frame, DiskState, Message, VerifyDigest, PROTOCOL_VERSION,
};

use super::{
    driver::corpus_dir, join_records, CHAP_USER, HB_SECRET, INITIATOR, TGT_CHAP, TGT_OPEN,
};

const ISID: [u8; 6] = [0x80, 0, 0x12, 0x34, 0, 1];

fn write(target: &str, files: Vec<(&str, Vec<u8>)>) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("gen-") {
            std::fs::remove_file(p).unwrap();
        }
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(format!("gen-{name}")), bytes).unwrap();
    }
}

fn wire(pdus: &[Pdu], digests: bool) -> Vec<u8> {
    let mut b = BytesMut::new();
    for p in pdus {
        encode_pdu(p, digests, digests, &mut b);
    }
    b.to_vec()
}

fn text(pairs: &[(&str, &str)]) -> Bytes {
    Bytes::from(encode_text(pairs))
}

fn scsi_command(itt: u32, flags: u8, edtl: u32, cdb: &[u8], data: &[u8]) -> Pdu {
    let mut p = Pdu::new(Opcode::ScsiCommand);
    p.set_flags(flags);
    p.set_lun(0);
    p.set_itt(itt);
    p.set_u32_at(offset::WORD20, edtl);
    p.set_u32_at(offset::WORD24, itt);
    p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
    p.set_data(Bytes::copy_from_slice(data));
    p
}

fn pdu_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let login = LoginRequestBuilder::new(0x87, 1)
        .isid(ISID)
        .cid(1)
        .cmd_sn(1)
        .data(text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TGT_OPEN),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]))
        .build();
    let read10 = scsi_command(2, 0xc1, 4096, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]);
    let write10 = scsi_command(
        3,
        0xa1,
        4096,
        &[0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0],
        &[0xab; 512],
    );
    let mut ext_cdb = scsi_command(4, 0x81, 0, &[0x7f; 16], &[]);
    ext_cdb.ahs = Bytes::from_static(&[0x00, 0x05, 0x01, 0x00, 0xaa, 0xbb, 0xcc, 0xdd]);
    let data_out = DataOutBuilder::new(3, 0x10)
        .final_bit(true)
        .buffer_offset(512)
        .data(Bytes::from_static(&[0xcd; 700]))
        .build();
    let mut nop_out = Pdu::new(Opcode::NopOut);
    nop_out.set_flags(0x80);
    nop_out.set_itt(9);
    nop_out.set_u32_at(offset::WORD20, RESERVED_TAG);
    nop_out.set_data(Bytes::from_static(b"ping"));
    let mut logout = Pdu::new(Opcode::LogoutRequest);
    logout.set_flags(0x80);
    logout.set_itt(10);
    let mut tmf = Pdu::new(Opcode::TaskMgmtRequest);
    tmf.set_flags(0x81);
    tmf.set_itt(11);
    tmf.set_u32_at(offset::WORD20, 2);
    let text_req = TextRequestBuilder::new(12, RESERVED_TAG, 0x80)
        .data(text(&[("SendTargets", "All")]))
        .build();
    let mut snack = Pdu::new(Opcode::Snack);
    snack.set_flags(0x80);
    let responses = vec![
        ScsiResponseBuilder::new(2)
            .status(2)
            .sense(&[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
            .residual(Residual::Underflow(512))
            .build(),
        DataInBuilder::new(2)
            .final_bit(true)
            .status(0)
            .data(Bytes::from_static(&[0x11; 4096]))
            .build(),
        R2tBuilder::new(0, 3, 0x10)
            .buffer_offset(512)
            .desired_data_transfer_length(3584)
            .build(),
        NopInBuilder::new(9, RESERVED_TAG)
            .data(Bytes::from_static(b"ping"))
            .build(),
        TextResponseBuilder::new(12, RESERVED_TAG, 0x80)
            .data(text(&[
                ("TargetName", TGT_OPEN),
                ("TargetAddress", "127.0.0.1:3260,1"),
            ]))
            .build(),
        LoginResponseBuilder::new(0x87, 1)
            .versions(0, 0)
            .isid(ISID)
            .tsih(1)
            .status(0, 0)
            .build(),
        LogoutResponseBuilder::new(10, 0).times(2, 20).build(),
        TaskMgmtResponseBuilder::new(11, 0).build(),
        RejectBuilder::new(RejectReason::ProtocolError, &read10.bhs).build(),
        AsyncMessageBuilder::new(1).parameters(1, 2, 3).build(),
    ];
    let requests = vec![
        login,
        read10.clone(),
        write10.clone(),
        ext_cdb.clone(),
        data_out.clone(),
        nop_out.clone(),
        logout,
        tmf,
        text_req,
        snack,
    ];
    let mut out = Vec::new();
    let names = [
        "login", "read10", "write10", "ahs", "data-out", "nop-out", "logout", "tmf", "text",
        "snack",
    ];
    for (name, p) in names.iter().zip(&requests) {
        out.push((*name, wire(std::slice::from_ref(p), false)));
    }
    let rnames = [
        "scsi-response",
        "data-in",
        "r2t",
        "nop-in",
        "text-response",
        "login-response",
        "logout-response",
        "tmf-response",
        "reject",
        "async",
    ];
    for (name, p) in rnames.iter().zip(&responses) {
        out.push((*name, wire(std::slice::from_ref(p), false)));
    }
    out.push(("stream", wire(&requests[1..6], false)));
    out.push((
        "stream-digests",
        wire(&[write10, data_out, nop_out, ext_cdb], true),
    ));
    out
}

fn login_req(flags: u8, cmd_sn: u32, pairs: &[(&str, &str)]) -> Pdu {
    let mut p = LoginRequestBuilder::new(flags, 0x1234)
        .isid(ISID)
        .cid(1)
        .cmd_sn(cmd_sn)
        .exp_stat_sn(1000)
        .data(text(pairs))
        .build();
    p.bhs[0] |= 0x40;
    p
}

fn login_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let op_keys: &[(&str, &str)] = &[
        ("HeaderDigest", "CRC32C,None"),
        ("DataDigest", "None"),
        ("MaxConnections", "1"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("ErrorRecoveryLevel", "0"),
    ];
    let none = vec![
        login_req(
            0x81,
            1,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TGT_OPEN),
                ("SessionType", "Normal"),
                ("AuthMethod", "None"),
            ],
        ),
        login_req(0x87, 1, op_keys),
    ];
    let chap = vec![
        login_req(
            0x01,
            1,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TGT_CHAP),
                ("SessionType", "Normal"),
                ("AuthMethod", "CHAP,None"),
            ],
        ),
        login_req(0x01, 1, &[("CHAP_A", "7,5")]),
        login_req(
            0x81,
            1,
            &[
                ("CHAP_N", CHAP_USER),
                ("CHAP_R", "@"),
                ("CHAP_I", "3"),
                ("CHAP_C", "0x0123456789abcdef0123456789abcdef"),
            ],
        ),
        login_req(0x87, 1, op_keys),
    ];
    let discovery = vec![login_req(
        0x87,
        1,
        &[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("HeaderDigest", "None"),
            ("MaxRecvDataSegmentLength", "65536"),
        ],
    )];
    // Operational stage only, its text split over two PDUs with the C bit.
    let mut all: Vec<(String, String)> = vec![
        ("InitiatorName".into(), INITIATOR.into()),
        ("TargetName".into(), TGT_OPEN.into()),
    ];
    all.extend(op_keys.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let t = encode_text(&all);
    let (a, b) = t.split_at(t.len() / 2);
    let mut first = login_req(0x44, 1, &[]);
    first.set_data(Bytes::copy_from_slice(a));
    let mut second = login_req(0x87, 1, &[]);
    second.set_data(Bytes::copy_from_slice(b));
    let continued = vec![first, second];
    // Connection reinstatement: non-zero TSIH.
    let mut reinstate = none.clone();
    for p in &mut reinstate {
        p.bhs[14..16].copy_from_slice(&1u16.to_be_bytes());
    }
    vec![
        ("none", join_records(&none)),
        ("chap", join_records(&chap)),
        ("discovery", join_records(&discovery)),
        ("continue", join_records(&continued)),
        ("reinstate", join_records(&reinstate)),
    ]
}

fn text_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let req = |itt: u32, ttt: u32, flags: u8, data: Bytes| {
        TextRequestBuilder::new(itt, ttt, flags).data(data).build()
    };
    vec![
        (
            "send-targets-all",
            join_records(&[
                req(7, RESERVED_TAG, 0x80, text(&[("SendTargets", "All")])),
                // the rest of a long answer, fetched with the TTT
                req(7, 1, 0x80, Bytes::new()),
                req(7, 2, 0x80, Bytes::new()),
            ]),
        ),
        (
            "send-targets-one",
            join_records(&[req(
                8,
                RESERVED_TAG,
                0x80,
                text(&[("SendTargets", TGT_OPEN)]),
            )]),
        ),
        (
            "mrdsl",
            join_records(&[req(
                9,
                RESERVED_TAG,
                0x80,
                text(&[
                    ("MaxRecvDataSegmentLength", "4096"),
                    ("X-com.example.k", "v"),
                ]),
            )]),
        ),
        (
            "continued-request",
            join_records(&[
                req(10, RESERVED_TAG, 0x40, Bytes::from_static(b"SendTa")),
                req(10, RESERVED_TAG, 0x80, Bytes::from_static(b"rgets=All\0")),
            ]),
        ),
        (
            "operational",
            join_records(&[req(
                11,
                RESERVED_TAG,
                0x80,
                text(&[
                    ("HeaderDigest", "CRC32C,None"),
                    ("MaxBurstLength", "262144"),
                    ("FirstBurstLength", "65536"),
                    ("ImmediateData", "No"),
                    ("InitialR2T", "No"),
                    ("ErrorRecoveryLevel", "0"),
                ]),
            )]),
        ),
    ]
}

/// A logical unit's persistent reservation state as a `PrState` message carries it: two
/// registrants, one holding WRITE EXCLUSIVE - REGISTRANTS ONLY, APTPL set.
fn reservation_state() -> PrState {
    let port = |name: &str, isid| InitiatorPort::new(name, [0x40, 0, 0, 0, 0, isid]);
    let registration = |name, isid, key| Registration {
        port: port(name, isid),
        key,
        all_tg_pt: false,
        relative_port: 1,
    };
    PrState {
        generation: 3,
        registrations: vec![
            registration(INITIATOR, 1, 0xA1),
            registration("iqn.2026-11.org.twinsan.fuzz:other", 2, 0xB2),
        ],
        reservation: Some(Reservation {
            holder: port(INITIATOR, 1),
            kind: PrType::WriteExclusiveRegistrantsOnly,
        }),
        aptpl: true,
        spc2_holder: None,
    }
}

fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let uuids = GenerationUuids {
        current: 0x1234_5678_9abc_def1,
        bitmap: 0,
        history: vec![0x1111, 0x2222],
    };
    let msgs = vec![
        (
            "hello",
            Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                volume_name: "r0".into(),
                size_bytes: 1 << 30,
                role: Role::Primary,
                uuids: uuids.clone(),
                flags: 0,
                node_id: 42,
                challenge: [7; 32],
            },
        ),
        ("auth-response", Message::AuthResponse { mac: [9; 32] }),
        ("auth-ok", Message::AuthOk),
        (
            "auth-failed",
            Message::AuthFailed {
                reason: "wrong secret".into(),
            },
        ),
        (
            "state",
            Message::StateChange {
                role: Role::Secondary,
                disk: DiskState::UpToDate,
                uuids: uuids.clone(),
                flags: 1,
                bm_weight: 17,
            },
        ),
        (
            "bitmap",
            Message::Bitmap {
                runs: vec![(0, 8), (100, 1), (4096, 512)],
                last: true,
            },
        ),
        ("decision", Message::Decision { hg: -2 }),
        ("sync-uuid", Message::SyncUuid { uuid: 99 }),
        (
            "write",
            Message::Write {
                seq: 1,
                offset: 4096,
                data: Bytes::from_static(&[0x5a; 4096]),
                fua: true,
            },
        ),
        (
            "write-ack",
            Message::WriteAck {
                seq: 1,
                ok: false,
                err: "EIO".into(),
            },
        ),
        ("flush", Message::Flush { seq: 2 }),
        ("flush-ack", Message::FlushAck { seq: 2, ok: true }),
        (
            "resync-data",
            Message::ResyncData {
                seq: 3,
                offset: 0,
                data: Bytes::from_static(&[0xa5; 512]),
            },
        ),
        ("resync-ack", Message::ResyncAck { seq: 3, ok: true }),
        ("resync-done", Message::ResyncDone { uuids }),
        (
            "verify-request",
            Message::VerifyRequest {
                seq: 4,
                offset: 0,
                len: 8192,
                alg: VerifyDigest::Crc32c,
                digests: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
            },
        ),
        (
            "verify-reply",
            Message::VerifyReply {
                seq: 4,
                offset: 0,
                len: 8192,
                equal: false,
                mismatched: vec![4096],
            },
        ),
        (
            "pr-state",
            Message::PrState {
                seq: 5,
                blob: LogicalUnit::encode_reservations(&reservation_state()),
            },
        ),
        ("pr-state-ack", Message::PrStateAck { seq: 5, ok: true }),
        ("ping", Message::Ping),
        ("pong", Message::Pong),
        (
            "disconnect",
            Message::Disconnect {
                reason: "bye".into(),
            },
        ),
    ];
    let mut stream = Vec::new();
    for (_, m) in &msgs[..8] {
        stream.extend_from_slice(&encode_frame(m).unwrap());
    }
    let mut out: Vec<(&'static str, Vec<u8>)> = msgs
        .into_iter()
        .map(|(n, m)| (n, encode_frame(&m).unwrap().to_vec()))
        .collect();
    out.push(("stream", stream));
    out
}

fn heartbeat_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use twinsan_ha::heartbeat::{encode, Beat};
    use twinsan_ha::role::PeerState;
    let beat = |node: &str, state, manual, seq| Beat {
        node: node.into(),
        state,
        manual,
        boot_id: 0x0123_4567_89ab_cdef,
        seq,
        unix_ms: 1_750_000_000_000,
    };
    vec![
        (
            "primary",
            encode(&beat("host-a", PeerState::Primary, false, 1), HB_SECRET),
        ),
        (
            "secondary-manual",
            encode(&beat("host-b", PeerState::Secondary, true, 7), HB_SECRET),
        ),
        (
            "empty-name",
            encode(&beat("", PeerState::Primary, false, 2), HB_SECRET),
        ),
        (
            "long-name",
            encode(
                &beat(&"n".repeat(255), PeerState::Secondary, false, 3),
                HB_SECRET,
            ),
        ),
    ]
}

/// Writes every generated seed.
pub fn write_all() {
    write("pdu_codec", pdu_seeds());
    write("login", login_seeds());
    write("text", text_seeds());
    write("replication_frame", frame_seeds());
    write("heartbeat", heartbeat_seeds());
}
