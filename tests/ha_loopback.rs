//! The HA role loop of two real `twinsan` processes on loopback: standalone source, heartbeats
//! over 127.0.0.1, a TCP witness held by the test, no VIP (VIPs need network namespaces: see the
//! namespace acceptance tests). Checks start-up roles, operator commands and their refusals,
//! the persisted manual mode, takeover after SIGKILL and that there is no automatic fail-back.

mod common;

use common::{bin, free_port, run, scratch_dir, text};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLI: Duration = Duration::from_secs(30);

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    name: &'static str,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    portal: u16,
    child: Option<Child>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    fn new(
        base: &Path,
        name: &'static str,
        hb: u16,
        peer_hb: u16,
        portal: u16,
        witness_port: u16,
        preferred: bool,
        mgmt: (u16, u16),
    ) -> Node {
        let ha = format!(
            r#"source = "standalone"
management_listen = "127.0.0.1:{}"
management_peer = "127.0.0.1:{}"
witnesses = ["127.0.0.1"]
witness_port = {witness_port}
witness_interval_ms = 200
witness_timeout_ms = 200
preferred_primary = {preferred}
"#,
            mgmt.0, mgmt.1
        );
        Node::with_ha(base, name, hb, peer_hb, portal, &ha, "")
    }

    /// A node whose `[ha]` table gets `ha` (source and its keys) and `tail` (sub-tables).
    fn with_ha(
        base: &Path,
        name: &'static str,
        hb: u16,
        peer_hb: u16,
        portal: u16,
        ha: &str,
        tail: &str,
    ) -> Node {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("twinsan.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
data_dir = "{data}"

[[target]]
iqn = "iqn.2026-11.org.twinsan.test:ha"
portals = ["127.0.0.1:{portal}"]

[[target.lun]]
number = 0
path = "{img}"
size = "16MiB"

[ha]
node = "{name}"
listen = "127.0.0.1:{hb}"
peer = "127.0.0.1:{peer_hb}"
secret = "loopback-ha-secret"
heartbeat_interval_ms = 50
peer_timeout_ms = 400
{ha}
{tail}
"#,
                data = dir.join("data").display(),
                img = dir.join("lun0.img").display(),
            ),
        )
        .unwrap();
        Node {
            name,
            log: dir.join("twinsan.log"),
            dir,
            config,
            portal,
            child: None,
        }
    }

    fn start(&mut self) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(bin())
                .args(["serve", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .unwrap(),
        );
        // Wait for the control socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_status().is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: no control socket; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let o = run(
            Command::new(bin())
                .args(args)
                .arg("--config")
                .arg(&self.config),
            CLI,
        );
        (o.status.success(), text(&o))
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let (ok, out) = self.cli(&["status", "--json"]);
        if !ok {
            return None;
        }
        let start = out.find('{')?;
        serde_json::from_str(&out[start..]).ok()
    }

    fn ha(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("{}: status failed; log:\n{}", self.name, self.log_text()))
            ["ha"]
            .clone()
    }

    fn wait_role(&self, role: &str, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let ha = self.ha();
            if ha["role"] == role && ha["target_serving"] == (role == "primary") {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < limit,
                "{}: not {role} within {limit:?}: {ha}\nlog:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn serving(&self) -> bool {
        TcpStream::connect_timeout(
            &format!("127.0.0.1:{}", self.portal).parse().unwrap(),
            Duration::from_millis(200),
        )
        .is_ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn standalone_pair_on_loopback() {
    let base = scratch_dir();
    let witness = TcpListener::bind("127.0.0.1:0").unwrap();
    let wport = witness.local_addr().unwrap().port();
    let (hb_a, hb_b) = (free_udp(), free_udp());
    let (mg_a, mg_b) = (free_udp(), free_udp());
    let mut a = Node::new(
        base.path(),
        "a",
        hb_a,
        hb_b,
        free_port(),
        wport,
        true,
        (mg_a, mg_b),
    );
    let mut b = Node::new(
        base.path(),
        "b",
        hb_b,
        hb_a,
        free_port(),
        wport,
        false,
        (mg_b, mg_a),
    );
    a.start();
    b.start();

    // The preferred host becomes primary once it heard the peer is secondary.
    a.wait_role("primary", Duration::from_secs(10));
    b.wait_role("secondary", Duration::from_secs(5));
    assert!(a.serving(), "primary's portal must accept connections");
    assert!(!b.serving(), "secondary's portal must be closed");
    let ha = b.ha();
    assert_eq!(ha["peer_replication"], "primary", "{ha}");
    assert_eq!(ha["peer_management"], "primary", "{ha}");
    assert_eq!(ha["peer_node"], "a", "{ha}");
    assert_eq!(ha["witness"], true, "{ha}");
    assert_eq!(ha["node"], "b");
    assert_eq!(ha["source"], "standalone");
    assert_eq!(a.ha()["counters"]["promotions"], 1);

    // Operator rules: become-primary needs manual mode, and is refused while the peer is
    // primary; manual mode persists in the state file.
    let (ok, out) = b.cli(&["become-primary"]);
    assert!(!ok && out.contains("manual mode"), "{out}");
    let (ok, out) = b.cli(&["manual-mode-enable"]);
    assert!(ok, "{out}");
    let state = std::fs::read_to_string(b.dir.join("data/ha-state.toml")).unwrap();
    assert!(state.contains("manual = true"), "{state}");
    let (ok, out) = b.cli(&["become-primary"]);
    assert!(!ok && out.contains("peer is primary"), "{out}");
    assert_eq!(b.ha()["role"], "secondary");
    assert!(b.ha()["counters"]["refusals"].as_u64().unwrap() >= 2);
    // A sees B's manual flag through the heartbeats.
    let t0 = Instant::now();
    while a.ha()["peer_manual"] != true {
        assert!(t0.elapsed() < Duration::from_secs(3), "{}", a.ha());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, out) = b.cli(&["manual-mode-disable"]);
    assert!(ok, "{out}");
    assert_eq!(b.ha()["manual"], false);

    // `get` masks the secret; `log` returns recent lines.
    let (ok, out) = b.cli(&["get"]);
    assert!(
        ok && out.contains("***") && !out.contains("loopback-ha-secret"),
        "{out}"
    );
    let (ok, out) = b.cli(&["log"]);
    assert!(ok && out.contains("operator command"), "{out}");

    // Crash of the primary: B takes over once A is silent (400 ms) and the witness answers.
    a.kill();
    let took = b.wait_role("primary", Duration::from_secs(10));
    assert!(b.serving());
    eprintln!("takeover after SIGKILL: serving on b after {took:?}");
    assert!(took < Duration::from_secs(3), "takeover took {took:?}");

    // A returns: it stays secondary (no automatic fail-back, even though preferred).
    a.start();
    a.wait_role("secondary", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1000));
    let ha = a.ha();
    assert_eq!(ha["role"], "secondary", "{ha}");
    assert_eq!(ha["peer_replication"], "primary", "{ha}");
    assert!(!a.serving());
    assert_eq!(b.ha()["role"], "primary");

    // Planned move back in manual mode: B steps down, A steps up.
    for n in [&a, &b] {
        let (ok, out) = n.cli(&["manual-mode-enable"]);
        assert!(ok, "{out}");
    }
    let t0 = Instant::now();
    let (ok, out) = b.cli(&["become-secondary"]);
    assert!(ok, "{out}");
    let t_demoted = t0.elapsed();
    // A must hear that B is secondary before it may promote.
    let t1 = Instant::now();
    loop {
        let (ok, out) = a.cli(&["become-primary"]);
        if ok {
            break;
        }
        assert!(
            out.contains("peer is primary") && t1.elapsed() < Duration::from_secs(3),
            "{out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "planned switchover: demote {t_demoted:?}, promote done {:?} after",
        t1.elapsed()
    );
    assert!(a.serving() && !b.serving());
    drop(witness);
}

/// A node following test XAPI host `i` (pool.conf says `pool`), with `ha` added to its `[ha]`
/// table; alerts are not muted after start.
fn xapi_node(
    base: &Path,
    xapi: &twinsan_ha::testxapi::TestXapi,
    name: &'static str,
    i: usize,
    (hb, peer_hb): (u16, u16),
    pool: &str,
    ha: &str,
) -> Node {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let pool_conf = dir.join("pool.conf");
    std::fs::write(&pool_conf, pool).unwrap();
    let ha = format!(
        "source = \"xapi\"\npool_conf = \"{}\"\n{ha}",
        pool_conf.display()
    );
    let tail = format!(
        r#"[ha.xapi]
url = "http://{addr}:{port}/"
user = "{user}"
password = "{password}"
host_uuid = "{uuid}"
timeout_ms = 2000
event_timeout_secs = 5

[ha.alerts]
startup_quiet_secs = 0
"#,
        addr = xapi.address(i),
        port = xapi.endpoint(i).port,
        user = twinsan_ha::testxapi::USER,
        password = twinsan_ha::testxapi::PASSWORD,
        uuid = twinsan_ha::testxapi::host_uuid(i),
    );
    Node::with_ha(base, name, hb, peer_hb, free_port(), &ha, &tail)
}

/// Source `xapi` against the in-process test XAPI: the pool master moves by XAPI alone
/// (pool.conf unchanged), the storage role follows within a second, and promotions reach
/// XenCenter as `message.create`.
#[test]
fn xapi_master_change_moves_the_role() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let xapi = rt
        .block_on(twinsan_ha::testxapi::TestXapi::start())
        .unwrap();
    let base = scratch_dir();
    let (hb_a, hb_b) = (free_udp(), free_udp());
    let node = |name, i, hb, peer_hb, pool: &str| {
        xapi_node(base.path(), &xapi, name, i, (hb, peer_hb), pool, "")
    };
    let mut a = node("a", 0, hb_a, hb_b, "master");
    let mut b = node("b", 1, hb_b, hb_a, "slave:127.0.0.1");
    a.start();
    b.start();
    a.wait_role("primary", Duration::from_secs(10));
    b.wait_role("secondary", Duration::from_secs(5));
    let t0 = Instant::now();
    while a.ha()["last_signal"] != "xapi: master" {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", a.ha());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.ha()["confirmed"], true);

    // The master moves in XAPI only.
    let t0 = Instant::now();
    xapi.set_master(1);
    b.wait_role("primary", Duration::from_secs(5));
    let took = t0.elapsed();
    eprintln!("XAPI master change -> b serving after {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(b.serving() && !a.serving());
    assert_eq!(a.ha()["role"], "secondary");
    let ha = b.ha();
    assert_eq!(ha["native"], "master", "{ha}");
    assert_eq!(ha["confirmed"], true, "{ha}");

    // XenCenter got the promotion messages (alerts are delivered in the background).
    let t0 = Instant::now();
    loop {
        let n = xapi
            .messages()
            .iter()
            .filter(|m| m.name == "TWINSAN_PRIMARY")
            .count();
        if n >= 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "messages: {:?}",
            xapi.messages()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(xapi);
    drop(rt);
}

/// iscsi-ha's `replug_pbd`: once a host serves, the unplugged PBDs (every host's) of the iSCSI
/// SRs naming its target IQN are plugged through XAPI, with retries; what still fails after the
/// last round is alerted (XenCenter message); another target's SR is never touched. A new
/// primary (after a master change) checks again.
#[test]
fn xapi_replugs_the_pbds_of_our_iscsi_srs() {
    const OURS: &str = "iqn.2026-11.org.twinsan.test:ha";
    const FAILED: &str = "TWINSAN_PBD_PLUG_FAILED";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let xapi = rt
        .block_on(twinsan_ha::testxapi::TestXapi::start())
        .unwrap();
    let dc = |iqn| {
        [
            ("target", "127.0.0.1"),
            ("port", "3260"),
            ("targetIQN", iqn),
        ]
    };
    // Our SR: host 0's PBD names the IQN in upper case; host 1's first plug fails.
    let sr = xapi.add_sr("twinsan SR", "lvmoiscsi");
    let ours_a = xapi.add_pbd(&sr, 0, &dc("IQN.2026-11.ORG.TWINSAN.TEST:HA"), false);
    let ours_b = xapi.add_pbd(&sr, 1, &dc(OURS), false);
    xapi.fail_plugs(&ours_b, 1, "SR_BACKEND_FAILURE_202");
    // Another SAN's SR, unplugged on both hosts: never ours to plug.
    let other = xapi.add_sr("other SAN", "lvmoiscsi");
    let other_a = xapi.add_pbd(&other, 0, &dc("iqn.2000-01.com.example:other"), false);
    let other_b = xapi.add_pbd(&other, 1, &dc("iqn.2000-01.com.example:other"), false);
    // Ours too, but its plug always fails: three rounds, then the alert.
    let broken = xapi.add_sr("broken SR", "lvmoiscsi");
    let broken_a = xapi.add_pbd(&broken, 0, &dc(OURS), false);
    xapi.fail_plugs(&broken_a, 1000, "SR_BACKEND_FAILURE_47");
    let broken_uuid = xapi.uuid_of(&broken).unwrap();

    let base = scratch_dir();
    let (hb_a, hb_b) = (free_udp(), free_udp());
    let ha = "replug_attempts = 3\nreplug_backoff_ms = 100\n";
    let mut a = xapi_node(base.path(), &xapi, "a", 0, (hb_a, hb_b), "master", ha);
    let mut b = xapi_node(
        base.path(),
        &xapi,
        "b",
        1,
        (hb_b, hb_a),
        "slave:127.0.0.1",
        ha,
    );
    a.start();
    b.start();
    a.wait_role("primary", Duration::from_secs(10));
    b.wait_role("secondary", Duration::from_secs(5));

    let plugs = |r: &str| xapi.plug_calls().iter().filter(|c| *c == r).count();
    let alerts = || {
        xapi.messages()
            .into_iter()
            .filter(|m| m.name == FAILED)
            .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    while alerts().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no {FAILED} message; plugs {:?}; messages {:?}\nlog a:\n{}",
            xapi.plug_calls(),
            xapi.messages(),
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(xapi.pbd_attached(&ours_a), Some(true));
    assert_eq!(xapi.pbd_attached(&ours_b), Some(true));
    assert_eq!(xapi.pbd_attached(&broken_a), Some(false));
    assert_eq!(plugs(&ours_a), 1, "{:?}", xapi.plug_calls());
    assert_eq!(plugs(&ours_b), 2, "{:?}", xapi.plug_calls());
    assert_eq!(plugs(&broken_a), 3, "{:?}", xapi.plug_calls());
    assert_eq!(plugs(&other_a) + plugs(&other_b), 0);
    assert_eq!(xapi.pbd_attached(&other_a), Some(false));
    let m = &alerts()[0];
    assert_eq!(m.obj_uuid, twinsan_ha::testxapi::host_uuid(0), "{m:?}");
    assert!(
        m.body.contains(&broken_uuid) && m.body.contains("SR_BACKEND_FAILURE_47"),
        "{m:?}"
    );
    assert!(m.body.contains("after 3 attempts"), "{m:?}");
    let log = a.log_text();
    assert!(
        log.contains("plugging the PBD of an iSCSI SR served here")
            && log.contains(&twinsan_ha::testxapi::host_uuid(1))
            && log.contains("PBD plug failed"),
        "{log}"
    );
    // The secondary never plugs.
    assert!(!b.log_text().contains("plugging the PBD"));

    // The master moves: b serves and checks again (only the broken PBD is left).
    xapi.set_master(1);
    b.wait_role("primary", Duration::from_secs(5));
    let t0 = Instant::now();
    while plugs(&broken_a) < 6 || alerts().len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "plugs {:?}; messages {:?}\nlog b:\n{}",
            xapi.plug_calls(),
            xapi.messages(),
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(alerts()[1].obj_uuid, twinsan_ha::testxapi::host_uuid(1));
    // Bounded: no further rounds, and the other SAN's SR is still untouched.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(plugs(&broken_a), 6, "{:?}", xapi.plug_calls());
    assert_eq!(plugs(&ours_a) + plugs(&ours_b), 3);
    assert_eq!(plugs(&other_a) + plugs(&other_b), 0);
    drop(xapi);
    drop(rt);
}
