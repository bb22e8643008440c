//! The Linux kernel initiator in a qemu guest: Debian's kernel with open-iscsi, dm-multipath,
//! LVM and fio, as XenServer's dom0 runs them, booted from an initramfs that
//! `scripts/guest/build-image.sh` builds (cached by content hash under the tool cache).
//!
//! A test gives the guest a shell script (`/test/run.sh`, sourcing `/lib/twinsan-guest.sh`)
//! in a second cpio archive appended to the image's, and networks it through tap devices
//! inside a namespace the test created, so every packet stays in that namespace. The guest
//! talks to the test over its second serial port (a unix socket here): `host_say` lines arrive
//! through [`Guest::expect`], and [`Guest::send`] answers `host_wait`. When the script ends the
//! guest prints its `dmesg` and a verdict on the console, then powers off; [`Guest::finish`]
//! returns both.
//!
//! KVM is used when it boots the guest (probed once per kernel and host, the result cached);
//! otherwise TCG, which is what this machine kind has (its /dev/kvm is a nested variant on which
//! a stock kernel hangs at boot). `TWINSAN_GUEST_ACCEL=kvm|tcg` forces one.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::netns::{Netns, NsChild};
use super::{run, tail, text, tool};

const QEMU: &str = "qemu-system-x86_64";

/// Bound of the image build (downloads and unpacks Debian packages on its first run).
const BUILD_LIMIT: Duration = Duration::from_secs(1200);
/// Lines of dmesg that mean an I/O error reached the guest's block layer or filesystem.
pub const IO_ERROR_PATTERNS: [&str; 5] = [
    "I/O error",
    "Buffer I/O error",
    "rejecting I/O to offline device",
    "EXT4-fs error",
    "blk_update_request",
];

/// How qemu runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// A built guest image and the accelerator that boots it here.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: Accel,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or finds cached) the guest image and picks the accelerator, or says why the guest
/// cannot run and returns `None`: not root (the guest needs a namespace and a tap device), or
/// neither KVM nor TCG boots it. A failed image build panics: the test command installs what it
/// needs, so that is a real failure.
pub fn image_or_skip(test: &str) -> Option<GuestImage> {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED {test}: the kernel-initiator guest needs root (namespaces, tap devices)"
        );
        return None;
    }
    let r = IMAGE.get_or_init(|| {
        tool(QEMU);
        let t = Instant::now();
        let o = run(
            Command::new("bash").arg(repo().join("scripts/guest/build-image.sh")),
            BUILD_LIMIT,
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "scripts/guest/build-image.sh failed:\n{}",
            text(&o)
        );
        let get = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("build-image.sh printed no {k}=: {out}"))
        };
        let (kernel, initrd) = (get("kernel"), get("initrd"));
        eprintln!(
            "guest image: {} + {} ({:.1?})",
            kernel.display(),
            initrd.display(),
            t.elapsed()
        );
        let accel = choose_accel(&kernel, &initrd)?;
        Ok(GuestImage {
            kernel,
            initrd,
            accel,
        })
    });
    match r {
        Ok(img) => Some(img.clone()),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// KVM when it is usable and boots the guest to its verdict, else TCG when that does; the
/// result of the (slow) KVM probe is cached per kernel and host kernel release.
fn choose_accel(kernel: &Path, initrd: &Path) -> Result<Accel, String> {
    match std::env::var("TWINSAN_GUEST_ACCEL").as_deref() {
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok("tcg") => return Ok(Accel::Tcg),
        _ => {}
    }
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cache = initrd.with_file_name(format!("accel-{}", release.trim()));
    match std::fs::read_to_string(&cache).as_deref().map(str::trim) {
        Ok("kvm") if kvm_usable => {
            eprintln!(
                "guest accelerator: KVM (probed before: {})",
                cache.display()
            );
            return Ok(Accel::Kvm);
        }
        Ok("tcg") => {
            eprintln!(
                "guest accelerator: TCG (KVM {}; probed before: {})",
                if kvm_usable {
                    "did not boot the guest"
                } else {
                    "not usable"
                },
                cache.display()
            );
            return Ok(Accel::Tcg);
        }
        _ => {}
    }
    if kvm_usable {
        match probe(Accel::Kvm, kernel, initrd) {
            Ok(()) => {
                let _ = std::fs::write(&cache, "kvm\n");
                eprintln!("guest accelerator: KVM");
                return Ok(Accel::Kvm);
            }
            Err(e) => {
                eprintln!("guest accelerator: /dev/kvm does not boot the guest, using TCG ({e})")
            }
        }
    } else {
        eprintln!("guest accelerator: TCG (no usable /dev/kvm)");
    }
    probe(Accel::Tcg, kernel, initrd)
        .map_err(|e| format!("neither KVM nor TCG boots the guest: {e}"))?;
    let _ = std::fs::write(&cache, "tcg\n");
    Ok(Accel::Tcg)
}

/// Boots the guest with a script that only passes, without network; Ok when the verdict came.
fn probe(accel: Accel, kernel: &Path, initrd: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let combined = dir.path().join("initrd");
    write_combined(initrd, &[("test/run.sh", b"exit 0\n".to_vec())], &combined)
        .map_err(|e| e.to_string())?;
    let console = dir.path().join("console.log");
    let mut cmd = Command::new(tool(QEMU));
    cmd.args(accel.args())
        .args(common_args())
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&combined)
        .args(["-append", &cmdline(&[], false, 60)])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-nic", "none"]);
    let limit = match accel {
        Accel::Kvm => Duration::from_secs(40),
        Accel::Tcg => Duration::from_secs(120),
    };
    let t = Instant::now();
    let o = run(&mut cmd, limit);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    if log.contains("TWINSAN-GUEST-VERDICT: pass") {
        eprintln!(
            "guest probe with {accel:?}: booted and passed in {:.1?}",
            t.elapsed()
        );
        Ok(())
    } else {
        Err(format!(
            "{accel:?}: no verdict after {:.1?} ({}); console tail:\n{}",
            t.elapsed(),
            o.status,
            tail(&log, 20)
        ))
    }
}

fn common_args() -> [&'static str; 13] {
    [
        "-m",
        "1024",
        "-smp",
        "1",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-vga",
        "none",
        "-L",
        "/usr/share/qemu",
    ]
}

fn cmdline(nics: &[Nic], multipath: bool, timeout_s: u64) -> String {
    let net = nics
        .iter()
        .enumerate()
        .map(|(i, n)| format!("eth{i}:{}", n.guest_cidr))
        .collect::<Vec<_>>()
        .join(",");
    let mut s = format!(
        "console=ttyS0 quiet net.ifnames=0 panic=-1 twinsan.iqn={GUEST_IQN} twinsan.multipath={} twinsan.timeout={timeout_s}",
        u8::from(multipath)
    );
    if !net.is_empty() {
        s.push_str(&format!(" twinsan.net={net}"));
    }
    s
}

/// The guest's initiator name.
pub const GUEST_IQN: &str = "iqn.2026-12.org.twinsan.test:guest";

/// Writes `base` (a compressed cpio), zero padding to 4 bytes, and a newc cpio holding `files`
/// (paths relative to /, parent directories created) to `out`: the kernel unpacks both.
pub fn write_combined(base: &Path, files: &[(&str, Vec<u8>)], out: &Path) -> std::io::Result<()> {
    let mut buf = std::fs::read(base)?;
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
    let mut ino = 0x7000u32;
    let mut entry = |buf: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        buf.extend_from_slice(b"070701");
        for f in fields {
            buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
        buf.extend_from_slice(data);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
    };
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    for d in &dirs {
        entry(&mut buf, d, 0o040755, &[]);
    }
    for (path, data) in files {
        entry(&mut buf, path, 0o100755, data);
    }
    entry(&mut buf, "TRAILER!!!", 0, &[]);
    std::fs::write(out, buf)
}

/// One network card of the guest: the tap device (already created in the namespace) and the
/// guest's address on it ("10.232.0.2/24").
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap: String,
    pub guest_cidr: String,
}

/// Creates tap device `name` in `ns`, up, with `host_cidr` on it, or as a port of `bridge`.
pub fn add_tap(ns: &Netns, name: &str, host_cidr: Option<&str>, bridge: Option<&str>) {
    ns.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
    if let Some(c) = host_cidr {
        ns.ip(&["addr", "add", c, "dev", name]);
    }
    if let Some(b) = bridge {
        ns.ip(&["link", "set", name, "master", b]);
    }
    ns.ip(&["link", "set", name, "up"]);
}

pub struct GuestSpec<'a> {
    pub image: &'a GuestImage,
    /// The namespace the taps live in; qemu runs there.
    pub ns: &'a Netns,
    pub nics: Vec<Nic>,
    /// XenServer's multipath settings (replacement_timeout 15 s, multipathd) instead of the
    /// single-path ones (144 s).
    pub multipath: bool,
    /// `/test/run.sh`.
    pub script: String,
    /// Bound of the whole guest run, boot included.
    pub timeout: Duration,
    /// Where the console log and the combined initrd go.
    pub dir: &'a Path,
}

/// A running guest.
pub struct Guest {
    child: Option<NsChild>,
    lines: Receiver<String>,
    ctl: UnixStream,
    pub console: PathBuf,
    started: Instant,
    deadline: Instant,
    /// Every line the guest said, with the second it arrived.
    pub said: Vec<(f64, String)>,
}

/// What the guest reported at its end.
#[derive(Debug)]
pub struct GuestOutcome {
    pub passed: bool,
    pub verdict: String,
    pub dmesg: String,
    pub console: String,
}

impl GuestOutcome {
    /// dmesg lines that show an I/O error reaching the block layer or a filesystem.
    pub fn io_errors(&self) -> Vec<&str> {
        self.dmesg
            .lines()
            .filter(|l| IO_ERROR_PATTERNS.iter().any(|p| l.contains(p)))
            .collect()
    }

    /// The kernel's lines about the storage stack (iSCSI sessions and connections, SCSI
    /// devices, device-mapper, filesystems), without the boot's noise.
    pub fn storage_dmesg(&self) -> Vec<&str> {
        const KEYS: [&str; 9] = [
            "iscsi",
            "connection",
            "session",
            " sd ",
            "scsi",
            "device-mapper",
            "EXT4",
            "I/O error",
            "blk_",
        ];
        self.dmesg
            .lines()
            .filter(|l| KEYS.iter().any(|k| l.contains(k)))
            .filter(|l| {
                !l.contains("Loading iSCSI transport") && !l.contains("SCSI subsystem initialized")
            })
            .collect()
    }

    /// Panics with the console unless the guest's script passed.
    pub fn assert_passed(&self) {
        assert!(
            self.passed,
            "guest verdict: {}\n----- guest console (last 150 lines) -----\n{}",
            self.verdict,
            tail(&self.console, 150)
        );
    }
}

impl Guest {
    /// Boots the guest in `spec.ns`, connected to the control port.
    pub fn start(spec: GuestSpec<'_>) -> Guest {
        let combined = spec.dir.join("guest-initrd");
        write_combined(
            &spec.image.initrd,
            &[("test/run.sh", spec.script.clone().into_bytes())],
            &combined,
        )
        .unwrap();
        let console = spec.dir.join("guest-console.log");
        let sock = spec.dir.join("guest-ctl.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = spec.ns.command(tool(QEMU));
        cmd.args(spec.image.accel.args())
            .args(common_args())
            .arg("-kernel")
            .arg(&spec.image.kernel)
            .arg("-initrd")
            .arg(&combined)
            .args([
                "-append",
                &cmdline(&spec.nics, spec.multipath, spec.timeout.as_secs()),
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["-serial", "chardev:ctl"]);
        for (i, n) in spec.nics.iter().enumerate() {
            cmd.args([
                "-netdev",
                &format!("tap,id=n{i},ifname={},script=no,downscript=no", n.tap),
                "-device",
                &format!(
                    "virtio-net-pci,netdev=n{i},mac=52:54:00:12:34:{:02x}",
                    i + 1
                ),
            ]);
        }
        let log = spec.dir.join("qemu.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start qemu");
        let mut child = NsChild {
            child,
            what: "qemu guest".into(),
        };
        let started = Instant::now();
        let ctl = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    if !child.running() || started.elapsed() > Duration::from_secs(20) {
                        panic!(
                            "qemu's control socket {}: {e}; qemu log:\n{}",
                            sock.display(),
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let (tx, rx) = mpsc::channel();
        let reader = ctl.try_clone().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        eprintln!(
            "guest started ({:?}, {} NIC(s), multipath {})",
            spec.image.accel,
            spec.nics.len(),
            spec.multipath
        );
        Guest {
            child: Some(child),
            lines: rx,
            ctl,
            console,
            started,
            deadline: started + spec.timeout + Duration::from_secs(30),
            said: Vec::new(),
        }
    }

    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Waits for the guest to say a line starting with `word` (the word alone or followed by a
    /// space) and returns the rest of it. Panics with the console if the guest ends or `limit`
    /// passes first.
    pub fn expect(&mut self, word: &str, limit: Duration) -> String {
        let until = (Instant::now() + limit).min(self.deadline);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let t = self.secs();
                    let shown: String = line.chars().take(160).collect();
                    let more = if shown.len() < line.len() { " ..." } else { "" };
                    eprintln!("[guest {t:7.2}] {shown}{more}");
                    self.said.push((t, line.clone()));
                    if line == word {
                        return String::new();
                    }
                    if let Some(rest) = line.strip_prefix(&format!("{word} ")) {
                        return rest.to_string();
                    }
                    if line.starts_with("TWINSAN-GUEST-VERDICT:") {
                        self.fail(&format!(
                            "the guest ended while the test waited for `{word}`: {line}"
                        ));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("the guest did not say `{word}` within {limit:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => self.fail(&format!(
                    "the guest's control port closed while waiting for `{word}`"
                )),
            }
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        panic!(
            "{why}\n----- guest console (last 150 lines) -----\n{}",
            tail(&self.console_text(), 150)
        );
    }

    /// Sends one line to the guest's `host_wait`.
    pub fn send(&mut self, line: &str) {
        eprintln!("[host  {:7.2}] -> guest: {line}", self.secs());
        let r = self.ctl.write_all(format!("{line}\n").as_bytes());
        if let Err(e) = r {
            self.fail(&format!("writing to the guest's control port: {e}"));
        }
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console)
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Waits for the guest to power off (bounded by the spec's timeout) and returns its verdict
    /// and dmesg.
    pub fn finish(mut self) -> GuestOutcome {
        let mut child = self.child.take().expect("guest running");
        let left = self.deadline.saturating_duration_since(Instant::now());
        if child.wait(left).is_none() {
            eprintln!("guest did not power off in time: killed");
        }
        eprintln!("guest ran for {:.1?}", self.started.elapsed());
        let console = self.console_text();
        let verdict = console
            .lines()
            .rev()
            .find_map(|l| {
                l.split_once("TWINSAN-GUEST-VERDICT: ")
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "no verdict (the guest did not finish)".into());
        let dmesg = match (
            console.find("TWINSAN-GUEST-DMESG-BEGIN"),
            console.rfind("TWINSAN-GUEST-DMESG-END"),
        ) {
            (Some(a), Some(b)) if a < b => {
                console[a..b].lines().skip(1).collect::<Vec<_>>().join("\n")
            }
            _ => String::new(),
        };
        GuestOutcome {
            passed: verdict == "pass",
            verdict,
            dmesg,
            console,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
            if std::thread::panicking() {
                eprintln!(
                    "----- guest console (last 80 lines) -----\n{}",
                    tail(&self.console_text(), 80)
                );
            }
        }
    }
}
