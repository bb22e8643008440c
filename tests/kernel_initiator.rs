//! The Linux kernel initiator against twinsan, as XenServer's dom0 runs it: open-iscsi with
//! XenServer's timeouts, dm-multipath, an LVM volume group per SR, in a qemu guest (see
//! `tests/common/guest.rs`). Every packet stays inside the test's network namespaces.
//!
//! Each test boots one guest and drives it through a script: the guest says what it did over
//! its control port, the test faults the target side in between, and at the end the guest's
//! verdict and `dmesg` decide (no I/O error may reach its block layer or filesystem).

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::guest::{self, Guest, GuestImage, GuestSpec, Nic};
use common::ha::{ok_cli, wait_serving_on, HaLab, HaSpec, Source, VIP};
use common::netns::{self, Lab, Netns};
use common::{bin, scratch_dir, status_json, IQN};

const CHAP_IQN: &str = "iqn.2026-11.org.twinsan.test:chap";
const CHAP_USER: &str = "guest-user";
const CHAP_SECRET: &str = "guest-secret-12";
const MUTUAL_USER: &str = "target-user";
const MUTUAL_SECRET: &str = "target-secret-12";
/// XenServer names an LVMoISCSI SR's volume group after the SR.
const SR_VG: &str = "VG_XenStorage-5d3c0c38-9a54-4d4e-b6f2-2f1c7a0c9e11";
const PROMOTE: Duration = Duration::from_secs(30);

/// Shell functions every guest script below uses (after the harness's library).
const GUEST_COMMON: &str = r#"
. /lib/twinsan-guest.sh
# disk_of TARGET: the sd device of the (only) LUN 0 of TARGET's session, waited for.
disk_of() {
    i=0
    while [ $i -lt 100 ]; do
        d=$(iscsiadm -m session -P 3 2>/dev/null | awk -v t="$1" '
            /^Target: / { cur = $2 }
            /Attached scsi disk/ && cur == t { print $4; exit }')
        if [ -n "$d" ] && [ -b "/dev/$d" ]; then echo "$d"; return 0; fi
        sleep 0.2; i=$((i + 1))
    done
    return 1
}
# fio_verify NAME FILE SIZE [extra args]: random 4k writes then a read-back verify.
fio_verify() {
    n=$1; f=$2; s=$3; shift 3
    fio --name="$n" --filename="$f" --size="$s" --rw=randwrite --bs=4k --ioengine=libaio \
        --iodepth=8 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output-format=json --output="/tmp/$n.json" "$@"
}
# say_fio NAME RC: the fio result as one line to the host.
say_fio() {
    host_say "fio $1 rc=$2 $(tr -d '\n' < "/tmp/$1.json" 2>/dev/null)"
}
"#;

fn script(body: &str, vars: &[(&str, &str)]) -> String {
    let mut s = format!("set -u\n{GUEST_COMMON}\n{body}\n");
    for (k, v) in vars {
        s = s.replace(&format!("@{k}@"), v);
    }
    s
}

/// Starts twinsan with `config` in `ns` (the lab kills it at the end) and waits until it
/// accepts connections on `portal`.
fn start_target(lab: &Lab, ns: &Netns, config: &Path, log: &Path, portal: &str) -> u32 {
    let mut cmd = ns.command(bin());
    cmd.args(["serve", "--config"]).arg(config).env(
        "RUST_LOG",
        std::env::var("TWINSAN_LOG").unwrap_or_else(|_| "info".into()),
    );
    let pid = lab.spawn(cmd, "twinsan", log);
    let portal = portal.to_string();
    let t = Instant::now();
    loop {
        let p = portal.clone();
        if ns.with(move || TcpStream::connect(p).is_ok()) {
            return pid;
        }
        let alive = lab.with_child(pid, |c| c.running()).unwrap_or(false);
        assert!(
            alive && t.elapsed() < Duration::from_secs(20),
            "twinsan did not listen on {portal}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fio JSON a guest sent with `say_fio`: (rc, json).
fn parse_fio(rest: &str) -> (i32, serde_json::Value) {
    let (rc, json) = rest.split_once(' ').unwrap_or((rest, ""));
    let rc = rc
        .strip_prefix("rc=")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let json = json
        .find('{')
        .and_then(|i| serde_json::from_str(&json[i..]).ok())
        .unwrap_or(serde_json::Value::Null);
    (rc, json)
}

/// Longest write completion latency of a fio run, in seconds (the pause the guest saw).
fn max_write_latency(json: &serde_json::Value) -> f64 {
    json["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .filter_map(|j| j["write"]["clat_ns"]["max"].as_f64())
                .fold(0.0, f64::max)
                / 1e9
        })
        .unwrap_or(f64::NAN)
}

fn written_bytes(json: &serde_json::Value) -> u64 {
    json["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .filter_map(|j| j["write"]["io_bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Checks a fio result line: exit 0, no error, something written.
fn check_fio(what: &str, rest: &str) -> f64 {
    let (rc, json) = parse_fio(rest);
    assert_eq!(rc, 0, "{what}: fio failed in the guest: {rest}");
    assert!(
        json["jobs"][0]["error"] == 0,
        "{what}: fio reported an error: {json}"
    );
    assert!(written_bytes(&json) > 0, "{what}: nothing written: {json}");
    max_write_latency(&json)
}

/// Waits for the guest's `fio NAME rc=.. {json}` line and checks it (exit 0, no error, data
/// written); returns the longest write in seconds.
fn expect_fio(g: &mut Guest, name: &str, what: &str, limit: Duration) -> f64 {
    let r = g.expect("fio", limit);
    let rest = r.strip_prefix(&format!("{name} ")).unwrap_or_else(|| {
        panic!(
            "expected fio {name}, got: {}",
            r.chars().take(200).collect::<String>()
        )
    });
    check_fio(what, rest)
}

fn assert_no_io_errors(out: &guest::GuestOutcome, allowed: &dyn Fn(&str) -> bool) {
    eprintln!(
        "----- guest dmesg, storage lines -----\n{}",
        out.storage_dmesg().join("\n")
    );
    let bad: Vec<&str> = out
        .io_errors()
        .into_iter()
        .filter(|l| !allowed(l))
        .collect();
    assert!(
        bad.is_empty(),
        "I/O errors reached the guest's block layer:\n{}\n----- dmesg -----\n{}",
        bad.join("\n"),
        out.dmesg
    );
}

/// Prints the warnings and errors twinsan logged (what an admin would be alerted by).
fn show_warnings(label: &str, log: &str) {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    eprintln!(
        "----- {label}: {} warning/error lines -----\n{}",
        lines.len(),
        lines.join("\n")
    );
}

/// LUN 0's NAA designator of target `iqn` as twinsan reports it (lower-case hex).
fn naa_of(config: &Path, iqn: &str) -> String {
    let v = status_json(config);
    v["targets"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["iqn"] == iqn))
        .and_then(|t| t["luns"][0]["naa"].as_str())
        .unwrap_or_else(|| panic!("no NAA for {iqn} in {v}"))
        .to_ascii_lowercase()
}

// ---------------------------------------------------------------------------------------
// One host: login, identity, CHAP, digests, an SR-like volume group, restart under load
// ---------------------------------------------------------------------------------------

const HOST_ADDR: &str = "10.232.0.1";
const GUEST_ADDR: &str = "10.232.0.2/24";
const HOST_ADDR2: &str = "10.232.1.1";
const GUEST_ADDR2: &str = "10.232.1.2/24";

struct SoloHost {
    lab: Lab,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    pid: Option<u32>,
    image: GuestImage,
}

impl SoloHost {
    /// Host namespace `lab.a` with one tap per portal and twinsan serving `IQN` (a 256 MiB
    /// thin LUN) and `CHAP_IQN` (CHAP + mutual CHAP) on every portal.
    fn new_or_skip(test: &str, two_portals: bool) -> Option<SoloHost> {
        let image = guest::image_or_skip(test)?;
        let lab = Lab::new_or_skip(test)?;
        let dir = scratch_dir();
        guest::add_tap(&lab.a, "gtap0", Some(&format!("{HOST_ADDR}/24")), None);
        let mut portals = vec![format!("{HOST_ADDR}:3260")];
        if two_portals {
            guest::add_tap(&lab.a, "gtap1", Some(&format!("{HOST_ADDR2}/24")), None);
            portals.push(format!("{HOST_ADDR2}:3260"));
        }
        let portals = portals
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let d = dir.path();
        // With two portals (the multipath test) LUN 1 of IQN presents the IET identity.
        let iet_lun = if two_portals {
            format!(
                "\n[[target.lun]]\nnumber = 1\npath = \"{}/iet.img\"\nsize = \"64MiB\"\nidentity = \"iet\"\n",
                d.display()
            )
        } else {
            String::new()
        };
        let config = d.join("twinsan.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
data_dir = "{data}"

[[target]]
iqn = "{IQN}"
portals = [{portals}]

[[target.lun]]
number = 0
path = "{d}/lun0.img"
size = "256MiB"
{iet_lun}

[[target]]
iqn = "{CHAP_IQN}"
portals = [{portals}]
chap = {{ user = "{CHAP_USER}", secret = "{CHAP_SECRET}" }}
mutual_chap = {{ user = "{MUTUAL_USER}", secret = "{MUTUAL_SECRET}" }}

[[target.lun]]
number = 0
path = "{d}/chap.img"
size = "64MiB"
"#,
                data = d.join("data").display(),
                d = d.display(),
            ),
        )
        .unwrap();
        let log = d.join("twinsan.log");
        let mut h = SoloHost {
            lab,
            config,
            log,
            pid: None,
            image,
            dir,
        };
        h.start();
        Some(h)
    }

    fn start(&mut self) {
        let pid = start_target(
            &self.lab,
            &self.lab.a,
            &self.config,
            &self.log,
            &format!("{HOST_ADDR}:3260"),
        );
        self.pid = Some(pid);
    }

    /// SIGTERM and wait (bounded) for the exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.pid.take().and_then(|p| self.lab.take(p)) {
            assert!(
                c.terminate(Duration::from_secs(20)).is_some(),
                "twinsan did not exit within 20 s of SIGTERM"
            );
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn nics(&self, two: bool) -> Vec<Nic> {
        let mut v = vec![Nic {
            tap: "gtap0".into(),
            guest_cidr: GUEST_ADDR.into(),
        }];
        if two {
            v.push(Nic {
                tap: "gtap1".into(),
                guest_cidr: GUEST_ADDR2.into(),
            });
        }
        v
    }
}

const LOGIN_SCRIPT: &str = r#"
P=@HOST@:3260
step discovery
iscsiadm -m discovery -t st -p $P > /tmp/disc || fail "discovery: $(cat /tmp/disc)"
cat /tmp/disc
grep -q "@IQN@" /tmp/disc && grep -q "@CHAP_IQN@" /tmp/disc || fail "discovery lacks a target"

step login-plain
iscsiadm -m node -T @IQN@ -p $P --login || fail "login"
d=$(disk_of @IQN@) || fail "no disk after login"
udevadm settle --timeout=10
sd=/sys/block/$d/device
host_say "identity vendor=$(cat $sd/vendor | tr -d ' ') model=$(cat $sd/model | tr -d ' ') rev=$(cat $sd/rev | tr -d ' ')"
host_say "scsiid $(/lib/udev/scsi_id -g -d /dev/$d)"
host_say "byid $(ls /dev/disk/by-id/ | tr '\n' ' ')"
host_say "wwid $(cat $sd/wwid)"
sg_inq -p 0x83 /dev/$d || fail "sg_inq 0x83"
host_say "size $(blockdev --getsize64 /dev/$d) lbs=$(cat /sys/block/$d/queue/logical_block_size)"
host_say "provisioning $(cat $sd/scsi_disk/*/provisioning_mode) max_discard=$(cat /sys/block/$d/queue/discard_max_bytes)"
sg_rtpg /dev/$d > /tmp/rtpg 2>&1; host_say "rtpg rc=$? $(tr '\n' ' ' < /tmp/rtpg)"
iscsiadm -m session -P 2 | grep -E "HeaderDigest|DataDigest|MaxRecvDataSegmentLength|FirstBurstLength|MaxBurstLength|ImmediateData|InitialR2T"

step discard
dd if=/dev/urandom of=/dev/$d bs=1M count=4 oflag=direct 2>/dev/null || fail "dd"
blkdiscard -o 0 -l 4194304 /dev/$d || fail "blkdiscard"
host_say discarded
host_wait checked 60 || fail "host did not check the discard"

step sr-vg
pvcreate -ff -y /dev/$d || fail pvcreate
vgcreate @VG@ /dev/$d || fail vgcreate
for lv in 1 2 3; do lvcreate -y -L 48M -n VHD-$lv @VG@ || fail "lvcreate $lv"; done
vgck @VG@ || fail "vgck"
rc=0; fio_verify lv1 /dev/@VG@/VHD-1 16M || rc=$?; say_fio lv1 $rc
mkfs.ext4 -q /dev/@VG@/VHD-2 || fail mkfs
mkdir -p /mnt/fs; mount /dev/@VG@/VHD-2 /mnt/fs || fail mount
dd if=/dev/urandom of=/mnt/fs/data bs=1M count=8 2>/dev/null; md5sum /mnt/fs/data > /tmp/md5
umount /mnt/fs || fail umount
e2fsck -fn /dev/@VG@/VHD-2 || fail "e2fsck after mkfs"

step restart-under-load
# fio on LV 3 while the target restarts (the session stays open through it)
fio_verify restart /dev/@VG@/VHD-3 24M --rate_iops=150 &
fpid=$!
sleep 3
host_say loading restart
wait $fpid; rc=$?; say_fio restart $rc
vgck @VG@ || fail "vgck after restart"
mount /dev/@VG@/VHD-2 /mnt/fs || fail "mount after restart"
md5sum -c /tmp/md5 || fail "file changed"
umount /mnt/fs
e2fsck -fn /dev/@VG@/VHD-2 || fail "e2fsck after restart"
vgchange -an @VG@ || fail "vgchange -an"
iscsiadm -m node -T @IQN@ -p $P --logout || fail logout

step digests
iscsiadm -m node -T @IQN@ -p $P -o update -n 'node.conn[0].iscsi.HeaderDigest' -v CRC32C
iscsiadm -m node -T @IQN@ -p $P -o update -n 'node.conn[0].iscsi.DataDigest' -v CRC32C
iscsiadm -m node -T @IQN@ -p $P --login || fail "login with digests"
d=$(disk_of @IQN@) || fail "no disk with digests"
iscsiadm -m session -P 2 | grep -E "HeaderDigest|DataDigest" > /tmp/dig; cat /tmp/dig
grep -q "HeaderDigest: CRC32C" /tmp/dig && grep -q "DataDigest: CRC32C" /tmp/dig || fail "digests not negotiated"
vgchange -ay @VG@ >/dev/null 2>&1
rc=0; fio_verify digests /dev/$d 8M --offset=200M || rc=$?; say_fio digests $rc
vgchange -an @VG@ >/dev/null 2>&1
iscsiadm -m node -T @IQN@ -p $P --logout || fail "logout digests"

step chap
C=@CHAP_IQN@
iscsiadm -m node -T $C -p $P --login && fail "login without CHAP accepted"
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.authmethod -v CHAP
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.username -v @CHAP_USER@
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.password -v wrong-secret-123
iscsiadm -m node -T $C -p $P --login && fail "login with a wrong CHAP secret accepted"
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.password -v @CHAP_SECRET@
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.username_in -v @MUTUAL_USER@
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.password_in -v wrong-secret-456
iscsiadm -m node -T $C -p $P --login && fail "login with a wrong mutual secret accepted"
iscsiadm -m node -T $C -p $P -o update -n node.session.auth.password_in -v @MUTUAL_SECRET@
iscsiadm -m node -T $C -p $P --login || fail "mutual CHAP login"
d=$(disk_of $C) || fail "no disk with CHAP"
rc=0; fio_verify chap /dev/$d 8M || rc=$?; say_fio chap $rc
iscsiadm -m node -T $C -p $P --logout || fail "logout chap"
host_say done
"#;

/// Discovery and login (plain, CHAP, mutual CHAP, digests), identity as the kernel and udev see
/// it, thin provisioning and discard, an SR's volume group with fio verify and fsck, and a
/// restart of twinsan under load with the session open.
#[test]
fn kernel_initiator_login_identity_sr_and_restart() {
    let Some(mut h) = SoloHost::new_or_skip("kinit-login", false) else {
        return;
    };
    let naa = naa_of(&h.config, IQN);
    let body = script(
        LOGIN_SCRIPT,
        &[
            ("HOST", HOST_ADDR),
            ("IQN", IQN),
            ("CHAP_IQN", CHAP_IQN),
            ("CHAP_USER", CHAP_USER),
            ("CHAP_SECRET", CHAP_SECRET),
            ("MUTUAL_USER", MUTUAL_USER),
            ("MUTUAL_SECRET", MUTUAL_SECRET),
            ("VG", SR_VG),
        ],
    );
    let mut g = Guest::start(GuestSpec {
        image: &h.image,
        ns: &h.lab.a,
        nics: h.nics(false),
        multipath: false,
        script: body,
        timeout: Duration::from_secs(600),
        dir: h.dir.path(),
    });
    let boot = Duration::from_secs(120);
    let identity = g.expect("identity", boot);
    assert!(
        identity.contains("vendor=TWINSAN"),
        "kernel's view of the vendor: {identity}"
    );
    let scsiid = g.expect("scsiid", Duration::from_secs(30));
    assert_eq!(
        scsiid,
        format!("3{naa}"),
        "scsi_id -g (XenServer's SCSIid) must be 3 + the NAA designator"
    );
    let byid = g.expect("byid", Duration::from_secs(30));
    assert!(
        byid.split_whitespace()
            .any(|n| n == format!("scsi-{scsiid}")),
        "/dev/disk/by-id lacks scsi-{scsiid}: {byid}"
    );
    let wwid = g.expect("wwid", Duration::from_secs(30));
    eprintln!("kernel wwid: {wwid}");
    let size = g.expect("size", Duration::from_secs(30));
    assert!(
        size.starts_with(&format!("{} ", 256u64 << 20)),
        "capacity: {size}"
    );
    let prov = g.expect("provisioning", Duration::from_secs(30));
    assert!(
        prov.starts_with("unmap") || prov.starts_with("writesame_16"),
        "thin provisioning not detected: {prov}"
    );
    let rtpg = g.expect("rtpg", Duration::from_secs(30));
    eprintln!("sg_rtpg: {rtpg}");
    g.expect("discarded", Duration::from_secs(60));
    // The discarded 4 MiB are holes again in the backing file.
    let img = h.dir.path().join("lun0.img");
    let allocated = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(
        allocated < 4 << 20,
        "{allocated} bytes still allocated after blkdiscard of the 4 MiB written"
    );
    g.send("checked");
    expect_fio(&mut g, "lv1", "fio on an LV", Duration::from_secs(240));
    g.expect("loading", Duration::from_secs(180));
    let t = Instant::now();
    h.stop();
    h.start();
    eprintln!("twinsan restarted under load in {:.2?}", t.elapsed());
    let pause = expect_fio(
        &mut g,
        "restart",
        "fio across the restart",
        Duration::from_secs(300),
    );
    eprintln!("restart under load: longest write seen by the guest {pause:.2} s");
    for what in ["digests", "chap"] {
        expect_fio(&mut g, what, what, Duration::from_secs(240));
    }
    g.expect("done", Duration::from_secs(120));
    let out = g.finish();
    out.assert_passed();
    assert_no_io_errors(&out, &|_| false);
    let log = h.log_text();
    show_warnings("twinsan", &log);
    assert!(!log.contains("panicked"), "twinsan panicked:\n{log}");
    // open-iscsi ends each discovery session with a reset: its normal close, not a warning.
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("discovery"))
        .collect();
    assert!(
        warned.is_empty(),
        "discovery sessions logged as warnings:\n{}",
        warned.join("\n")
    );
    h.stop();
}

// ---------------------------------------------------------------------------------------
// dm-multipath over two portals of one host
// ---------------------------------------------------------------------------------------

const MULTIPATH_SCRIPT: &str = r#"
step multipath-login
for p in @HOST@:3260 @HOST2@:3260; do
    iscsiadm -m discovery -t st -p $p >/dev/null || fail "discovery $p"
    iscsiadm -m node -T @IQN@ -p $p --login || fail "login $p"
done
udevadm settle --timeout=10
# paths_up N: wait until the multipath map has N active ready paths
paths_up() {
    i=0
    while [ $i -lt 120 ]; do
        n=$(multipath -ll 2>/dev/null | grep -c "active ready running")
        [ "$n" -ge "$1" ] && return 0
        sleep 0.5; i=$((i + 1))
    done
    multipath -ll
    return 1
}
# LUN 0 has twinsan's identity, LUN 1 the IET one migrated SRs keep: each needs its device
# section (multibus: one path group holding both paths).
for v in TWINSAN IET; do
    i=0
    while [ $i -lt 40 ] && ! multipath -ll 2>/dev/null | grep -q "$v,"; do
        multipath >/dev/null 2>&1; sleep 0.5; i=$((i + 1))
    done
done
multipath -ll
paths_up 4 || fail "multipath did not assemble both paths of both LUNs"
for v in TWINSAN IET; do
    w=$(multipath -ll | awk -v v="$v," 'index($0, v) {print $1; exit}')
    [ -n "$w" ] || fail "no multipath map for $v"
    host_say "map $v groups=$(multipath -ll $w | grep -c 'policy=') $(multipath -ll $w | head -1)"
done
m=/dev/mapper/$(multipath -ll | awk 'index($0, "TWINSAN,") {print $1; exit}')
[ -b "$m" ] || fail "no multipath device"
pvcreate -ff -y $m || fail pvcreate
vgcreate @VG@ $m || fail vgcreate
lvcreate -y -L 64M -n VHD-mp @VG@ || fail lvcreate
for cut in 1 0; do
    step "path-loss-$cut"
    fio_verify cut$cut /dev/@VG@/VHD-mp 24M --rate_iops=150 &
    fpid=$!
    sleep 3
    host_say "loading cut$cut"
    host_wait "restored" 300 || fail "host never restored the path"
    paths_up 4 || fail "path did not come back"
    host_say "paths-back cut$cut"
    wait $fpid; rc=$?; say_fio cut$cut $rc
    vgck @VG@ || fail "vgck after path loss"
done
vgchange -an @VG@
host_say done
"#;

/// dm-multipath with XenServer's settings over two portals of one host: each path in turn is
/// cut under fio load and restored; no I/O error reaches the multipath device, the volume group
/// or fio, and both paths return.
#[test]
fn kernel_initiator_multipath_survives_path_loss() {
    let Some(mut h) = SoloHost::new_or_skip("kinit-mpath", true) else {
        return;
    };
    let body = script(
        MULTIPATH_SCRIPT,
        &[
            ("HOST", HOST_ADDR),
            ("HOST2", HOST_ADDR2),
            ("IQN", IQN),
            ("VG", SR_VG),
        ],
    );
    let mut g = Guest::start(GuestSpec {
        image: &h.image,
        ns: &h.lab.a,
        nics: h.nics(true),
        multipath: true,
        script: body,
        timeout: Duration::from_secs(600),
        dir: h.dir.path(),
    });
    for vendor in ["TWINSAN", "IET"] {
        let map = g.expect("map", Duration::from_secs(180));
        eprintln!("multipath map: {map}");
        assert!(
            map.starts_with(&format!("{vendor} groups=1 ")),
            "{vendor}: the multipath device section (multibus, one path group) did not apply: {map}"
        );
    }
    let mut pauses = Vec::new();
    for (cut, tap) in [(1, "gtap1"), (0, "gtap0")] {
        g.expect("loading", Duration::from_secs(120));
        std::thread::sleep(Duration::from_secs(2));
        h.lab.a.ip(&["link", "set", tap, "down"]);
        eprintln!("path {tap} cut");
        // Long enough for the initiator to declare the path dead (NOP-Out 5 s + 5 s, then
        // replacement_timeout 15 s fails its I/O over to the other path).
        std::thread::sleep(Duration::from_secs(25));
        h.lab.a.ip(&["link", "set", tap, "up"]);
        g.send("restored");
        g.expect("paths-back", Duration::from_secs(120));
        let pause = expect_fio(
            &mut g,
            &format!("cut{cut}"),
            &format!("fio across the loss of {tap}"),
            Duration::from_secs(300),
        );
        eprintln!("path {tap} lost: longest write seen by the guest {pause:.2} s");
        pauses.push(pause);
    }
    g.expect("done", Duration::from_secs(60));
    let out = g.finish();
    out.assert_passed();
    // A dead path's own SCSI device reports the I/O dm-multipath then retries on the other
    // path; nothing may reach the multipath device (dm-N) or the filesystem above it.
    assert_no_io_errors(&out, &|l| l.contains(" sd") && !l.contains("dm-"));
    eprintln!("multipath path-loss pauses (s): {pauses:.2?}");
    let log = h.log_text();
    show_warnings("twinsan", &log);
    assert!(!log.contains("panicked"), "twinsan panicked:\n{log}");
    h.stop();
}

// ---------------------------------------------------------------------------------------
// A replicated pair with HA: failovers under the guest's writes
// ---------------------------------------------------------------------------------------

const GUEST_LAN_ADDR: &str = "10.231.0.20/24";

const FAILOVER_SCRIPT: &str = r#"
V=@VIP@:3260
step login
iscsiadm -m discovery -t st -p $V > /tmp/disc || fail "discovery: $(cat /tmp/disc)"
iscsiadm -m node -T @IQN@ -p $V --login || fail "login"
d=$(disk_of @IQN@) || fail "no disk"
pvcreate -ff -y /dev/$d || fail pvcreate
vgcreate @VG@ /dev/$d || fail vgcreate
lvcreate -y -L 64M -n VHD-data @VG@ || fail "lvcreate data"
lvcreate -y -L 24M -n VHD-fs @VG@ || fail "lvcreate fs"
mkfs.ext4 -q /dev/@VG@/VHD-fs || fail mkfs
mkdir -p /mnt/fs; mount /dev/@VG@/VHD-fs /mnt/fs || fail mount
dd if=/dev/urandom of=/mnt/fs/data bs=1M count=4 2>/dev/null; md5sum /mnt/fs/data > /tmp/md5
umount /mnt/fs || fail umount
host_say ready
while :; do
    ph=$(host_wait phase 900) || fail "no phase from the host"
    [ "$ph" = done ] && break
    step "$ph"
    fio_verify "$ph" /dev/@VG@/VHD-data 16M --rate_iops=150 &
    fpid=$!
    sleep 3
    host_say "loading $ph"
    wait $fpid; rc=$?
    say_fio "$ph" $rc
    vgck @VG@ || fail "vgck after $ph"
    mount /dev/@VG@/VHD-fs /mnt/fs || fail "mount after $ph"
    md5sum -c /tmp/md5 >/dev/null || fail "file changed after $ph"
    echo "$ph" >> /mnt/fs/phases; sync
    umount /mnt/fs || fail "umount after $ph"
    e2fsck -fn /dev/@VG@/VHD-fs >/dev/null || fail "e2fsck after $ph"
    host_say "checked $ph"
done
vgchange -an @VG@ || fail "vgchange -an"
iscsiadm -m node -T @IQN@ -p $V --logout || fail logout
host_say done
"#;

/// Shows each host's warnings and asserts neither daemon panicked.
fn assert_no_panic(l: &HaLab) {
    for h in [&l.a, &l.b] {
        let log = h.log_text();
        show_warnings(h.label, &log);
        assert!(!log.contains("panicked"), "{} panicked:\n{log}", h.label);
    }
}

/// Waits for the pair to be in sync, stops both hosts and asserts both replicas hold the same
/// bytes; returns A's image.
fn stop_in_sync_and_compare(l: &mut HaLab) -> Vec<u8> {
    l.wait_in_sync(Duration::from_secs(60));
    l.stop(0);
    l.stop(1);
    let n = l.size_bytes as usize;
    let a = std::fs::read(&l.a.image).unwrap();
    let b = std::fs::read(&l.b.image).unwrap();
    let first = (0..n).find(|&i| a[i] != b[i]);
    assert!(
        first.is_none(),
        "the replicas differ, first at byte {first:?}"
    );
    a
}

/// XenServer's stack on a replicated pair with HA (xapi source), the guest logged in through
/// the floating IP with XenServer's single-path settings (replacement_timeout 144 s) and an SR's
/// volume group on the LUN. Under its fio writes with verify, in turn: a planned switchover to
/// B and back (manual mode), a pool-master change to B, SIGKILL of B's daemon with the service
/// manager restarting it, and B's links cut while the pool elects A. After each: fio's verify,
/// `vgck`, the filesystem's content and `e2fsck` clean; at the end the guest's dmesg holds no
/// I/O error and both replicas hold the same bytes. The pause each fault cost the guest (its
/// longest write) is printed.
#[test]
fn kernel_initiator_rides_through_failovers() {
    let Some(image) = guest::image_or_skip("kinit-failover") else {
        return;
    };
    let mut spec = HaSpec::new(Source::Xapi);
    spec.image_bytes = 160 << 20;
    let Some(mut l) = HaLab::new_or_skip("kfail", spec) else {
        return;
    };
    guest::add_tap(&l.lab.bridge, "gtap0", None, Some("br0"));
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let body = script(
        FAILOVER_SCRIPT,
        &[("VIP", VIP), ("IQN", IQN), ("VG", SR_VG)],
    );
    let dir = l.dir();
    let mut g = Guest::start(GuestSpec {
        image: &image,
        ns: &l.lab.bridge,
        nics: vec![Nic {
            tap: "gtap0".into(),
            guest_cidr: GUEST_LAN_ADDR.into(),
        }],
        multipath: false,
        script: body,
        timeout: Duration::from_secs(900),
        dir: &dir,
    });
    g.expect("ready", Duration::from_secs(240));
    let mut pauses: Vec<(&str, f64, Duration)> = Vec::new();
    let phases = ["switchover", "switchback", "master", "kill", "cut"];
    for ph in phases {
        g.send(&format!("phase {ph}"));
        g.expect("loading", Duration::from_secs(120));
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        let to = match ph {
            "switchover" => {
                ok_cli(&l.a, &["manual-mode-enable"]);
                ok_cli(&l.b, &["manual-mode-enable"]);
                ok_cli(&l.a, &["become-secondary"]);
                ok_cli(&l.b, &["become-primary"]);
                1
            }
            "switchback" => {
                ok_cli(&l.b, &["become-secondary"]);
                ok_cli(&l.a, &["become-primary"]);
                0
            }
            "master" => {
                l.flip_master(1);
                1
            }
            "kill" => {
                l.kill(1);
                // The service manager restarts it (RestartSec of packaging/twinsan.service).
                std::thread::sleep(Duration::from_secs(1));
                l.start(1);
                1
            }
            "cut" => {
                l.host_down(1);
                let x = &l.xapi.as_ref().unwrap().xapi;
                x.set_hang(1, true);
                x.set_master(0);
                l.a.write_pool_conf("master");
                0
            }
            _ => unreachable!(),
        };
        let serving = wait_serving_on(&l, to, Duration::from_secs(60));
        eprintln!("{ph}: serving on {} after {serving:.2?}", l.host(to).label);
        let pause = expect_fio(
            &mut g,
            ph,
            &format!("fio across {ph}"),
            Duration::from_secs(300),
        );
        eprintln!("{ph}: longest write seen by the guest {pause:.2} s");
        pauses.push((ph, pause, t.elapsed()));
        g.expect("checked", Duration::from_secs(120));
        match ph {
            "switchback" => {
                l.wait_primary(0, PROMOTE);
                ok_cli(&l.a, &["manual-mode-disable"]);
                ok_cli(&l.b, &["manual-mode-disable"]);
            }
            "cut" => {
                // B comes back as a pool slave of the new master.
                let x = &l.xapi.as_ref().unwrap().xapi;
                x.set_hang(1, false);
                l.b.write_pool_conf(&format!("slave:{}", netns::XAPI_ADDRS[0]));
                l.host_up(1);
                l.wait("B back as secondary, A primary", PROMOTE, |a, b| {
                    a["role"] == "primary" && b["role"] == "secondary"
                });
            }
            _ => {}
        }
        l.wait_primary(to, PROMOTE);
    }
    g.send("phase done");
    g.expect("done", Duration::from_secs(120));
    let out = g.finish();
    out.assert_passed();
    assert_no_io_errors(&out, &|_| false);
    for (ph, pause, _) in &pauses {
        eprintln!("FAILOVER-PAUSE {ph}: {pause:.2} s (longest guest write)");
    }
    stop_in_sync_and_compare(&mut l);
    assert_no_panic(&l);
}

// ---------------------------------------------------------------------------------------
// ALUA across a replicated pair, as the kernel initiator and sg3-utils see it
// ---------------------------------------------------------------------------------------

const ALUA_SCRIPT: &str = r##"
step alua-login
# disk_at PORTAL: the sd device of the session logged in to PORTAL (ip:port), waited for.
disk_at() {
    i=0
    while [ $i -lt 100 ]; do
        d=$(iscsiadm -m session -P 3 2>/dev/null | awk -v p="$1" '
            /Current Portal: / { cur = $3; sub(/,.*/, "", cur) }
            /Attached scsi disk/ && cur == p { print $4; exit }')
        if [ -n "$d" ] && [ -b "/dev/$d" ]; then echo "$d"; return 0; fi
        sleep 0.2; i=$((i + 1))
    done
    return 1
}
# cdb10 OP DEV OFFSET BYTES: a READ(10) / WRITE(10) CDB for BYTES at byte OFFSET (LBS blocks).
cdb10() {
    lba=$(($3 / LBS)); n=$(($4 / LBS))
    printf '%s 00 %02x %02x %02x %02x 00 %02x %02x 00' "$1" \
        $((lba >> 24 & 255)) $((lba >> 16 & 255)) $((lba >> 8 & 255)) $((lba & 255)) \
        $((n >> 8 & 255)) $((n & 255))
}
# sgw DEV OFFSET FILE: WRITE(10) of FILE at byte OFFSET through SG_IO (passthrough: the
# kernel's ALUA device handler does not filter it, the command reaches the target).
sgw() {
    s=$(wc -c < "$3")
    sg_raw -s "$s" -i "$3" "/dev/$1" $(cdb10 2a "$1" "$2" "$s")
}
# sgr DEV OFFSET BYTES OUT: READ(10) of BYTES at byte OFFSET through SG_IO into OUT.
sgr() {
    sg_raw -r "$3" -o "$4" "/dev/$1" $(cdb10 28 "$1" "$2" "$3")
}
# dm-multipath with the README's device entry for an ALUA pair (instead of the guest's
# multibus one): a path group per target port group, the active/optimized one used.
cat > /etc/multipath.conf <<'EOF'
defaults {
	user_friendly_names	no
	polling_interval	2
	find_multipaths		no
}
devices {
	device {
		vendor			"TWINSAN"
		product			"TWINSAN-DISK"
		hardware_handler	"1 alua"
		prio			alua
		path_grouping_policy	group_by_prio
		failback		immediate
		path_checker		tur
		no_path_retry		12
	}
}
EOF
multipathd reconfigure || fail "multipathd reconfigure"
# Both hosts' own portals (host_portals), each found by a discovery on it: two paths.
for p in @A@:3260 @B@:3260; do
    iscsiadm -m discovery -t st -p $p > /tmp/disc 2>&1 || fail "discovery $p: $(cat /tmp/disc)"
    cat /tmp/disc
done
for p in @A@:3260 @B@:3260; do
    iscsiadm -m node -T @IQN@ -p $p --login || fail "login $p"
done
DA=$(disk_at @A@:3260) || fail "no disk through A's portal"
DB=$(disk_at @B@:3260) || fail "no disk through B's portal"
udevadm settle --timeout=10
LBS=$(cat /sys/block/$DA/queue/logical_block_size)
i=0
while [ $i -lt 60 ] && ! multipath -ll 2>/dev/null | grep -q "TWINSAN,"; do
    multipath >/dev/null 2>&1; sleep 0.5; i=$((i + 1))
done
multipath -ll
yes alua-written-through-A | head -c 65536 > /tmp/pa
yes alua-written-through-B | head -c 65536 > /tmp/pb
yes refused-by-the-standby | head -c 65536 > /tmp/px
host_say "paths A=$DA B=$DB lbs=$LBS sectors_a=$(cat /sys/block/$DA/size) sectors_b=$(cat /sys/block/$DB/size) scsiid_a=$(/lib/udev/scsi_id -g -d /dev/$DA) scsiid_b=$(/lib/udev/scsi_id -g -d /dev/$DB) wwid_a=$(tr ' ' _ < /sys/block/$DA/device/wwid) wwid_b=$(tr ' ' _ < /sys/block/$DB/device/wwid)"
# The host's commands, one a line ("run CMD"); each one's exit status and output back.
while :; do
    c=$(host_wait run 600) || fail "no command from the host"
    [ "$c" = done ] && break
    echo "# $c"
    out=$(eval "$c" 2>&1); rc=$?
    printf '%s\n' "$out"
    host_say "out rc=$rc $(printf '%s' "$out" | tr '\n' '\036')"
done
multipath -F >/dev/null 2>&1
iscsiadm -m node -T @IQN@ --logout || fail "logout"
host_say done
"##;

/// One target port group descriptor as `sg_rtpg -d` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PortGroup {
    id: u16,
    /// Asymmetric access state (0 active/optimized, 2 standby).
    state: u8,
    /// sg_rtpg's decoding of the state, e.g. "active/optimized".
    decoded: String,
    /// Relative target port identifiers.
    ports: Vec<u16>,
}

/// The hexadecimal number at the start of `s` ("0x1 , Pref=0" -> 1).
fn hex_at(s: &str) -> Option<u16> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    let digits: String = s.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    u16::from_str_radix(&digits, 16).ok()
}

/// The value after `label` on the first line holding it.
fn field(lines: &[String], label: &str) -> Option<u16> {
    lines
        .iter()
        .find_map(|l| l.split_once(label).and_then(|(_, v)| hex_at(v)))
}

/// Parses `sg_rtpg -d` output: one [`PortGroup`] per descriptor, in the order reported.
fn parse_rtpg(lines: &[String]) -> Vec<PortGroup> {
    let mut groups: Vec<PortGroup> = Vec::new();
    let mut in_ports = false;
    for l in lines {
        if let Some((_, v)) = l.split_once("target port group id :") {
            groups.push(PortGroup {
                id: hex_at(v).unwrap_or(u16::MAX),
                state: u8::MAX,
                decoded: String::new(),
                ports: Vec::new(),
            });
            in_ports = false;
        } else if let (Some(g), Some((_, v))) =
            (groups.last_mut(), l.split_once("asymmetric access state :"))
        {
            g.state = hex_at(v).map_or(u8::MAX, |s| s as u8);
            g.decoded = v
                .split_once('(')
                .and_then(|(_, d)| d.split_once(')'))
                .map(|(d, _)| d.to_string())
                .unwrap_or_default();
        } else if l.contains("Relative target port ids:") {
            in_ports = true;
        } else if let (true, Some(g)) = (in_ports, groups.last_mut()) {
            match hex_at(l) {
                Some(p) if l.trim().starts_with("0x") => g.ports.push(p),
                _ => in_ports = false,
            }
        }
    }
    groups
}

/// Sends `cmd` to the guest's command loop: (exit status, output lines; the guest sends them
/// separated by ASCII RS, 0x1E).
fn guest_run(g: &mut Guest, cmd: &str, limit: Duration) -> (i32, Vec<String>) {
    g.send(&format!("run {cmd}"));
    let r = g.expect("out", limit);
    let (rc, out) = r.split_once(' ').unwrap_or((&r, ""));
    let rc = rc
        .strip_prefix("rc=")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    (rc, out.split('\x1e').map(str::to_string).collect())
}

const ALUA_AO: u8 = 0x0;
const ALUA_STANDBY: u8 = 0x2;
const STANDBY_SENSE: &str = "target port in standby state";

/// The groups `sg_rtpg -d` should report through the path of the host in group `own`, with
/// group `active` active/optimized and the other standby (own group first).
fn want_groups(own: u16, active: u16) -> Vec<(u16, u8, Vec<u16>)> {
    let other = 3 - own;
    let state = |g| if g == active { ALUA_AO } else { ALUA_STANDBY };
    vec![
        (own, state(own), vec![own]),
        (other, state(other), vec![other]),
    ]
}

/// Runs `sg_rtpg -d` on `dev` until it succeeds with `want` (the kernel or sg_rtpg itself
/// may first meet the 2A/06 unit attention or a session being re-established), at most
/// `limit`; prints every answer, returns the last one's groups and lines.
fn rtpg_until(
    g: &mut Guest,
    path: &str,
    dev: &str,
    want: &[(u16, u8, Vec<u16>)],
    limit: Duration,
) -> (Vec<PortGroup>, Vec<String>) {
    let t = Instant::now();
    loop {
        let (rc, out) = guest_run(
            g,
            &format!("sg_rtpg -d /dev/{dev}"),
            Duration::from_secs(60),
        );
        let groups = parse_rtpg(&out);
        let got: Vec<(u16, u8, Vec<u16>)> = groups
            .iter()
            .map(|p| (p.id, p.state, p.ports.clone()))
            .collect();
        if rc == 0 && got == want {
            eprintln!(
                "sg_rtpg -d through {path} (/dev/{dev}), after {:.1?}:\n    {}",
                t.elapsed(),
                out.join("\n    ")
            );
            return (groups, out);
        }
        assert!(
            t.elapsed() < limit,
            "sg_rtpg through {path}: rc {rc}, groups {got:?}, want {want:?} (after {limit:?}):\n{}",
            out.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Checks one path's RTPG answer and that the decoded names match the states.
fn check_decoded(path: &str, groups: &[PortGroup]) {
    for p in groups {
        let name = match p.state {
            ALUA_AO => "active/optimized",
            ALUA_STANDBY => "standby",
            _ => "?",
        };
        assert_eq!(
            p.decoded, name,
            "{path}: sg_rtpg decodes group {}'s state as {:?}",
            p.id, p.decoded
        );
    }
}

/// The standby path `standby` refuses TEST UNIT READY and a WRITE at byte `at` (of the
/// pattern file `/tmp/px` in the guest) with TARGET PORT IN STANDBY STATE, and the active path
/// `active` is ready. `label` names the standby host in the messages.
fn standby_refuses(
    g: &mut Guest,
    standby: &str,
    active: &str,
    at: u64,
    label: &str,
    limit: Duration,
) {
    let out = turs_until(g, standby, 2, limit);
    eprintln!(
        "sg_turs through the standby path ({label}): {}",
        out.join(" | ")
    );
    turs_until(g, active, 0, limit);
    let (rc, out) = guest_run(g, &format!("sgw {standby} {at} /tmp/px"), limit);
    eprintln!(
        "WRITE through the standby path ({label}): rc {rc}: {}",
        out.join(" | ")
    );
    assert!(
        rc != 0 && out.join(" ").to_lowercase().contains(STANDBY_SENSE),
        "WRITE through the standby path ({label}): rc {rc}: {out:?}"
    );
}

/// `sg_turs` until it exits with `want_rc` (a unit attention may come first), at most
/// `limit`: the last output.
fn turs_until(g: &mut Guest, dev: &str, want_rc: i32, limit: Duration) -> Vec<String> {
    let t = Instant::now();
    loop {
        let (rc, out) = guest_run(
            g,
            &format!("sg_turs -v /dev/{dev}"),
            Duration::from_secs(60),
        );
        if rc == want_rc {
            return out;
        }
        assert!(
            t.elapsed() < limit,
            "sg_turs /dev/{dev}: rc {rc}, want {want_rc}:\n{}",
            out.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One path group of `multipath -ll`: (prio, status, [(device, path states)]).
type PathGroup = (u32, String, Vec<(String, String)>);

/// The path groups of `multipath -ll` output.
fn parse_multipath(lines: &[String]) -> Vec<PathGroup> {
    let after = |l: &str, key: &str| -> String {
        l.split(key)
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("")
            .to_string()
    };
    let mut groups: Vec<PathGroup> = Vec::new();
    for l in lines {
        if l.contains("policy=") {
            groups.push((
                after(l, "prio=").parse().unwrap_or(0),
                after(l, "status="),
                Vec::new(),
            ));
        } else if let Some(g) = groups.last_mut() {
            // "| `- 0:0:0:0 sda 8:0 active ready running"
            let w: Vec<&str> = l.split_whitespace().collect();
            if let Some(i) = w.iter().position(|x| x.matches(':').count() == 3) {
                if let Some(dev) = w.get(i + 1) {
                    g.2.push((dev.to_string(), w.get(i + 3..).unwrap_or(&[]).join(" ")));
                }
            }
        }
    }
    groups
}

/// `multipath -ll` until the map's active path group is the one path `active_dev` (higher
/// priority, as `prio alua` ranks active/optimized) and the other group holds `standby_dev`,
/// at most `limit`: the last output.
fn multipath_until(
    g: &mut Guest,
    active_dev: &str,
    standby_dev: &str,
    limit: Duration,
) -> Vec<String> {
    let t = Instant::now();
    loop {
        let (rc, out) = guest_run(g, "multipath -ll", Duration::from_secs(60));
        let groups = parse_multipath(&out);
        let prio = |d: &str| {
            groups
                .iter()
                .find(|g| g.2.iter().any(|p| p.0 == d))
                .map(|g| g.0)
        };
        let ok = rc == 0
            && groups.len() == 2
            && groups.iter().all(|g| g.2.len() == 1)
            && groups
                .iter()
                .any(|(_, status, paths)| status == "active" && paths[0].0 == active_dev)
            && prio(standby_dev).is_some()
            && prio(active_dev) > prio(standby_dev);
        if ok {
            eprintln!(
                "multipath -ll after {:.1?}:\n    {}",
                t.elapsed(),
                out.join("\n    ")
            );
            return out;
        }
        assert!(
            t.elapsed() < limit,
            "multipath: want {active_dev} active, {standby_dev} in the other group; got {groups:?}:\n{}",
            out.join("\n")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// LUN 0's statistics of `IQN` on host `h` (`status --json`).
fn lun_stats(h: &common::ha::HaHost) -> serde_json::Value {
    let v = h
        .status_json()
        .unwrap_or_else(|e| panic!("{}: {e}", h.label));
    v["targets"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["iqn"] == IQN))
        .map(|t| t["luns"][0]["stats"].clone())
        .unwrap_or_else(|| panic!("{}: no LUN statistics in {v}", h.label))
}

/// (bytes read, bytes written) by commands that completed GOOD, from [`lun_stats`].
fn media_bytes(stats: &serde_json::Value) -> (u64, u64) {
    (
        stats["read_bytes"].as_u64().expect("read_bytes"),
        stats["written_bytes"].as_u64().expect("written_bytes"),
    )
}

/// Both target port groups of an `alua = true` target on a replicated pair with HA, seen by
/// the Linux kernel initiator logged in to both hosts' own portals (`host_portals`): two paths
/// to one LUN (the same WWID). Through each path `sg_rtpg -d` reports both groups, the
/// primary's active/optimized and the secondary's standby, with the same group ids and states
/// and the relative target ports VPD page 83h (`sg_vpd -p di`) gives each path; TEST UNIT
/// READY, WRITE and READ through the standby path are refused with 04/0B while the same WRITE
/// through the active path lands. After a planned switchover (manual mode, A secondary, B
/// primary) the states have swapped on both paths and the refusals follow. At the end both
/// replicas are identical: the active paths' patterns are there and the refused writes nowhere.
#[test]
fn kernel_initiator_alua_groups_follow_a_switchover() {
    let Some(image) = guest::image_or_skip("kinit-alua") else {
        return;
    };
    let mut spec = HaSpec::new(Source::Xapi);
    spec.alua = true;
    let Some(mut l) = HaLab::new_or_skip("kalua", spec) else {
        return;
    };
    guest::add_tap(&l.lab.bridge, "gtap0", None, Some("br0"));
    l.start_both();
    l.wait_primary(0, PROMOTE);
    // Group 1 is the host whose replication listen address sorts lower.
    let repl = |a: &str| -> std::net::SocketAddr { format!("{a}:7788").parse().unwrap() };
    let (ga, gb) = if repl(netns::A_REPL) < repl(netns::B_REPL) {
        (1u16, 2u16)
    } else {
        (2, 1)
    };
    let naa = naa_of(&l.a.config, IQN);
    let (a_addr, b_addr) = (netns::A_ADDR, netns::B_ADDR);
    let body = script(ALUA_SCRIPT, &[("A", a_addr), ("B", b_addr), ("IQN", IQN)]);
    let dir = l.dir();
    let t0 = Instant::now();
    let mut g = Guest::start(GuestSpec {
        image: &image,
        ns: &l.lab.bridge,
        nics: vec![Nic {
            tap: "gtap0".into(),
            guest_cidr: GUEST_LAN_ADDR.into(),
        }],
        multipath: true,
        script: body,
        timeout: Duration::from_secs(600),
        dir: &dir,
    });
    let paths = g.expect("paths", Duration::from_secs(240));
    eprintln!(
        "guest logged in to both host portals after {:.1?}: {paths}",
        t0.elapsed()
    );
    let kv = |k: &str| {
        paths
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {paths}"))
            .to_string()
    };
    assert_eq!(kv("wwid_a"), kv("wwid_b"), "two paths, one LUN: {paths}");
    // The identifier multipath and XenServer go by (scsi_id: 3 + the NAA designator).
    assert_eq!(
        kv("scsiid_a"),
        kv("scsiid_b"),
        "two paths, one LUN: {paths}"
    );
    assert_eq!(kv("scsiid_a"), format!("3{naa}"), "scsi_id -g: {paths}");
    // The standby path has its size too (READ CAPACITY is served in standby): the kernel keeps
    // the size it read when the path appeared, also once the path turns active.
    assert_eq!(
        (kv("sectors_a"), kv("sectors_b")),
        (
            (l.size_bytes / 512).to_string(),
            (l.size_bytes / 512).to_string()
        ),
        "the paths' sizes in 512-byte sectors: {paths}"
    );
    let lim = Duration::from_secs(60);
    let (dev_a, dev_b) = (kv("A"), kv("B"));
    // path label, device variable in the guest, own group
    let both = [("A's portal", "$DA", ga), ("B's portal", "$DB", gb)];

    // TPGS and the port designators, through each path.
    for (path, dev, own) in both {
        let (rc, inq) = guest_run(&mut g, &format!("sg_inq /dev/{dev}"), lim);
        assert_eq!(rc, 0, "sg_inq through {path}: {inq:?}");
        assert!(
            inq.iter().any(|l| l.contains("TPGS=1")),
            "{path}: TPGS is not 1 (implicit ALUA):\n{}",
            inq.join("\n")
        );
        let (rc, vpd) = guest_run(&mut g, &format!("sg_vpd -p di /dev/{dev}"), lim);
        assert_eq!(rc, 0, "sg_vpd -p di through {path}: {vpd:?}");
        eprintln!("sg_vpd -p di through {path}:\n    {}", vpd.join("\n    "));
        assert_eq!(
            (
                field(&vpd, "Relative target port:"),
                field(&vpd, "Target port group:")
            ),
            (Some(own), Some(own)),
            "{path}: VPD 83h's relative target port and target port group"
        );
    }

    // Before: A primary.
    let mut seen = Vec::new();
    for (path, dev, own) in both {
        let (groups, _) = rtpg_until(&mut g, path, dev, &want_groups(own, ga), lim);
        check_decoded(path, &groups);
        let mut sorted = groups.clone();
        sorted.sort();
        seen.push(sorted);
    }
    assert_eq!(seen[0], seen[1], "the two paths report different groups");
    let mp = multipath_until(&mut g, &dev_a, &dev_b, lim);
    // One map holds both paths (the map's name is udev's ID_SERIAL; sg3-utils-udev ranks
    // the T10 vendor designator above a locally assigned NAA, so it is not scsi_id's).
    assert_eq!(
        mp.iter()
            .filter(|l| l.contains(" TWINSAN,TWINSAN-DISK"))
            .count(),
        1,
        "not one multipath map: {mp:?}"
    );

    // The standby path refuses media access; the active one serves.
    standby_refuses(&mut g, "$DB", "$DA", 2 << 20, "B", lim);
    let (rc, out) = guest_run(&mut g, "sgr $DB 1048576 65536 /tmp/rb", lim);
    assert!(
        rc != 0 && out.join(" ").to_lowercase().contains(STANDBY_SENSE),
        "READ through the standby path: rc {rc}: {out:?}"
    );
    let (rc, out) = guest_run(&mut g, "sgw $DA 1048576 /tmp/pa", lim);
    assert_eq!(rc, 0, "WRITE through the active path (A): {out:?}");
    let (rc, out) = guest_run(
        &mut g,
        "sgr $DA 1048576 65536 /tmp/ra && cmp /tmp/pa /tmp/ra",
        lim,
    );
    assert_eq!(rc, 0, "read-back through the active path (A): {out:?}");

    // Planned switchover: A steps down, B up.
    let t = Instant::now();
    ok_cli(&l.a, &["manual-mode-enable"]);
    ok_cli(&l.b, &["manual-mode-enable"]);
    ok_cli(&l.a, &["become-secondary"]);
    // The target's own count: B, secondary until now, completed no read or write (the
    // initiator's and the kernel's commands were all refused).
    let b_stats = lun_stats(&l.b);
    eprintln!("B's LUN statistics as secondary: {b_stats}");
    assert_eq!(
        media_bytes(&b_stats),
        (0, 0),
        "B executed media access while secondary: {b_stats}"
    );
    assert!(
        b_stats["check_conditions"].as_object().is_some_and(|m| m
            .values()
            .filter_map(|n| n.as_u64())
            .sum::<u64>()
            >= 4),
        "B's refusals are not counted: {b_stats}"
    );
    let a_demoted = lun_stats(&l.a);
    let deadline = Instant::now() + PROMOTE;
    loop {
        let o = l.b.cli(&["become-primary"]);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B: become-primary: {}",
            common::text(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    l.wait_primary(1, PROMOTE);
    eprintln!("switchover to B done after {:.2?}", t.elapsed());

    let mut seen = Vec::new();
    for (path, dev, own) in both {
        let (groups, _) = rtpg_until(&mut g, path, dev, &want_groups(own, gb), lim);
        check_decoded(path, &groups);
        let mut sorted = groups.clone();
        sorted.sort();
        seen.push(sorted);
    }
    assert_eq!(
        seen[0], seen[1],
        "after: the two paths report different groups"
    );
    // failback immediate: the map moves to B's path, now the active/optimized group.
    multipath_until(&mut g, &dev_b, &dev_a, lim);
    standby_refuses(&mut g, "$DA", "$DB", 4 << 20, "A", lim);
    let (rc, out) = guest_run(&mut g, "sgw $DB 3145728 /tmp/pb", lim);
    assert_eq!(rc, 0, "WRITE through the active path (B): {out:?}");
    let (rc, out) = guest_run(
        &mut g,
        "sgr $DB 1048576 65536 /tmp/ra && cmp /tmp/pa /tmp/ra && sgr $DB 3145728 65536 /tmp/rb && cmp /tmp/pb /tmp/rb",
        lim,
    );
    assert_eq!(rc, 0, "read-back through the new active path (B): {out:?}");

    // A, secondary since the switchover, completed no read or write either.
    let a_stats = lun_stats(&l.a);
    eprintln!("A's LUN statistics, secondary since the switchover: {a_stats}");
    assert_eq!(
        media_bytes(&a_stats),
        media_bytes(&a_demoted),
        "A executed media access while secondary: {a_demoted} -> {a_stats}"
    );
    g.send("run done");
    g.expect("done", Duration::from_secs(120));
    let out = g.finish();
    out.assert_passed();
    eprintln!(
        "----- guest dmesg, storage lines -----\n{}",
        out.storage_dmesg().join("\n")
    );
    eprintln!("ALUA guest run: {:.1?} in all", t0.elapsed());

    let a = stop_in_sync_and_compare(&mut l);
    let pattern = |s: &str| -> Vec<u8> { format!("{s}\n").bytes().cycle().take(65536).collect() };
    const K64: usize = 65536;
    assert_eq!(
        &a[1 << 20..(1 << 20) + K64],
        &pattern("alua-written-through-A")[..]
    );
    assert_eq!(
        &a[3 << 20..(3 << 20) + K64],
        &pattern("alua-written-through-B")[..]
    );
    for off in [2usize << 20, 4 << 20] {
        assert!(
            a[off..off + K64].iter().all(|&x| x == 0),
            "a write refused by the standby reached the medium at {off}"
        );
    }
    assert_no_panic(&l);
}
