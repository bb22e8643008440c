//! Two real `twinsan` daemons with HA (`[ha]`, see the interface contract in the README's HA
//! section) in a network-namespace [`Lab`]: host A and host B replicate LUN 0 over their direct
//! link and share the floating IP [`VIP`] on the LAN; the client namespace reaches the target only
//! through the VIP. Also: the test XAPI served from the bridge namespace, an SMTP sink, a writer of
//! tagged blocks that reconnects after a switchover, fio in the client namespace with a per-I/O
//! latency log, and a monitor of the client's ARP view of the VIP.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twinsan_ha::testxapi::TestXapi;

use super::netns::{self, Lab, Netns, NsChild};
use super::raw::{Progress, TagWriter, WriteOpts, WriteReport};
use super::{bin, fio, run, scratch_dir, tail, text, IQN};

/// The floating IP and its iSCSI portal.
pub const VIP: &str = "10.231.0.100";
pub const ISCSI_PORT: u16 = 3260;
pub const VOLUME: &str = "r0";
const REPL_PORT: u16 = 7788;
const HA_PORT: u16 = 7789;
const SMTP_PORT: u16 = 2525;
const SECRET: &str = "ha-test-secret";
pub const MIB: u64 = 1 << 20;
/// Bound of one CLI call.
const CLI_LIMIT: Duration = Duration::from_secs(20);

pub fn vip_portal() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), ISCSI_PORT)
}

/// The iSCSI URL of LUN 0 behind the VIP.
pub fn vip_url() -> String {
    format!("iscsi://{VIP}:{ISCSI_PORT}/{IQN}/0")
}

/// `[ha] source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Xapi,
    Standalone,
    Manual,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Xapi => "xapi",
            Source::Standalone => "standalone",
            Source::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HaSpec {
    pub source: Source,
    pub image_bytes: u64,
    /// Witness addresses (standalone); default: the bridge namespace, which answers.
    pub witnesses: Vec<String>,
    /// Configure `[ha.xapi]` (a live session with event.from) pointing at the test XAPI.
    pub xapi_session: bool,
    /// Configure `[ha.alerts]` to the SMTP sink in the bridge namespace.
    pub alerts: bool,
    /// `alua = true` on the target, with this host's LAN address as its `host_portals`
    /// (bound in both roles, so an initiator keeps a path to the standby group).
    pub alua: bool,
}

impl HaSpec {
    pub fn new(source: Source) -> HaSpec {
        HaSpec {
            source,
            image_bytes: 64 * MIB,
            witnesses: vec![netns::BRIDGE_ADDR.to_string()],
            xapi_session: source == Source::Xapi,
            alerts: false,
            alua: false,
        }
    }
}

/// One host: namespace, files, daemon.
pub struct HaHost {
    pub label: &'static str,
    /// 0 for A, 1 for B (the test XAPI's host index).
    pub index: usize,
    pub ns: Netns,
    pub dir: PathBuf,
    pub image: PathBuf,
    pub config: PathBuf,
    pub pool_conf: PathBuf,
    pub log: PathBuf,
    pub lan_addr: &'static str,
    pub repl_addr: &'static str,
    pid: Option<u32>,
    starts: u32,
}

/// Runs `twinsan args...` against host `h`'s daemon (noted in its log); panics unless it
/// succeeds, else returns its output.
pub fn ok_cli(h: &HaHost, args: &[&str]) -> String {
    h.note(&format!("twinsan {args:?}"));
    let o = h.cli(args);
    assert!(
        o.status.success(),
        "{}: twinsan {args:?} failed ({}): {}",
        h.label,
        o.status,
        text(&o)
    );
    text(&o)
}

impl HaHost {
    pub fn note(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = writeln!(f, "==== test: {line}");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes pool.conf the way xapi does (a temporary file renamed over it).
    pub fn write_pool_conf(&self, content: &str) {
        let tmp = self.pool_conf.with_extension("tmp");
        std::fs::write(&tmp, format!("{content}\n")).unwrap();
        std::fs::rename(&tmp, &self.pool_conf).unwrap();
        self.note(&format!("pool.conf := {content}"));
    }

    /// `twinsan <args> --config <this host's config>` from the root namespace (the control
    /// socket is a file).
    pub fn cli(&self, args: &[&str]) -> Output {
        run(
            Command::new(bin())
                .args(args)
                .arg("--config")
                .arg(&self.config),
            CLI_LIMIT,
        )
    }

    /// `twinsan status --json`, parsed.
    pub fn status_json(&self) -> Result<serde_json::Value, String> {
        if self.pid.is_none() {
            return Err("not running".into());
        }
        let o = self.cli(&["status", "--json"]);
        if !o.status.success() {
            return Err(format!("status failed: {}", text(&o).trim()));
        }
        serde_json::from_slice(&o.stdout)
            .map_err(|e| format!("status --json is not JSON: {e}: {}", text(&o)))
    }

    /// The `ha` object of `status --json`.
    pub fn ha(&self) -> Result<serde_json::Value, String> {
        let s = self.status_json()?;
        match s.get("ha") {
            Some(h) if h.is_object() => Ok(h.clone()),
            _ => Err(format!("no `ha` object in status: {s}")),
        }
    }

    /// `ha.role`, or the error as text.
    pub fn role(&self) -> String {
        match self.ha() {
            Ok(h) => h["role"].as_str().unwrap_or("?").to_string(),
            Err(e) => format!("<{e}>"),
        }
    }

    /// The test volume's entry in `status --json`.
    pub fn volume(&self) -> Result<serde_json::Value, String> {
        self.status_json()?["volumes"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == VOLUME))
            .cloned()
            .ok_or_else(|| format!("no volume {VOLUME}"))
    }

    /// Replication state of the volume, brief.
    pub fn vol_brief(&self) -> String {
        match self.volume() {
            Ok(v) => format!(
                "{} {} {}/{} oos {}",
                v["role"].as_str().unwrap_or("?"),
                v["connection"].as_str().unwrap_or("?"),
                v["disk_state"].as_str().unwrap_or("?"),
                v["peer_disk_state"].as_str().unwrap_or("-"),
                v["out_of_sync_bytes"]
            ),
            Err(e) => e,
        }
    }

    /// Bytes of application writes this host replicated to its peer (`sent_bytes`).
    pub fn replicated_bytes(&self) -> Option<u64> {
        self.volume().ok()?["sent_bytes"].as_u64()
    }

    pub fn has_vip(&self) -> bool {
        Lab::has_addr(&self.ns, VIP)
    }

    pub fn running(&self) -> bool {
        self.pid.is_some()
    }
}

/// The lab with two HA hosts and the services the tests talk to.
pub struct HaLab {
    pub a: HaHost,
    pub b: HaHost,
    pub spec: HaSpec,
    pub xapi: Option<XapiServer>,
    pub smtp: Option<SmtpSink>,
    /// Usable size of the replicated volume.
    pub size_bytes: u64,
    /// Host `i` is cut off the network ([`HaLab::host_down`]): a VIP still configured on its
    /// downed interface answers nobody.
    pub down: Arc<[AtomicBool; 2]>,
    // Dropped last (declaration order): the lab kills the daemons before the directory goes.
    pub lab: Lab,
    dir: Option<tempfile::TempDir>,
}

impl HaLab {
    /// Builds the namespaces, both hosts' files and configurations, the test XAPI (xapi source)
    /// and the SMTP sink (alerts), and runs `create-md` on both hosts (skip-identical: the fresh
    /// images are identical, all zeroes). Does not start the daemons. `None` when namespaces are
    /// not available (the reason is printed).
    pub fn new_or_skip(test: &str, spec: HaSpec) -> Option<HaLab> {
        let lab = Lab::new_or_skip(test)?;
        let dir = scratch_dir();
        let host = |label: &'static str, index: usize, ns: &Netns, lan, repl| {
            let d = dir.path().join(label);
            std::fs::create_dir_all(&d).unwrap();
            let image = d.join("disk.img");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(spec.image_bytes)
                .unwrap();
            HaHost {
                label,
                index,
                ns: ns.clone(),
                config: d.join("twinsan.toml"),
                pool_conf: d.join("pool.conf"),
                log: d.join("twinsan.log"),
                image,
                dir: d,
                lan_addr: lan,
                repl_addr: repl,
                pid: None,
                starts: 0,
            }
        };
        let a = host("A", 0, &lab.a, netns::A_ADDR, netns::A_REPL);
        let b = host("B", 1, &lab.b, netns::B_ADDR, netns::B_REPL);
        let xapi = (spec.source == Source::Xapi).then(|| XapiServer::start(&lab.bridge));
        let smtp = spec.alerts.then(|| SmtpSink::start(&lab.bridge));
        let mut l = HaLab {
            a,
            b,
            spec,
            xapi,
            smtp,
            size_bytes: 0,
            down: Arc::new([AtomicBool::new(false), AtomicBool::new(false)]),
            lab,
            dir: Some(dir),
        };
        if l.spec.source == Source::Xapi {
            l.a.write_pool_conf("master");
            l.b.write_pool_conf(&format!("slave:{}", netns::XAPI_ADDRS[0]));
        }
        l.write_config(0);
        l.write_config(1);
        let token = format!("tok{:x}", rand::random::<u32>());
        let mut sizes = Vec::new();
        for h in [&l.a, &l.b] {
            let o = run(
                Command::new(bin())
                    .args(["replication", "create-md", "--config"])
                    .arg(&h.config)
                    .args(["--volume", VOLUME])
                    .args(["--initial-sync", "skip-identical", "--skip-token", &token]),
                CLI_LIMIT,
            );
            let out = text(&o);
            assert!(o.status.success(), "{}: create-md failed: {out}", h.label);
            let usable = out
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(3)
                .find(|w| w[0] == "size" && w[2].starts_with("bytes"))
                .and_then(|w| w[1].parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{}: no usable size in: {out}", h.label));
            sizes.push(usable);
        }
        assert_eq!(sizes[0], sizes[1]);
        l.size_bytes = sizes[0];
        Some(l)
    }

    pub fn host(&self, i: usize) -> &HaHost {
        [&self.a, &self.b][i]
    }

    fn host_mut(&mut self, i: usize) -> &mut HaHost {
        if i == 0 {
            &mut self.a
        } else {
            &mut self.b
        }
    }

    /// (Re)writes host `i`'s configuration from the spec.
    pub fn write_config(&self, i: usize) {
        let h = self.host(i);
        let peer = self.host(1 - i);
        let s = &self.spec;
        let witnesses = s
            .witnesses
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cfg = format!(
            r#"[server]
data_dir = "{data}"

[[target]]
iqn = "{IQN}"
portals = ["{VIP}:{ISCSI_PORT}"]
{alua}
[[target.lun]]
number = 0
path = "{image}"

[target.lun.replication]
name = "{VOLUME}"
listen = "{repl}:{REPL_PORT}"
peer = "{peer_repl}:{REPL_PORT}"
secret = "{SECRET}"
meta = "internal"
role = "secondary"
ping_interval_secs = 1
timeout_secs = 3

[ha]
source = "{source}"
node = "host-{label}"
listen = "{repl}:{HA_PORT}"
peer = "{peer_repl}:{HA_PORT}"
management_listen = "{lan}:{HA_PORT}"
management_peer = "{peer_lan}:{HA_PORT}"
secret = "{SECRET}"
heartbeat_interval_ms = 200
peer_timeout_ms = 1500
witnesses = [{witnesses}]
witness_port = 0
preferred_primary = {preferred}
pool_conf = "{pool_conf}"
state_file = "{state}"
garp_count = 3
garp_interval_ms = 100

[[ha.vip]]
address = "{VIP}/{plen}"
interface = "{lan_if}"
label = "tsan"
"#,
            data = h.dir.join("data").display(),
            image = h.image.display(),
            repl = h.repl_addr,
            peer_repl = peer.repl_addr,
            lan = h.lan_addr,
            peer_lan = peer.lan_addr,
            source = s.source.name(),
            label = h.label.to_lowercase(),
            preferred = i == 0,
            pool_conf = h.pool_conf.display(),
            state = h.dir.join("ha-state.toml").display(),
            plen = netns::PREFIX_LEN,
            lan_if = netns::LAN_IF,
            alua = if s.alua {
                format!(
                    "alua = true\nhost_portals = [\"{}:{ISCSI_PORT}\"]\n",
                    h.lan_addr
                )
            } else {
                String::new()
            },
        );
        if let (true, Some(x)) = (s.xapi_session, &self.xapi) {
            cfg.push_str(&format!(
                r#"
[ha.xapi]
url = "http://{addr}:{port}/"
user = "{user}"
password = "{password}"
timeout_ms = 2000
host_uuid = "{uuid}"
"#,
                addr = netns::XAPI_ADDRS[i],
                uuid = twinsan_ha::testxapi::host_uuid(i),
                port = x.port,
                user = twinsan_ha::testxapi::USER,
                password = twinsan_ha::testxapi::PASSWORD,
            ));
        }
        if let Some(m) = &self.smtp {
            cfg.push_str(&format!(
                r#"
[ha.alerts]
smtp_server = "{server}"
smtp_port = {port}
smtp_tls = "none"
from = "twinsan@host-{label}"
to = ["ops@example.org"]
subject = "twinsan alert from host-{label}"
suppress_minutes = 30
startup_quiet_secs = 0
xencenter = true
"#,
                server = netns::BRIDGE_ADDR,
                port = m.port,
                label = h.label.to_lowercase(),
            ));
        }
        std::fs::write(&h.config, cfg).unwrap();
    }

    /// Starts host `i`'s daemon in its namespace and waits (bounded) for its control socket.
    pub fn start(&mut self, i: usize) {
        assert!(
            self.host(i).pid.is_none(),
            "{} already running",
            self.host(i).label
        );
        let h = self.host(i);
        let mut cmd = h.ns.command(bin());
        cmd.args(["serve", "--config"]).arg(&h.config).env(
            "RUST_LOG",
            std::env::var("TWINSAN_LOG").unwrap_or_else(|_| "info".into()),
        );
        h.note(&format!("start #{}", h.starts + 1));
        let pid = self.lab.spawn(cmd, &format!("twinsan {}", h.label), &h.log);
        let h = self.host_mut(i);
        h.pid = Some(pid);
        h.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let h = self.host(i);
            match h.status_json() {
                Ok(_) => return,
                Err(e) => {
                    let exited = self.lab.with_child(pid, |c| !c.running()).unwrap_or(true);
                    if exited || Instant::now() > deadline {
                        panic!(
                            "{}: daemon {} ({e}); log:\n{}",
                            h.label,
                            if exited {
                                "exited at start"
                            } else {
                                "has no control socket after 20 s"
                            },
                            tail(&h.log_text(), 60)
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn start_both(&mut self) {
        self.start(0);
        self.start(1);
    }

    fn take(&mut self, i: usize) -> Option<NsChild> {
        let pid = self.host_mut(i).pid.take()?;
        self.lab.take(pid)
    }

    /// SIGKILL host `i`'s daemon (a crash).
    pub fn kill(&mut self, i: usize) {
        self.host(i).note("SIGKILL");
        if let Some(mut c) = self.take(i) {
            c.kill();
        }
    }

    /// SIGTERM host `i`'s daemon; it must exit by itself within 20 s.
    pub fn stop(&mut self, i: usize) {
        self.host(i).note("SIGTERM");
        if let Some(mut c) = self.take(i) {
            let t = Instant::now();
            let st = c.terminate(Duration::from_secs(20));
            let h = self.host(i);
            match st {
                Some(st) => h.note(&format!("exited ({st}) after {:.2?}", t.elapsed())),
                None => panic!(
                    "{}: daemon did not exit within 20 s of SIGTERM; log:\n{}",
                    h.label,
                    tail(&h.log_text(), 60)
                ),
            }
        }
    }

    /// Whether host `i`'s daemon process is still alive.
    pub fn alive(&mut self, i: usize) -> bool {
        match self.host(i).pid {
            Some(pid) => self.lab.with_child(pid, |c| c.running()).unwrap_or(false),
            None => false,
        }
    }

    /// Polls until `pred(a_ha, b_ha)` holds on the `ha` objects of both hosts' status (a host
    /// that is not running gives `Null`); panics with both states after `limit`.
    pub fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut pred: impl FnMut(&serde_json::Value, &serde_json::Value) -> bool,
    ) -> Duration {
        let t0 = Instant::now();
        let deadline = t0 + limit;
        loop {
            let get = |h: &HaHost| {
                if h.running() {
                    h.ha().unwrap_or(serde_json::Value::Null)
                } else {
                    serde_json::Value::Null
                }
            };
            let (a, b) = (get(&self.a), get(&self.b));
            if pred(&a, &b) {
                return t0.elapsed();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}\nA: {a}\nB: {b}\nA volume: {}\nB volume: {}",
                    self.a.vol_brief(),
                    self.b.vol_brief()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until host `i` is primary, serving, holding the VIP, and the other is secondary (or
    /// down), and the replicated volume is connected and in sync when both run.
    pub fn wait_primary(&self, i: usize, limit: Duration) -> Duration {
        let both = self.a.running() && self.b.running();
        let t = self.wait(
            &format!("{} primary and serving", self.host(i).label),
            limit,
            |a, b| {
                let (p, s) = if i == 0 { (a, b) } else { (b, a) };
                p["role"] == "primary"
                    && p["target_serving"] == true
                    && p["vips"]
                        .as_array()
                        .is_some_and(|v| v.iter().all(|x| x["local"] == true))
                    && (s.is_null() || s["role"] == "secondary")
            },
        );
        assert!(
            self.host(i).has_vip(),
            "{} lacks the VIP",
            self.host(i).label
        );
        if both {
            assert!(
                !self.host(1 - i).has_vip(),
                "{} holds the VIP too",
                self.host(1 - i).label
            );
            self.wait_in_sync(limit);
        }
        t
    }

    /// Both volumes Connected, UpToDate and with nothing out of sync.
    pub fn wait_in_sync(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = |h: &HaHost| {
                h.volume().is_ok_and(|v| {
                    v["connection"] == "Connected"
                        && v["disk_state"] == "UpToDate"
                        && v["peer_disk_state"] == "UpToDate"
                        && v["out_of_sync_bytes"] == 0
                })
            };
            if ok(&self.a) && ok(&self.b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas not in sync after {limit:?}: A {} | B {}",
                self.a.vol_brief(),
                self.b.vol_brief()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes host `i` the pool master the way a designate-new-master does: the XAPI's pool
    /// record changes (event.from fires), then pool.conf on the new master says `master`
    /// and on the old one `slave:<new master>`.
    pub fn flip_master(&self, i: usize) {
        let x = self.xapi.as_ref().expect("xapi source");
        x.xapi.set_master(i);
        self.host(i).write_pool_conf("master");
        self.host(1 - i)
            .write_pool_conf(&format!("slave:{}", netns::XAPI_ADDRS[i]));
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.as_ref().unwrap().path().to_path_buf()
    }

    /// Takes host `i` off the network (LAN and replication link down), as a host that crashed
    /// looks to everyone else.
    pub fn host_down(&self, i: usize) {
        let h = self.host(i);
        h.note("links down");
        self.down[i].store(true, Ordering::SeqCst);
        h.ns.ip(&["link", "set", netns::LAN_IF, "down"]);
        h.ns.ip(&["link", "set", netns::REPL_IF, "down"]);
    }

    /// Brings host `i`'s links up again.
    pub fn host_up(&self, i: usize) {
        let h = self.host(i);
        h.note("links up");
        h.ns.ip(&["link", "set", netns::REPL_IF, "up"]);
        h.ns.ip(&["link", "set", netns::LAN_IF, "up"]);
        self.down[i].store(false, Ordering::SeqCst);
    }

    /// Host `i` holds the VIP on a link that is up (so it answers ARP for it).
    pub fn answers_vip(&self, i: usize) -> bool {
        !self.down[i].load(Ordering::SeqCst) && self.host(i).has_vip()
    }
}

impl Drop for HaLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for h in [&self.a, &self.b] {
                eprintln!(
                    "----- host {} log (last 120 lines, {}) -----\n{}",
                    h.label,
                    h.log.display(),
                    tail(&h.log_text(), 120)
                );
            }
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Test XAPI in the bridge namespace
// ---------------------------------------------------------------------------------------

/// The in-process test XAPI, its two hosts' servers listening on [`netns::XAPI_ADDRS`] inside
/// the bridge namespace (reachable from A and B over the LAN), driven by a runtime on a thread
/// that entered that namespace.
pub struct XapiServer {
    pub xapi: Arc<TestXapi>,
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl XapiServer {
    pub fn start(ns: &Netns) -> XapiServer {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let addrs: [IpAddr; 2] = netns::XAPI_ADDRS.map(|a| a.parse().unwrap());
                let x = Arc::new(TestXapi::start_on(addrs).await.expect("test XAPI"));
                tx.send(x.clone()).unwrap();
                let _ = stopped.await;
            });
        });
        let xapi = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("test XAPI start");
        let port = xapi.endpoint(0).port;
        XapiServer {
            xapi,
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for XapiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// SMTP sink
// ---------------------------------------------------------------------------------------

/// One message the sink received.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

/// A minimal SMTP server (RFC 5321 sections 3.3 and 4.1: greeting, EHLO/HELO, MAIL, RCPT,
/// DATA with dot-stuffing, RSET, NOOP, QUIT) in the bridge namespace that records every message.
pub struct SmtpSink {
    pub port: u16,
    pub mails: Arc<Mutex<Vec<Mail>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SmtpSink {
    pub fn start(ns: &Netns) -> SmtpSink {
        let mails = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let listener =
            ns.with(|| TcpListener::bind((netns::BRIDGE_ADDR, SMTP_PORT)).expect("SMTP sink bind"));
        listener.set_nonblocking(true).unwrap();
        let (m, s) = (mails.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        if let Err(e) = smtp_session(conn, &m) {
                            eprintln!("SMTP sink: session ended: {e}");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SmtpSink {
            port: SMTP_PORT,
            mails,
            stop,
            thread: Some(thread),
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn smtp_session(conn: TcpStream, mails: &Mutex<Vec<Mail>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 sink.test ESMTP twinsan test sink\r\n")?;
    let (mut from, mut to) = (String::new(), Vec::new());
    // Bounded: a session of an alert is a handful of commands.
    for _ in 0..200 {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            w.write_all(b"250-sink.test\r\n250 8BITMIME\r\n")?;
        } else if let Some(a) = upper.strip_prefix("MAIL FROM:") {
            from = cmd[cmd.len() - a.len()..].trim().to_string();
            to.clear();
            w.write_all(b"250 OK\r\n")?;
        } else if let Some(a) = upper.strip_prefix("RCPT TO:") {
            to.push(cmd[cmd.len() - a.len()..].trim().to_string());
            w.write_all(b"250 OK\r\n")?;
        } else if upper == "DATA" {
            w.write_all(b"354 end with <CRLF>.<CRLF>\r\n")?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                if l.trim_end_matches(['\r', '\n']) == "." {
                    break;
                }
                let l = l.strip_prefix('.').map(str::to_string).unwrap_or(l);
                data.push_str(&l);
                if data.len() > 1 << 20 {
                    return Err(std::io::Error::other("message over 1 MiB"));
                }
            }
            mails.lock().unwrap().push(Mail {
                from: from.clone(),
                to: to.clone(),
                data,
            });
            w.write_all(b"250 OK queued\r\n")?;
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else if upper == "RSET" || upper == "NOOP" {
            w.write_all(b"250 OK\r\n")?;
        } else {
            w.write_all(b"502 not implemented\r\n")?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Clients in the client namespace
// ---------------------------------------------------------------------------------------

/// Result of a [`spawn_resuming_writer`] run: one [`WriteReport`] per connection.
#[derive(Debug, Default)]
pub struct ResumeReport {
    pub rounds: Vec<WriteReport>,
    /// Block -> highest acknowledged sequence number over all rounds.
    pub acked: BTreeMap<u64, u64>,
    /// How long each reconnection took (connection lost -> logged in again).
    pub reconnects: Vec<Duration>,
    /// Why the run ended.
    pub end: String,
    /// When the writer started, and when it stopped issuing (its time bound, or giving up).
    pub started: Option<Instant>,
    pub stopped: Option<Instant>,
}

impl ResumeReport {
    pub fn good(&self) -> u64 {
        self.rounds.iter().map(|r| r.good()).sum()
    }

    pub fn failed(&self) -> u64 {
        self.rounds.iter().map(|r| r.failed).sum()
    }

    pub fn notes(&self) -> Vec<String> {
        self.rounds.iter().flat_map(|r| r.notes.clone()).collect()
    }

    /// The longest time without an acknowledged write, from the first acknowledgement until the
    /// writer stopped issuing (so a connection that hangs to the end counts in full).
    pub fn max_pause(&self) -> Duration {
        let mut at: Vec<Instant> = self
            .rounds
            .iter()
            .flat_map(|r| r.done.iter().filter(|d| d.good).map(|d| d.at))
            .collect();
        at.sort();
        if let (Some(&last), Some(stopped)) = (at.last(), self.stopped) {
            if stopped > last {
                at.push(stopped);
            }
        }
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} connections, {} acked, {} failed, {} distinct blocks, reconnects {:.3?}, longest pause {:.3?}; rounds ended: {:?}; end: {}",
            self.rounds.len(),
            self.good(),
            self.failed(),
            self.acked.len(),
            self.reconnects,
            self.max_pause(),
            self.rounds.iter().map(|r| r.end.clone()).collect::<Vec<_>>(),
            self.end
        )
    }
}

/// Writes tagged blocks to the VIP from the client namespace for `total`, logging in again
/// whenever the connection is lost (at most `reconnect_limit` of trying each time), as an
/// initiator with a replacement timeout does (each login attempt gives up after 250 ms, so the
/// measured pause is not rounded up to a long connect timeout). Round `k` tags its writes with iteration
/// `opts.iteration + k`, so sequence numbers grow across rounds.
pub fn spawn_resuming_writer(
    client: &Netns,
    opts: WriteOpts,
    total: Duration,
    reconnect_limit: Duration,
    progress: Arc<Progress>,
) -> JoinHandle<ResumeReport> {
    client.thread(move || {
        let t0 = Instant::now();
        let mut rep = ResumeReport {
            started: Some(t0),
            ..ResumeReport::default()
        };
        let mut lost_at: Option<Instant> = None;
        let mut round = 0u64;
        // Bounded by `total` and the reconnect limit; at most 1000 connections.
        while round < 1000 {
            if t0.elapsed() >= total || progress.stop.load(Ordering::SeqCst) {
                rep.end = "done".into();
                rep.stopped = Some(Instant::now().min(t0 + total));
                break;
            }
            let try_from = lost_at.unwrap_or_else(Instant::now);
            let mut w = match TagWriter::connect_at(vip_portal(), Duration::from_millis(250)) {
                Ok(w) => w,
                Err(e) => {
                    if try_from.elapsed() > reconnect_limit {
                        rep.end = format!("no login within {reconnect_limit:?}: {e}");
                        rep.stopped = Some(Instant::now());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            if let Some(l) = lost_at.take() {
                rep.reconnects.push(l.elapsed());
            }
            let mut o = opts.clone();
            o.iteration = opts.iteration + round;
            o.max_time = total.saturating_sub(t0.elapsed());
            round += 1;
            let r = w.run(&o, &progress);
            for (&b, &s) in &r.acked {
                let e = rep.acked.entry(b).or_insert(s);
                *e = (*e).max(s);
            }
            let lost = r.end.contains("connection lost") || r.end.contains("send failed");
            rep.rounds.push(r);
            if lost {
                lost_at = Some(Instant::now());
            }
        }
        rep
    })
}

/// Outcome of one fio run against the VIP.
#[derive(Debug)]
pub struct FioRun {
    pub output: Output,
    pub json: Option<serde_json::Value>,
    /// Longest single I/O latency in the per-I/O log.
    pub max_latency: Duration,
    /// Longest gap between consecutive I/O completions.
    pub max_gap: Duration,
    pub completions: usize,
}

impl FioRun {
    pub fn text(&self) -> String {
        text(&self.output)
    }

    /// fio exited 0, its job reported no error and the output has no verify failure.
    pub fn clean(&self) -> Result<(), String> {
        let out = self.text();
        if !self.output.status.success() {
            return Err(format!("fio exited with {}", self.output.status));
        }
        if out.contains("verify: bad")
            || out.contains("bad magic")
            || out.contains("crc32c: verify failed")
        {
            return Err("fio verify error".into());
        }
        let job = self
            .json
            .as_ref()
            .map(|j| j["jobs"][0].clone())
            .ok_or("no fio JSON")?;
        if job["error"].as_i64() != Some(0) {
            return Err(format!("fio job error {}", job["error"]));
        }
        Ok(())
    }

    pub fn bytes(&self, dir: &str) -> u64 {
        self.json
            .as_ref()
            .and_then(|j| j["jobs"][0][dir]["io_bytes"].as_u64())
            .unwrap_or(0)
    }
}

/// Starts fio (libiscsi engine) in the client namespace against the VIP: `rw` for `runtime_s`
/// (time based), 4 KiB blocks, queue depth 8, with `verify` crc32c (verify_fatal) when asked;
/// every I/O's latency goes to a log in `dir`. Returns a handle to join for the result.
pub fn spawn_fio(
    client: &Netns,
    dir: &Path,
    name: &str,
    rw: &str,
    runtime_s: u32,
    size: u64,
    verify: bool,
) -> JoinHandle<FioRun> {
    let filename = vip_url().replace(':', "\\:");
    let prefix = dir.join(name);
    let mut cmd = client.command(fio());
    // libiscsi 1.19 sends a PDU's data with writev(2), which cannot pass MSG_NOSIGNAL: when a
    // failover closes the connection under a write, the kernel raises SIGPIPE and kills fio's
    // job process, and fio's parent then crashes (SIGSEGV) freeing the dead job's options.
    // qemu, libiscsi's main user, ignores SIGPIPE; fio does the same here, so libiscsi sees
    // EPIPE and reconnects as it does for any other connection loss. An ignored disposition
    // survives exec (through `ip netns exec` to fio).
    // SAFETY: the closure only calls signal(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(())
        });
    }
    cmd.args([
        &format!("--name={name}"),
        "--ioengine=libiscsi",
        &format!("--filename={filename}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        "--iodepth=8",
        &format!("--size={size}"),
        "--time_based",
        &format!("--runtime={runtime_s}"),
        "--log_avg_msec=0",
        &format!("--write_lat_log={}", prefix.display()),
        "--output-format=json",
    ]);
    if verify {
        cmd.args([
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_backlog=512",
            "--verify_state_save=0",
        ]);
    }
    let limit = Duration::from_secs(runtime_s as u64 + 90);
    std::thread::spawn(move || {
        let output = run(&mut cmd, limit);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let json = stdout
            .find('{')
            .and_then(|i| serde_json::from_str(&stdout[i..]).ok());
        let (max_latency, max_gap, completions) = lat_log_stats(&prefix);
        FioRun {
            output,
            json,
            max_latency,
            max_gap,
            completions,
        }
    })
}

/// Longest latency and longest gap between completions in fio's `<prefix>_lat.*.log` files
/// (lines `time_ms, latency_ns, ddir, bs, offset`).
fn lat_log_stats(prefix: &Path) -> (Duration, Duration, usize) {
    let dir = prefix.parent().unwrap();
    let stem = format!("{}_lat.", prefix.file_name().unwrap().to_string_lossy());
    let mut max_lat = 0u64;
    let mut times = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if !n.starts_with(&stem) {
            continue;
        }
        for line in std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
        {
            let mut f = line.split(',').map(str::trim);
            let (Some(t), Some(l)) = (f.next(), f.next()) else {
                continue;
            };
            let (Ok(t), Ok(l)) = (t.parse::<u64>(), l.parse::<u64>()) else {
                continue;
            };
            max_lat = max_lat.max(l);
            times.push(t);
        }
    }
    times.sort_unstable();
    let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    (
        Duration::from_nanos(max_lat),
        Duration::from_millis(gap),
        times.len(),
    )
}

// ---------------------------------------------------------------------------------------
// The client's view of the VIP
// ---------------------------------------------------------------------------------------

/// MACs that answered one ARP request burst for the VIP from the client (`arping`).
pub fn arp_answers(client: &Netns) -> BTreeSet<String> {
    let o = client.run(
        "arping",
        &["-c", "2", "-w", "1", "-I", netns::LAN_IF, VIP],
        Duration::from_secs(5),
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| {
            let s = l.find('[')?;
            let e = l[s..].find(']')? + s;
            Some(l[s + 1..e].to_ascii_lowercase())
        })
        .collect()
}

/// Watches, until stopped, who holds the VIP: both hosts' addresses and the client's ARP view
/// (answers to its ARP requests, and its neighbour entry). Any sample where the VIP is on both
/// hosts, or two MACs answer one ARP burst, is a violation.
pub struct VipMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<VipReport>>,
}

#[derive(Debug, Default, Clone)]
pub struct VipReport {
    pub samples: u64,
    pub violations: Vec<String>,
    /// Distinct MACs seen answering (over the whole run).
    pub macs_seen: BTreeSet<String>,
}

impl VipMonitor {
    pub fn start(lab: &HaLab, limit: Duration) -> VipMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (a, b, client) = (lab.a.ns.clone(), lab.b.ns.clone(), lab.lab.client.clone());
        let down = lab.down.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut rep = VipReport::default();
            while !s.load(Ordering::SeqCst) && t0.elapsed() < limit {
                let up = |i: usize| !down[i].load(Ordering::SeqCst);
                let (on_a, on_b) = (
                    up(0) && Lab::has_addr(&a, VIP),
                    up(1) && Lab::has_addr(&b, VIP),
                );
                let answers = arp_answers(&client);
                let neigh = netns::neigh_macs(&client.ip(&["neigh", "show", VIP]));
                rep.samples += 1;
                rep.macs_seen.extend(answers.iter().cloned());
                if on_a && on_b {
                    rep.violations.push(format!(
                        "{:.2?}: VIP configured on both A and B",
                        t0.elapsed()
                    ));
                }
                if answers.len() > 1 {
                    rep.violations.push(format!(
                        "{:.2?}: two MACs answered the client's ARP for the VIP: {answers:?} (neigh {neigh:?})",
                        t0.elapsed()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            rep
        });
        VipMonitor {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> VipReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("VIP monitor")
    }
}

impl Drop for VipMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until host `i` replicates at least `bytes` more of the client's writes: the
/// client (`fio`, handed back) has found the new primary and its I/O flows again (an
/// operator checks this before taking the other host down). If fio has exited instead, the
/// panic shows its output: a client that died is not the same failure as one still waiting.
pub fn wait_client_writes_through(
    lab: &HaLab,
    i: usize,
    bytes: u64,
    limit: Duration,
    fio: JoinHandle<FioRun>,
) -> JoinHandle<FioRun> {
    let h = lab.host(i);
    let t0 = Instant::now();
    let mut base = None;
    loop {
        if let Some(now) = h.replicated_bytes() {
            let b = *base.get_or_insert(now);
            if now >= b + bytes {
                return fio;
            }
        }
        if t0.elapsed() > limit || fio.is_finished() {
            let client = if fio.is_finished() {
                match fio.join() {
                    Ok(f) => format!("fio had exited ({}):\n{}", f.output.status, f.text()),
                    Err(_) => "fio's thread panicked".to_string(),
                }
            } else {
                "fio still running".to_string()
            };
            panic!(
                "{}: client writes did not flow through it within {:?} (replicated {:?}, started at {:?}; {}); {client}",
                h.label,
                t0.elapsed(),
                h.replicated_bytes(),
                base,
                h.vol_brief()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls from the client namespace until an iSCSI login to the VIP works and the VIP is held by
/// host `i` only; returns the time it took. Panics after `limit`.
pub fn wait_serving_on(lab: &HaLab, i: usize, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let client = lab.lab.client.clone();
    loop {
        if lab.answers_vip(i) && !lab.answers_vip(1 - i) {
            let ok = client
                .with(|| TagWriter::connect_at(vip_portal(), Duration::from_millis(500)).is_ok());
            if ok {
                return t0.elapsed();
            }
        }
        if t0.elapsed() > limit {
            panic!(
                "{} not serving on the VIP after {limit:?}: A role {} VIP {}, B role {} VIP {}",
                lab.host(i).label,
                lab.a.role(),
                lab.a.has_vip(),
                lab.b.role(),
                lab.b.has_vip()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
