//! Migration from tgt / IET + DRBD + iscsi-ha: `twinsan import` on realistic and broken
//! configurations, the imported configuration serving, and the disk identity compared byte
//! for byte with a real tgtd serving the same targets.conf on the same backing files.

mod common;

use common::raw::Raw;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import")
}

fn import(args: &[&str]) -> Output {
    run(
        Command::new(bin()).arg("import").args(args),
        Duration::from_secs(30),
    )
}

fn check_config(path: &Path) -> Output {
    run(
        Command::new(bin())
            .args(["check-config", "--config"])
            .arg(path),
        Duration::from_secs(30),
    )
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// A tgtd of our own: its own control port and portal, stopped by PID at the end.
struct Tgtd {
    child: Child,
    control: u16,
    tids: Vec<u32>,
}

impl Tgtd {
    fn start(dir: &Path, port: u16) -> Tgtd {
        // tgtd takes control ports below 32768; the test's own port keeps them apart.
        let control = 200 + (port % 700);
        let log = std::fs::File::create(dir.join("tgtd.log")).unwrap();
        let child = Command::new(tool("tgtd"))
            .args(["-f", "-C", &control.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tgtd");
        let t = Tgtd {
            child,
            control,
            tids: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = t.tgtadm(&["--op", "show", "--mode", "target"]);
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tgtd did not come up: {}",
                std::fs::read_to_string(dir.join("tgtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t
    }

    fn tgtadm(&self, args: &[&str]) -> Output {
        run(
            Command::new(tool("tgtadm"))
                .args(["-C", &self.control.to_string()])
                .args(args),
            Duration::from_secs(20),
        )
    }

    /// Configures targets exactly as an admin does: `tgt-admin -e -c targets.conf`.
    fn load(&mut self, conf: &Path, tids: Vec<u32>) {
        let o = run(
            Command::new(tool("tgt-admin"))
                .args(["-e", "-C", &self.control.to_string(), "-c"])
                .arg(conf),
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "tgt-admin: {}", text(&o));
        self.tids = tids;
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        for tid in &self.tids {
            let _ = self.tgtadm(&[
                "--op",
                "delete",
                "--mode",
                "target",
                "--force",
                "--tid",
                &tid.to_string(),
            ]);
        }
        let _ = self.tgtadm(&["--op", "delete", "--mode", "system"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard INQUIRY and VPD 0x00, 0x80, 0x83 as raw bytes, read with our own initiator.
fn raw_identity(port: u16, target: &str, lun: u64) -> Vec<(String, Vec<u8>)> {
    let mut raw = Raw::try_login_to(port, target, INIT1, false, false)
        .unwrap_or_else(|e| panic!("login to {target} on port {port}: {e}"));
    let mut out = Vec::new();
    for (name, evpd, page) in [
        ("standard", 0u8, 0u8),
        ("vpd 0x00", 1, 0x00),
        ("vpd 0x80", 1, 0x80),
        ("vpd 0x83", 1, 0x83),
    ] {
        let (status, data, sense) = raw
            .scsi_sync(
                lun,
                &[0x12, evpd, page, 0, 255, 0],
                255,
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(status, 0, "{target}/{lun} {name}: sense {sense:02x?}");
        out.push((name.to_string(), data));
    }
    out
}

/// What `iscsi-inq` prints for the standard page and `-e 1 -c 0|128|131`.
fn inq_text(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    for args in [
        vec![],
        vec!["-e", "1", "-c", "0"],
        vec!["-e", "1", "-c", "128"],
        vec!["-e", "1", "-c", "131"],
    ] {
        let o = run(
            Command::new(tool("iscsi-inq")).args(&args).arg(url),
            Duration::from_secs(30),
        );
        assert!(o.status.success(), "iscsi-inq {args:?} {url}: {}", text(&o));
        out.push(String::from_utf8_lossy(&o.stdout).to_string());
    }
    out
}

const TGT_A: &str = "iqn.2026-11.org.twinsan.test:mig-a";
const TGT_B: &str = "iqn.2026-11.org.twinsan.test:mig-b";

#[test]
fn tgt_identity_is_byte_identical_after_import() {
    let dir = scratch_dir();
    let d = dir.path();
    for f in ["a.img", "b.img", "c.img", "d.img"] {
        sparse(&d.join(f), 64 << 20);
    }
    // Target B first in the file: tgt-admin still numbers by sorted IQN, so A is tid 1.
    // A: two plain backing stores, tgt's default identities, LUNs 1 and 2 by path order.
    // B: LUN 3 with every identity key set; d.img gets LUN 1 and defaults.
    let conf = format!(
        "default-driver iscsi\n\n<target {TGT_B}>\n    <backing-store {d}/c.img>\n        lun 3\n        scsi_id 1-migrated-sr\n        scsi_sn SRSERIAL-0003\n        vendor_id ACME\n        product_id SUPERDISK\n        product_rev 0042\n    </backing-store>\n    <backing-store {d}/d.img>\n        write-cache on\n    </backing-store>\n</target>\n\n<target {TGT_A}>\n    backing-store {d}/b.img\n    backing-store {d}/a.img\n</target>\n",
        d = d.display()
    );
    let conf_path = d.join("targets.conf");
    std::fs::write(&conf_path, conf).unwrap();

    let tgt_port = free_port();
    let mut tgtd = Tgtd::start(d, tgt_port);
    tgtd.load(&conf_path, vec![1, 2]);
    let show = text(&tgtd.tgtadm(&["--op", "show", "--mode", "target"]));
    assert!(show.contains(&format!("Target 1: {TGT_A}")), "{show}");
    assert!(show.contains(&format!("Target 2: {TGT_B}")), "{show}");

    let port = free_port();
    let config = d.join("twinsan.toml");
    let o = import(&[
        "--host",
        "xen1",
        "--tgt",
        conf_path.to_str().unwrap(),
        "--portal",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        d.join("data").to_str().unwrap(),
        "--output",
        config.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "import: {}", text(&o));
    let c = check_config(&config);
    assert!(c.status.success(), "check-config: {}", text(&c));

    // The same import guided by the running tgtd's own account of tids and SCSI ID/SN
    // (what the migration guide tells operators to save) agrees with the files.
    let show_path = d.join("tgtadm-show.txt");
    std::fs::write(
        &show_path,
        &tgtd
            .tgtadm(&["--lld", "iscsi", "--mode", "target", "--op", "show"])
            .stdout,
    )
    .unwrap();
    let guided = d.join("guided.toml");
    let o = import(&[
        "--host",
        "xen1",
        "--tgt",
        conf_path.to_str().unwrap(),
        "--tgt-show",
        show_path.to_str().unwrap(),
        "--portal",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        d.join("data").to_str().unwrap(),
        "--output",
        guided.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "import --tgt-show: {}", text(&o));
    assert!(
        !text(&o).contains("differs") && !text(&o).contains("not in the running"),
        "{}",
        text(&o)
    );
    let values = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("tgt_tid") || l.starts_with("scsi_") || l.starts_with("number")
            })
            .map(|l| l.split("  #").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(values(&config), values(&guided));

    let mut server = Server::start_with_config(d, &config, port);

    let ls = run(
        Command::new(tool("iscsi-ls")).args(["-s", &format!("iscsi://127.0.0.1:{port}")]),
        Duration::from_secs(30),
    );
    let ls = text(&ls);
    for (t, lun) in [(TGT_A, 1), (TGT_A, 2), (TGT_B, 1), (TGT_B, 3)] {
        assert!(ls.contains(&format!("Target:{t}")), "{ls}");
        assert!(ls.contains(&format!("Lun:{lun} ")), "{ls}");
    }

    let mut compared = 0;
    for (t, lun, serial) in [
        (TGT_A, 1u64, "beaf11"),
        (TGT_A, 2, "beaf12"),
        (TGT_B, 1, "beaf21"),
        (TGT_B, 3, "SRSERIAL-0003"),
    ] {
        let theirs = raw_identity(tgt_port, t, lun);
        let ours = raw_identity(port, t, lun);
        for ((name, a), (_, b)) in theirs.iter().zip(&ours) {
            assert_eq!(
                hex(a),
                hex(b),
                "{t} LUN {lun} {name}: tgt (left) and twinsan (right) differ"
            );
            compared += a.len();
        }
        let vpd80 = &theirs[2].1;
        assert!(
            String::from_utf8_lossy(vpd80).ends_with(serial),
            "{t}/{lun}: tgt's serial {vpd80:02x?} is not {serial}: the test does not cover what it claims"
        );
        let tgt_text = inq_text(&format!("iscsi://127.0.0.1:{tgt_port}/{t}/{lun}"));
        let our_text = inq_text(&format!("iscsi://127.0.0.1:{port}/{t}/{lun}"));
        assert_eq!(
            tgt_text, our_text,
            "{t} LUN {lun}: iscsi-inq output differs"
        );
    }
    eprintln!("identity of 4 LUNs on 2 targets byte-identical: {compared} bytes compared");
    server.assert_alive();

    // The rehearsal the migration guide runs before switching anything: same identity from
    // stand-in files, next to the running tgtd.
    let rport = free_port();
    let rconfig = d.join("rehearsal.toml");
    let o = import(&[
        "--host",
        "xen1",
        "--tgt",
        conf_path.to_str().unwrap(),
        "--portal",
        &format!("127.0.0.1:{rport}"),
        "--data-dir",
        d.join("rehearsal-data").to_str().unwrap(),
        "--rehearsal",
        d.join("rehearsal").to_str().unwrap(),
        "--output",
        rconfig.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "import --rehearsal: {}", text(&o));
    std::fs::create_dir_all(d.join("rehearsal")).unwrap();
    let _rehearsal = Server::start_with_config(d, &rconfig, rport);
    for (t, lun) in [(TGT_A, 1u64), (TGT_A, 2), (TGT_B, 1), (TGT_B, 3)] {
        assert_eq!(
            raw_identity(tgt_port, t, lun),
            raw_identity(rport, t, lun),
            "rehearsal {t}/{lun}"
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn realistic_fixtures_import_and_pass_check_config() {
    let dir = scratch_dir();
    let f = fixtures();
    let pool = f.join("pool");
    let out = dir.path().join("pool.toml");
    let o = import(&[
        "--host",
        "xen1",
        "--drbd",
        pool.join("drbd.conf").to_str().unwrap(),
        "--tgt",
        pool.join("targets.conf").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    // Every option twinsan cannot map is reported with its file and line.
    for w in [
        "global_common.conf:24: resource iscsi1: option `rr-conflict disconnect`",
        "global_common.conf:12: resource iscsi1: option `degr-wfc-timeout 120`",
        "global_common.conf:9: resource iscsi1: option `outdate-peer",
        "targets.conf:13: target iqn.2012-01.com.example:iscsi-ha.sr1: initiator-address",
    ] {
        assert!(stderr.contains(w), "no warning `{w}` in:\n{stderr}");
    }
    let toml = std::fs::read_to_string(&out).unwrap();
    for expect in [
        "path = \"/dev/sdb1\"  # ",
        "name = \"iscsi1\"",
        "meta = \"/dev/sdc1[0]\"",
        "fencing = \"suspend-io\"",
        "tgt_tid = 2",
        "scsi_sn = \"SR1SERIAL\"  # ",
        "resync_rate = 52428800",
    ] {
        assert!(toml.contains(expect), "`{expect}` missing from:\n{toml}");
    }
    // Every value line carries its origin.
    for l in toml.lines() {
        if l.contains(" = ") && !l.starts_with('#') && !l.ends_with('[') {
            assert!(l.contains("  # "), "no origin comment: {l}");
        }
    }
    let c = check_config(&out);
    assert!(c.status.success(), "{}", text(&c));
    let listed = String::from_utf8_lossy(&c.stdout).to_string();
    assert!(
        listed.contains("iqn.2012-01.com.example:iscsi-ha.sr2/10 -> /dev/vg0/sr2"),
        "{listed}"
    );

    // With iscsi-ha the [ha] tables of the HA contract are written.
    let ha_out = dir.path().join("pool-ha.toml");
    let o = import(&[
        "--host",
        "xen2",
        "--drbd",
        pool.join("drbd.conf").to_str().unwrap(),
        "--tgt",
        pool.join("targets.conf").to_str().unwrap(),
        "--iscsi-ha",
        pool.join("iscsi-ha.conf").to_str().unwrap(),
        "--output",
        ha_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let toml = std::fs::read_to_string(&ha_out).unwrap();
    for expect in [
        "[ha]\nsource = \"xapi\"",
        "node = \"xen2\"",
        "listen = \"10.10.1.2:7799\"",
        "peer = \"10.10.1.1:7799\"",
        "[[ha.vip]]\naddress = \"10.10.1.3/24\"",
        "interface = \"xenbr1\"",
        "[ha.alerts]\nsmtp_server = \"127.0.0.1\"",
        "to = [\"ops@example.com\"]",
        "\"10.10.1.3:3260\",  # DRBD_VIRTUAL_IP",
    ] {
        assert!(toml.contains(expect), "`{expect}` missing from:\n{toml}");
    }
    let c = check_config(&ha_out);
    assert!(c.status.success(), "{}", text(&c));

    let iet = f.join("iet");
    let out = dir.path().join("iet.toml");
    let o = import(&[
        "--host",
        "xen2",
        "--drbd",
        pool.join("drbd.conf").to_str().unwrap(),
        "--ietd",
        iet.join("ietd.conf").to_str().unwrap(),
        "--initiators-allow",
        iet.join("initiators.allow").to_str().unwrap(),
        "--portal",
        "192.0.2.10:3260",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let toml = std::fs::read_to_string(&out).unwrap();
    assert!(toml.contains("identity = \"iet\""), "{toml}");
    assert!(toml.contains("allowed_initiators = [\"iqn.2026-01.com.example:xen1\", \"iqn.2026-01.com.example:xen2\"]  # "), "{toml}");
    assert!(toml.contains("listen = \"10.10.1.2:7789\""), "{toml}");
    let c = check_config(&out);
    assert!(c.status.success(), "{}", text(&c));
}

#[test]
fn imported_ietd_configuration_serves_with_iet_identity() {
    let dir = scratch_dir();
    let d = dir.path();
    sparse(&d.join("sr1.img"), 64 << 20);
    sparse(&d.join("sr1b.img"), 32 << 20);
    let conf = format!(
        "Target iqn.2026-11.org.twinsan.test:iet-sr1\n\tLun 0 Path={d}/sr1.img,Type=fileio,ScsiId=sr1-lun0,ScsiSN=SR1LUN0\n\tLun 4 Path={d}/sr1b.img,Type=fileio\n\tAlias sr1\n\tMaxConnections 1\n",
        d = d.display()
    );
    std::fs::write(d.join("ietd.conf"), conf).unwrap();
    std::fs::write(
        d.join("initiators.allow"),
        format!("ALL 10.0.0.0/8\niqn.2026-11.org.twinsan.test:iet-sr1 {INIT1}\n"),
    )
    .unwrap();
    let port = free_port();
    let config = d.join("twinsan.toml");
    let o = import(&[
        "--host",
        "h",
        "--ietd",
        d.join("ietd.conf").to_str().unwrap(),
        "--initiators-allow",
        d.join("initiators.allow").to_str().unwrap(),
        "--portal",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        d.join("data").to_str().unwrap(),
        "--output",
        config.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let _server = Server::start_with_config(d, &config, port);
    let ls = run(
        Command::new(tool("iscsi-ls")).args([
            "-s",
            "-i",
            INIT1,
            &format!("iscsi://127.0.0.1:{port}"),
        ]),
        Duration::from_secs(30),
    );
    let ls = text(&ls);
    assert!(ls.contains("Lun:0 ") && ls.contains("Lun:4 "), "{ls}");
    let ids = raw_identity(port, "iqn.2026-11.org.twinsan.test:iet-sr1", 0);
    assert_eq!(&ids[0].1[8..36], b"IET     VIRTUAL-DISK    0   ");
    assert_eq!(ids[1].1, vec![0, 0, 0, 3, 0, 0x80, 0x83]);
    assert_eq!(&ids[2].1[4..], b"         SR1LUN0");
    assert_eq!(&ids[3].1[8..24], b"IET\0\0\0\0\0sr1-lun0");
    // LUN 4 without ScsiId: IET's MD5 of target name and LUN, serial = its hex.
    let ids = raw_identity(port, "iqn.2026-11.org.twinsan.test:iet-sr1", 4);
    let scsi_id = &ids[3].1[16..32];
    let sn: String = scsi_id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(String::from_utf8_lossy(&ids[2].1[4..]), sn);
    // The initiators.allow name rule holds: another initiator is refused.
    assert!(Raw::try_login_to(
        port,
        "iqn.2026-11.org.twinsan.test:iet-sr1",
        INIT2,
        false,
        false
    )
    .is_err());
}

#[test]
fn broken_files_fail_with_file_line_and_reason() {
    let f = fixtures();
    let b = f.join("broken");
    let pool = f.join("pool");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "--drbd".into(),
                s(&b.join("drbd-missing-semicolon.conf")),
                "--tgt".into(),
                s(&pool.join("targets.conf")),
            ],
            format!(
                "{}:3: `device` has too many values",
                b.join("drbd-missing-semicolon.conf").display()
            ),
        ),
        (
            vec![
                "--drbd".into(),
                s(&b.join("drbd-protocol-a.conf")),
                "--tgt".into(),
                s(&pool.join("targets.conf")),
            ],
            format!(
                "{}:2: resource r0: protocol A",
                b.join("drbd-protocol-a.conf").display()
            ),
        ),
        (
            vec!["--tgt".into(), s(&b.join("targets-unclosed.conf"))],
            format!(
                "{}:2: <target iqn.2012-01.com.example:sr1> opened here is not closed",
                b.join("targets-unclosed.conf").display()
            ),
        ),
        (
            vec!["--ietd".into(), s(&b.join("ietd-bad-lun.conf"))],
            format!(
                "{}:3: Lun `zero` is not a number",
                b.join("ietd-bad-lun.conf").display()
            ),
        ),
        (
            vec![
                "--drbd".into(),
                s(&pool.join("drbd.conf")),
                "--tgt".into(),
                s(&pool.join("targets.conf")),
                "--iscsi-ha".into(),
                s(&b.join("iscsi-ha-bad-mask.conf")),
            ],
            format!(
                "{}:2: DRBD_VIRTUAL_MASK `255.0.255.0`",
                b.join("iscsi-ha-bad-mask.conf").display()
            ),
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["--host".to_string(), "xen1".to_string()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let o = import(&refs);
        let t = text(&o);
        assert!(!o.status.success(), "{all:?} succeeded: {t}");
        assert!(t.contains(&want), "{all:?}: expected `{want}` in:\n{t}");
        assert!(!t.contains("panicked"), "{t}");
    }
}

#[test]
fn drbd_backed_lun_is_served_from_the_lower_disk_after_import() {
    let dir = scratch_dir();
    let d = dir.path();
    sparse(&d.join("lower1.img"), 128 << 20);
    sparse(&d.join("plain.img"), 64 << 20);
    let (link, port) = (free_port(), free_port());
    std::fs::write(
        d.join("drbd.conf"),
        format!(
            "resource r1 {{\n  net {{ shared-secret \"replication-secret\"; }}\n  on xen1 {{ device /dev/drbd1; disk {d}/lower1.img; address 127.0.0.1:{link}; meta-disk internal; }}\n  on xen2 {{ device /dev/drbd1; disk /dev/sdb1; address 127.0.0.2:{link}; meta-disk internal; }}\n}}\n",
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("targets.conf"),
        format!(
            "<target iqn.2026-11.org.twinsan.test:e2e>\n  backing-store /dev/drbd1\n  backing-store {}/plain.img\n</target>\n",
            d.display()
        ),
    )
    .unwrap();
    let config = d.join("twinsan.toml");
    let o = import(&[
        "--host",
        "xen1",
        "--drbd",
        d.join("drbd.conf").to_str().unwrap(),
        "--tgt",
        d.join("targets.conf").to_str().unwrap(),
        "--portal",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        d.join("data").to_str().unwrap(),
        "--output",
        config.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(
        toml.contains(&format!("path = \"{}/lower1.img\"", d.display())),
        "{toml}"
    );
    // New metadata here (adopting existing DRBD metadata is `replication adopt`'s job).
    let o = run(
        Command::new(bin())
            .args([
                "replication",
                "create-md",
                "--volume",
                "r1",
                "--initial-sync",
                "full",
                "--config",
            ])
            .arg(&config),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "{}", text(&o));
    let _server = Server::start_with_config(d, &config, port);
    let ls = run(
        Command::new(tool("iscsi-ls")).args(["-s", &format!("iscsi://127.0.0.1:{port}")]),
        Duration::from_secs(30),
    );
    let ls = text(&ls);
    // The DRBD LUN is the device's usable size (lower disk minus internal metadata), as tgt
    // served /dev/drbd1. tgt-admin numbers backing stores in byte-wise path order, so which
    // LUN is which depends on where the scratch directory lives (/check/... sorts before
    // /dev/drbd1, /tmp/... after).
    let plain = format!("{}/plain.img", d.display());
    let (drbd_lun, plain_lun) = if "/dev/drbd1" < plain.as_str() {
        (1, 2)
    } else {
        (2, 1)
    };
    assert!(
        ls.contains(&format!("Lun:{drbd_lun}    Type:DIRECT_ACCESS (Size:127M)")),
        "{ls}"
    );
    assert!(
        ls.contains(&format!("Lun:{plain_lun}    Type:DIRECT_ACCESS (Size:63M)")),
        "{ls}"
    );
}
