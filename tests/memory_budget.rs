//! Issue 13 item 1: memory for in-flight data is bounded. Sessions queue 32 MiB WRITEs whose
//! data never comes and 32 MiB READs whose Data-In is never read; the daemon's resident
//! memory stays under `max_inflight_bytes` plus a fixed margin, a new session's INQUIRY is
//! answered at once, and once the hogs are gone the budget is whole again (a 1 MiB write
//! and read back on a fresh session). Before the budget, the same load took one 32 MiB
//! buffer per command: gigabytes.
//!
//! Session limits: `max_sessions_per_initiator` refuses one session too many with
//! OUT OF RESOURCES (login status 0x0302) and takes it once another has gone.

mod common;

use bytes::Bytes;
use common::raw::Raw;
use common::*;
use std::time::{Duration, Instant};
use twinsan::iscsi::pdu::{Opcode, Pdu};

const MIB: u64 = 1 << 20;
/// The configured server-wide budget and each session's share.
const BUDGET: u64 = 128 * MIB;
const SESSION_BUDGET: u64 = 64 * MIB;
/// What the daemon holds beside command data (code, runtime, page tables, buffers of
/// small PDUs): measured about 15-25 MiB here; the test allows more.
const MARGIN: u64 = 96 * MIB;
/// One command's transfer: the largest the Block Limits page allows.
const CMD: u32 = 32 << 20;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A READ(16) or WRITE(16) of `CMD` bytes at `lba`, with no data (F set: nothing
/// unsolicited follows a write).
fn bulk(raw: &mut Raw, write: bool, lba: u64, block: u32) -> Pdu {
    let mut cdb = [0u8; 16];
    cdb[0] = if write { 0x8a } else { 0x88 };
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&(CMD / block).to_be_bytes());
    let mut p = raw.scsi_command(0, &cdb, if write { 0 } else { CMD }, None);
    if write {
        p.set_flags(0x80 | 0x20 | 0x01);
        p.set_u32_at(20, CMD);
    }
    p
}

fn block_size(raw: &mut Raw) -> u32 {
    let (status, data, _) = raw
        .scsi_sync(
            0,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            8,
            Duration::from_secs(10),
        )
        .expect("READ CAPACITY(10)");
    assert_eq!(status, 0);
    u32::from_be_bytes(data[4..8].try_into().unwrap())
}

#[test]
fn stalled_reads_and_writes_stay_within_the_budget_and_a_new_session_is_served() {
    let dir = scratch_dir();
    let mut server = Server::start_with_server_keys(
        dir.path(),
        &format!("max_inflight_bytes = {BUDGET}\nmax_session_inflight_bytes = {SESSION_BUDGET}"),
        "",
        Some(&format!(
            "[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"2GiB\"\n",
            dir.path().join("lun0.img").display()
        )),
        "",
    );
    let pid = server.child.id();
    let mut first = Raw::login(server.port, false, false);
    let block = block_size(&mut first);
    drop(first);
    let idle_rss = rss(pid);

    // Three sessions, each 16 WRITEs with no data and 16 READs never read: 1.5 GiB of
    // buffers if each took its own.
    let mut hogs = Vec::new();
    for s in 0..3u64 {
        let mut raw = Raw::try_login(server.port, &format!("{INIT1}-hog{s}"), false, false)
            .expect("hog login");
        for i in 0..16u64 {
            let lba = (s * 32 + i) * u64::from(CMD / block);
            let w = bulk(&mut raw, true, lba, block);
            raw.send(w);
            let r = bulk(&mut raw, false, lba, block);
            raw.send(r);
        }
        hogs.push(raw);
    }
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "daemon RSS idle {} MiB, peak under load {} MiB (budget {} MiB)",
        idle_rss / MIB,
        peak / MIB,
        BUDGET / MIB
    );
    let st = status_json(&server.config);
    let held = st["inflight_bytes"]
        .as_u64()
        .expect("status inflight_bytes");
    eprintln!("status: {} MiB of data in flight", held / MIB);
    assert!(
        held > 0 && held <= BUDGET,
        "status reports {held} bytes in flight (budget {BUDGET})"
    );
    assert_eq!(st["max_inflight_bytes"].as_u64(), Some(BUDGET));
    assert!(
        peak <= BUDGET + MARGIN,
        "RSS {} MiB over the budget {} MiB + margin {} MiB",
        peak / MIB,
        BUDGET / MIB,
        MARGIN / MIB
    );

    // A new session while the budget is spent: INQUIRY moves no bulk data and is answered
    // at once (the issue saw 3.7 s before the budget; the bound is the 100 ms).
    let mut fresh = Raw::try_login(server.port, INIT2, false, false).expect("fresh login");
    let t = Instant::now();
    let (status, data, _) = fresh
        .scsi_sync(0, &[0x12, 0, 0, 0, 96, 0], 96, Duration::from_secs(10))
        .expect("INQUIRY");
    let took = t.elapsed();
    eprintln!("INQUIRY on a new session took {took:?}");
    assert_eq!(status, 0);
    assert!(data.len() >= 36);
    assert!(
        took < Duration::from_millis(100),
        "INQUIRY took {took:?} with the budget spent"
    );
    server.assert_alive();

    // The hogs go: their charges are released and bulk I/O runs again.
    drop(hogs);
    let mut raw = Raw::try_login(server.port, INIT1, false, false).expect("login after");
    let payload: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    let blocks = (MIB / u64::from(block)) as u32;
    let mut wcdb = [0u8; 10];
    wcdb[0] = 0x2a;
    wcdb[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
    let deadline = Instant::now() + Duration::from_secs(20);
    // Immediate data up to FirstBurstLength, the rest as Data-Out for R2Ts.
    let p = raw.scsi_command(0, &wcdb, 0, Some(Bytes::copy_from_slice(&payload[..65536])));
    let itt = p.itt();
    let mut p = p;
    p.set_u32_at(20, MIB as u32);
    raw.send(p);
    let status = loop {
        assert!(
            Instant::now() < deadline,
            "write after the hogs left timed out"
        );
        let Some(r) = raw.recv(Duration::from_millis(200)) else {
            continue;
        };
        match r.opcode() {
            Some(Opcode::R2t) if r.itt() == itt => {
                let ttt = r.u32_at(20);
                let offset = r.u32_at(40) as usize;
                let len = r.u32_at(44) as usize;
                let mut sent = 0;
                let mut sn = 0;
                while sent < len {
                    let n = (len - sent).min(262_144);
                    let mut d = Pdu::new(Opcode::DataOut);
                    d.set_flags(if sent + n == len { 0x80 } else { 0 });
                    d.set_itt(itt);
                    d.set_u32_at(20, ttt);
                    d.set_u32_at(36, sn);
                    d.set_u32_at(40, (offset + sent) as u32);
                    d.set_data(Bytes::copy_from_slice(
                        &payload[offset + sent..offset + sent + n],
                    ));
                    raw.send(d);
                    sent += n;
                    sn += 1;
                }
            }
            Some(Opcode::ScsiResponse) if r.itt() == itt => break r.bhs[3],
            _ => {}
        }
    };
    assert_eq!(status, 0, "the 1 MiB write after the hogs left");
    let mut rcdb = [0u8; 10];
    rcdb[0] = 0x28;
    rcdb[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
    let (status, back, _) = raw
        .scsi_sync(0, &rcdb, MIB as u32, Duration::from_secs(20))
        .expect("read back");
    assert_eq!(status, 0);
    assert!(back == payload, "the 1 MiB read back differs");
    server.assert_alive();
}

#[test]
fn one_session_too_many_for_an_initiator_is_out_of_resources() {
    let dir = scratch_dir();
    let mut server =
        Server::start_with_server_keys(dir.path(), "max_sessions_per_initiator = 2", "", None, "");
    let a = Raw::try_login(server.port, INIT1, false, false).expect("first");
    let _b = Raw::try_login(server.port, INIT1, false, false).expect("second");
    let err = Raw::try_login(server.port, INIT1, false, false)
        .err()
        .expect("a third session of one initiator is refused");
    assert!(
        err.to_string().contains("status 0x03/0x02"),
        "want OUT OF RESOURCES, got: {err}"
    );
    let _other = Raw::try_login(server.port, INIT2, false, false).expect("another initiator");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Raw::try_login(server.port, INIT1, false, false) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the freed session slot was not reusable: {e}"),
        }
    }
    assert!(server.log_text().contains("session limit reached"));
    server.assert_alive();
}
