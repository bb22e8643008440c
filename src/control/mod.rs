//! The local control socket: a Unix stream socket at `server.control_socket` speaking one
//! JSON request per line and one JSON answer per line. `twinsan status` and the other
//! operator commands are clients of it; scripts can be too (`{"command":"status"}`).

use crate::iscsi::context::IscsiContext;
use crate::volumes::Volumes;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub mod client;

pub use client::{request, request_with_timeout, ControlError};

/// What the control socket answers from and acts on.
pub struct ControlContext {
    /// Targets, logical units and sessions (`status`).
    pub iscsi: Arc<IscsiContext>,
    /// Replicated volumes (`status`, `replication ...`).
    pub volumes: Volumes,
    /// The HA role loop, when `[ha]` is configured (set once it runs).
    pub ha: std::sync::OnceLock<Arc<crate::ha::HaHandle>>,
    /// The effective configuration with secrets masked (`twinsan get`).
    pub effective_config: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// An operator action on a replicated volume (see `volumes::act`).
    Replication {
        volume: String,
        action: String,
        #[serde(default)]
        force: bool,
    },
    /// An HA operator command: manual-mode-enable, manual-mode-disable, become-primary,
    /// become-secondary.
    Ha {
        action: String,
    },
    /// The effective configuration, secrets masked.
    Get,
    /// Recent log lines, then (unless `follow` is false) each new line.
    Log {
        #[serde(default = "default_follow")]
        follow: bool,
    },
}

fn default_follow() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub targets: Vec<TargetStatus>,
    pub sessions: Vec<SessionStatus>,
    /// READ/WRITE data held now by all sessions, and the limit (`max_inflight_bytes`).
    #[serde(default)]
    pub inflight_bytes: u64,
    #[serde(default)]
    pub max_inflight_bytes: u64,
    /// `VolumeStatus` of each replicated volume, as JSON.
    #[serde(default)]
    pub volumes: Vec<serde_json::Value>,
    /// The HA role loop's view (absent without `[ha]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TargetStatus {
    pub iqn: String,
    pub luns: Vec<LunStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LunStatus {
    pub number: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub store: String,
    /// The I/O engine serving this LUN (`io_uring` or `threads`).
    #[serde(default)]
    pub engine: String,
    pub naa: String,
    pub serial: String,
    /// Commands, bytes, errors and queue depth since start (what the metrics endpoint
    /// exports as `twinsan_lun_*`).
    #[serde(default)]
    pub stats: crate::scsi::stats::LunStatsSnapshot,
}

#[cfg(test)]
impl LunStatus {
    /// LUN 0, 1 MiB of 512-byte blocks, with `stats` (for the renderers' tests).
    pub(crate) fn with_stats(stats: crate::scsi::stats::LunStatsSnapshot) -> LunStatus {
        LunStatus {
            number: 0,
            size_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            store: String::new(),
            engine: String::new(),
            naa: String::new(),
            serial: String::new(),
            stats,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    pub tsih: u16,
    pub initiator: String,
    /// None for a discovery session.
    pub target: Option<String>,
    pub active_tasks: u32,
    /// READ/WRITE data this session holds now.
    #[serde(default)]
    pub inflight_bytes: u64,
}

fn status(state: &ControlContext, started: Instant) -> Status {
    let mut targets: Vec<TargetStatus> = state
        .iscsi
        .targets
        .values()
        .map(|t| TargetStatus {
            iqn: t.iqn.clone(),
            luns: t
                .scsi
                .logical_units()
                .map(|lu| LunStatus {
                    number: lu.lun(),
                    size_bytes: lu.num_blocks() * lu.block_size() as u64,
                    block_size: lu.block_size(),
                    read_only: lu.settings().read_only,
                    store: lu.store().describe(),
                    engine: lu.store().engine().to_string(),
                    naa: hex::encode(&lu.settings().identity.naa),
                    serial: lu.settings().identity.serial.clone(),
                    stats: lu.stats().snapshot(),
                })
                .collect(),
        })
        .collect();
    targets.sort_by(|a, b| a.iqn.cmp(&b.iqn));
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: started.elapsed().as_secs(),
        targets,
        sessions: state
            .iscsi
            .sessions
            .list()
            .iter()
            .map(|s| SessionStatus {
                tsih: s.tsih,
                initiator: s.initiator.clone(),
                target: s.target.as_ref().map(|t| t.iqn.clone()),
                active_tasks: s.active_tasks(),
                inflight_bytes: s.budget.used(),
            })
            .collect(),
        inflight_bytes: state.iscsi.budget.used(),
        max_inflight_bytes: state.iscsi.budget.limit(),
        volumes: state
            .volumes
            .iter()
            .map(|v| serde_json::to_value(v.status()).unwrap_or_default())
            .collect(),
        ha: None,
    }
}

/// The `status` answer: what the daemon serves and, with `[ha]`, the role loop's view. The
/// metrics endpoint exports the same snapshot.
pub async fn full_status(state: &ControlContext, started: Instant) -> Status {
    let mut st = status(state, started);
    if let Some(h) = state.ha.get() {
        st.ha = Some(h.status_json().await);
    }
    st
}

async fn answer(state: &ControlContext, started: Instant, line: &str) -> serde_json::Value {
    match serde_json::from_str::<Request>(line) {
        Ok(Request::Status) => {
            let st = full_status(state, started).await;
            serde_json::json!({ "ok": true, "status": st })
        }
        Ok(Request::Ha { action }) => {
            let Some(h) = state.ha.get() else {
                return serde_json::json!({ "ok": false, "error": "HA is not configured (no [ha] table)" });
            };
            let Some(c) = crate::ha::Command::parse(&action) else {
                return serde_json::json!({ "ok": false, "error": format!("unknown ha action `{action}`") });
            };
            match h.command(c).await {
                Ok(message) => serde_json::json!({ "ok": true, "message": message }),
                Err(reason) => serde_json::json!({ "ok": false, "error": reason }),
            }
        }
        Ok(Request::Get) => serde_json::json!({ "ok": true, "config": state.effective_config }),
        Ok(Request::Log { .. }) => {
            serde_json::json!({ "ok": false, "error": "log is answered by stream_log" })
        }
        Ok(Request::Replication {
            volume,
            action,
            force,
        }) => {
            let Some(v) = state.volumes.by_name(&volume) else {
                return serde_json::json!({ "ok": false, "error": format!("no replicated volume `{volume}`") });
            };
            match crate::volumes::act(v, &action, force).await {
                Ok(()) => serde_json::json!({ "ok": true }),
                Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
            }
        }
        Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
    }
}

/// Serves the control socket until `shutdown`. A stale socket file from a crashed run is
/// replaced; a live one (another twinsan answering) is an error.
pub async fn serve(
    path: PathBuf,
    state: Arc<ControlContext>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another twinsan answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(&path)?;
    // Operator commands change roles later: only root (the owner) may talk to the daemon.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    info!(socket = %path.display(), "control socket ready");
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client(stream, &state, started).await {
                            debug!("control client: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn client(
    stream: UnixStream,
    state: &ControlContext,
    started: Instant,
) -> std::io::Result<()> {
    let peer = peer_name(&stream);
    let (rd, mut wr) = stream.into_split();
    // A bounded read: a client cannot make the daemon buffer without limit.
    let mut rd = BufReader::new(rd.take(1 << 20));
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if rd.read_until(b'\n', &mut raw).await? == 0 {
            return Ok(());
        }
        if raw.last() == Some(&b'\n') {
            raw.pop();
            if raw.last() == Some(&b'\r') {
                raw.pop();
            }
        }
        let reply = match std::str::from_utf8(&raw) {
            Err(e) => {
                warn!(
                    client = %peer,
                    "control socket: refused a request that is not UTF-8 ({} bytes: {e})",
                    raw.len()
                );
                serde_json::json!({ "ok": false, "error": format!("bad request: not UTF-8 ({e})") })
            }
            Ok(line) => {
                if let Ok(Request::Log { follow }) = serde_json::from_str::<Request>(line) {
                    return stream_log(&mut wr, follow).await;
                }
                let reply = answer(state, started, line).await;
                if let Some(e) = reply["error"]
                    .as_str()
                    .filter(|e| e.starts_with("bad request"))
                {
                    warn!(client = %peer, "control socket: refused a request: {e}");
                }
                reply
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        wr.write_all(out.as_bytes()).await?;
    }
}

/// Who is on the other end of a control connection: the peer's pid and uid (a Unix socket
/// has no address; the socket is root's only, so this names the process).
fn peer_name(stream: &UnixStream) -> String {
    match stream.peer_cred() {
        Ok(c) => format!(
            "pid {} uid {}",
            c.pid().map_or_else(|| "?".to_string(), |p| p.to_string()),
            c.uid()
        ),
        Err(_) => "unknown".into(),
    }
}

/// `log`: the kept lines as `{"ok":true,"lines":[...]}`, then each new one as `{"line":...}`.
async fn stream_log(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    follow: bool,
) -> std::io::Result<()> {
    let (lines, mut rx) = crate::logbuf::snapshot_and_follow();
    let mut out = serde_json::json!({ "ok": true, "lines": lines }).to_string();
    out.push('\n');
    wr.write_all(out.as_bytes()).await?;
    if !follow {
        return Ok(());
    }
    loop {
        let line = match rx.recv().await {
            Ok(l) => l,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                format!("... {n} log lines skipped (reader too slow)")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        let mut out = serde_json::json!({ "line": line }).to_string();
        out.push('\n');
        wr.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

/// Human-readable rendering of a status.
/// `[#####.....]` for `percent` (0-100) in `width` cells.
fn progress_bar(percent: f64, width: usize) -> String {
    let filled = ((percent.clamp(0.0, 100.0) / 100.0) * width as f64).round() as usize;
    format!("{}{}", "#".repeat(filled), ".".repeat(width - filled))
}

/// What changed between two snapshots `elapsed` apart: each replicated volume's link rates
/// (application and resync traffic). For `status --watch`.
pub fn render_rates(before: &Status, now: &Status, elapsed: std::time::Duration) -> String {
    use std::fmt::Write;
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut o = String::new();
    for t in &now.targets {
        let Some(bt) = before.targets.iter().find(|b| b.iqn == t.iqn) else {
            continue;
        };
        for l in &t.luns {
            let Some(b) = bt.luns.iter().find(|b| b.number == l.number) else {
                continue;
            };
            let (a, b) = (&l.stats, &b.stats);
            // Counters that went backwards (daemon restarted) read as no traffic.
            let reads = a.reads.saturating_sub(b.reads);
            let writes = a.writes.saturating_sub(b.writes);
            let mean_us = |ns: u64, n: u64| {
                if n == 0 {
                    0.0
                } else {
                    ns as f64 / n as f64 / 1e3
                }
            };
            let mib = |x: u64| x as f64 / secs / (1 << 20) as f64;
            let _ = writeln!(
                o,
                "lun {:<3} read {:.0} IOPS {:.1} MiB/s {:.0} us, write {:.0} IOPS {:.1} MiB/s {:.0} us, in flight {}",
                l.number,
                reads as f64 / secs,
                mib(a.read_bytes.saturating_sub(b.read_bytes)),
                mean_us(a.read_latency_ns.saturating_sub(b.read_latency_ns), reads),
                writes as f64 / secs,
                mib(a.written_bytes.saturating_sub(b.written_bytes)),
                mean_us(a.write_latency_ns.saturating_sub(b.write_latency_ns), writes),
                a.in_flight,
            );
        }
    }
    for v in &now.volumes {
        let Some(b) = before.volumes.iter().find(|b| b["name"] == v["name"]) else {
            continue;
        };
        let rate = |k: &str| {
            let d = v[k]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(b[k].as_u64().unwrap_or(0));
            d as f64 / secs / (1 << 20) as f64
        };
        let _ = writeln!(
            o,
            "volume {}: link sent {:.1} MiB/s, received {:.1} MiB/s (resync {:.1} / {:.1} MiB/s)",
            v["name"].as_str().unwrap_or("?"),
            rate("sent_bytes"),
            rate("received_bytes"),
            rate("resync_sent_bytes"),
            rate("resync_received_bytes"),
        );
    }
    o
}

pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "twinsan {} (pid {}, up {} s)",
        s.version, s.pid, s.uptime_secs
    );
    for t in &s.targets {
        let _ = writeln!(o, "target {}", t.iqn);
        for l in &t.luns {
            let _ = writeln!(
                o,
                "  lun {:<3} {:>8} MiB  bs {:<4} {} engine {} naa {} serial {}\n          {}",
                l.number,
                l.size_bytes >> 20,
                l.block_size,
                if l.read_only { "ro" } else { "rw" },
                l.engine,
                l.naa,
                l.serial,
                l.store
            );
        }
    }
    for v in &s.volumes {
        let f = |k: &str| match &v[k] {
            serde_json::Value::String(x) => x.clone(),
            serde_json::Value::Null => "unknown".into(),
            other => other.to_string(),
        };
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            o,
            "volume {}: {} (peer {}), {}, disk {} / peer {}, out of sync {} KiB{}{}",
            f("name"),
            f("role"),
            f("peer_role"),
            f("connection"),
            f("disk_state"),
            f("peer_disk_state"),
            n("out_of_sync_bytes") >> 10,
            if v["split_brain"] == true {
                ", SPLIT BRAIN"
            } else {
                ""
            },
            if v["suspended"] == true {
                ", I/O SUSPENDED"
            } else {
                ""
            },
        );
        let r = &v["resync"];
        if r.is_object() {
            let pct = r["percent"].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                o,
                "  resync [{}] {:.1}% ({} of {} MiB) at {} MiB/s, ETA {} s",
                progress_bar(pct, 30),
                pct,
                r["done_bytes"].as_u64().unwrap_or(0) >> 20,
                r["total_bytes"].as_u64().unwrap_or(0) >> 20,
                r["bytes_per_sec"].as_u64().unwrap_or(0) >> 20,
                r["eta_secs"]
            );
        }
        let _ = writeln!(
            o,
            "  sent {} MiB, received {} MiB, resync sent {} MiB / received {} MiB, write errors {}",
            n("sent_bytes") >> 20,
            n("received_bytes") >> 20,
            n("resync_sent_bytes") >> 20,
            n("resync_received_bytes") >> 20,
            n("write_errors")
        );
    }
    if let Some(ha) = &s.ha {
        o.push_str(&crate::ha::render(ha));
    }
    let _ = writeln!(
        o,
        "sessions: {} (data in flight {} of {} MiB)",
        s.sessions.len(),
        s.inflight_bytes >> 20,
        s.max_inflight_bytes >> 20
    );
    for x in &s.sessions {
        let _ = writeln!(
            o,
            "  tsih {:<5} {} -> {} ({} active, {} KiB in flight)",
            x.tsih,
            x.initiator,
            x.target.as_deref().unwrap_or("discovery"),
            x.active_tasks,
            x.inflight_bytes >> 10
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(volumes: Vec<serde_json::Value>) -> Status {
        Status {
            version: "0".into(),
            pid: 1,
            uptime_secs: 0,
            targets: Vec::new(),
            sessions: Vec::new(),
            inflight_bytes: 0,
            max_inflight_bytes: 0,
            volumes,
            ha: None,
        }
    }

    #[test]
    fn progress_bar_fills_in_proportion_and_clamps() {
        assert_eq!(progress_bar(0.0, 10), "..........");
        assert_eq!(progress_bar(50.0, 10), "#####.....");
        assert_eq!(progress_bar(100.0, 10), "##########");
        assert_eq!(progress_bar(250.0, 4), "####");
        assert_eq!(progress_bar(f64::NAN, 4).len(), 4);
    }

    #[test]
    fn rates_are_byte_deltas_per_second_per_volume() {
        let v = |sent: u64, rs: u64| {
            serde_json::json!({"name": "r0", "sent_bytes": sent, "received_bytes": 0,
                "resync_sent_bytes": rs, "resync_received_bytes": 0})
        };
        let before = status(vec![v(0, 0)]);
        let now = status(vec![v(8 << 20, 2 << 20)]);
        let r = render_rates(&before, &now, std::time::Duration::from_secs(2));
        assert_eq!(
            r,
            "volume r0: link sent 4.0 MiB/s, received 0.0 MiB/s (resync 1.0 / 0.0 MiB/s)\n"
        );
        // A counter that went backwards (daemon restarted) reads as no traffic.
        let r = render_rates(&now, &before, std::time::Duration::from_secs(1));
        assert!(r.contains("sent 0.0 MiB/s"));
    }

    #[test]
    fn lun_rates_are_iops_mib_and_mean_latency_over_the_interval() {
        let lun = |reads: u64, read_ns: u64, writes: u64, write_ns: u64, in_flight: u64| {
            let mut s = status(Vec::new());
            s.targets.push(TargetStatus {
                iqn: "iqn.x:t".into(),
                luns: vec![LunStatus::with_stats(
                    crate::scsi::stats::LunStatsSnapshot {
                        reads,
                        read_bytes: reads * 4096,
                        read_latency_ns: read_ns,
                        writes,
                        written_bytes: writes << 20,
                        write_latency_ns: write_ns,
                        in_flight,
                        ..Default::default()
                    },
                )],
            });
            s
        };
        let before = lun(1000, 50_000_000, 10, 1_000_000, 0);
        // 2 s later: 2,000 reads of 4 KiB that took 100 us each, 4 writes of 1 MiB at 2 ms.
        let now = lun(3000, 250_000_000, 14, 9_000_000, 3);
        let r = render_rates(&before, &now, std::time::Duration::from_secs(2));
        assert_eq!(
            r,
            "lun 0   read 1000 IOPS 3.9 MiB/s 100 us, write 2 IOPS 2.0 MiB/s 2000 us, in flight 3\n"
        );
        // Nothing done: no division by zero.
        let r = render_rates(&now, &now, std::time::Duration::from_secs(1));
        assert!(
            r.starts_with("lun 0   read 0 IOPS 0.0 MiB/s 0 us, write 0 IOPS"),
            "{r}"
        );
    }
}
