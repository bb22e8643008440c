//! Issue 15, the Prometheus endpoint (`[server] metrics_listen`): a replicated pair on
//! loopback is scraped during its initial resync and during a replicated write workload;
//! every scrape is parsed by Python's `prometheus_client` text parser (the Debian package
//! python3-prometheus-client) and compared with `twinsan status --json` taken just before
//! and just after it: counters lie between the two, states equal them when they did not
//! change meanwhile, and once the workload is over everything is equal.

mod common;

use common::pair::{Host, Init, Pair, PairSpec, MIB};
use common::raw::{spawn_writer, Progress, WriteOpts};
use common::{run, status_json, text};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The Python that has python3-prometheus-client (Debian's, not a pyenv shim).
const PYTHON: &str = "/usr/bin/python3";

/// Parses an exposition with `prometheus_client.parser.text_string_to_metric_families`
/// and prints every sample as JSON `[name, {labels}, value]`. The parser names counter
/// samples the OpenMetrics way: `drbd_peerdevice_sent_bytes` (drbd-reactor's name, exported
/// as is) comes back as `drbd_peerdevice_sent_bytes_total`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    # Every sample belongs to a family announced by # TYPE: an untyped one is a stray.
    if family.type == "untyped":
        sys.exit("sample outside its family: %s" % family.samples)
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// Samples of one scrape: (name, sorted labels) -> value.
#[derive(Debug)]
struct Samples(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Samples {
    /// The value of `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let l = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0.get(&(name.to_string(), l)).copied()
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {:#?}", self.0.keys()))
    }

    /// The label value `label` of the one `name` sample whose value is 1 among those that
    /// also carry `with` (the enum style of drbd-reactor).
    fn state(&self, name: &str, label: &str, with: &[(&str, &str)]) -> String {
        let on: Vec<&String> = self
            .0
            .iter()
            .filter(|((n, l), v)| {
                n == name
                    && **v == 1.0
                    && with
                        .iter()
                        .all(|(k, x)| l.get(*k).map(String::as_str) == Some(*x))
            })
            .filter_map(|((_, l), _)| l.get(label))
            .collect();
        assert_eq!(on.len(), 1, "{name}: not exactly one state is 1: {on:?}");
        on[0].clone()
    }
}

/// GET /metrics on `port` (HTTP/1.1, bounded); checks status and content type and parses
/// the body with the Python parser.
fn scrape(port: u16) -> Samples {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the scrape");
    let raw = String::from_utf8(raw).expect("UTF-8 exposition");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape answered {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "content type: {head}"
    );
    parse(body)
}

fn parse(exposition: &str) -> Samples {
    let mut child = Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/install-deps.sh installs python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "prometheus_client refused the exposition: {}\n{exposition}",
        text(&o)
    );
    let v: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&o.stdout).expect("parser output");
    let mut m = BTreeMap::new();
    for (name, labels, value) in v {
        assert!(
            m.insert((name.clone(), labels.clone()), value).is_none(),
            "duplicate sample {name}{labels:?}"
        );
    }
    Samples(m)
}

/// `twinsan status --json`, the LUN's stats and the volume.
struct Snap {
    lun: serde_json::Value,
    vol: serde_json::Value,
}

fn snap(h: &Host) -> Snap {
    let s = status_json(&h.config);
    Snap {
        lun: s["targets"][0]["luns"][0]["stats"].clone(),
        vol: s["volumes"][0].clone(),
    }
}

/// `before <= scraped <= after` for a counter (or `>=` both ways for a falling gauge).
fn between(what: &str, before: u64, scraped: f64, after: u64) {
    let (lo, hi) = (before.min(after) as f64, before.max(after) as f64);
    assert!(
        lo <= scraped && scraped <= hi,
        "{what}: scraped {scraped}, status said {before} before and {after} after"
    );
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("status has no number {k}: {v}"))
}

/// The volume's state samples equal `status` when it did not change during the scrape.
fn states_agree(s: &Samples, before: &serde_json::Value, after: &serde_json::Value) {
    for (metric, label, key) in [
        ("drbd_resource_role", "drbd_resource_role", "role"),
        ("drbd_device_state", "drbd_device_state", "disk_state"),
        ("twinsan_volume_connection_state", "state", "connection"),
        ("twinsan_volume_peer_disk_state", "state", "peer_disk_state"),
    ] {
        if before[key] == after[key] {
            let want = before[key].as_str().unwrap_or("DUnknown");
            assert_eq!(s.state(metric, label, &[("name", "r0")]), want, "{metric}");
        }
    }
    for (metric, key) in [
        ("drbd_resource_suspended", "suspended"),
        ("twinsan_volume_split_brain", "split_brain"),
    ] {
        if before[key] == after[key] {
            let want = if before[key] == true { 1.0 } else { 0.0 };
            assert_eq!(s.must(metric, &[("name", "r0")]), want, "{metric}");
        }
    }
}

#[test]
fn scrapes_agree_with_status_during_resync_and_replicated_writes() {
    let t0 = Instant::now();
    let mut p = Pair::new(PairSpec {
        image_bytes: 64 * MIB,
        init: Init::FullFromA,
        // About 8 s for the full sync: room for several scrapes while it runs.
        resync_rate: "8M".into(),
        metrics: true,
        ..PairSpec::default()
    });
    p.start();
    let (pa, pb) = (p.a.metrics_port.unwrap(), p.b.metrics_port.unwrap());
    let peer_of_a = p.a.peer.to_string();
    let peer_of_b = p.b.peer.to_string();
    let pd_a = [
        ("name", "r0"),
        ("conn_name", peer_of_a.as_str()),
        ("volume", "0"),
    ];
    let pd_b = [
        ("name", "r0"),
        ("conn_name", peer_of_b.as_str()),
        ("volume", "0"),
    ];

    // Resync: A is the sync source. Its out-of-sync bytes fall and the progress grows.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut oos_seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "resync did not finish within 90 s"
        );
        let before = snap(&p.a);
        let s = scrape(pa);
        let after = snap(&p.a);
        let (bv, av) = (&before.vol, &after.vol);
        let in_sync = av["resync"].is_null()
            && av["out_of_sync_bytes"] == 0
            && av["connection"] == "Connected";
        if in_sync && !oos_seen.is_empty() {
            break;
        }
        states_agree(&s, bv, av);
        let oos = s.must("drbd_peerdevice_outofsync_bytes", &pd_a);
        between(
            "resync sent",
            n(bv, "resync_sent_bytes"),
            s.must("twinsan_volume_resync_sent_bytes_total", &pd_a),
            n(av, "resync_sent_bytes"),
        );
        if bv["resync"].is_object() && av["resync"].is_object() {
            assert_eq!(s.must("twinsan_volume_resync_active", &pd_a), 1.0);
            between(
                "resync done",
                n(&bv["resync"], "done_bytes"),
                s.must("twinsan_volume_resync_done_bytes", &pd_a),
                n(&av["resync"], "done_bytes"),
            );
            assert!(s.must("twinsan_volume_resync_total_bytes", &pd_a) > 0.0);
            // Only while the resync runs does it only fall (the handshake before it sets
            // the whole bitmap).
            between(
                "out of sync",
                n(bv, "out_of_sync_bytes"),
                oos,
                n(av, "out_of_sync_bytes"),
            );
            oos_seen.push(oos);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!(
        "resync: {} scrapes while it ran, out of sync {:?} MiB; {:.1?}",
        oos_seen.len(),
        oos_seen
            .iter()
            .map(|b| (b / MIB as f64).round())
            .collect::<Vec<_>>(),
        t0.elapsed()
    );
    assert!(
        oos_seen.len() >= 3,
        "too few scrapes saw the resync: {oos_seen:?}"
    );
    assert!(
        oos_seen.windows(2).all(|w| w[1] <= w[0]) && oos_seen.last() < oos_seen.first(),
        "out-of-sync bytes did not fall: {oos_seen:?}"
    );
    p.wait_in_sync(Duration::from_secs(60));

    // Replicated writes: 4 KiB random writes at queue depth 8 for 4 s through A.
    let progress = Arc::new(Progress::default());
    let mut opts = WriteOpts::random(1, 0, 4096);
    opts.queue_depth = 8;
    opts.max_time = Duration::from_secs(4);
    let writer = spawn_writer(p.a.iscsi_port, opts, progress);
    let mut scrapes = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the writer did not end within 60 s"
        );
        let before = snap(&p.a);
        let s = scrape(pa);
        let after = snap(&p.a);
        let w = [("target", common::IQN), ("lun", "0"), ("class", "write")];
        between(
            "LUN writes",
            n(&before.lun, "writes"),
            s.must("twinsan_lun_commands_total", &w),
            n(&after.lun, "writes"),
        );
        between(
            "LUN written bytes",
            n(&before.lun, "written_bytes"),
            s.must(
                "twinsan_lun_written_bytes_total",
                &[("target", common::IQN), ("lun", "0")],
            ),
            n(&after.lun, "written_bytes"),
        );
        between(
            "sent bytes",
            n(&before.vol, "sent_bytes"),
            s.must("drbd_peerdevice_sent_bytes_total", &pd_a),
            n(&after.vol, "sent_bytes"),
        );
        states_agree(&s, &before.vol, &after.vol);
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = writer.join().unwrap().expect("writer");
    assert!(report.good() > 0, "the workload wrote nothing");

    // Quiet now: scrape and status agree exactly.
    let lun = [("target", common::IQN), ("lun", "0")];
    let (sa, a) = (scrape(pa), snap(&p.a));
    let (sb, b) = (scrape(pb), snap(&p.b));
    states_agree(&sa, &a.vol, &a.vol);
    states_agree(&sb, &b.vol, &b.vol);
    for (class, key) in [
        ("read", "reads"),
        ("write", "writes"),
        ("flush", "flushes"),
        ("other", "others"),
    ] {
        let mut l = lun.to_vec();
        l.push(("class", class));
        assert_eq!(
            sa.must("twinsan_lun_commands_total", &l),
            n(&a.lun, key) as f64,
            "{class}"
        );
    }
    assert_eq!(
        sa.must("twinsan_lun_written_bytes_total", &lun),
        n(&a.lun, "written_bytes") as f64
    );
    assert_eq!(sa.must("twinsan_lun_commands_in_flight", &lun), 0.0);
    let mut wl = lun.to_vec();
    wl.push(("class", "write"));
    assert_eq!(
        sa.must("twinsan_lun_command_duration_seconds_count", &wl),
        n(&a.lun, "writes") as f64,
        "one write latency per write"
    );
    assert!(n(&a.lun, "writes") >= report.good());
    assert_eq!(
        sa.must("drbd_peerdevice_sent_bytes_total", &pd_a),
        n(&a.vol, "sent_bytes") as f64
    );
    assert_eq!(
        sb.must("drbd_peerdevice_received_bytes_total", &pd_b),
        n(&b.vol, "received_bytes") as f64
    );
    assert_eq!(sa.must("drbd_peerdevice_outofsync_bytes", &pd_a), 0.0);
    let acks = sa.must(
        "twinsan_volume_write_ack_seconds_count",
        &[("name", "r0"), ("conn_name", peer_of_a.as_str())],
    );
    assert!(
        acks >= report.good() as f64,
        "{acks} write acks for {} acknowledged writes",
        report.good()
    );
    eprintln!(
        "workload: {} writes acknowledged, {scrapes} scrapes during it; A: {} writes, {} acks timed; test took {:.1?}",
        report.good(),
        n(&a.lun, "writes"),
        acks,
        t0.elapsed()
    );
    p.stop_both();
}

#[test]
fn metrics_listen_that_cannot_bind_is_a_start_error_naming_the_key() {
    let dir = common::scratch_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = dir.path().join("twinsan.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\nmetrics_listen = \"{addr}\"\n\n[[target]]\niqn = \"{}\"\nportals = [\"127.0.0.1:{}\"]\n\n[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"16MiB\"\n",
            dir.path().join("data").display(),
            common::IQN,
            common::free_port(),
            dir.path().join("lun0.img").display(),
        ),
    )
    .unwrap();
    let o = run(
        Command::new(common::bin())
            .args(["serve", "--config"])
            .arg(&config),
        Duration::from_secs(30),
    );
    let out = text(&o);
    assert!(
        !o.status.success(),
        "started with a taken metrics port: {out}"
    );
    assert!(
        out.contains(&format!("server.metrics_listen = \"{addr}\"")),
        "the error does not name the key: {out}"
    );
    // And a malformed address is refused by check-config, naming the key.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&addr.to_string(), "localhost"),
    )
    .unwrap();
    let o = run(
        Command::new(common::bin())
            .args(["check-config", "--config"])
            .arg(&config),
        Duration::from_secs(30),
    );
    let out = text(&o);
    assert!(
        !o.status.success(),
        "check-config accepted `localhost`: {out}"
    );
    assert!(out.contains("server.metrics_listen"), "{out}");
}
