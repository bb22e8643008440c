//! HA acceptance tests (issue 4) in network namespaces: host A, host B and a client on a bridge
//! that lives in a namespace of its own, plus a direct A-B replication link (see
//! `common::netns`). Two real `twinsan` daemons run with `[ha]`; the client reaches the target
//! only through the floating IP. All traffic stays inside the namespaces the test creates.
//!
//! Every test needs root and `ip`; without them it prints why and passes as skipped (CI runs as
//! root, so there they run). Bounds: every client runs for a fixed time, every wait has a limit.

mod common;

use common::ha::{
    ok_cli, spawn_fio, spawn_resuming_writer, wait_client_writes_through, wait_serving_on, HaLab,
    HaSpec, Source, VipMonitor, MIB, VIP,
};
use common::netns::{self, Lab};
use common::raw::{check_acked, Progress, TagWriter, WriteOpts, TAG_BLOCK};
use common::*;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound for a host to become primary and serving (start-up includes the peer handshake).
const PROMOTE: Duration = Duration::from_secs(30);
/// The tagged writers replace a connection that answers nothing for this long with commands
/// outstanding, as open-iscsi does with its default NOP-Out interval and timeout (5 s each).
const INITIATOR_STALL_LIMIT: Duration = Duration::from_secs(5);

fn wait_acked(progress: &Progress, n: u64, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while progress.acked.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: only {} of {n} writes acknowledged within {limit:?}",
            progress.acked.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Harness self-test, no HA: the lab's links work (LAN, replication link, isolation of the
/// replication link from the client), a plain replicated pair runs inside the namespaces, and fio
/// from the client namespace writes and verifies through A's LAN portal.
#[test]
fn lab_runs_a_replicated_pair_and_fio_from_the_client() {
    let Some(lab) = Lab::new_or_skip("labself") else {
        return;
    };
    assert!(lab.ping(&lab.client, netns::A_ADDR), "client -> A");
    assert!(lab.ping(&lab.client, netns::B_ADDR), "client -> B");
    assert!(
        lab.ping(&lab.a, netns::B_REPL),
        "A -> B over the replication link"
    );
    assert!(
        lab.ping(&lab.a, netns::BRIDGE_ADDR),
        "A -> bridge (witness)"
    );
    assert!(
        !lab.ping(&lab.client, netns::B_REPL),
        "the client must not reach the replication link"
    );
    // Nothing of the lab is visible in the root namespace.
    let root = netns::ip(&["-o", "addr", "show"]).unwrap();
    assert!(
        !root.contains("10.231."),
        "lab address in the root namespace: {root}"
    );

    let dir = scratch_dir();
    let token = format!("tok{:x}", rand::random::<u32>());
    let mut pids = Vec::new();
    let mut images = Vec::new();
    for (label, ns, lan, repl, peer, role) in [
        (
            "A",
            &lab.a,
            netns::A_ADDR,
            netns::A_REPL,
            netns::B_REPL,
            "primary",
        ),
        (
            "B",
            &lab.b,
            netns::B_ADDR,
            netns::B_REPL,
            netns::A_REPL,
            "secondary",
        ),
    ] {
        let d = dir.path().join(label);
        std::fs::create_dir_all(&d).unwrap();
        let image = d.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let config = d.join("twinsan.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
data_dir = "{data}"

[[target]]
iqn = "{IQN}"
portals = ["{lan}:3260"]

[[target.lun]]
number = 0
path = "{image}"

[target.lun.replication]
name = "r0"
listen = "{repl}:7788"
peer = "{peer}:7788"
secret = "lab-replication-secret"
meta = "internal"
role = "{role}"
ping_interval_secs = 1
timeout_secs = 3
"#,
                data = d.join("data").display(),
                image = image.display(),
            ),
        )
        .unwrap();
        let o = run(
            Command::new(bin())
                .args(["replication", "create-md", "--config"])
                .arg(&config)
                .args(["--volume", "r0", "--initial-sync", "skip-identical"])
                .args(["--skip-token", &token]),
            Duration::from_secs(30),
        );
        assert!(o.status.success(), "create-md {label}: {}", text(&o));
        let mut cmd = ns.command(bin());
        cmd.args(["serve", "--config"]).arg(&config);
        pids.push((
            lab.spawn(cmd, label, &d.join("twinsan.log")),
            config,
            d.join("twinsan.log"),
        ));
        images.push(image);
    }
    let status = |config: &std::path::Path| -> Option<serde_json::Value> {
        let o = run(
            Command::new(bin())
                .args(["status", "--json", "--config"])
                .arg(config),
            Duration::from_secs(20),
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .map(|s| s["volumes"][0].clone())
    };
    let in_sync = |v: &Option<serde_json::Value>| {
        v.as_ref().is_some_and(|v| {
            v["connection"] == "Connected"
                && v["disk_state"] == "UpToDate"
                && v["peer_disk_state"] == "UpToDate"
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (status(&pids[0].1), status(&pids[1].1));
        if in_sync(&a) && in_sync(&b) {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "pair not connected in the lab: A {a:?} B {b:?}\nA log:\n{}\nB log:\n{}",
                std::fs::read_to_string(&pids[0].2).unwrap_or_default(),
                std::fs::read_to_string(&pids[1].2).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Tagged writes from a thread inside the client namespace, through A's LAN portal, beyond
    // the 16 MiB fio writes below.
    const TAGGED_FIRST: u64 = 32 * MIB / TAG_BLOCK;
    let portal: std::net::SocketAddr = format!("{}:3260", netns::A_ADDR).parse().unwrap();
    let rep = lab.client.with(move || {
        let mut w = TagWriter::connect_at(portal, Duration::from_secs(5)).expect("login to A");
        w.run(
            &WriteOpts::list(1, (TAGGED_FIRST..TAGGED_FIRST + 64).collect()),
            &Progress::default(),
        )
    });
    assert_eq!(rep.good(), 64, "{}", rep.summary());

    // fio with libiscsi from the client namespace.
    let filename = format!("iscsi://{}:3260/{IQN}/0", netns::A_ADDR).replace(':', "\\:");
    let o = run(
        lab.client.command(fio()).args([
            "--name=labself",
            "--ioengine=libiscsi",
            &format!("--filename={filename}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--time_based",
            "--runtime=4",
            "--output-format=json",
        ]),
        Duration::from_secs(90),
    );
    let out = text(&o);
    assert!(
        o.status.success(),
        "fio in the client namespace failed:\n{out}"
    );
    assert!(!out.contains("verify: bad"), "{out}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').unwrap_or(0)..]).expect("fio JSON");
    let written = json["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 0, "{out}");
    eprintln!(
        "lab self-test: pair connected in namespaces; fio from the client wrote {written} bytes at {:.0} IOPS",
        json["jobs"][0]["write"]["iops"].as_f64().unwrap_or(0.0)
    );
    // B holds the tagged writes and what fio wrote (sent over the replication link).
    for (pid, _, _) in &pids {
        lab.with_child(*pid, |c| {
            c.terminate(Duration::from_secs(20));
        });
    }
    let (problems, _) = check_acked(&images[1], &rep.acked, TAGGED_FIRST..TAGGED_FIRST + 64);
    assert!(
        problems.is_empty(),
        "tagged writes missing on B: {problems:#?}"
    );
    let a_data = std::fs::read(&images[0]).unwrap();
    let b_data = std::fs::read(&images[1]).unwrap();
    let n = 16 * MIB as usize;
    assert!(a_data[..n] == b_data[..n], "replicas differ after fio");
}

/// Harness self-test, no daemon: the test XAPI served from the bridge namespace answers host A
/// (its host 0: master) and host B (host 1: HOST_IS_SLAVE until the test flips the master), and
/// the SMTP sink receives a mail sent from A by the ha crate's SMTP client.
#[test]
fn lab_serves_the_test_xapi_and_smtp_sink() {
    use twinsan_ha::alerts::{send_mail, SmtpConfig, SmtpTls};
    use twinsan_ha::testxapi::{PASSWORD, USER};
    use twinsan_ha::xapi::{Endpoint, Transport, XapiClient, XapiError};
    let Some(lab) = Lab::new_or_skip("labxapi") else {
        return;
    };
    let x = common::ha::XapiServer::start(&lab.bridge);
    let smtp = common::ha::SmtpSink::start(&lab.bridge);
    let port = x.port;
    let client = move |i: usize| {
        XapiClient::new(
            Endpoint {
                host: netns::XAPI_ADDRS[i].to_string(),
                port,
                transport: Transport::Plain,
            },
            Duration::from_secs(2),
        )
    };
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // From A: log in to host 0 (master), create a message, send a mail.
    let smtp_port = smtp.port;
    lab.a.with(move || {
        rt().block_on(async move {
            let c = client(0);
            let s = c.login(USER, PASSWORD).await.expect("login on the master");
            c.message_create(&s, "TWINSAN_LAB", 5, "Host", "uuid", "from A")
                .await
                .expect("message.create");
            send_mail(
                &SmtpConfig {
                    server: netns::BRIDGE_ADDR.into(),
                    port: smtp_port,
                    tls: SmtpTls::None,
                    verify_cert: false,
                    user: None,
                    password: None,
                    from: "twinsan@host-a".into(),
                    to: vec!["ops@example.org".into()],
                    subject_prefix: "[lab]".into(),
                    helo_name: "host-a".into(),
                    timeout: Duration::from_secs(5),
                },
                "lab test",
                "body line\n.leading dot\n",
            )
            .await
            .expect("mail to the sink");
        })
    });
    // From B: host 1 is a slave and names the master; after the flip it is the master.
    let xa = x.xapi.clone();
    lab.b.with(move || {
        rt().block_on(async move {
            match client(1).login(USER, PASSWORD).await {
                Err(XapiError::HostIsSlave { master }) => assert_eq!(master, netns::XAPI_ADDRS[0]),
                other => panic!("login on the slave: {other:?}"),
            }
            xa.set_master(1);
            client(1)
                .login(USER, PASSWORD)
                .await
                .expect("login on the new master");
        })
    });
    let msgs = x.xapi.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].name, "TWINSAN_LAB");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].from.contains("twinsan@host-a"), "{mails:?}");
    assert_eq!(mails[0].to, vec!["<ops@example.org>".to_string()]);
    assert!(
        mails[0].data.contains("Subject: [lab] lab test"),
        "{}",
        mails[0].data
    );
    assert!(
        mails[0].data.contains("\n.leading dot"),
        "dot-stuffing: {}",
        mails[0].data
    );
}

/// Pool master flip with the xapi source (test XAPI + pool.conf): the VIP and the target move to
/// B and back to A while fio (libiscsi, write with verify) runs against the VIP from the client;
/// fio sees no I/O or verify error; the I/O pause is measured; the VIP is never on both hosts.
#[test]
fn pool_master_flip_moves_vip_and_target_under_fio() {
    let Some(mut l) = HaLab::new_or_skip("flip", HaSpec::new(Source::Xapi)) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let mac = |ns: &netns::Netns| Lab::mac(ns, netns::LAN_IF).to_ascii_lowercase();
    let (mac_a, mac_b) = (mac(&l.lab.a), mac(&l.lab.b));
    let monitor = VipMonitor::start(&l, Duration::from_secs(120));
    let fio = spawn_fio(
        &l.lab.client,
        &l.dir(),
        "flip",
        "randwrite",
        24,
        32 * MIB,
        true,
    );
    std::thread::sleep(Duration::from_secs(4));
    let t = Instant::now();
    l.flip_master(1);
    let to_b = wait_serving_on(&l, 1, Duration::from_secs(20));
    l.wait_primary(1, PROMOTE);
    eprintln!("pool master A -> B: serving on B after {to_b:.2?}");
    // Flip back only once the client's writes flow through B: a pool master does not move
    // twice within a second or two, and the test should show B served I/O.
    let fio = wait_client_writes_through(&l, 1, 256 * 1024, Duration::from_secs(20), fio);
    std::thread::sleep(Duration::from_secs(6).saturating_sub(t.elapsed()));
    l.flip_master(0);
    let to_a = wait_serving_on(&l, 0, Duration::from_secs(20));
    l.wait_primary(0, PROMOTE);
    eprintln!("pool master B -> A: serving on A after {to_a:.2?}");
    let f = fio.join().unwrap();
    let vips = monitor.finish();
    eprintln!(
        "fio: {} bytes written, {} read back and verified, {} I/Os logged; longest I/O {:.3?}, longest gap between completions {:.3?}; VIP monitor: {} samples, MACs {:?}",
        f.bytes("write"),
        f.bytes("read"),
        f.completions,
        f.max_latency,
        f.max_gap,
        vips.samples,
        vips.macs_seen
    );
    if let Err(e) = f.clean() {
        panic!("fio across the master flips: {e}\n{}", f.text());
    }
    assert!(f.bytes("write") > 0);
    assert!(vips.violations.is_empty(), "{:#?}", vips.violations);
    // The client's ARP view followed the VIP to B and back to A.
    assert!(
        vips.macs_seen.contains(&mac_a) && vips.macs_seen.contains(&mac_b),
        "client saw {:?} answer for the VIP; A is {mac_a}, B is {mac_b}",
        vips.macs_seen
    );
    assert_eq!(
        l.lab.client_neigh(VIP),
        vec![mac_a.clone()],
        "client neighbour entry"
    );
    assert!(
        f.max_latency < Duration::from_secs(20),
        "I/O stalled for {:.2?}",
        f.max_latency
    );
    for h in [&l.a, &l.b] {
        let ha = h.ha().unwrap();
        assert!(
            ha["counters"]["promotions"].as_u64() >= Some(1),
            "{}: {ha}",
            h.label
        );
    }
}

/// The primary host fails while the client writes tagged blocks: A's daemon is SIGKILLed and A
/// drops off the network (links down), as a crashed host does. B takes over (standalone: peer
/// silent on both paths and the witness answers; xapi: the pool elects B master while A's xapi
/// hangs), the client logs in again through the VIP and goes on writing, and B holds every
/// acknowledged write. Then A comes back: its daemon starts while still cut off (it must clean up
/// the VIP left by the crash and must not promote), its links come up, and it rejoins as
/// secondary (no automatic fail-back) and resyncs. The VIP never answers from both hosts.
fn kill_primary_other_host_takes_over(source: Source) {
    const REGION: u64 = 2048;
    let name = format!("kill{}", source.name());
    let Some(mut l) = HaLab::new_or_skip(&name, HaSpec::new(source)) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let monitor = VipMonitor::start(&l, Duration::from_secs(120));
    let progress = Arc::new(Progress::default());
    let mut opts = WriteOpts::random(1, 0, REGION);
    opts.queue_depth = 8;
    opts.stall_limit = Some(INITIATOR_STALL_LIMIT);
    let writer = spawn_resuming_writer(
        &l.lab.client,
        opts,
        Duration::from_secs(12),
        Duration::from_secs(15),
        progress.clone(),
    );
    wait_acked(&progress, 500, Duration::from_secs(10), "before the kill");
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000));
    l.kill(0);
    l.host_down(0);
    if source == Source::Xapi {
        // The host died: its xapi no longer answers, and the pool elects B as master.
        let x = &l.xapi.as_ref().unwrap().xapi;
        x.set_hang(0, true);
        x.set_master(1);
        l.b.write_pool_conf("master");
    }
    let takeover = wait_serving_on(&l, 1, Duration::from_secs(20));
    let acked_at_takeover = progress.acked.load(Ordering::SeqCst);
    eprintln!(
        "{}: A killed and cut off; B serving after {takeover:.2?}",
        source.name()
    );
    let rep = writer.join().unwrap();
    eprintln!("{}: client: {}", source.name(), rep.summary());
    let ha_b = l.b.ha().unwrap();
    assert_eq!(ha_b["role"], "primary", "B: {ha_b}");
    assert!(
        rep.rounds.len() >= 2 && !rep.reconnects.is_empty(),
        "the client never had to reconnect: {}",
        rep.summary()
    );
    assert!(
        rep.rounds.last().unwrap().good() > 0
            && progress.acked.load(Ordering::SeqCst) > acked_at_takeover,
        "the client did not resume writing on B: {}",
        rep.summary()
    );
    assert_eq!(rep.failed(), 0, "writes failed: {:?}", rep.notes());

    // A returns: daemon first (still cut off), then the links.
    if source == Source::Xapi {
        let x = &l.xapi.as_ref().unwrap().xapi;
        x.set_hang(0, false);
        l.a.write_pool_conf(&format!("slave:{}", netns::XAPI_ADDRS[1]));
    }
    l.start(0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !l.a.has_vip(),
        "A's daemon did not remove the VIP left by the crash"
    );
    assert_ne!(l.a.role(), "primary", "A promoted while cut off");
    l.host_up(0);
    l.wait("A back as secondary, B primary", PROMOTE, |a, b| {
        a["role"] == "secondary" && b["role"] == "primary"
    });
    l.wait_in_sync(Duration::from_secs(60));
    let vips = monitor.finish();
    assert!(vips.violations.is_empty(), "{:#?}", vips.violations);
    l.stop(0);
    l.stop(1);
    for h in [&l.b, &l.a] {
        let (problems, newer) = check_acked(&h.image, &rep.acked, 0..REGION);
        eprintln!(
            "{}: {} acknowledged blocks checked on {} ({newer} hold a newer write)",
            source.name(),
            rep.acked.len(),
            h.label
        );
        assert!(
            problems.is_empty(),
            "{} acknowledged blocks lost or damaged on {}, first: {:#?}",
            problems.len(),
            h.label,
            &problems[..problems.len().min(10)]
        );
    }
}

#[test]
fn sigkill_primary_standalone_peer_takes_over() {
    kill_primary_other_host_takes_over(Source::Standalone);
}

#[test]
fn sigkill_primary_xapi_peer_takes_over() {
    kill_primary_other_host_takes_over(Source::Xapi);
}

/// Only the primary's daemon is SIGKILLed (standalone; the host stays up, so its kernel keeps
/// the VIP until the address lifetime the daemon set runs out): B must not add the VIP while it
/// still answers from A (duplicate detection; the client never sees two MACs), then takes over
/// once it is gone; the client resumes and every acknowledged write is on B. The service manager
/// then restarts A's daemon, which comes back secondary (no automatic fail-back) and resyncs.
#[test]
fn sigkill_daemon_only_standalone_peer_takes_over() {
    const REGION: u64 = 2048;
    let Some(mut l) = HaLab::new_or_skip("killonly", HaSpec::new(Source::Standalone)) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let monitor = VipMonitor::start(&l, Duration::from_secs(120));
    let progress = Arc::new(Progress::default());
    let mut opts = WriteOpts::random(1, 0, REGION);
    opts.queue_depth = 8;
    opts.stall_limit = Some(INITIATOR_STALL_LIMIT);
    let writer = spawn_resuming_writer(
        &l.lab.client,
        opts,
        Duration::from_secs(20),
        Duration::from_secs(20),
        progress.clone(),
    );
    wait_acked(&progress, 500, Duration::from_secs(10), "before the kill");
    l.kill(0);
    let t = Instant::now();
    let mut both = Vec::new();
    let takeover = loop {
        if l.a.has_vip() && l.b.has_vip() {
            both.push(t.elapsed());
        }
        if l.b.has_vip() && !l.a.has_vip() && l.b.role() == "primary" {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B did not take over within 20 s of A's SIGKILL: A VIP {}, B {} VIP {}",
            l.a.has_vip(),
            l.b.role(),
            l.b.has_vip()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(both.is_empty(), "VIP on both hosts at {both:?}");
    wait_serving_on(&l, 1, Duration::from_secs(10));
    eprintln!("A's daemon SIGKILLed; B primary with the VIP {takeover:.2?} later");
    let rep = writer.join().unwrap();
    eprintln!("client: {}", rep.summary());
    assert!(
        rep.rounds.len() >= 2 && rep.rounds.last().unwrap().good() > 0,
        "the client did not resume on B: {}",
        rep.summary()
    );
    assert_eq!(rep.failed(), 0, "{:?}", rep.notes());
    // The service manager restarts A's daemon: it rejoins as secondary.
    l.start(0);
    l.wait("A back as secondary, B primary", PROMOTE, |a, b| {
        a["role"] == "secondary" && b["role"] == "primary"
    });
    l.wait_in_sync(Duration::from_secs(60));
    let vips = monitor.finish();
    assert!(vips.violations.is_empty(), "{:#?}", vips.violations);
    l.stop(0);
    l.stop(1);
    for h in [&l.b, &l.a] {
        let (problems, _) = check_acked(&h.image, &rep.acked, 0..REGION);
        assert!(
            problems.is_empty(),
            "{}: {} acknowledged blocks lost or damaged, first: {:#?}",
            h.label,
            problems.len(),
            &problems[..problems.len().min(10)]
        );
    }
}

/// With A primary and reachable, neither `become-primary` in manual mode nor a forged `master`
/// pool.conf makes B a second primary; the client's I/O is never interrupted and its ARP view
/// only ever shows A's MAC for the VIP.
#[test]
fn split_role_protection() {
    let mut spec = HaSpec::new(Source::Xapi);
    // pool.conf is B's only signal: the peer check alone must stop the forged one.
    spec.xapi_session = false;
    let Some(mut l) = HaLab::new_or_skip("split", spec) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let mac_a = Lab::mac(&l.lab.a, netns::LAN_IF);
    let monitor = VipMonitor::start(&l, Duration::from_secs(90));
    let progress = Arc::new(Progress::default());
    let writer = spawn_resuming_writer(
        &l.lab.client,
        WriteOpts::random(1, 0, 1024),
        Duration::from_secs(16),
        Duration::from_secs(10),
        progress.clone(),
    );
    wait_acked(&progress, 100, Duration::from_secs(10), "client writing");
    let refusals = |h: &common::ha::HaHost| h.ha().unwrap()["counters"]["refusals"].as_u64();
    let before = refusals(&l.b);

    // 1. Manual mode: become-primary on B is refused while A is primary and reachable.
    ok_cli(&l.b, &["manual-mode-enable"]);
    l.b.note("twinsan become-primary (must be refused)");
    let o = l.b.cli(&["become-primary"]);
    assert!(
        !o.status.success(),
        "become-primary on B succeeded with A primary: {}",
        text(&o)
    );
    assert!(
        !String::from_utf8_lossy(&o.stderr).trim().is_empty(),
        "refusal without a reason: {}",
        text(&o)
    );
    eprintln!("become-primary refused: {}", text(&o).trim());
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(l.b.role(), "secondary");
        assert_eq!(l.a.role(), "primary");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(refusals(&l.b) > before, "refusal not counted");
    ok_cli(&l.b, &["manual-mode-disable"]);

    // 2. A forged "master" pool.conf on B.
    l.b.write_pool_conf("master");
    let t = Instant::now();
    let mut blocked_seen = None;
    while t.elapsed() < Duration::from_secs(6) {
        let hb = l.b.ha().unwrap();
        assert_ne!(
            hb["role"], "primary",
            "forged pool.conf made B primary: {hb}"
        );
        assert_ne!(
            hb["role"], "promoting",
            "forged pool.conf started a promotion: {hb}"
        );
        assert_eq!(l.a.role(), "primary");
        if !hb["blocked"].is_null() {
            blocked_seen = Some(hb["blocked"].clone());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("forged pool.conf on B: blocked = {blocked_seen:?}");
    assert!(
        blocked_seen.is_some(),
        "B never reported the blocked promotion in status"
    );
    l.b.write_pool_conf(&format!("slave:{}", netns::XAPI_ADDRS[0]));

    let rep = writer.join().unwrap();
    let vips = monitor.finish();
    eprintln!(
        "client: {}; VIP monitor: {} samples, MACs {:?}",
        rep.summary(),
        vips.samples,
        vips.macs_seen
    );
    assert!(vips.violations.is_empty(), "{:#?}", vips.violations);
    assert!(vips.samples >= 5, "too few ARP samples");
    assert_eq!(
        vips.macs_seen.iter().cloned().collect::<Vec<_>>(),
        vec![mac_a.to_ascii_lowercase()],
        "the client saw a MAC other than A's for the VIP"
    );
    assert_eq!(
        l.lab.client_neigh(VIP),
        vec![mac_a.to_ascii_lowercase()],
        "client neighbour entry"
    );
    assert_eq!(
        rep.rounds.len(),
        1,
        "the client lost its connection: {}",
        rep.summary()
    );
    assert_eq!(rep.failed(), 0, "{:?}", rep.notes());
    assert!(!l.b.has_vip());
}

/// replaced-stack.md's rolling maintenance with the client running fio (write, verify): both
/// hosts into manual mode, storage to B, A's daemon restarted, storage back to A, manual mode
/// left; no I/O error. Leaving manual mode is refused while a host is not in its native role.
#[test]
fn manual_mode_rolling_maintenance() {
    let Some(mut l) = HaLab::new_or_skip("rolling", HaSpec::new(Source::Xapi)) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let monitor = VipMonitor::start(&l, Duration::from_secs(150));
    let fio = spawn_fio(
        &l.lab.client,
        &l.dir(),
        "rolling",
        "randwrite",
        30,
        32 * MIB,
        true,
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    ok_cli(&l.a, &["manual-mode-enable"]);
    ok_cli(&l.b, &["manual-mode-enable"]);
    for h in [&l.a, &l.b] {
        assert_eq!(h.ha().unwrap()["manual"], true, "{}", h.label);
    }
    // Storage to B.
    let t = Instant::now();
    ok_cli(&l.a, &["become-secondary"]);
    ok_cli(&l.b, &["become-primary"]);
    let to_b = wait_serving_on(&l, 1, Duration::from_secs(20));
    eprintln!(
        "storage moved to B: serving after {:.2?} ({to_b:.2?} after become-primary)",
        t.elapsed()
    );
    // As an operator would, see the client's I/O flow through B before touching A.
    let fio = wait_client_writes_through(&l, 1, 256 * 1024, Duration::from_secs(20), fio);
    // Not in native roles (B primary, pool master A): leaving manual mode is refused.
    let o = l.b.cli(&["manual-mode-disable"]);
    assert!(
        !o.status.success(),
        "manual-mode-disable accepted on B while B is primary but pool slave: {}",
        text(&o)
    );
    // Work on A: restart its daemon; it must come back secondary and still in manual mode.
    l.stop(0);
    l.start(0);
    l.wait("A back as secondary in manual mode", PROMOTE, |a, b| {
        a["role"] == "secondary" && a["manual"] == true && b["role"] == "primary"
    });
    l.wait_in_sync(Duration::from_secs(60));
    // Storage back to A.
    let t = Instant::now();
    ok_cli(&l.b, &["become-secondary"]);
    ok_cli(&l.a, &["become-primary"]);
    let to_a = wait_serving_on(&l, 0, Duration::from_secs(20));
    eprintln!(
        "storage moved back to A: serving after {:.2?} ({to_a:.2?})",
        t.elapsed()
    );
    let fio = wait_client_writes_through(&l, 0, 256 * 1024, Duration::from_secs(20), fio);
    ok_cli(&l.a, &["manual-mode-disable"]);
    ok_cli(&l.b, &["manual-mode-disable"]);
    l.wait("both out of manual mode, A primary", PROMOTE, |a, b| {
        a["manual"] == false
            && b["manual"] == false
            && a["role"] == "primary"
            && b["role"] == "secondary"
    });
    eprintln!(
        "rolling maintenance sequence done after {:.2?}",
        t0.elapsed()
    );
    let f = fio.join().unwrap();
    let vips = monitor.finish();
    eprintln!(
        "fio: {} bytes written, {} verified; longest I/O {:.3?}, longest gap {:.3?}",
        f.bytes("write"),
        f.bytes("read"),
        f.max_latency,
        f.max_gap
    );
    if let Err(e) = f.clean() {
        panic!("fio during rolling maintenance: {e}\n{}", f.text());
    }
    assert!(vips.violations.is_empty(), "{:#?}", vips.violations);
}

/// `twinsan status` (text and `--json`), `get` and `log` on both hosts show the contract's
/// fields; alerts reach the SMTP sink and the test XAPI (message.create).
#[test]
fn status_fields_alert_email_and_xapi_message() {
    let mut spec = HaSpec::new(Source::Xapi);
    spec.alerts = true;
    let Some(mut l) = HaLab::new_or_skip("status", spec) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    const FIELDS: &[&str] = &[
        "node",
        "source",
        "role",
        "manual",
        "native",
        "confirmed",
        "last_signal",
        "last_signal_age_ms",
        "peer_replication",
        "peer_management",
        "witness",
        "blocked",
        "target_serving",
        "target_expected",
        "vips",
        "counters",
    ];
    for (h, role, native, serving, local) in [
        (&l.a, "primary", "master", true, true),
        (&l.b, "secondary", "slave", false, false),
    ] {
        let s = h.status_json().unwrap();
        let ha = &s["ha"];
        for f in FIELDS {
            assert!(ha.get(f).is_some(), "{}: ha.{f} missing: {ha}", h.label);
        }
        for c in ["promotions", "demotions", "refusals", "alerts_sent"] {
            assert!(
                ha["counters"][c].is_u64(),
                "{}: counters.{c}: {ha}",
                h.label
            );
        }
        assert_eq!(ha["node"], format!("host-{}", h.label.to_lowercase()));
        assert_eq!(ha["source"], "xapi");
        assert_eq!(ha["role"], role, "{}: {ha}", h.label);
        assert_eq!(ha["native"], native, "{}: {ha}", h.label);
        assert_eq!(ha["manual"], false);
        assert_eq!(ha["target_serving"], serving, "{}: {ha}", h.label);
        assert_eq!(ha["target_expected"], serving, "{}: {ha}", h.label);
        assert!(ha["last_signal"].is_string() && ha["last_signal_age_ms"].is_u64());
        let peer_role = if role == "primary" {
            "secondary"
        } else {
            "primary"
        };
        assert_eq!(ha["peer_replication"], peer_role, "{}: {ha}", h.label);
        let vip = &ha["vips"][0];
        assert_eq!(vip["address"], format!("{VIP}/{}", netns::PREFIX_LEN));
        assert_eq!(vip["interface"], netns::LAN_IF);
        assert_eq!(vip["local"], local, "{}: {ha}", h.label);
        let vol = &s["volumes"][0];
        for f in ["role", "connection", "disk_state", "out_of_sync_bytes"] {
            assert!(vol.get(f).is_some(), "{}: volume field {f}: {vol}", h.label);
        }
        assert_eq!(
            vol["role"].as_str().map(str::to_lowercase).as_deref(),
            Some(role),
            "{}: {vol}",
            h.label
        );
        // The human view.
        let out = ok_cli(h, &["status"]);
        for word in [role, "VIP"] {
            assert!(
                out.to_lowercase().contains(&word.to_lowercase()),
                "{}: `twinsan status` lacks {word}:\n{out}",
                h.label
            );
        }
        // Effective configuration, secrets masked.
        let got = ok_cli(h, &["get"]);
        assert!(got.contains("host-"), "{}: get:\n{got}", h.label);
        assert!(
            !got.contains("ha-test-secret")
                && !got.contains(&format!("\"{}\"", twinsan_ha::testxapi::PASSWORD)),
            "{}: `twinsan get` shows a secret:\n{got}",
            h.label
        );
        let log = ok_cli(h, &["log"]);
        assert!(!log.trim().is_empty(), "{}: empty `twinsan log`", h.label);
    }

    // A's promotion at start alerted (start-up quiet period is 0 here); flip the master so B
    // promotes and alerts too.
    l.flip_master(1);
    wait_serving_on(&l, 1, Duration::from_secs(20));
    let smtp = l.smtp.as_ref().unwrap();
    let xapi = &l.xapi.as_ref().unwrap().xapi;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mails = smtp.mails();
        let from_b = mails.iter().any(|m| m.from.contains("host-b"));
        let msgs = xapi.messages();
        if from_b && !msgs.is_empty() {
            let m = mails.iter().find(|m| m.from.contains("host-b")).unwrap();
            eprintln!(
                "{} mails at the sink, e.g. from {} to {:?}:\n{}\n{} XAPI messages, e.g. {:?}",
                mails.len(),
                m.from,
                m.to,
                m.data.lines().take(12).collect::<Vec<_>>().join("\n"),
                msgs.len(),
                msgs[0]
            );
            assert!(m.to.iter().any(|t| t.contains("ops@example.org")));
            assert!(
                m.data.contains("Subject:"),
                "no Subject header:\n{}",
                m.data
            );
            assert!(msgs.iter().all(|m| m.name.starts_with("TWINSAN_")));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no alert from B at the SMTP sink ({} mails: {:?}) or no XAPI message ({msgs:?})",
            mails.len(),
            mails.iter().map(|m| m.from.clone()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let alerts_sent = l.b.ha().unwrap()["counters"]["alerts_sent"].as_u64();
    assert!(alerts_sent >= Some(1), "B counted no alert");
}

/// Planned-switchover and pool-master-change timings, several repetitions each way; writes the
/// markdown report `benches/results/ha-switchover.md`. Run by `benches/ha-switchover.sh`.
#[test]
#[ignore = "benchmark: run with benches/ha-switchover.sh"]
fn ha_switchover_benchmark() {
    let reps: usize = std::env::var("HA_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let Some(mut l) = HaLab::new_or_skip("bench", HaSpec::new(Source::Xapi)) else {
        return;
    };
    l.start_both();
    l.wait_primary(0, PROMOTE);
    let client = l.lab.client.clone();
    let measure_pause = |l: &HaLab, act: &dyn Fn(&HaLab) -> usize| -> (Duration, Duration, u64) {
        let progress = Arc::new(Progress::default());
        let mut opts = WriteOpts::random(1, 0, 2048);
        opts.queue_depth = 8;
        // Like open-iscsi's NOP-Out timeout: a connection that goes silent is replaced.
        opts.stall_limit = Some(INITIATOR_STALL_LIMIT);
        let writer = spawn_resuming_writer(
            &client,
            opts,
            Duration::from_secs(12),
            Duration::from_secs(15),
            progress.clone(),
        );
        wait_acked(&progress, 200, Duration::from_secs(10), "bench writer");
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let to = act(l);
        wait_serving_on(l, to, Duration::from_secs(20));
        let serving = t.elapsed();
        let rep = writer.join().unwrap();
        eprintln!("  client: {}", rep.summary());
        assert_eq!(rep.failed(), 0, "{:?}", rep.notes());
        assert!(
            rep.rounds.len() >= 2 && rep.rounds.last().unwrap().good() > 0,
            "the client did not resume on the new primary: {}",
            rep.summary()
        );
        l.wait_primary(to, PROMOTE);
        (rep.max_pause(), serving, rep.good())
    };
    let mut planned = Vec::new();
    let mut flips = Vec::new();
    let mut current = 0usize;
    for r in 0..reps {
        // Planned switchover in manual mode (become-secondary, then become-primary).
        ok_cli(&l.a, &["manual-mode-enable"]);
        ok_cli(&l.b, &["manual-mode-enable"]);
        let from = current;
        let (pause, serving, acked) = measure_pause(&l, &|l: &HaLab| {
            ok_cli(l.host(from), &["become-secondary"]);
            ok_cli(l.host(1 - from), &["become-primary"]);
            1 - from
        });
        eprintln!("rep {r}: planned {} -> {}: pause {pause:.0?}, serving after {serving:.0?}, {acked} writes", l.host(from).label, l.host(1 - from).label);
        planned.push((from, pause, serving));
        // Back to native roles (pool master = A), leave manual mode.
        ok_cli(l.host(1 - from), &["become-secondary"]);
        ok_cli(l.host(from), &["become-primary"]);
        wait_serving_on(&l, from, Duration::from_secs(20));
        l.wait_primary(from, PROMOTE);
        ok_cli(&l.a, &["manual-mode-disable"]);
        ok_cli(&l.b, &["manual-mode-disable"]);
        // Pool master change.
        let (pause, serving, acked) = measure_pause(&l, &|l: &HaLab| {
            l.flip_master(1 - current);
            1 - current
        });
        eprintln!("rep {r}: pool master {} -> {}: serving after {serving:.0?}, pause {pause:.0?}, {acked} writes", l.host(current).label, l.host(1 - current).label);
        flips.push((current, pause, serving));
        current = 1 - current;
        // Planned switchovers start from the native primary: make A master again.
        if current != 0 {
            l.flip_master(0);
            wait_serving_on(&l, 0, Duration::from_secs(20));
            l.wait_primary(0, PROMOTE);
            current = 0;
        }
    }
    let stats = |v: &[Duration]| {
        let mut s = v.to_vec();
        s.sort();
        let mean = s.iter().sum::<Duration>() / s.len().max(1) as u32;
        (s[0], s[s.len() / 2], mean, s[s.len() - 1])
    };
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    let mut md = String::new();
    md.push_str("# HA switchover benchmark\n\n");
    md.push_str(&format!(
        "Produced by `benches/ha-switchover.sh` ({reps} repetitions, {}). Two `twinsan` daemons (release build) in network namespaces \
         (A, B, client on a bridge; direct replication link), 64 MiB replicated LUN; the client writes tagged 4 KiB blocks at queue \
         depth 8 to the VIP and logs in again when its connection drops. \"I/O pause\" is the longest time without an acknowledged \
         write; \"serving\" is the time from the operator command / pool master change until an iSCSI login through the VIP \
         reaches the new host (VIP only on it). The serving times are upper bounds: each poll round runs `ip addr` in both \
         host namespaces and a login from the client, which takes tens to hundreds of ms on a loaded machine; the client's \
         pause is the precise measure. The writer gives up a connection that answers nothing for 5 s with commands \
         outstanding (open-iscsi's default NOP-Out timeout) and retries logins every 250 ms.\n\n",
        std::env::var("HA_BENCH_NOTE").unwrap_or_else(|_| "2-core shared VM".into())
    ));
    md.push_str("| measurement | goal | min ms | median ms | mean ms | max ms |\n|---|---|---|---|---|---|\n");
    let rows: [(&str, &str, Vec<Duration>); 4] = [
        (
            "planned switchover (manual mode) I/O pause",
            "<= 1000 ms",
            planned.iter().map(|p| p.1).collect(),
        ),
        (
            "planned switchover: command -> serving on new host",
            "",
            planned.iter().map(|p| p.2).collect(),
        ),
        (
            "pool master change -> serving on new host",
            "<= 2000 ms",
            flips.iter().map(|p| p.2).collect(),
        ),
        (
            "pool master change I/O pause",
            "",
            flips.iter().map(|p| p.1).collect(),
        ),
    ];
    for (what, goal, v) in &rows {
        let (min, med, mean, max) = stats(v);
        md.push_str(&format!(
            "| {what} | {goal} | {} | {} | {} | {} |\n",
            ms(min),
            ms(med),
            ms(mean),
            ms(max)
        ));
    }
    md.push_str("\n## Each repetition\n\n| rep | planned from | pause ms | serving ms | master flip from | pause ms | serving ms |\n|---|---|---|---|---|---|---|\n");
    for (i, (p, f)) in planned.iter().zip(&flips).enumerate() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            i + 1,
            l.host(p.0).label,
            ms(p.1),
            ms(p.2),
            l.host(f.0).label,
            ms(f.1),
            ms(f.2)
        ));
    }
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/ha-switchover.md");
    std::fs::write(&out, &md).unwrap();
    eprintln!("{md}\nwritten to {}", out.display());
}
