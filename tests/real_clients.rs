//! The target against initiators nobody here wrote: libiscsi's tools and conformance suite,
//! qemu-img and fio with the libiscsi engine.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn inq_83(url: &str) -> String {
    let o = run(
        Command::new(tool("iscsi-inq")).args(["-e", "1", "-c", "131", url]),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "iscsi-inq failed: {}", text(&o));
    text(&o)
}

#[test]
fn discovery_lists_target_and_identity_survives_restart() {
    let dir = scratch_dir();
    let naa = "6001405aabbccddeeff0011223344556";
    let lun = format!(
        "[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"64MiB\"\nnaa = \"{naa}\"\n\n[[target.lun]]\nnumber = 3\npath = \"{}\"\nsize = \"32MiB\"\nblock_size = 4096\n",
        dir.path().join("a.img").display(),
        dir.path().join("b.img").display()
    );
    let mut s = Server::start(dir.path(), "", Some(&lun), "");
    let o = run(
        Command::new(tool("iscsi-ls")).args(["-s", &format!("iscsi://{}", s.portal())]),
        Duration::from_secs(30),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("Target:{IQN} Portal:{},1", s.portal())),
        "{out}"
    );
    assert!(out.contains("Lun:0") && out.contains("Lun:3"), "{out}");

    let before0 = inq_83(&s.url(0));
    assert!(before0.contains("Designator Type:(3) NAA"), "{before0}");
    let before3 = inq_83(&s.url(3));
    // The generated identity of LUN 3 is persisted; the configured NAA of LUN 0 is presented.
    let o80 = text(&run(
        Command::new(tool("iscsi-inq")).args(["-e", "1", "-c", "128", &s.url(3)]),
        Duration::from_secs(30),
    ));
    s.stop();
    let persisted = std::fs::read_to_string(dir.path().join("data/identity.toml")).unwrap();
    let s2 = Server::start_with_config(dir.path(), &s.config.clone(), s.port);
    assert_eq!(inq_83(&s2.url(0)), before0);
    assert_eq!(inq_83(&s2.url(3)), before3);
    let o80_after = text(&run(
        Command::new(tool("iscsi-inq")).args(["-e", "1", "-c", "128", &s2.url(3)]),
        Duration::from_secs(30),
    ));
    assert_eq!(o80, o80_after);
    assert_eq!(
        persisted,
        std::fs::read_to_string(dir.path().join("data/identity.toml")).unwrap()
    );
    // The NAA bytes (binary) appear in the raw page: check via iscsi-inq's designator length.
    assert!(before0.contains("NAA"), "{before0}");
}

fn conformance(suites: &[&str], s: &Server, limit: Duration) -> (CuCounts, String) {
    let url = s.url(0);
    let mut cmd = Command::new(tool("iscsi-test-cu"));
    cmd.args(["-d", "-i", INIT1, "-I", INIT2]);
    for suite in suites {
        cmd.args(["-t", suite]);
    }
    cmd.args([&url, &url]);
    let o = run(&mut cmd, limit);
    let out = text(&o);
    (parse_cu(&out), out)
}

/// The suites issue 2 requires with zero failures, each run on its own.
#[test]
fn conformance_required_suites_have_zero_failures() {
    required_suites_have_zero_failures();
}

/// Issue 9: the same on a kernel without io_uring (XenServer dom0's 4.19: ENOSYS).
#[test]
fn conformance_required_suites_without_io_uring_enosys() {
    deny_io_uring(libc::ENOSYS);
    required_suites_have_zero_failures();
}

/// Issue 9: io_uring refused by policy (a container's seccomp profile: EPERM).
#[test]
fn conformance_required_suites_without_io_uring_eperm() {
    deny_io_uring(libc::EPERM);
    required_suites_have_zero_failures();
}

fn required_suites_have_zero_failures() {
    let dir = scratch_dir();
    let mut s = Server::start(dir.path(), "", None, "");
    let suites = [
        "Inquiry",
        "Mandatory",
        "ReadCapacity10",
        "ReadCapacity16",
        "Read6",
        "Read10",
        "Read12",
        "Read16",
        "Write10",
        "Write12",
        "Write16",
        "WriteVerify10",
        "WriteVerify12",
        "WriteVerify16",
        "Verify10",
        "Verify12",
        "Verify16",
        "TestUnitReady",
        "ModeSense6",
        "StartStopUnit",
        "iSCSIcmdsn",
        "iSCSIdatasn",
        "iSCSIResiduals",
        "iSCSITMF",
        "MultipathIO",
    ];
    let mut failures = Vec::new();
    for suite in suites {
        let (c, out) = conformance(&[&format!("ALL.{suite}")], &s, Duration::from_secs(300));
        eprintln!(
            "{suite}: {} passed, {} skipped, {} failed",
            c.passed,
            c.skipped,
            c.failed.len()
        );
        assert!(
            c.passed + c.skipped + c.failed.len() > 0,
            "{suite} ran no test:\n{out}"
        );
        if suite == "MultipathIO" {
            assert!(c.passed > 0, "MultipathIO only skipped:\n{out}");
        }
        failures.extend(c.failed.iter().map(|f| format!("{suite}: {f}")));
        s.assert_alive();
    }
    assert!(
        failures.is_empty(),
        "failed: {failures:#?}\nserver log:\n{}",
        s.log_text()
    );
}

/// Issue 14: SCSI-3 persistent reservations (PERSISTENT RESERVE IN / OUT, all six types,
/// two initiators) and SPC-2 RESERVE / RELEASE, every test passing and none skipped (a
/// target without them makes libiscsi skip: "PERSISTENT RESERVE OUT is not implemented").
#[test]
fn conformance_reservations_pass() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let suites = [
        ("PrinReadKeys", 2),
        ("PrinServiceactionRange", 1),
        ("PrinReportCapabilities", 1),
        ("ProutRegister", 1),
        ("ProutReserve", 13),
        ("ProutClear", 1),
        ("ProutPreempt", 1),
        ("Reserve6", 7),
    ];
    suites_pass_whole(&s, &suites);
}

/// Issue 14: VMware offloads. RECEIVE COPY RESULTS, READ CAPACITY(16), ORWRITE and WRITE
/// SAME(16) whole, every EXTENDED COPY test but ValidTgtDescr and every WRITE SAME(10) test but
/// UnmapUntilEnd, all passing and none skipped. (libiscsi 1.19's ValidTgtDescr expects GOOD
/// for a CSCD descriptor whose LU ID TYPE is reserved; SPC-4 6.4.5.3 makes that INVALID FIELD
/// IN PARAMETER LIST, which is what twinsan answers and what later libiscsi expects. Its
/// WriteSame10.UnmapUntilEnd sends 0xFF blocks with UNMAP set and expects zeroes back;
/// twinsan unmaps only a zero block, what an unmapped block reads as, and writes others.)
#[test]
fn conformance_vaai_pass() {
    let dir = scratch_dir();
    // 512e (4 KiB physical blocks): the unaligned-unmap tests run instead of skipping.
    let lun = format!(
        "[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"1GiB\"\nphysical_block_size = 4096\n",
        dir.path().join("lun0.img").display()
    );
    let s = Server::start(dir.path(), "", Some(&lun), "");
    let tests = [
        ("ReceiveCopyResults", 2),
        ("ExtendedCopy.Simple", 1),
        ("ExtendedCopy.ParamHdr", 1),
        ("ExtendedCopy.DescrLimits", 1),
        ("ExtendedCopy.DescrType", 1),
        ("ExtendedCopy.ValidSegDescr", 1),
        ("ReadCapacity16", 4),
        ("OrWrite", 6),
        ("WriteSame16", 10),
        ("WriteSame10.Simple", 1),
        ("WriteSame10.BeyondEol", 1),
        ("WriteSame10.ZeroBlocks", 1),
        ("WriteSame10.WriteProtect", 1),
        ("WriteSame10.Unmap", 1),
        ("WriteSame10.UnmapUnaligned", 1),
        ("WriteSame10.UnmapVPD", 1),
        ("WriteSame10.Check", 1),
        ("WriteSame10.InvalidDataOutSize", 1),
    ];
    suites_pass_whole(&s, &tests);
}

/// Runs each `SCSI.<suite>` and requires exactly its expected number of tests to pass, none
/// skipped ("not implemented" / "not supported" / SKIPPED) and none failed.
fn suites_pass_whole(s: &Server, suites: &[(&str, usize)]) {
    let mut failures = Vec::new();
    for &(suite, expected) in suites {
        let (c, out) = conformance(&[&format!("SCSI.{suite}")], s, Duration::from_secs(300));
        eprintln!(
            "{suite}: {} passed, {} skipped, {} failed",
            c.passed,
            c.skipped,
            c.failed.len()
        );
        assert!(
            !out.contains("not implemented")
                && !out.contains("not supported")
                && !out.contains("SKIPPED"),
            "{suite} skipped tests:\n{out}"
        );
        if c.passed != expected {
            failures.push(format!("{suite}: {} of {expected} passed", c.passed));
        }
        failures.extend(c.failed.iter().map(|f| format!("{suite}: {f}")));
    }
    assert!(
        failures.is_empty(),
        "failed: {failures:#?}\nserver log:\n{}",
        s.log_text()
    );
}

/// The whole ALL family runs to the end without the server crashing and without a failure;
/// counts are printed (issue 14: at least 210 passing is the goal, 194 today).
#[test]
fn conformance_all_completes_without_crash() {
    let dir = scratch_dir();
    let mut s = Server::start(dir.path(), "", None, "");
    let url = s.url(0);
    let o = run(
        Command::new(tool("iscsi-test-cu"))
            .args(["-d", "-i", INIT1, "-I", INIT2, "-t", "ALL", &url, &url]),
        Duration::from_secs(1800),
    );
    let out = text(&o);
    let c = parse_cu(&out);
    eprintln!(
        "iscsi-test-cu ALL: {} passed, {} skipped, {} failed: {:?}",
        c.passed,
        c.skipped,
        c.failed.len(),
        c.failed
    );
    s.assert_alive();
    assert!(
        out.contains("Run Summary"),
        "the run did not finish:\n{out}"
    );
    // Two tests of libiscsi 1.19 expect what the standard does not ask for (README,
    // Conformance): ValidTgtDescr wants GOOD for a reserved LU ID TYPE, which SPC-4 6.4.5.3
    // makes INVALID FIELD IN PARAMETER LIST (later libiscsi agrees); UnmapUntilEnd wants a
    // WRITE SAME with UNMAP of non-zero data to read back as zeroes, where twinsan writes the
    // data (it unmaps only zeroes, so what is read is what was written). Any other failure
    // fails the test.
    const KNOWN: [&str; 2] = ["ExtendedCopy.ValidTgtDescr", "WriteSame10.UnmapUntilEnd"];
    let unexpected: Vec<_> = c
        .failed
        .iter()
        .filter(|f| !KNOWN.contains(&f.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "iscsi-test-cu ALL failures: {unexpected:?}"
    );
    assert!(c.passed >= 194, "too few tests passed: {c:?}");
}

fn write_random(path: &std::path::Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &v[..len]).unwrap();
}

#[test]
fn qemu_img_roundtrip_is_identical() {
    qemu_img_roundtrip();
}

#[test]
fn qemu_img_roundtrip_without_io_uring_enosys() {
    deny_io_uring(libc::ENOSYS);
    qemu_img_roundtrip();
}

#[test]
fn qemu_img_roundtrip_without_io_uring_eperm() {
    deny_io_uring(libc::EPERM);
    qemu_img_roundtrip();
}

fn qemu_img_roundtrip() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    write_random(&src, 256 << 20, 42);
    let qemu_img = tool("qemu-img");
    let o = run(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(s.url(0)),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "convert to LUN: {}", text(&o));
    let o = run(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(s.url(0))
            .arg(&back),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "convert from LUN: {}", text(&o));
    let a = std::fs::read(&src).unwrap();
    let b = std::fs::read(&back).unwrap();
    assert_eq!(b.len(), 1 << 30, "LUN is 1 GiB");
    assert!(a == b[..a.len()], "data read back differs");
    assert!(
        b[a.len()..].iter().all(|&x| x == 0),
        "bytes past the image are not zero"
    );
}

fn fio_verify(
    url: &str,
    name: &str,
    offset: &str,
    size: &str,
    runtime: u32,
) -> std::process::Output {
    let filename = url.replace(':', "\\:");
    run(
        Command::new(fio()).args([
            &format!("--name={name}"),
            "--ioengine=libiscsi",
            &format!("--filename={filename}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--time_based",
            &format!("--runtime={runtime}"),
            "--verify_backlog=1024",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        Duration::from_secs(runtime as u64 + 120),
    )
}

fn assert_fio_ok(o: &std::process::Output) {
    let out = text(o);
    assert!(o.status.success(), "fio failed:\n{out}");
    assert!(!out.contains("verify: bad"), "verify error:\n{out}");
    // fio prints notes before its JSON.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = &stdout[stdout.find('{').unwrap_or(0)..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{out}"));
    for job in v["jobs"].as_array().unwrap() {
        assert_eq!(job["error"].as_i64(), Some(0), "fio job error:\n{out}");
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap() > 0,
            "no writes:\n{out}"
        );
    }
}

#[test]
fn fio_random_write_verify_qd32_30s() {
    fio_random_write_verify(30);
}

#[test]
fn fio_random_write_verify_without_io_uring_enosys() {
    deny_io_uring(libc::ENOSYS);
    fio_random_write_verify(20);
}

#[test]
fn fio_random_write_verify_without_io_uring_eperm() {
    deny_io_uring(libc::EPERM);
    fio_random_write_verify(20);
}

fn fio_random_write_verify(secs: u32) {
    let dir = scratch_dir();
    let mut s = Server::start(dir.path(), "", None, "");
    let o = fio_verify(&s.url(0), "verify", "0", "512m", secs);
    assert_fio_ok(&o);
    s.assert_alive();
}

#[test]
fn two_initiators_at_once() {
    let dir = scratch_dir();
    let mut s = Server::start(dir.path(), "", None, "");
    let u1 = s.url(0);
    let u2 = s.url(0);
    let a = std::thread::spawn(move || fio_verify(&u1, "first", "0", "256m", 10));
    let b = std::thread::spawn(move || fio_verify(&u2, "second", "512m", "256m", 10));
    assert_fio_ok(&a.join().unwrap());
    assert_fio_ok(&b.join().unwrap());
    s.assert_alive();
}

const CHAP_TARGET: &str = "chap = { user = \"xen\", secret = \"xensecret1234\" }\nmutual_chap = { user = \"tgt\", secret = \"targetsecret12\" }\nallowed_initiators = [\"iqn.2026-11.org.twinsan.test:init1\"]\n";
const CHAP_DISCOVERY: &str =
    "[discovery]\nchap = { user = \"disco\", secret = \"discosecret12\" }\n";

fn ls(portal_url: &str, initiator: &str) -> (bool, String) {
    let o = run(
        Command::new(tool("iscsi-ls")).args(["-i", initiator, "-s", portal_url]),
        Duration::from_secs(30),
    );
    (o.status.success() && text(&o).contains("Lun:0"), text(&o))
}

#[test]
fn chap_discovery_and_acl_with_libiscsi() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), CHAP_TARGET, None, CHAP_DISCOVERY);
    let p = s.portal();
    // iscsi-ls uses the same credentials for discovery and login; discovery CHAP differs
    // from the target's, so check each separately with iscsi-inq (normal session only).
    let (ok, out) = ls(&format!("iscsi://disco%discosecret12@{p}"), INIT1);
    assert!(
        !ok,
        "listing LUNs must fail: the target needs its own CHAP secret\n{out}"
    );
    assert!(
        out.contains(IQN),
        "discovery with CHAP lists the target:\n{out}"
    );
    let (ok, out) = ls(&format!("iscsi://disco%wrongsecret1@{p}"), INIT1);
    assert!(
        !ok && !out.contains(IQN),
        "discovery with a wrong secret must fail:\n{out}"
    );
    let (ok, out) = ls(&format!("iscsi://{p}"), INIT1);
    assert!(
        !ok && !out.contains(IQN),
        "discovery without CHAP must fail:\n{out}"
    );

    let inq = |url: &str, initiator: &str| {
        let o = run(
            Command::new(tool("iscsi-inq")).args(["-i", initiator, url]),
            Duration::from_secs(30),
        );
        (o.status.success(), text(&o))
    };
    let good = format!(
        "iscsi://xen%xensecret1234@{p}/{IQN}/0?target_user=tgt&target_password=targetsecret12"
    );
    let (ok, out) = inq(&good, INIT1);
    assert!(ok && out.contains("TWINSAN"), "mutual CHAP login: {out}");
    let one_way = format!("iscsi://xen%xensecret1234@{p}/{IQN}/0");
    let (ok, out) = inq(&one_way, INIT1);
    assert!(ok, "one-way CHAP login: {out}");
    let (ok, out) = inq(
        &format!(
            "iscsi://xen%xensecret1234@{p}/{IQN}/0?target_user=tgt&target_password=wrongtarget12"
        ),
        INIT1,
    );
    assert!(
        !ok,
        "initiator must refuse a target that fails mutual CHAP: {out}"
    );
    let (ok, out) = inq(&format!("iscsi://xen%badsecret1234@{p}/{IQN}/0"), INIT1);
    assert!(!ok, "wrong CHAP secret must fail: {out}");
    let (ok, out) = inq(&good, INIT2);
    assert!(!ok, "initiator outside the ACL must be refused: {out}");
    let log = s.log_text();
    assert!(
        log.contains("is not in the allowed_initiators"),
        "ACL refusal is logged with its reason:\n{log}"
    );
}
