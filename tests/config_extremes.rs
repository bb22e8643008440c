//! Issue 13, config validation: for every numeric key, the smallest and largest values a
//! config file can hold (and the edges of the key's range) are either refused by
//! `twinsan check-config` with the key named, or the daemon starts with them and serves an
//! iSCSI login (login, a NOP-Out ping, logout). Replication keys run with a replicated LUN
//! whose peer is absent; `[ha]` keys with `source = "manual"` and `become-primary`.

mod common;

use common::raw::Raw;
use common::{bin, free_port, run, scratch_dir, text, IQN};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use twinsan::iscsi::pdu::{Opcode, Pdu};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Section {
    Server,
    Negotiation,
    Target,
    Lun,
    Replication,
    Ha,
    HaXapi,
    HaAlerts,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    U8,
    U16,
    U32,
    U64,
}

struct Case {
    section: Section,
    key: &'static str,
    /// The key's line (and companions it needs, e.g. a larger peer timeout).
    lines: String,
    value: String,
    runs: bool,
}

const I64_MIN: i128 = i64::MIN as i128;
const I64_MAX: i128 = i64::MAX as i128;

/// The values to try for a key of type `ty` whose accepted range is `lo..=hi`: the smallest
/// and largest integers of TOML, the type's own limits, the range's edges and one step
/// outside each.
fn values(ty: Ty, lo: i128, hi: i128) -> Vec<i128> {
    let ty_max = match ty {
        Ty::U8 => u8::MAX as i128,
        Ty::U16 => u16::MAX as i128,
        Ty::U32 => u32::MAX as i128,
        Ty::U64 => I64_MAX,
    };
    let mut v = vec![I64_MIN, 0, lo - 1, lo, hi, hi + 1, ty_max, I64_MAX];
    v.retain(|&x| (I64_MIN..=I64_MAX).contains(&x) && (x >= 0 || x == I64_MIN));
    v.sort();
    v.dedup();
    v
}

fn cases() -> Vec<Case> {
    use Section::*;
    use Ty::*;
    // (section, key, type, lo, hi, companion lines for a value)
    type Companion = fn(i128) -> String;
    let none: Companion = |_| String::new();
    let table: Vec<(Section, &str, Ty, i128, i128, Companion)> = vec![
        (Server, "nop_in_interval_secs", U64, 0, 3600, none),
        (Server, "nop_in_timeout_secs", U64, 1, 3600, none),
        (Server, "login_timeout_secs", U64, 1, 3600, none),
        (Server, "queue_depth", U32, 1, 4096, none),
        (Server, "worker_threads", U64, 0, 1024, none),
        (Server, "io_threads", U64, 0, 256, none),
        (Server, "max_inflight_bytes", U64, 0, 1 << 40, none),
        (Server, "max_session_inflight_bytes", U64, 0, 1 << 40, none),
        (Server, "max_sessions", U32, 1, 65535, none),
        (Server, "max_sessions_per_initiator", U32, 1, 65535, none),
        (Server, "max_logins_in_progress", U32, 1, 65535, none),
        (
            Negotiation,
            "max_recv_data_segment_length",
            U32,
            512,
            (1 << 24) - 1,
            none,
        ),
        (
            Negotiation,
            "max_burst_length",
            U32,
            512,
            (1 << 24) - 1,
            |v| {
                // first_burst_length must not exceed it.
                if v < 65536 {
                    format!("first_burst_length = {}", v.max(512))
                } else {
                    String::new()
                }
            },
        ),
        (
            Negotiation,
            "first_burst_length",
            U32,
            512,
            (1 << 24) - 1,
            |_| "max_burst_length = 16777215".into(),
        ),
        (Negotiation, "max_outstanding_r2t", U32, 1, 65535, none),
        (Negotiation, "default_time2wait", U32, 0, 3600, none),
        (Negotiation, "default_time2retain", U32, 0, 3600, none),
        (Target, "tpgt", U16, 0, 65535, none),
        (Lun, "number", U64, 0, 16383, none),
        (Lun, "size", U64, 512, 1 << 50, none),
        (Lun, "thin_threshold_percent", U8, 1, 99, none),
        (Lun, "sanitize_rate", U64, 1 << 20, 1 << 40, none),
        (Lun, "tgt_tid", U32, 1, u32::MAX as i128, |_| {
            "identity = \"tgt\"".into()
        }),
        (Replication, "ping_interval_secs", U64, 1, 120, |_| {
            "timeout_secs = 600".into()
        }),
        (Replication, "timeout_secs", U64, 2, 600, |_| {
            "ping_interval_secs = 1".into()
        }),
        (Replication, "resync_rate", U64, 1 << 20, 1 << 40, none),
        (Ha, "heartbeat_interval_ms", U64, 10, 10_000, |v| {
            format!("peer_timeout_ms = {}", (2 * v).clamp(1500, 600_000))
        }),
        (Ha, "peer_timeout_ms", U64, 500, 600_000, none),
        (Ha, "witness_port", U16, 0, 65535, none),
        (Ha, "witness_interval_ms", U64, 100, 60_000, |_| {
            "witness_timeout_ms = 100".into()
        }),
        (Ha, "witness_timeout_ms", U64, 1, 1000, none),
        (Ha, "garp_count", U32, 1, 100, none),
        (Ha, "garp_interval_ms", U64, 0, 10_000, none),
        (Ha, "vip_probe_count", U32, 1, 10, none),
        (Ha, "vip_probe_wait_ms", U64, 10, 5000, none),
        (Ha, "drain_timeout_ms", U64, 0, 60_000, none),
        (Ha, "replug_attempts", U32, 1, 100, none),
        (Ha, "replug_backoff_ms", U64, 10, 600_000, none),
        (HaXapi, "timeout_ms", U64, 100, 120_000, none),
        (HaXapi, "event_timeout_secs", U64, 1, 3600, none),
        (HaAlerts, "smtp_port", U16, 0, 65535, none),
        (HaAlerts, "suppress_minutes", U64, 0, 7 * 24 * 60, none),
        (HaAlerts, "startup_quiet_secs", U64, 0, 86_400, none),
    ];
    let mut out = Vec::new();
    for (section, key, ty, lo, hi, companion) in table {
        for v in values(ty, lo, hi) {
            let extra = companion(v);
            out.push(Case {
                section,
                key,
                lines: format!("{key} = {v}\n{extra}"),
                value: v.to_string(),
                runs: (lo..=hi).contains(&v),
            });
        }
    }
    // Keys whose accepted values are not one interval.
    for (v, runs) in [
        (0, true),
        (1, false),
        (2, false),
        (3, true),
        (3600, true),
        (3601, false),
        (I64_MAX, false),
    ] {
        out.push(Case {
            section: Ha,
            key: "vip_lifetime_secs",
            lines: format!("vip_lifetime_secs = {v}\n"),
            value: v.to_string(),
            runs,
        });
    }
    for (v, runs) in [
        (0, false),
        (511, false),
        (512, true),
        (1024, false),
        (4096, true),
        (u32::MAX as i128, false),
    ] {
        out.push(Case {
            section: Lun,
            key: "block_size",
            lines: format!("block_size = {v}\n"),
            value: v.to_string(),
            runs,
        });
    }
    // Sizes as text: the largest a unit can say.
    for (v, runs) in [
        ("\"1048576G\"", true),
        ("\"1025T\"", false),
        ("\"16777215T\"", false),
    ] {
        out.push(Case {
            section: Lun,
            key: "size",
            lines: format!("size = {v}\n"),
            value: v.to_string(),
            runs,
        });
    }
    out
}

struct Ports {
    iscsi: u16,
    repl_listen: u16,
    repl_peer: u16,
    hb_listen: u16,
    hb_peer: u16,
    xapi: u16,
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole file for `case`; the LUN file lives in `lun_dir`.
fn config(case: &Case, dir: &Path, lun_dir: &Path, p: &Ports) -> String {
    use Section::*;
    let at = |s: Section| {
        if case.section == s {
            case.lines.as_str()
        } else {
            ""
        }
    };
    let mut lun = String::new();
    if case.key != "number" {
        lun.push_str("number = 0\n");
    }
    if case.section == Lun && case.key == "size" {
        lun.push_str(&format!(
            "path = \"{}\"\n",
            lun_dir.join("lun0.img").display()
        ));
    } else {
        lun.push_str(&format!("path = \"{}\"\n", dir.join("lun0.img").display()));
        // A replicated LUN's file exists already (create-md); others are created.
        if case.section != Replication {
            lun.push_str("size = \"16MiB\"\n");
        }
    }
    let mut c = format!(
        "[server]\ndata_dir = \"{data}\"\n{server}\n[negotiation]\n{neg}\n[[target]]\niqn = \"{IQN}\"\nportals = [\"127.0.0.1:{port}\"]\n{target}\n[[target.lun]]\n{lun}{lunx}\n",
        data = dir.join("data").display(),
        server = at(Server),
        neg = at(Negotiation),
        port = p.iscsi,
        target = at(Target),
        lunx = at(Lun),
    );
    if case.section == Replication {
        c.push_str(&format!(
            "[target.lun.replication]\nname = \"r0\"\nlisten = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\nsecret = \"extremes-secret\"\nrole = \"primary\"\n{}\n",
            p.repl_listen,
            p.repl_peer,
            at(Replication)
        ));
    }
    if matches!(case.section, Ha | HaXapi | HaAlerts) {
        c.push_str(&format!(
            "[ha]\nsource = \"manual\"\nnode = \"extremes\"\nlisten = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\nsecret = \"extremes-ha-secret\"\n{}\n",
            p.hb_listen,
            p.hb_peer,
            at(Ha)
        ));
        if case.section == HaXapi {
            c.push_str(&format!(
                "[ha.xapi]\nurl = \"http://127.0.0.1:{}/\"\npassword = \"pw\"\nhost_uuid = \"00000000-0000-0000-0000-000000000001\"\n{}\n",
                p.xapi,
                at(HaXapi)
            ));
        }
        if case.section == HaAlerts {
            c.push_str(&format!("[ha.alerts]\n{}\n", at(HaAlerts)));
        }
    }
    c
}

/// Kills the daemon by its PID when the case ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(args: &[&str], config: &Path) -> (bool, String) {
    let o = run(
        Command::new(bin()).args(args).arg("--config").arg(config),
        Duration::from_secs(30),
    );
    (o.status.success(), text(&o))
}

fn logout(r: &mut Raw) -> bool {
    let itt = r.next_itt();
    let mut p = Pdu::new(Opcode::LogoutRequest);
    p.set_immediate(true);
    p.set_flags(0x80);
    p.set_itt(itt);
    p.set_u32_at(24, r.cmd_sn);
    p.set_u32_at(28, r.exp_stat_sn);
    r.send(p);
    r.wait_for(|p| p.opcode() == Some(Opcode::LogoutResponse) && p.itt() == itt)
        .is_some_and(|p| p.bhs[2] == 0)
}

/// Runs one case; Err says what went wrong.
fn run_case(case: &Case, base: &Path, shm: &Path, n: usize) -> Result<(), String> {
    let name = format!(
        "{}.{} = {}",
        section_name(case.section),
        case.key,
        case.value
    );
    let dir = base.join(format!("case{n}"));
    let lun_dir = shm.join(format!("case{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&lun_dir).unwrap();
    let ports = Ports {
        iscsi: free_port(),
        repl_listen: free_port(),
        repl_peer: free_port(),
        hb_listen: free_udp(),
        hb_peer: free_udp(),
        xapi: free_port(),
    };
    let path = dir.join("twinsan.toml");
    std::fs::write(&path, config(case, &dir, &lun_dir, &ports)).unwrap();
    let (ok, out) = cli(&["check-config"], &path);
    if !ok {
        if case.runs {
            return Err(format!("{name}: refused, expected to run:\n{out}"));
        }
        if !out.contains(case.key) {
            return Err(format!("{name}: refused without naming the key:\n{out}"));
        }
        if !out.contains(&path.display().to_string()) {
            return Err(format!("{name}: refused without naming the file:\n{out}"));
        }
        return Ok(());
    }
    if !case.runs {
        return Err(format!("{name}: accepted, expected a refusal:\n{out}"));
    }
    if case.section == Section::Replication {
        let f = std::fs::File::create(dir.join("lun0.img")).unwrap();
        f.set_len(64 << 20).unwrap();
        let o = run(
            Command::new(bin())
                .args(["replication", "create-md", "--config"])
                .arg(&path)
                .args(["--volume", "r0", "--initial-sync", "full"]),
            Duration::from_secs(30),
        );
        if !o.status.success() {
            return Err(format!("{name}: create-md failed: {}", text(&o)));
        }
    }
    let log = dir.join("twinsan.log");
    let logf = std::fs::File::create(&log).unwrap();
    let mut d = Daemon(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start twinsan"),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ha = matches!(
        case.section,
        Section::Ha | Section::HaXapi | Section::HaAlerts
    );
    let mut promoted = !ha;
    loop {
        if let Ok(Some(st)) = d.0.try_wait() {
            return Err(format!(
                "{name}: daemon exited ({st}); log:\n{}",
                log_text()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: not serving within 30 s; log:\n{}",
                log_text()
            ));
        }
        if !promoted {
            let (ok, _) = cli(&["become-primary"], &path);
            promoted = ok;
        } else if std::net::TcpStream::connect(("127.0.0.1", ports.iscsi)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut r = Raw::try_login(ports.iscsi, common::INIT1, false, false)
        .map_err(|e| format!("{name}: login failed: {e}; log:\n{}", log_text()))?;
    if !r.ping() {
        return Err(format!(
            "{name}: no NOP-In answer after login; log:\n{}",
            log_text()
        ));
    }
    if !logout(&mut r) {
        return Err(format!("{name}: logout failed; log:\n{}", log_text()));
    }
    if let Ok(Some(st)) = d.0.try_wait() {
        return Err(format!(
            "{name}: daemon exited ({st}); log:\n{}",
            log_text()
        ));
    }
    let l = log_text();
    if l.contains("panicked") {
        return Err(format!("{name}: the daemon panicked; log:\n{l}"));
    }
    Ok(())
}

fn section_name(s: Section) -> &'static str {
    match s {
        Section::Server => "server",
        Section::Negotiation => "negotiation",
        Section::Target => "target",
        Section::Lun => "target.lun",
        Section::Replication => "target.lun.replication",
        Section::Ha => "ha",
        Section::HaXapi => "ha.xapi",
        Section::HaAlerts => "ha.alerts",
    }
}

#[test]
fn numeric_keys_at_their_extremes_are_refused_by_name_or_serve_a_login() {
    let base = scratch_dir();
    // The 1 PiB sparse LUN needs a filesystem that takes such a file: tmpfs does (ext4
    // stops at 16 TiB).
    let shm = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let cases = cases();
    let t0 = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    let started = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                if c.runs {
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Err(e) = run_case(c, base.path(), shm.path(), i) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{} cases ({} started a daemon and logged in) in {:.1} s",
        cases.len(),
        started.into_inner(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n----\n")
    );
}
