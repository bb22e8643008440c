//! Bad input from the network: malformed PDUs get a Reject or drop only their own
//! connection, while another session keeps working (RFC 7143 §7, §11.17).

mod common;

use bytes::{Bytes, BytesMut};
use common::raw::Raw;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use tokio_util::codec::Encoder;
use twinsan::iscsi::pdu::{Opcode, Pdu, RESERVED_TAG};

fn other_session_works(s: &Server) {
    let o = run(
        Command::new(tool("iscsi-inq")).arg(s.url(0)),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "a second session failed: {}", text(&o));
}

#[test]
fn bad_opcode_is_rejected_and_connection_survives() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let mut r = Raw::login(s.port, false, false);
    let mut p = Pdu::new(Opcode::NopOut);
    p.bhs[0] = 0x1d; // no such initiator opcode
    p.set_itt(77);
    r.send(p);
    let rej = r
        .wait_for(|p| p.opcode() == Some(Opcode::Reject))
        .expect("Reject");
    assert_eq!(rej.bhs[2], 0x05, "reason: command not supported");
    assert_eq!(
        rej.data[0] & 0x3f,
        0x1d,
        "Reject carries the offending header"
    );
    assert!(r.ping(), "connection still works");
    other_session_works(&s);
}

#[test]
fn oversized_data_segment_is_rejected() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let mut r = Raw::login(s.port, false, false);
    // WRITE(10) with 300000 bytes of immediate data: over our MaxRecvDataSegmentLength.
    let itt = r.next_itt();
    let mut p = Pdu::new(Opcode::ScsiCommand);
    p.set_flags(0x80 | 0x20 | 0x01);
    p.set_itt(itt);
    p.set_u32_at(20, 300_000);
    p.set_u32_at(24, r.cmd_sn);
    p.bhs[32] = 0x2a;
    p.set_data(Bytes::from(vec![0u8; 300_000]));
    r.send(p);
    let rej = r
        .wait_for(|p| p.opcode() == Some(Opcode::Reject))
        .expect("Reject");
    assert_eq!(rej.bhs[2], 0x04, "reason: protocol error");
    assert!(r.ping(), "connection still works");
    other_session_works(&s);
}

#[test]
fn bad_data_digest_is_rejected_bad_header_digest_drops_only_that_connection() {
    let dir = scratch_dir();
    let mut s = Server::start(dir.path(), "", None, "");
    let mut r = Raw::login(s.port, true, true);
    assert!(r.ping(), "digests negotiated and working");
    // A NOP-Out whose data digest is wrong.
    let mut p = Pdu::new(Opcode::NopOut);
    p.set_immediate(true);
    p.set_flags(0x80);
    p.set_itt(500);
    p.set_u32_at(20, RESERVED_TAG);
    p.set_data(Bytes::from_static(b"abcd"));
    let mut out = BytesMut::new();
    r.codec.clone().encode(p, &mut out).unwrap();
    let n = out.len();
    out[n - 1] ^= 0x55;
    r.send_raw(&out);
    let rej = r
        .wait_for(|p| p.opcode() == Some(Opcode::Reject))
        .expect("Reject");
    assert_eq!(rej.bhs[2], 0x02, "reason: data digest error");
    assert!(r.ping(), "connection survives a data digest error");

    // A header digest error: framing can no longer be trusted, the connection is dropped.
    let mut p = Pdu::new(Opcode::NopOut);
    p.set_immediate(true);
    p.set_flags(0x80);
    p.set_itt(501);
    let mut out = BytesMut::new();
    r.codec.clone().encode(p, &mut out).unwrap();
    out[48] ^= 1;
    r.send_raw(&out);
    assert!(
        r.closed(Duration::from_secs(5)),
        "header digest error closes the connection"
    );
    s.assert_alive();
    other_session_works(&s);
}

#[test]
fn cmdsn_far_outside_window_is_ignored() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let mut r = Raw::login(s.port, false, false);
    let far = r.test_unit_ready(r.cmd_sn.wrapping_add(1_000_000));
    let far_itt = far.itt();
    r.send(far);
    assert!(
        r.wait_for(|p| p.itt() == far_itt).is_none(),
        "a command outside the CmdSN window must be ignored (§4.2.2.1)"
    );
    let ok = r.test_unit_ready(r.cmd_sn);
    let itt = ok.itt();
    r.send(ok);
    let resp = r
        .wait_for(|p| p.itt() == itt)
        .expect("in-window command answered");
    assert_eq!(resp.opcode(), Some(Opcode::ScsiResponse));
    assert_eq!(resp.bhs[3], 0, "GOOD");
    other_session_works(&s);
}

/// A write sent ahead of ExpCmdSN waits for the gap to fill (§4.2.2.1); the unsolicited
/// Data-Out that follows it right away must not be lost meanwhile.
#[test]
fn unsolicited_data_out_for_a_held_command_is_kept() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let mut r = Raw::login(s.port, false, false);
    let gap = r.cmd_sn;
    r.cmd_sn = gap.wrapping_add(1);
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    // WRITE(10) of 16 blocks at LBA 40: 4 KiB immediate, 4 KiB unsolicited Data-Out.
    let cdb = [0x2a, 0, 0, 0, 0, 40, 0, 0, 16, 0];
    let mut w = r.scsi_command(0, &cdb, 0, Some(Bytes::from(payload[..4096].to_vec())));
    w.set_flags(w.flags() & !0x80); // F=0: unsolicited Data-Out follows
    w.set_u32_at(20, 8192);
    let itt = w.itt();
    r.send(w);
    let mut d = Pdu::new(Opcode::DataOut);
    d.set_flags(0x80);
    d.set_itt(itt);
    d.set_u32_at(20, RESERVED_TAG);
    d.set_u32_at(36, 0);
    d.set_u32_at(40, 4096);
    d.set_data(Bytes::from(payload[4096..].to_vec()));
    r.send(d);
    // Nothing can complete before the gap is filled.
    assert!(r.recv(Duration::from_millis(300)).is_none());
    let fill = r.test_unit_ready(gap);
    r.send(fill);
    let resp = r
        .wait_for(|p| p.itt() == itt && p.opcode() == Some(Opcode::ScsiResponse))
        .expect("the held write completes once its CmdSN comes up");
    assert_eq!(resp.bhs[3], 0, "GOOD");
    let (status, data, _) = r
        .scsi_sync(
            0,
            &[0x28, 0, 0, 0, 0, 40, 0, 0, 16, 0],
            8192,
            Duration::from_secs(10),
        )
        .expect("read back");
    assert_eq!(status, 0);
    assert!(
        data == payload,
        "both halves of the write reached the medium"
    );
}

#[test]
fn garbage_and_truncated_input_never_crash_the_server() {
    let dir = scratch_dir();
    let mut s = Server::start(dir.path(), "", None, "");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..40 {
        let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let len = 1 + (i * 37) % 300;
        let mut junk = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push(seed as u8);
        }
        if i % 3 == 0 {
            junk[0] = 0x43; // looks like a login request, the rest is garbage
        }
        let _ = stream.write_all(&junk);
        drop(stream);
    }
    // A huge declared data segment in an otherwise plausible login request.
    let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43;
    bhs[1] = 0x87;
    bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    let _ = stream.write_all(&bhs);
    drop(stream);
    std::thread::sleep(Duration::from_millis(200));
    s.assert_alive();
    other_session_works(&s);
}

/// An immediate Text Request as libiscsi's iSCSI.iSCSISendTargets.Invalid sends it (F=1,
/// TTT 0xffffffff, CmdSN the next one, NUL-terminated text).
fn text_request(r: &mut Raw, text: &[u8]) -> Pdu {
    let itt = r.next_itt();
    let mut p = Pdu::new(Opcode::TextRequest);
    p.set_immediate(true);
    p.set_flags(0x80);
    p.set_itt(itt);
    p.set_u32_at(20, RESERVED_TAG);
    p.set_u32_at(24, r.cmd_sn);
    p.set_u32_at(28, r.exp_stat_sn);
    p.set_data(Bytes::copy_from_slice(text));
    p
}

/// Issue 14: every Text Request of libiscsi's SendTargets.Invalid test is answered on the
/// same connection, each bad one with a Reject naming it, then `SendTargets=All` succeeds
/// (RFC 7143 §11.10, §11.17).
#[test]
fn invalid_sendtargets_requests_are_each_answered_on_a_normal_session() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let mut r = Raw::login(s.port, false, false);
    for text in [
        &b"SendTargetsPlease=All\0"[..],
        b"SendTargets=Alle\0",
        b"SendTargets=A\0",
        b"sENDtARGETS=aLL\0",
    ] {
        let p = text_request(&mut r, text);
        let itt = p.itt();
        r.send(p);
        let answer = r
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{text:?} not answered"));
        assert_eq!(answer.opcode(), Some(Opcode::Reject), "{text:?}");
        assert_eq!(answer.bhs[2], 0x04, "{text:?}: protocol error");
        assert_eq!(answer.data[16..20], itt.to_be_bytes(), "{text:?}");
    }
    let p = text_request(&mut r, b"SendTargets=All\0");
    let itt = p.itt();
    r.send(p);
    let answer = r
        .recv(Duration::from_secs(5))
        .expect("SendTargets=All answered");
    assert_eq!(
        (answer.opcode(), answer.flags(), answer.itt()),
        (Some(Opcode::TextResponse), 0x80, itt)
    );
    let text = String::from_utf8_lossy(&answer.data).to_string();
    assert!(text.starts_with(&format!("TargetName={IQN}\0")), "{text:?}");
    assert!(
        text.contains(&format!("TargetAddress={},1\0", s.portal())),
        "{text:?}"
    );
    assert!(r.ping(), "connection still works");
}

/// Sends a WRITE/WRITE AND VERIFY(10) of `blocks` blocks at LBA 0 of `lun` with EDTL `edtl`
/// (that many bytes of `fill` as immediate data); returns (status, sense key/ASC/ASCQ,
/// residual flags O/U, residual count).
fn write_with_edtl(
    r: &mut Raw,
    lun: u64,
    op: u8,
    blocks: u16,
    edtl: u32,
    fill: u8,
) -> (u8, Option<(u8, u8, u8)>, u8, u32) {
    let mut cdb = [0u8; 10];
    cdb[0] = op;
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let p = r.scsi_command(lun, &cdb, 0, Some(Bytes::from(vec![fill; edtl as usize])));
    let itt = p.itt();
    r.send(p);
    let resp = r
        .wait_for(|p| p.itt() == itt && p.opcode() == Some(Opcode::ScsiResponse))
        .expect("SCSI Response");
    let sense = (resp.data.len() >= 16).then(|| {
        let s = &resp.data[2..];
        (s[2] & 0x0f, s[12], s[13])
    });
    (resp.bhs[3], sense, resp.flags() & 0x06, resp.u32_at(44))
}

fn read_blocks(r: &mut Raw, lun: u64, blocks: u16, bs: u32) -> Vec<u8> {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let len = u32::from(blocks) * bs;
    let (status, data, _) = r
        .scsi_sync(lun, &cdb, len, Duration::from_secs(10))
        .expect("READ(10)");
    assert_eq!(status, 0, "READ(10) status");
    assert_eq!(data.len(), len as usize);
    data
}

/// Issue 14: WRITE(10) and WRITE AND VERIFY(10) whose iSCSI EDTL differs from the CDB's
/// transfer length, libiscsi iSCSIResiduals' cases on 512- and 4096-byte blocks. Each
/// answer is GOOD with exactly min(EDTL, CDB) bytes written, or CHECK CONDITION / ILLEGAL
/// REQUEST / INVALID FIELD IN COMMAND INFORMATION UNIT with nothing written (FCP-4); the
/// residual is the same either way; what lies past the truncation point is never touched.
#[test]
fn write_edtl_mismatch_is_never_good_with_other_bytes() {
    let dir = scratch_dir();
    let luns = format!(
        "[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"16MiB\"\n\n[[target.lun]]\nnumber = 1\npath = \"{}\"\nsize = \"16MiB\"\nblock_size = 4096\n",
        dir.path().join("a.img").display(),
        dir.path().join("b.img").display()
    );
    let s = Server::start(dir.path(), "", Some(&luns), "");
    let mut r = Raw::login(s.port, false, false);
    for (lun, bs) in [(0u64, 512u32), (1, 4096)] {
        for op in [0x2a, 0x2e] {
            // (CDB blocks, EDTL): libiscsi's cases, then a block and a half.
            for (blocks, edtl) in [
                (1u16, 0u32),
                (1, 2 * bs),
                (2, bs),
                (1, 10_000),
                (1, 200),
                (2, bs + bs / 2),
            ] {
                let what = format!("LUN {lun} op {op:#x}: {blocks} block(s), EDTL {edtl}");
                let tl = u32::from(blocks) * bs;
                let span = tl.max(edtl).div_ceil(bs) as u16;
                // Known contents first: 'a' over every block the case could touch.
                let (st, ..) = write_with_edtl(&mut r, lun, 0x2a, span, u32::from(span) * bs, b'a');
                assert_eq!(st, 0, "{what}: pattern write");
                let (status, sense, flags, residual) =
                    write_with_edtl(&mut r, lun, op, blocks, edtl, b'b');
                let expected_residual = if edtl < tl {
                    (0x04, tl - edtl)
                } else {
                    (0x02, edtl - tl)
                };
                assert_eq!((flags, residual), expected_residual, "{what}: residual");
                let written = match status {
                    0 => edtl.min(tl),
                    2 => {
                        assert_eq!(sense, Some((0x05, 0x0e, 0x03)), "{what}");
                        0
                    }
                    other => panic!("{what}: status {other:#x}"),
                };
                // Whole blocks below the CDB are honoured; anything else is refused.
                let refuse = edtl < tl && edtl % bs != 0;
                assert_eq!(status == 2, refuse, "{what}: status {status}");
                let medium = read_blocks(&mut r, lun, span, bs);
                let bad = medium
                    .iter()
                    .enumerate()
                    .find(|&(i, &b)| b != if (i as u32) < written { b'b' } else { b'a' });
                assert!(bad.is_none(), "{what}: byte {bad:?} (written {written})");
            }
        }
    }
    assert!(r.ping(), "connection still works");
}

/// Answers the target's NOP-In pings that arrive on `r` for `time`; how many.
fn answer_pings(r: &mut Raw, time: Duration) -> usize {
    let until = std::time::Instant::now() + time;
    let mut answered = 0;
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        let Some(p) = r.recv(left) else { break };
        if p.opcode() == Some(Opcode::NopIn) && p.itt() == RESERVED_TAG {
            let mut a = Pdu::new(Opcode::NopOut);
            a.set_immediate(true);
            a.set_flags(0x80);
            a.set_itt(RESERVED_TAG);
            a.set_u32_at(20, p.u32_at(20));
            a.set_u32_at(24, r.cmd_sn);
            r.send(a);
            answered += 1;
        }
    }
    answered
}

/// The target's NOP-In ping (RFC 7143 §11.19): none while the initiator is busy, one once it
/// has been quiet for `nop_in_interval_secs`; an initiator that answers keeps its session,
/// one that does not is dropped `nop_in_timeout_secs` later.
#[test]
fn idle_session_is_pinged_and_dropped_only_when_it_does_not_answer() {
    let dir = scratch_dir();
    let s = Server::start_with_server_keys(
        dir.path(),
        "nop_in_interval_secs = 1\nnop_in_timeout_secs = 2",
        "",
        None,
        "",
    );
    let mut quiet = Raw::login(s.port, false, false);
    let mut answers = Raw::login(s.port, false, false);
    let mut answered = 0;

    // Busy for 2.5 s (a ping of our own every 300 ms): the target never pings.
    let busy = std::time::Instant::now();
    let mut went_quiet = busy;
    while busy.elapsed() < Duration::from_millis(2500) {
        assert!(quiet.ping(), "our own NOP-Out answered");
        went_quiet = std::time::Instant::now();
        answered += answer_pings(&mut answers, Duration::from_millis(300));
    }
    let ping = loop {
        match quiet.recv(Duration::from_millis(100)) {
            Some(p) if p.opcode() == Some(Opcode::NopIn) && p.itt() == RESERVED_TAG => break p,
            Some(p) => panic!("unexpected PDU while quiet: {:?}", p.opcode()),
            None => assert!(
                went_quiet.elapsed() < Duration::from_secs(6),
                "no NOP-In within 5 s of quiet"
            ),
        }
        answered += answer_pings(&mut answers, Duration::from_millis(10));
    };
    let after = went_quiet.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "pinged {after:?} after the last PDU, before the 1 s interval"
    );
    assert_ne!(ping.u32_at(20), RESERVED_TAG, "the ping asks for an answer");
    // Not answered: the connection goes about 2 s later, while the other one answers.
    let unanswered = std::time::Instant::now();
    while unanswered.elapsed() < Duration::from_secs(6) && !quiet.closed(Duration::from_millis(100))
    {
        answered += answer_pings(&mut answers, Duration::from_millis(10));
    }
    assert!(
        unanswered.elapsed() < Duration::from_secs(6),
        "an unanswered ping did not drop the connection"
    );
    answered += answer_pings(&mut answers, Duration::from_secs(2));
    assert!(answered >= 3, "pings answered: {answered}");
    assert!(answers.ping(), "the answering session is alive");
    other_session_works(&s);
}
