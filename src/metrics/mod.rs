//! The Prometheus endpoint (`[server] metrics_listen`): `GET /metrics` answers the text
//! exposition format ([`exposition`]) of the same snapshot `twinsan status --json` shows
//! (per-LUN command counters and latency histograms, sessions, replicated volumes, HA).
//! Replicated-volume metrics carry drbd-reactor's names and labels where the meaning is the
//! same (`drbd_resource_role`, `drbd_connection_state`, `drbd_device_state`,
//! `drbd_peerdevice_outofsync_bytes`, ...), so existing DRBD dashboards keep working; the rest
//! are `twinsan_*`. The list is in README "Monitoring".
//!
//! The hot path only touches atomics ([`crate::scsi::stats`],
//! [`twinsan_replication::latency`]); all formatting happens here, per scrape.

pub mod exposition;

use crate::control::{full_status, ControlContext, Status};
use crate::scsi::stats::{CommandClass, SENSE_KEY_NAMES};
use bytes::Bytes;
use exposition::{Exposition, Kind};
use http_body_util::Full;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use twinsan_replication::latency::HistogramSnapshot;
use twinsan_replication::volume::{ConnState, Role, VolumeStatus};

/// Everything one scrape exports, gathered at once.
pub struct Scrape {
    /// What `twinsan status` answers (LUN counters, sessions, HA).
    pub status: Status,
    /// Latency histograms per (target, LUN): read, write, flush.
    pub lun_latency: BTreeMap<(String, u64), [(CommandClass, HistogramSnapshot); 3]>,
    /// Each replicated volume: its status, its peer and its write-ack latency.
    pub volumes: Vec<(VolumeStatus, SocketAddr, HistogramSnapshot)>,
}

impl Scrape {
    pub async fn gather(ctx: &ControlContext, started: Instant) -> Scrape {
        let status = full_status(ctx, started).await;
        let mut lun_latency = BTreeMap::new();
        for t in ctx.iscsi.targets.values() {
            for lu in t.scsi.logical_units() {
                lun_latency.insert((t.iqn.clone(), lu.lun()), lu.stats().latencies());
            }
        }
        let volumes = ctx
            .volumes
            .iter()
            .map(|v| (v.status(), v.peer_addr(), v.write_ack_latency()))
            .collect();
        Scrape {
            status,
            lun_latency,
            volumes,
        }
    }
}

const CONN_STATES: [&str; 3] = ["StandAlone", "Connecting", "Connected"];
const REPLICATION_STATES: [&str; 6] = [
    "StandAlone",
    "Connecting",
    "Connected",
    "SyncSource",
    "SyncTarget",
    "VerifySource",
];
const DISK_STATES: [&str; 5] = [
    "Diskless",
    "Inconsistent",
    "Outdated",
    "Consistent",
    "UpToDate",
];
/// The peer's disk as DRBD names an unknown one.
const PEER_DISK_STATES: [&str; 6] = [
    "Diskless",
    "Inconsistent",
    "Outdated",
    "Consistent",
    "UpToDate",
    "DUnknown",
];
const ROLES: [&str; 3] = ["Primary", "Secondary", "Unknown"];
const HA_ROLES: [&str; 4] = ["primary", "secondary", "promoting", "demoting"];
const HA_PEER_STATES: [&str; 4] = ["primary", "secondary", "unknown", "unreachable"];

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "Primary",
        Role::Secondary => "Secondary",
    }
}

/// DRBD 9 keeps sync and verify out of the connection state (they are the peer device's
/// replication state): every connected state is `Connected` there.
fn drbd_connection_state(c: ConnState) -> &'static str {
    match c {
        ConnState::StandAlone => "StandAlone",
        ConnState::Connecting => "Connecting",
        ConnState::Connected
        | ConnState::SyncSource
        | ConnState::SyncTarget
        | ConnState::VerifySource => "Connected",
    }
}

fn class_name(c: CommandClass) -> &'static str {
    match c {
        CommandClass::Read => "read",
        CommandClass::Write => "write",
        CommandClass::Flush => "flush",
        CommandClass::Other => "other",
    }
}

/// The exposition of `s`.
pub fn render(s: &Scrape) -> String {
    let mut e = Exposition::default();
    e.family(
        "twinsan_build_info",
        Kind::Gauge,
        "Always 1; the version as a label.",
    );
    e.sample(
        "twinsan_build_info",
        &[("version", &s.status.version)],
        1u64,
    );
    e.family(
        "twinsan_uptime_seconds",
        Kind::Gauge,
        "Seconds since the daemon started.",
    );
    e.sample("twinsan_uptime_seconds", &[], s.status.uptime_secs);
    render_luns(&mut e, s);
    render_sessions(&mut e, &s.status);
    render_volumes(&mut e, &s.volumes);
    if let Some(ha) = &s.status.ha {
        render_ha(&mut e, ha);
    }
    e.finish()
}

fn render_luns(e: &mut Exposition, s: &Scrape) {
    let luns: Vec<(&str, String, &crate::control::LunStatus)> = s
        .status
        .targets
        .iter()
        .flat_map(|t| {
            t.luns
                .iter()
                .map(move |l| (t.iqn.as_str(), l.number.to_string(), l))
        })
        .collect();
    let each = |e: &mut Exposition,
                name: &str,
                kind: Kind,
                help: &str,
                f: &dyn Fn(&crate::control::LunStatus) -> u64| {
        e.family(name, kind, help);
        for (t, n, l) in &luns {
            e.sample(name, &[("target", t), ("lun", n)], f(l));
        }
    };
    each(
        e,
        "twinsan_lun_size_bytes",
        Kind::Gauge,
        "Logical unit size in bytes.",
        &|l| l.size_bytes,
    );
    e.family(
        "twinsan_lun_commands_total",
        Kind::Counter,
        "SCSI commands executed, by class (read, write, flush, other); refused ones count under errors only.",
    );
    for (t, n, l) in &luns {
        for (class, v) in [
            ("read", l.stats.reads),
            ("write", l.stats.writes),
            ("flush", l.stats.flushes),
            ("other", l.stats.others),
        ] {
            e.sample(
                "twinsan_lun_commands_total",
                &[("target", t), ("lun", n), ("class", class)],
                v,
            );
        }
    }
    each(
        e,
        "twinsan_lun_read_bytes_total",
        Kind::Counter,
        "Data-In bytes of READs that completed GOOD.",
        &|l| l.stats.read_bytes,
    );
    each(
        e,
        "twinsan_lun_written_bytes_total",
        Kind::Counter,
        "Data-Out bytes of write commands that completed GOOD.",
        &|l| l.stats.written_bytes,
    );
    e.family(
        "twinsan_lun_check_conditions_total",
        Kind::Counter,
        "Commands answered CHECK CONDITION, by sense key (SPC-4 4.5.6); keys never returned are left out.",
    );
    for (t, n, l) in &luns {
        for key in SENSE_KEY_NAMES {
            if let Some(v) = l.stats.check_conditions.get(key) {
                e.sample(
                    "twinsan_lun_check_conditions_total",
                    &[("target", t), ("lun", n), ("sense_key", key)],
                    *v,
                );
            }
        }
    }
    each(
        e,
        "twinsan_lun_reservation_conflicts_total",
        Kind::Counter,
        "Commands answered RESERVATION CONFLICT.",
        &|l| l.stats.reservation_conflicts,
    );
    each(
        e,
        "twinsan_lun_commands_in_flight",
        Kind::Gauge,
        "Commands running on the logical unit now (its queue depth).",
        &|l| l.stats.in_flight,
    );
    e.family(
        "twinsan_lun_command_duration_seconds",
        Kind::Histogram,
        "Time from execution start to response of reads, writes (replicated: both hosts) and flushes.",
    );
    for ((t, n), classes) in &s.lun_latency {
        let n = n.to_string();
        for (class, h) in classes {
            e.histogram(
                "twinsan_lun_command_duration_seconds",
                &[("target", t), ("lun", &n), ("class", class_name(*class))],
                h,
            );
        }
    }
}

fn render_sessions(e: &mut Exposition, s: &Status) {
    // (initiator, target) -> (sessions, active tasks, bytes in flight)
    let mut by: BTreeMap<(&str, &str), (u64, u64, u64)> = BTreeMap::new();
    for x in &s.sessions {
        let k = (
            x.initiator.as_str(),
            x.target.as_deref().unwrap_or("discovery"),
        );
        let v = by.entry(k).or_default();
        v.0 += 1;
        v.1 += u64::from(x.active_tasks);
        v.2 += x.inflight_bytes;
    }
    for (name, help, pick) in [
        ("twinsan_sessions", "iSCSI sessions logged in, by initiator and target (\"discovery\" for SendTargets sessions).", 0),
        ("twinsan_session_active_tasks", "Commands the initiator's sessions have running.", 1),
        ("twinsan_session_inflight_bytes", "READ/WRITE data the initiator's sessions hold.", 2),
    ] {
        e.family(name, Kind::Gauge, help);
        for ((i, t), v) in &by {
            let v = [v.0, v.1, v.2][pick];
            e.sample(name, &[("initiator", i), ("target", t)], v);
        }
    }
    e.family(
        "twinsan_inflight_bytes",
        Kind::Gauge,
        "READ/WRITE data all sessions hold.",
    );
    e.sample("twinsan_inflight_bytes", &[], s.inflight_bytes);
    e.family(
        "twinsan_max_inflight_bytes",
        Kind::Gauge,
        "The limit of twinsan_inflight_bytes (max_inflight_bytes).",
    );
    e.sample("twinsan_max_inflight_bytes", &[], s.max_inflight_bytes);
}

fn render_volumes(e: &mut Exposition, volumes: &[(VolumeStatus, SocketAddr, HistogramSnapshot)]) {
    e.family(
        "drbd_resource_resources",
        Kind::Gauge,
        "Number of replicated volumes (resources).",
    );
    e.sample("drbd_resource_resources", &[], volumes.len() as u64);
    if volumes.is_empty() {
        return;
    }
    let peers: Vec<String> = volumes.iter().map(|(_, p, _)| p.to_string()).collect();
    let name = |i: usize| volumes[i].0.name.as_str();
    // drbd-reactor's label sets: resource `name`; connection `name`, `conn_name`; device
    // `name`, `volume` (always 0: one volume per resource); peer device all three.
    let res = |i: usize| [("name", name(i))];
    let conn = |i: usize| [("name", name(i)), ("conn_name", peers[i].as_str())];
    let dev = |i: usize| [("name", name(i)), ("volume", "0")];
    let peerdev = |i: usize| {
        [
            ("name", name(i)),
            ("conn_name", peers[i].as_str()),
            ("volume", "0"),
        ]
    };

    e.family(
        "drbd_resource_role",
        Kind::Gauge,
        "Role of the resource (1 for the current one).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.states(
            "drbd_resource_role",
            &res(i),
            "drbd_resource_role",
            &ROLES,
            role_name(v.role),
        );
    }
    e.family("drbd_resource_suspended", Kind::Gauge, "Boolean whether the resource's writes are suspended (fencing = \"suspend-io\" without the peer).");
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample("drbd_resource_suspended", &res(i), v.suspended);
    }
    e.family(
        "drbd_connection_state",
        Kind::Gauge,
        "Connection state to the peer, DRBD 9 style (sync and verify are Connected).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.states(
            "drbd_connection_state",
            &conn(i),
            "drbd_connection_state",
            &CONN_STATES,
            drbd_connection_state(v.connection),
        );
    }
    e.family("drbd_device_state", Kind::Gauge, "State of the local disk.");
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.states(
            "drbd_device_state",
            &dev(i),
            "drbd_device_state",
            &DISK_STATES,
            &v.disk_state.to_string(),
        );
    }
    e.family(
        "drbd_device_size_bytes",
        Kind::Gauge,
        "Usable size of the volume in bytes.",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample("drbd_device_size_bytes", &dev(i), v.size_bytes);
    }
    e.family(
        "drbd_peerdevice_outofsync_bytes",
        Kind::Gauge,
        "Bytes out of sync with the peer, according to the bitmap.",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample(
            "drbd_peerdevice_outofsync_bytes",
            &peerdev(i),
            v.out_of_sync_bytes,
        );
    }
    e.family(
        "drbd_peerdevice_sent_bytes",
        Kind::Counter,
        "Replicated data bytes sent to the peer (application writes and resync).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample("drbd_peerdevice_sent_bytes", &peerdev(i), v.sent_bytes);
    }
    e.family(
        "drbd_peerdevice_received_bytes",
        Kind::Counter,
        "Replicated data bytes received from the peer.",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample(
            "drbd_peerdevice_received_bytes",
            &peerdev(i),
            v.received_bytes,
        );
    }

    e.family("twinsan_volume_connection_state", Kind::Gauge, "twinsan's connection state (status `connection`), including SyncSource, SyncTarget and VerifySource.");
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.states(
            "twinsan_volume_connection_state",
            &conn(i),
            "state",
            &REPLICATION_STATES,
            &v.connection.to_string(),
        );
    }
    e.family(
        "twinsan_volume_peer_role",
        Kind::Gauge,
        "The peer's role (Unknown when not connected).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        let r = v.peer_role.map_or("Unknown", role_name);
        e.states("twinsan_volume_peer_role", &conn(i), "role", &ROLES, r);
    }
    e.family(
        "twinsan_volume_peer_disk_state",
        Kind::Gauge,
        "The peer's disk (DUnknown when not connected).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        let d = v
            .peer_disk_state
            .map_or_else(|| "DUnknown".to_string(), |d| d.to_string());
        e.states(
            "twinsan_volume_peer_disk_state",
            &peerdev(i),
            "state",
            &PEER_DISK_STATES,
            &d,
        );
    }
    e.family(
        "twinsan_volume_split_brain",
        Kind::Gauge,
        "Boolean: a split brain was detected on the last connect.",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample("twinsan_volume_split_brain", &res(i), v.split_brain);
    }
    e.family(
        "twinsan_volume_write_errors_total",
        Kind::Counter,
        "Local or peer write errors (their ranges are marked out of sync).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample("twinsan_volume_write_errors_total", &res(i), v.write_errors);
    }
    for (metric, help, pick) in [
        (
            "twinsan_volume_resync_sent_bytes_total",
            "Resync data bytes sent since start.",
            0,
        ),
        (
            "twinsan_volume_resync_received_bytes_total",
            "Resync data bytes received since start.",
            1,
        ),
    ] {
        e.family(metric, Kind::Counter, help);
        for (i, (v, _, _)) in volumes.iter().enumerate() {
            let x = [v.resync_sent_bytes, v.resync_received_bytes][pick];
            e.sample(metric, &peerdev(i), x);
        }
    }
    e.family(
        "twinsan_volume_resync_active",
        Kind::Gauge,
        "Boolean: a resync runs (the resync_* gauges below are its progress).",
    );
    for (i, (v, _, _)) in volumes.iter().enumerate() {
        e.sample(
            "twinsan_volume_resync_active",
            &peerdev(i),
            v.resync.is_some(),
        );
    }
    for (metric, help, pick) in [
        (
            "twinsan_volume_resync_done_bytes",
            "Bytes the running resync has synced.",
            0,
        ),
        (
            "twinsan_volume_resync_total_bytes",
            "Bytes the running resync has to sync.",
            1,
        ),
        (
            "twinsan_volume_resync_bytes_per_second",
            "Average rate of the running resync.",
            2,
        ),
    ] {
        e.family(metric, Kind::Gauge, help);
        for (i, (v, _, _)) in volumes.iter().enumerate() {
            if let Some(r) = &v.resync {
                e.sample(
                    metric,
                    &peerdev(i),
                    [r.done_bytes, r.total_bytes, r.bytes_per_sec][pick],
                );
            }
        }
    }
    for (metric, help, pick) in [
        (
            "twinsan_volume_verify_done_bytes",
            "Bytes the last or running online verify compared.",
            0,
        ),
        (
            "twinsan_volume_verify_total_bytes",
            "Bytes the last or running online verify has to compare.",
            1,
        ),
        (
            "twinsan_volume_verify_mismatched_blocks",
            "4 KiB blocks the last or running online verify found different.",
            2,
        ),
        (
            "twinsan_volume_verify_running",
            "Boolean: an online verify runs.",
            3,
        ),
    ] {
        e.family(metric, Kind::Gauge, help);
        for (i, (v, _, _)) in volumes.iter().enumerate() {
            if let Some(r) = &v.verify {
                let x = [
                    r.done_bytes,
                    r.total_bytes,
                    r.mismatched_blocks,
                    u64::from(!r.finished),
                ][pick];
                e.sample(metric, &peerdev(i), x);
            }
        }
    }
    e.family(
        "twinsan_volume_write_ack_seconds",
        Kind::Histogram,
        "Application writes: from queueing to the peer until the peer's ack (protocol C).",
    );
    for (i, (_, _, ack)) in volumes.iter().enumerate() {
        e.histogram("twinsan_volume_write_ack_seconds", &conn(i), ack);
    }
}

fn render_ha(e: &mut Exposition, ha: &serde_json::Value) {
    let node = ha["node"].as_str().unwrap_or("");
    let labels = [("node", node)];
    e.family(
        "twinsan_ha_role",
        Kind::Gauge,
        "HA role of this host (1 for the current one).",
    );
    e.states(
        "twinsan_ha_role",
        &labels,
        "role",
        &HA_ROLES,
        ha["role"].as_str().unwrap_or(""),
    );
    e.family(
        "twinsan_ha_manual_mode",
        Kind::Gauge,
        "Boolean: roles change only by command.",
    );
    e.sample("twinsan_ha_manual_mode", &labels, ha["manual"] == true);
    e.family(
        "twinsan_ha_target_serving",
        Kind::Gauge,
        "Boolean: the iSCSI portals accept logins.",
    );
    e.sample(
        "twinsan_ha_target_serving",
        &labels,
        ha["target_serving"] == true,
    );
    e.family(
        "twinsan_ha_peer_state",
        Kind::Gauge,
        "The peer as each heartbeat path sees it (1 for the current state).",
    );
    for (path, key) in [
        ("replication", "peer_replication"),
        ("management", "peer_management"),
    ] {
        e.states(
            "twinsan_ha_peer_state",
            &[("node", node), ("path", path)],
            "state",
            &HA_PEER_STATES,
            ha[key].as_str().unwrap_or(""),
        );
    }
    if let Some(w) = ha["witness"].as_bool() {
        e.family(
            "twinsan_ha_witness_reachable",
            Kind::Gauge,
            "Boolean: the witness answers (absent until known).",
        );
        e.sample("twinsan_ha_witness_reachable", &labels, w);
    }
    e.family(
        "twinsan_ha_vip_held",
        Kind::Gauge,
        "Boolean: this host holds the floating address (absent while unknown).",
    );
    for v in ha["vips"].as_array().into_iter().flatten() {
        if let Some(local) = v["local"].as_bool() {
            e.sample(
                "twinsan_ha_vip_held",
                &[
                    ("node", node),
                    ("address", v["address"].as_str().unwrap_or("")),
                    ("interface", v["interface"].as_str().unwrap_or("")),
                ],
                local,
            );
        }
    }
    let c = &ha["counters"];
    for (metric, key, help) in [
        (
            "twinsan_ha_promotions_total",
            "promotions",
            "Times this host became primary.",
        ),
        (
            "twinsan_ha_demotions_total",
            "demotions",
            "Times this host stepped down to secondary.",
        ),
        (
            "twinsan_ha_refusals_total",
            "refusals",
            "Role changes refused as unsafe (operator commands and automatic promotions).",
        ),
        (
            "twinsan_ha_alerts_sent_total",
            "alerts_sent",
            "Alerts sent (mail, XAPI messages).",
        ),
    ] {
        e.family(metric, Kind::Counter, help);
        e.sample(metric, &labels, c[key].as_u64().unwrap_or(0));
    }
    for (metric, key, help) in [
        ("twinsan_ha_last_promotion_seconds", "last_promotion_ms", "Duration of the last promotion (promoting until primary): this host's part of a switchover's I/O pause."),
        ("twinsan_ha_last_demotion_seconds", "last_demotion_ms", "Duration of the last demotion (demoting until secondary)."),
    ] {
        if let Some(ms) = c[key].as_u64() {
            e.family(metric, Kind::Gauge, help);
            e.sample(metric, &labels, ms as f64 / 1000.0);
        }
    }
}

/// Binds `addr` for the endpoint; the error names the key (a start-up error).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("server.metrics_listen = \"{addr}\": cannot listen: {e}"))
}

/// Answers scrapes on `listener` until `shutdown`: `GET /metrics` (any other path 404,
/// other methods 405). No authentication (see README "Monitoring").
pub async fn serve(listener: TcpListener, ctx: Arc<ControlContext>, shutdown: CancellationToken) {
    let started = Instant::now();
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "metrics endpoint ready: GET /metrics");
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let ctx = ctx.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let ctx = ctx.clone();
                            async move { Ok::<_, Infallible>(answer(&ctx, started, &req).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                        tokio::select! {
                            r = conn => if let Err(e) = r {
                                debug!(%peer, "metrics connection: {e}");
                            },
                            _ = shutdown.cancelled() => {}
                        }
                    });
                }
                Err(e) => {
                    warn!("metrics endpoint accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn answer<B>(
    ctx: &ControlContext,
    started: Instant,
    req: &hyper::Request<B>,
) -> hyper::Response<Full<Bytes>> {
    let reply = |code: u16, ctype: &str, body: Bytes| {
        let mut r = hyper::Response::new(Full::new(body));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            404,
            "text/plain",
            Bytes::from_static(b"twinsan: GET /metrics\n"),
        );
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(405, "text/plain", Bytes::from_static(b"GET only\n"));
    }
    let scrape = Scrape::gather(ctx, started).await;
    reply(200, exposition::CONTENT_TYPE, Bytes::from(render(&scrape)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinsan_replication::latency::LatencyHistogram;
    use twinsan_replication::link::DiskState;
    use twinsan_replication::volume::ResyncProgress;

    fn volume(connection: ConnState, resync: Option<ResyncProgress>) -> VolumeStatus {
        VolumeStatus {
            name: "r0".into(),
            role: Role::Primary,
            peer_role: Some(Role::Secondary),
            connection,
            disk_state: DiskState::UpToDate,
            peer_disk_state: Some(DiskState::Inconsistent),
            resync,
            verify: None,
            out_of_sync_bytes: 8192,
            sent_bytes: 100,
            received_bytes: 5,
            resync_sent_bytes: 64,
            resync_received_bytes: 0,
            write_errors: 0,
            split_brain: false,
            suspended: false,
            size_bytes: 1 << 20,
            current_uuid: 0,
            bitmap_uuid: 0,
            history_uuids: Vec::new(),
            md_flags: 0,
        }
    }

    fn scrape(volumes: Vec<VolumeStatus>, ha: Option<serde_json::Value>) -> Scrape {
        Scrape {
            status: Status {
                version: "0.1.0".into(),
                pid: 1,
                uptime_secs: 3,
                targets: Vec::new(),
                sessions: Vec::new(),
                inflight_bytes: 0,
                max_inflight_bytes: 1 << 30,
                volumes: Vec::new(),
                ha,
            },
            lun_latency: BTreeMap::new(),
            volumes: volumes
                .into_iter()
                .map(|v| {
                    (
                        v,
                        "192.0.2.2:7789".parse().unwrap(),
                        LatencyHistogram::default().snapshot(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_syncing_volume_is_connected_for_drbd_dashboards_and_sync_source_for_twinsan() {
        let progress = ResyncProgress {
            done_bytes: 4096,
            total_bytes: 12288,
            percent: 33.3,
            bytes_per_sec: 1000,
            eta_secs: Some(8),
        };
        let out = render(&scrape(
            vec![volume(ConnState::SyncSource, Some(progress))],
            None,
        ));
        for line in [
            "drbd_resource_role{name=\"r0\",drbd_resource_role=\"Primary\"} 1",
            "drbd_resource_role{name=\"r0\",drbd_resource_role=\"Secondary\"} 0",
            "drbd_connection_state{name=\"r0\",conn_name=\"192.0.2.2:7789\",drbd_connection_state=\"Connected\"} 1",
            "twinsan_volume_connection_state{name=\"r0\",conn_name=\"192.0.2.2:7789\",state=\"SyncSource\"} 1",
            "twinsan_volume_connection_state{name=\"r0\",conn_name=\"192.0.2.2:7789\",state=\"Connected\"} 0",
            "drbd_device_state{name=\"r0\",volume=\"0\",drbd_device_state=\"UpToDate\"} 1",
            "twinsan_volume_peer_disk_state{name=\"r0\",conn_name=\"192.0.2.2:7789\",volume=\"0\",state=\"Inconsistent\"} 1",
            "drbd_peerdevice_outofsync_bytes{name=\"r0\",conn_name=\"192.0.2.2:7789\",volume=\"0\"} 8192",
            "twinsan_volume_resync_done_bytes{name=\"r0\",conn_name=\"192.0.2.2:7789\",volume=\"0\"} 4096",
            "twinsan_volume_resync_total_bytes{name=\"r0\",conn_name=\"192.0.2.2:7789\",volume=\"0\"} 12288",
            "twinsan_volume_resync_active{name=\"r0\",conn_name=\"192.0.2.2:7789\",volume=\"0\"} 1",
            "twinsan_volume_write_ack_seconds_count{name=\"r0\",conn_name=\"192.0.2.2:7789\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
        // One state per family is 1.
        let ones = out
            .lines()
            .filter(|l| l.starts_with("drbd_connection_state{") && l.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1);
    }

    #[test]
    fn idle_volume_has_no_resync_progress_and_unknown_peer() {
        let mut v = volume(ConnState::Connecting, None);
        v.peer_role = None;
        v.peer_disk_state = None;
        let out = render(&scrape(vec![v], None));
        assert!(!out.contains("twinsan_volume_resync_done_bytes{"));
        assert!(out.contains(
            "twinsan_volume_resync_active{name=\"r0\",conn_name=\"192.0.2.2:7789\",volume=\"0\"} 0"
        ));
        assert!(out.contains("state=\"DUnknown\"} 1"));
        assert!(out.contains(
            "twinsan_volume_peer_role{name=\"r0\",conn_name=\"192.0.2.2:7789\",role=\"Unknown\"} 1"
        ));
    }

    #[test]
    fn ha_object_becomes_role_peer_vip_and_counters() {
        let ha = serde_json::json!({
            "node": "h1", "role": "primary", "manual": false, "target_serving": true,
            "peer_replication": "secondary", "peer_management": "unreachable", "witness": null,
            "vips": [{"address": "192.0.2.100/24", "interface": "eth0", "local": true},
                     {"address": "192.0.2.101/24", "interface": "eth0", "local": null}],
            "counters": {"promotions": 2, "demotions": 1, "refusals": 3, "alerts_sent": 0,
                         "last_promotion_ms": 1500, "last_demotion_ms": null},
        });
        let out = render(&scrape(Vec::new(), Some(ha)));
        for line in [
            "twinsan_ha_role{node=\"h1\",role=\"primary\"} 1",
            "twinsan_ha_role{node=\"h1\",role=\"secondary\"} 0",
            "twinsan_ha_peer_state{node=\"h1\",path=\"management\",state=\"unreachable\"} 1",
            "twinsan_ha_vip_held{node=\"h1\",address=\"192.0.2.100/24\",interface=\"eth0\"} 1",
            "twinsan_ha_promotions_total{node=\"h1\"} 2",
            "twinsan_ha_refusals_total{node=\"h1\"} 3",
            "twinsan_ha_last_promotion_seconds{node=\"h1\"} 1.5",
            "drbd_resource_resources 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
        // Unknown VIP, unknown witness and a demotion never made export nothing.
        assert!(!out.contains("192.0.2.101"));
        assert!(!out.contains("twinsan_ha_witness_reachable"));
        assert!(!out.contains("twinsan_ha_last_demotion_seconds"));
    }

    /// A scrape in which every family has samples: a volume resyncing and verifying, one
    /// LUN, one session and an HA host with every optional field known.
    fn everything() -> Scrape {
        let progress = ResyncProgress {
            done_bytes: 1,
            total_bytes: 2,
            percent: 50.0,
            bytes_per_sec: 1,
            eta_secs: None,
        };
        let mut v = volume(ConnState::SyncSource, Some(progress));
        v.verify = Some(twinsan_replication::volume::VerifyProgress {
            done_bytes: 1,
            total_bytes: 2,
            mismatched_blocks: 0,
            finished: false,
            aborted: false,
        });
        let ha = serde_json::json!({
            "node": "h1", "role": "primary", "manual": false, "target_serving": true,
            "peer_replication": "secondary", "peer_management": "secondary", "witness": true,
            "vips": [{"address": "192.0.2.100/24", "interface": "eth0", "local": true}],
            "counters": {"promotions": 1, "demotions": 1, "refusals": 0, "alerts_sent": 0,
                         "last_promotion_ms": 10, "last_demotion_ms": 10},
        });
        let mut s = scrape(vec![v], Some(ha));
        let mut stats = crate::scsi::stats::LunStatsSnapshot::default();
        stats.check_conditions.insert("MEDIUM ERROR".into(), 1);
        s.status.targets.push(crate::control::TargetStatus {
            iqn: "iqn.2026-11.org.twinsan:t".into(),
            luns: vec![crate::control::LunStatus::with_stats(stats)],
        });
        s.status.sessions.push(crate::control::SessionStatus {
            tsih: 1,
            initiator: "iqn.i".into(),
            target: None,
            active_tasks: 2,
            inflight_bytes: 3,
        });
        let h = LatencyHistogram::default().snapshot();
        s.lun_latency.insert(
            ("iqn.2026-11.org.twinsan:t".into(), 0),
            [
                (CommandClass::Read, h.clone()),
                (CommandClass::Write, h.clone()),
                (CommandClass::Flush, h),
            ],
        );
        s
    }

    /// Metric names in `text`: `twinsan_...` and `drbd_...` identifiers.
    fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices(['t', 'd']) {
            let rest = &text[i..];
            if !(rest.starts_with("twinsan_") || rest.starts_with("drbd_")) {
                continue;
            }
            if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
                continue;
            }
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].to_string());
        }
        names
    }

    #[test]
    fn the_dashboard_and_the_readme_use_only_exported_metrics_and_the_readme_lists_all() {
        let out = render(&everything());
        let exported: std::collections::BTreeSet<String> = out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(String::from)
            .collect();
        let families: std::collections::BTreeSet<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(String::from)
            .collect();
        let dashboard = include_str!("../../packaging/grafana-dashboard.json");
        let parsed: serde_json::Value = serde_json::from_str(dashboard).expect("valid JSON");
        assert!(parsed["panels"].as_array().is_some_and(|p| p.len() > 10));
        for name in metric_names(dashboard) {
            // Label names that are also metric names (drbd_resource_role...) are fine.
            assert!(
                exported.contains(&name),
                "the dashboard uses {name}, not exported"
            );
        }
        let readme = include_str!("../../README.md");
        let monitoring = readme
            .split("\n## Monitoring")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a Monitoring section");
        for name in metric_names(monitoring) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name.as_str(), |n, suf| n.strip_suffix(suf).unwrap_or(n));
            assert!(
                families.contains(family) || exported.contains(&name),
                "README names {name}, not exported"
            );
        }
        for f in &families {
            assert!(
                monitoring.contains(f.as_str()),
                "README Monitoring does not list {f}"
            );
        }
    }

    #[test]
    fn every_family_is_announced_once_and_before_its_samples() {
        let out = render(&everything());
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default().to_string();
                assert!(seen.insert(name.clone()), "{name} announced twice");
                current = name;
            } else if !line.starts_with('#') {
                let metric = line.split(['{', ' ']).next().unwrap_or_default();
                assert!(
                    metric.starts_with(current.as_str()),
                    "{metric} outside its family {current}"
                );
            }
        }
    }
}
