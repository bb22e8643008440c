//! Two real `twinsan` daemons ("A" and "B") replicating one LUN over 127.0.0.1: per-host
//! configuration, `replication create-md`, start / SIGTERM / SIGKILL, operator actions,
//! status polling with deadlines, optional in-test proxies on the replication link, and
//! byte-for-byte comparison of the two backing files' data areas.
//!
//! When a test panics while a [`Pair`] is alive, the pair prints the tail of both hosts'
//! logs and keeps its directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::proxy::LinkProxy;
use super::{bin, free_port, run, scratch_dir, text, Server, IQN};

pub const VOLUME: &str = "r0";
pub const SECRET: &str = "sharedsecret";
pub const MIB: u64 = 1 << 20;
/// Bound of one CLI call (status, operator action, create-md).
const CLI_LIMIT: Duration = Duration::from_secs(30);

/// Resync progress as `twinsan status --json` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    pub bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
}

/// Online-verify progress as `twinsan status --json` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct VerifyProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub mismatched_blocks: u64,
    pub finished: bool,
    pub aborted: bool,
}

/// One entry of `volumes` in `twinsan status --json` (the replication crate's
/// `VolumeStatus`).
#[derive(Debug, Clone, Deserialize)]
pub struct Vol {
    pub name: String,
    pub role: String,
    pub peer_role: Option<String>,
    pub connection: String,
    pub disk_state: String,
    pub peer_disk_state: Option<String>,
    pub resync: Option<ResyncProgress>,
    pub verify: Option<VerifyProgress>,
    pub out_of_sync_bytes: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
    pub write_errors: u64,
    pub split_brain: bool,
    pub suspended: bool,
    pub size_bytes: u64,
    pub current_uuid: u64,
    pub bitmap_uuid: u64,
}

impl Vol {
    pub fn connected(&self) -> bool {
        self.connection == "Connected"
    }

    /// Connected, both disks UpToDate, nothing out of sync.
    pub fn in_sync(&self) -> bool {
        self.connected()
            && self.disk_state == "UpToDate"
            && self.peer_disk_state.as_deref() == Some("UpToDate")
            && self.out_of_sync_bytes == 0
    }

    pub fn brief(&self) -> String {
        format!(
            "{} peer {} {} disk {}/{} oos {} resync {}/{} sb {} uuid {:016X}/{:016X}{}{}",
            self.role,
            self.peer_role.as_deref().unwrap_or("-"),
            self.connection,
            self.disk_state,
            self.peer_disk_state.as_deref().unwrap_or("-"),
            self.out_of_sync_bytes,
            self.resync_sent_bytes,
            self.resync_received_bytes,
            self.split_brain,
            self.current_uuid,
            self.bitmap_uuid,
            self.resync
                .as_ref()
                .map(|r| format!(" resyncing {:.1}% of {}", r.percent, r.total_bytes))
                .unwrap_or_default(),
            self.verify
                .as_ref()
                .map(|v| format!(
                    " verify {}/{} mismatched {} finished {}",
                    v.done_bytes, v.total_bytes, v.mismatched_blocks, v.finished
                ))
                .unwrap_or_default(),
        )
    }
}

/// How `create-md` sets up a new pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// A is the full-sync source (`--initial-sync full`), B plain (Inconsistent).
    FullFromA,
    /// Both `--initial-sync skip-identical` with the same token: no sync.
    SkipIdentical,
    /// No `create-md`: the test puts metadata on the backing files itself (e.g. DRBD's,
    /// then `replication adopt`) and sets [`Pair::size_bytes`].
    Prepared,
}

#[derive(Debug, Clone)]
pub struct PairSpec {
    /// Size of each backing file (created sparse with `set_len`).
    pub image_bytes: u64,
    pub init: Init,
    /// Route the replication link through a [`LinkProxy`] (cut / stall).
    pub proxied: bool,
    pub resync_rate: String,
    pub after_sb_0pri: String,
    pub after_sb_1pri: String,
    pub after_sb_2pri: String,
    /// Serve the Prometheus endpoint on a loopback port of each host ([`Host::metrics_port`]).
    pub metrics: bool,
    /// `alua = true` on the target (ALUA across the pair).
    pub alua: bool,
}

impl Default for PairSpec {
    fn default() -> Self {
        PairSpec {
            image_bytes: 64 * MIB,
            init: Init::SkipIdentical,
            proxied: false,
            resync_rate: "200M".into(),
            after_sb_0pri: "discard-zero-changes".into(),
            after_sb_1pri: "consensus".into(),
            after_sb_2pri: "disconnect".into(),
            metrics: false,
            alua: false,
        }
    }
}

/// One host of the pair: its directory, backing file, configuration and daemon.
pub struct Host {
    pub label: &'static str,
    pub dir: PathBuf,
    pub image: PathBuf,
    pub config: PathBuf,
    /// All of this host's daemon runs, appended.
    pub log: PathBuf,
    pub iscsi_port: u16,
    /// `[server] metrics_listen` port on 127.0.0.1, with [`PairSpec::metrics`].
    pub metrics_port: Option<u16>,
    pub listen: SocketAddr,
    /// Where this host dials the peer (the peer's listen address or a proxy).
    pub peer: SocketAddr,
    pub server: Option<Server>,
    /// The target's `portals` instead of `127.0.0.1:<iscsi_port>` (then `iscsi_port` must be
    /// bound some other way, e.g. as a host portal: start waits for it).
    pub portals: Option<String>,
    /// Lines added to this host's `[[target]]` table (e.g. `host_portals`).
    pub target_extra: String,
    /// Tables appended to this host's configuration (e.g. `[ha]`).
    pub extra: String,
    spec: PairSpec,
    starts: u32,
}

impl Host {
    pub fn write_config(&self, role: &str) {
        let s = &self.spec;
        let cfg = format!(
            r#"[server]
data_dir = "{data}"
{metrics}

[[target]]
iqn = "{IQN}"
portals = [{portals}]
alua = {alua}
{target_extra}

[[target.lun]]
number = 0
path = "{image}"

[target.lun.replication]
name = "{VOLUME}"
listen = "{listen}"
peer = "{peer}"
secret = "{SECRET}"
meta = "internal"
role = "{role}"
resync_rate = "{rate}"
ping_interval_secs = 1
timeout_secs = 3
after_sb_0pri = "{sb0}"
after_sb_1pri = "{sb1}"
after_sb_2pri = "{sb2}"
{extra}
"#,
            data = self.dir.join("data").display(),
            metrics = self
                .metrics_port
                .map(|p| format!("metrics_listen = \"127.0.0.1:{p}\""))
                .unwrap_or_default(),
            image = self.image.display(),
            listen = self.listen,
            peer = self.peer,
            rate = s.resync_rate,
            sb0 = s.after_sb_0pri,
            sb1 = s.after_sb_1pri,
            sb2 = s.after_sb_2pri,
            alua = s.alua,
            portals = self
                .portals
                .clone()
                .unwrap_or_else(|| format!("\"127.0.0.1:{}\"", self.iscsi_port)),
            target_extra = self.target_extra,
            extra = self.extra,
        );
        std::fs::write(&self.config, cfg).unwrap();
    }

    fn note(&self, line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = writeln!(f, "==== test: {line}");
    }

    /// `twinsan replication create-md` (daemon stopped); returns the usable size.
    pub fn create_md(&self, extra: &[&str]) -> u64 {
        let o = run(
            Command::new(bin())
                .args(["replication", "create-md", "--config"])
                .arg(&self.config)
                .args(["--volume", VOLUME])
                .args(extra),
            CLI_LIMIT,
        );
        let out = text(&o);
        assert!(
            o.status.success(),
            "{}: create-md {extra:?} failed: {out}",
            self.label
        );
        // "r0: metadata created, usable size N bytes"
        let usable = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(3)
            .find(|w| w[0] == "size" && w[2].starts_with("bytes"))
            .and_then(|w| w[1].parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{}: no usable size in create-md output: {out}", self.label));
        self.note(&format!("create-md {extra:?}: usable {usable}"));
        usable
    }

    /// Starts the daemon with start-up role `role` ("primary" / "secondary").
    pub fn start(&mut self, role: &str) {
        assert!(self.server.is_none(), "{} already running", self.label);
        self.starts += 1;
        self.write_config(role);
        self.note(&format!("start #{} as {role}", self.starts));
        self.server = Some(Server::start_logged(
            &self.dir,
            &self.config,
            self.iscsi_port,
            &self.log,
        ));
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            self.note("SIGKILL");
            s.kill();
        }
    }

    /// SIGTERM, which must stop the daemon cleanly within 20 s.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            self.note("SIGTERM");
            let t = Instant::now();
            match s.terminate(Duration::from_secs(20)) {
                Some(st) => {
                    assert!(
                        st.success(),
                        "{}: daemon exited with {st} after SIGTERM",
                        self.label
                    );
                    self.note(&format!("exited after {:.2?}", t.elapsed()));
                }
                None => {
                    s.kill();
                    panic!("{}: daemon did not stop within 20 s of SIGTERM", self.label);
                }
            }
        }
    }

    pub fn running(&mut self) -> bool {
        self.server.as_mut().is_some_and(|s| s.running())
    }

    /// The replicated volume's status, or why it could not be had.
    pub fn status(&self) -> Result<Vol, String> {
        if self.server.is_none() {
            return Err("not running".into());
        }
        let o = run(
            Command::new(bin())
                .args(["status", "--json", "--config"])
                .arg(&self.config),
            CLI_LIMIT,
        );
        if !o.status.success() {
            return Err(format!("status failed: {}", text(&o)));
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .map_err(|e| format!("status JSON: {e}: {}", text(&o)))?;
        let vol = v["volumes"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == VOLUME))
            .ok_or_else(|| format!("no volume {VOLUME} in {v}"))?;
        serde_json::from_value(vol.clone()).map_err(|e| format!("volume status {vol}: {e}"))
    }

    pub fn vol(&self) -> Vol {
        self.status()
            .unwrap_or_else(|e| panic!("{}: {e}", self.label))
    }

    /// `twinsan replication <action> [extra]` against the running daemon.
    pub fn act(&self, action: &str, extra: &[&str]) -> Output {
        self.note(&format!("replication {action} {extra:?}"));
        run(
            Command::new(bin())
                .args(["replication", action, "--config"])
                .arg(&self.config)
                .args(["--volume", VOLUME])
                .args(extra),
            CLI_LIMIT,
        )
    }

    pub fn act_ok(&self, action: &str, extra: &[&str]) {
        let o = self.act(action, extra);
        assert!(
            o.status.success(),
            "{}: replication {action} {extra:?} failed: {}",
            self.label,
            text(&o)
        );
    }

    /// Polls this host's status every 100 ms until `pred` holds; panics after `limit`.
    pub fn wait(&self, what: &str, limit: Duration, mut pred: impl FnMut(&Vol) -> bool) -> Vol {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.status() {
                Ok(v) if pred(&v) => return v,
                Ok(v) => v.brief(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "{}: timed out after {limit:?} waiting for {what}; last: {last}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `[0, len)` of the backing file.
    pub fn data_area(&self, len: u64) -> Vec<u8> {
        use std::io::Read;
        let mut f = std::fs::File::open(&self.image).unwrap();
        let mut v = vec![0u8; len as usize];
        f.read_exact(&mut v).unwrap();
        v
    }

    /// XORs 0xFF into `len` bytes at `offset` of the backing file (the daemon must be
    /// stopped).
    pub fn corrupt(&self, offset: u64, len: usize) {
        use std::os::unix::fs::FileExt;
        assert!(
            self.server.is_none(),
            "{}: corrupt only while stopped",
            self.label
        );
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.image)
            .unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset).unwrap();
        for x in &mut b {
            *x ^= 0xff;
        }
        f.write_all_at(&b, offset).unwrap();
        f.sync_all().unwrap();
        self.note(&format!("corrupted {len} bytes at {offset}"));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{IQN}/0", self.iscsi_port)
    }
}

/// Indices of the 4 KiB blocks where `a` and `b` differ.
pub fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<u64> {
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// A free loopback port not handed out before in this process (two `free_port` calls
/// may return the same port, which would break a pair that needs four).
pub fn unique_port() -> u16 {
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut used = USED.lock().unwrap();
    for _ in 0..100 {
        let p = free_port();
        if !used.contains(&p) {
            used.push(p);
            return p;
        }
    }
    panic!("no unused loopback port after 100 tries");
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub struct Pair {
    dir: Option<tempfile::TempDir>,
    pub a: Host,
    pub b: Host,
    pub link: Option<LinkProxy>,
    /// Usable data size (create-md), equal on both hosts.
    pub size_bytes: u64,
}

impl Pair {
    /// Creates both hosts' backing files and configurations and runs create-md on both.
    pub fn new(spec: PairSpec) -> Pair {
        let dir = scratch_dir();
        let link = spec.proxied.then(LinkProxy::new);
        let a_listen: SocketAddr = format!("127.0.0.1:{}", unique_port()).parse().unwrap();
        let b_listen: SocketAddr = format!("127.0.0.1:{}", unique_port()).parse().unwrap();
        let (a_peer, b_peer) = match &link {
            Some(l) => {
                l.ab.set_target(b_listen);
                l.ba.set_target(a_listen);
                (l.ab.addr(), l.ba.addr())
            }
            None => (b_listen, a_listen),
        };
        let host = |label: &'static str, listen, peer| {
            let d = dir.path().join(label);
            std::fs::create_dir_all(&d).unwrap();
            let image = d.join("disk.img");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(spec.image_bytes)
                .unwrap();
            Host {
                label,
                log: d.join("twinsan.log"),
                config: d.join("twinsan.toml"),
                image,
                dir: d,
                iscsi_port: unique_port(),
                metrics_port: spec.metrics.then(unique_port),
                listen,
                peer,
                server: None,
                portals: None,
                target_extra: String::new(),
                extra: String::new(),
                spec: spec.clone(),
                starts: 0,
            }
        };
        let a = host("A", a_listen, a_peer);
        let b = host("B", b_listen, b_peer);
        a.write_config("primary");
        b.write_config("secondary");
        let token = format!("tok{:x}", rand::random::<u32>());
        let (ua, ub) = match spec.init {
            Init::FullFromA => (a.create_md(&["--initial-sync", "full"]), b.create_md(&[])),
            Init::SkipIdentical => {
                let args = ["--initial-sync", "skip-identical", "--skip-token", &token];
                (a.create_md(&args), b.create_md(&args))
            }
            Init::Prepared => (0, 0),
        };
        assert_eq!(ua, ub, "usable sizes differ");
        assert!(
            spec.init == Init::Prepared || (ua > 0 && ua < spec.image_bytes),
            "usable {ua} of {}",
            spec.image_bytes
        );
        Pair {
            dir: Some(dir),
            a,
            b,
            link,
            size_bytes: ua,
        }
    }

    /// Starts A as primary and B as secondary.
    pub fn start(&mut self) {
        self.a.start("primary");
        self.b.start("secondary");
    }

    pub fn link(&self) -> &LinkProxy {
        self.link.as_ref().expect("pair built with proxied = true")
    }

    /// Polls both hosts every 100 ms until `pred(a, b)` holds; panics after `limit`.
    pub fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut pred: impl FnMut(&Vol, &Vol) -> bool,
    ) -> (Vol, Vol) {
        let deadline = Instant::now() + limit;
        loop {
            let last = match (self.a.status(), self.b.status()) {
                (Ok(a), Ok(b)) if pred(&a, &b) => return (a, b),
                (a, b) => {
                    let f = |r: Result<Vol, String>| r.map(|v| v.brief()).unwrap_or_else(|e| e);
                    format!("A: {} | B: {}", f(a), f(b))
                }
            };
            if Instant::now() >= deadline {
                panic!("timed out after {limit:?} waiting for {what}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both Connected, both UpToDate, nothing out of sync on either side.
    pub fn wait_in_sync(&self, limit: Duration) -> (Vol, Vol) {
        let (a, b) = self.wait(
            "both Connected and UpToDate, nothing out of sync",
            limit,
            |a, b| a.in_sync() && b.in_sync(),
        );
        assert_eq!(
            a.current_uuid & !1,
            b.current_uuid & !1,
            "in sync but different generations"
        );
        assert_eq!(a.size_bytes, self.size_bytes);
        (a, b)
    }

    /// SIGTERM both (B first, so A does not count the disconnect as a failure).
    pub fn stop_both(&mut self) {
        self.b.stop();
        self.a.stop();
    }

    /// The data areas of both backing files must be byte-identical.
    pub fn assert_identical(&self) {
        let (a, b) = (
            self.a.data_area(self.size_bytes),
            self.b.data_area(self.size_bytes),
        );
        let diff = differing_blocks(&a, &b);
        assert!(
            diff.is_empty(),
            "data areas differ in {} blocks of 4 KiB, first: {:?}",
            diff.len(),
            &diff[..diff.len().min(16)]
        );
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.as_ref().unwrap().path().to_path_buf()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for h in [&self.a, &self.b] {
                eprintln!(
                    "----- host {} log (last 150 lines, {}) -----\n{}",
                    h.label,
                    h.log.display(),
                    tail(&h.log_text(), 150)
                );
            }
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}
