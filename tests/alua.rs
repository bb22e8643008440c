//! ALUA across a replicated pair (SPC-4 5.16, issue 14 item 4), end to end: two real
//! `twinsan` daemons with `alua = true`, both serving their portal (no `[ha]`), REPORT
//! TARGET PORT GROUPS sent to both through a raw iSCSI session before and after a switchover
//! (`replication secondary` on A, `primary` on B). `sg_rtpg` needs a kernel SCSI device, so
//! it is not used here: the raw client sends the same CDB (MAINTENANCE IN / 0x0A, extended
//! format) and the test decodes the answer.

mod common;

use bytes::Bytes;
use common::pair::{Pair, PairSpec};
use common::raw::Raw;
use common::{bin, run, text, INIT1, IQN};
use std::time::Duration;
use twinsan::iscsi::pdu::Opcode;

const LIMIT: Duration = Duration::from_secs(10);
const SYNC: Duration = Duration::from_secs(60);
const BLOCK: usize = 512;

/// (status, data in, (sense key, asc, ascq)) of one command without Data-Out.
fn cmd(s: &mut Raw, cdb: &[u8], read_len: u32) -> (u8, Vec<u8>, (u8, u8, u8)) {
    let (status, data, sense) = s.scsi_sync(0, cdb, read_len, LIMIT).expect("a SCSI status");
    (status, data, key_asc_ascq(&sense))
}

fn key_asc_ascq(sense: &[u8]) -> (u8, u8, u8) {
    if sense.len() < 14 {
        return (0, 0, 0);
    }
    (sense[2] & 0x0F, sense[12], sense[13])
}

/// WRITE(10) of one block at `lba`, its data sent as immediate data.
fn write(s: &mut Raw, lba: u32, fill: u8) -> (u8, (u8, u8, u8)) {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2A;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    let p = s.scsi_command(0, &cdb, 0, Some(Bytes::from(vec![fill; BLOCK])));
    let itt = p.itt();
    s.send(p);
    let r = s
        .wait_for(|r| r.opcode() == Some(Opcode::ScsiResponse) && r.itt() == itt)
        .expect("a response to the WRITE");
    let sense = if r.data.len() >= 2 {
        &r.data[2..]
    } else {
        &[][..]
    };
    (r.bhs[3], key_asc_ascq(sense))
}

fn read_cdb(lba: u32) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    cdb
}

const TUR: [u8; 6] = [0; 6];
const NOT_READY_STANDBY: (u8, u8, u8) = (0x2, 0x04, 0x0B);

/// REPORT TARGET PORT GROUPS, extended header: (group, access state, relative port) per
/// descriptor, in the order reported.
fn rtpg(s: &mut Raw) -> Vec<(u16, u8, u16)> {
    let mut cdb = [0u8; 12];
    cdb[0] = 0xA3;
    cdb[1] = 0x20 | 0x0A;
    cdb[6..10].copy_from_slice(&1024u32.to_be_bytes());
    let (status, d, sense) = cmd(s, &cdb, 1024);
    assert_eq!(status, 0, "RTPG: sense {sense:x?}");
    assert_eq!(d[4] & 0x70, 0x10, "extended format header");
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len());
    let mut groups = Vec::new();
    let mut off = 8;
    while off + 8 <= d.len() {
        let g = &d[off..];
        let ports = usize::from(g[7]);
        assert_eq!(ports, 1, "one target port per group");
        let rel = u16::from_be_bytes([g[10], g[11]]);
        groups.push((u16::from_be_bytes([g[2], g[3]]), g[0] & 0x0F, rel));
        off += 8 + 4 * ports;
    }
    groups
}

/// REPORT TARGET PORT GROUPS until it shows `want` (the peer's role reaches this host over
/// the replication link a moment after the role change; the change's unit attention may
/// come first), at most 10 s; the last answer.
fn rtpg_settled(s: &mut Raw, want: &[(u16, u8, u16)]) -> Vec<(u16, u8, u16)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xA3;
        cdb[1] = 0x20 | 0x0A;
        cdb[6..10].copy_from_slice(&1024u32.to_be_bytes());
        let (status, _, sense) = cmd(s, &cdb, 1024);
        let attention = status == 0x02 && sense == (0x6, 0x2A, 0x06);
        if !attention {
            let groups = rtpg(s);
            if groups == want || std::time::Instant::now() > deadline {
                return groups;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RTPG: sense {sense:x?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// This host's (relative target port, target port group) from VPD page 83h.
fn port_designators(s: &mut Raw) -> (Option<u16>, Option<u16>) {
    let (status, d, _) = cmd(s, &[0x12, 1, 0x83, 1, 0, 0], 256);
    assert_eq!(status, 0);
    let (mut rel, mut group) = (None, None);
    let mut off = 4;
    while off + 4 <= d.len() {
        let len = usize::from(d[off + 3]);
        let v = &d[off + 4..off + 4 + len];
        match d[off + 1] & 0x3F {
            0x14 => rel = Some(u16::from_be_bytes([v[2], v[3]])),
            0x15 => group = Some(u16::from_be_bytes([v[2], v[3]])),
            _ => {}
        }
        off += 4 + len;
    }
    (rel, group)
}

const AO: u8 = 0x0;
const STANDBY: u8 = 0x2;

#[test]
fn alua_groups_follow_a_switchover_and_standby_never_touches_the_medium() {
    let mut p = Pair::new(PairSpec {
        alua: true,
        ..PairSpec::default()
    });
    p.start();
    p.wait_in_sync(SYNC);
    // Group 1 is the host whose replication listen address is lower.
    let (ga, gb) = if p.a.listen < p.b.listen {
        (1, 2)
    } else {
        (2, 1)
    };
    let mut a = Raw::login(p.a.iscsi_port, false, false);
    let mut b = Raw::login(p.b.iscsi_port, false, false);

    for (s, g) in [(&mut a, ga), (&mut b, gb)] {
        let (_, inq, _) = cmd(s, &[0x12, 0, 0, 0, 96, 0], 96);
        assert_eq!(inq[5] & 0x30, 0x10, "TPGS=01b (implicit ALUA)");
        assert_eq!(port_designators(s), (Some(g), Some(g)));
    }
    // Before: A primary (active/optimized), B standby, reported alike by both hosts.
    assert_eq!(rtpg(&mut a), vec![(ga, AO, ga), (gb, STANDBY, gb)]);
    assert_eq!(rtpg(&mut b), vec![(gb, STANDBY, gb), (ga, AO, ga)]);

    // The secondary refuses media access before the store is touched.
    assert_eq!(cmd(&mut b, &TUR, 0).2, NOT_READY_STANDBY);
    assert_eq!(write(&mut b, 8, 0xB1), (0x02, NOT_READY_STANDBY));
    assert_eq!(cmd(&mut b, &read_cdb(8), BLOCK as u32).2, NOT_READY_STANDBY);
    let (status, zeros, _) = cmd(&mut a, &read_cdb(8), BLOCK as u32);
    assert_eq!(
        (status, zeros),
        (0, vec![0u8; BLOCK]),
        "B's write reached nothing"
    );
    assert_eq!(write(&mut a, 9, 0xA1), (0x00, (0, 0, 0)));
    assert_eq!(cmd(&mut a, &TUR, 0).0, 0);

    // Switchover: A secondary, then B primary.
    p.a.act_ok("secondary", &[]);
    p.b.act_ok("primary", &[]);
    p.wait("B primary, A secondary, connected", SYNC, |a, b| {
        a.role == "Secondary" && b.role == "Primary" && a.connected() && b.connected()
    });

    // Every I_T nexus learns of it once: UNIT ATTENTION 2A/06.
    for s in [&mut a, &mut b] {
        assert_eq!(cmd(s, &TUR, 0).2, (0x6, 0x2A, 0x06));
    }
    assert_eq!(cmd(&mut b, &TUR, 0).0, 0, "B serves now");
    assert_eq!(cmd(&mut a, &TUR, 0).2, NOT_READY_STANDBY);
    assert_eq!(rtpg(&mut a), vec![(ga, STANDBY, ga), (gb, AO, gb)]);
    assert_eq!(rtpg(&mut b), vec![(gb, AO, gb), (ga, STANDBY, ga)]);

    assert_eq!(write(&mut a, 10, 0xA2), (0x02, NOT_READY_STANDBY));
    assert_eq!(write(&mut b, 11, 0xB2), (0x00, (0, 0, 0)));
    let (_, block10, _) = cmd(&mut b, &read_cdb(10), BLOCK as u32);
    assert_eq!(block10, vec![0u8; BLOCK], "A's refused write is nowhere");
    let (_, block9, _) = cmd(&mut b, &read_cdb(9), BLOCK as u32);
    assert_eq!(block9, vec![0xA1; BLOCK], "A's write as primary is on B");
    drop((a, b));
    p.wait_in_sync(SYNC);
    p.stop_both();
    p.assert_identical();
    let img = p.a.data_area(p.size_bytes);
    assert!(img[8 * BLOCK..9 * BLOCK].iter().all(|&x| x == 0));
    assert!(img[10 * BLOCK..11 * BLOCK].iter().all(|&x| x == 0));
    assert!(img[11 * BLOCK..12 * BLOCK].iter().all(|&x| x == 0xB2));
}

/// `[ha]` (manual source, heartbeats on loopback) for `node`.
fn ha_table(node: &str, hb: u16, peer_hb: u16) -> String {
    format!(
        r#"
[ha]
node = "{node}"
source = "manual"
listen = "127.0.0.1:{hb}"
peer = "127.0.0.1:{peer_hb}"
secret = "loopback-ha-secret"
heartbeat_interval_ms = 50
peer_timeout_ms = 400
"#
    )
}

fn ha_cli(h: &common::pair::Host, args: &[&str]) -> (bool, String) {
    let o = run(
        std::process::Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&h.config),
        LIMIT * 3,
    );
    (o.status.success(), text(&o))
}

/// Retries `become-primary` (the peer's demotion reaches it over the heartbeats).
fn become_primary(h: &common::pair::Host) {
    let deadline = std::time::Instant::now() + SYNC;
    loop {
        let (ok, out) = ha_cli(h, &["become-primary"]);
        if ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{}: {out}", h.label);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn with_ha_the_standby_host_keeps_its_host_portal() {
    let mut p = Pair::new(PairSpec {
        alua: true,
        ..PairSpec::default()
    });
    // `portals` (the shared address, here 127.0.0.2) only while primary; the host portal
    // (127.0.0.1:iscsi_port) in both roles.
    let shared = common::pair::unique_port();
    let (hb_a, hb_b) = (common::pair::unique_port(), common::pair::unique_port());
    for (h, node, hb, peer_hb) in [(&mut p.a, "a", hb_a, hb_b), (&mut p.b, "b", hb_b, hb_a)] {
        h.portals = Some(format!("\"127.0.0.2:{shared}\""));
        h.target_extra = format!("host_portals = [\"127.0.0.1:{}\"]", h.iscsi_port);
        h.extra = ha_table(node, hb, peer_hb);
    }
    p.start();
    become_primary(&p.a);
    p.wait_in_sync(SYNC);
    let (ga, gb) = if p.a.listen < p.b.listen {
        (1, 2)
    } else {
        (2, 1)
    };
    let mut b = Raw::login(p.b.iscsi_port, false, false);
    let want = vec![(gb, STANDBY, gb), (ga, AO, ga)];
    assert_eq!(rtpg_settled(&mut b, &want), want);
    assert_eq!(write(&mut b, 3, 0xB3), (0x02, NOT_READY_STANDBY));
    let shared_addr = std::net::SocketAddr::from(([127, 0, 0, 2], shared));
    let mut via_shared =
        Raw::try_login_at(shared_addr, IQN, INIT1, false, false, LIMIT).expect("login to A");
    assert_eq!(rtpg(&mut via_shared), vec![(ga, AO, ga), (gb, STANDBY, gb)]);
    drop(via_shared);

    // Planned switchover: A steps down, B up. B's host-portal session lives on.
    for h in [&p.a, &p.b] {
        let (ok, out) = ha_cli(h, &["manual-mode-enable"]);
        assert!(ok, "{out}");
    }
    let (ok, out) = ha_cli(&p.a, &["become-secondary"]);
    assert!(ok, "{out}");
    become_primary(&p.b);
    assert_eq!(cmd(&mut b, &TUR, 0).2, (0x6, 0x2A, 0x06));
    assert_eq!(rtpg(&mut b), vec![(gb, AO, gb), (ga, STANDBY, ga)]);
    // A, now secondary, still answers on its host portal, as standby.
    let mut a = Raw::login(p.a.iscsi_port, false, false);
    assert_eq!(rtpg(&mut a), vec![(ga, STANDBY, ga), (gb, AO, gb)]);
    assert_eq!(write(&mut a, 4, 0xA4), (0x02, NOT_READY_STANDBY));
    assert_eq!(write(&mut b, 5, 0xB5), (0x00, (0, 0, 0)));
    let (_, block3, _) = cmd(&mut b, &read_cdb(3), BLOCK as u32);
    let (_, block4, _) = cmd(&mut b, &read_cdb(4), BLOCK as u32);
    assert_eq!((block3, block4), (vec![0; BLOCK], vec![0; BLOCK]));
}
