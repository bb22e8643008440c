//! SR replug after boot (iscsi-ha's `replug_pbd`).
//!
//! XenServer does not always plug an iSCSI SR after a hard reboot: xapi tried before the target
//! was up and gives up. Once this host serves, the PBDs (one per host and SR) of the iSCSI SRs
//! whose `targetIQN` names one of this host's targets and that are not attached are plugged,
//! across the whole pool as iscsi-ha did, in bounded rounds with back-off.
//!
//! Which PBDs to plug ([`pbds_to_plug`]) is pure and unit-tested; [`run`] only fetches records and
//! makes the calls. It talks to the pool master (`PBD.plug` is a pool operation): on a slave the
//! login's `HOST_IS_SLAVE` names it, and a slave that cannot reach its master does nothing, as
//! iscsi-ha's does (the master's xapi, when it comes back, owns the pool's PBDs).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::xapi::{Session, XapiClient, XapiError};
use crate::xmlrpc::Value;

/// SR types backed by an iSCSI target named in the PBD's `targetIQN`: LVM over iSCSI (what
/// iscsi-ha replugged), the raw-LUN iSCSI SR and GFS2 over iSCSI.
pub const ISCSI_SR_TYPES: &[&str] = &["lvmoiscsi", "iscsi", "gfs2"];

/// Longest wait between two rounds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Error codes of `PBD.plug` meaning the PBD's host is down: its own xapi plugs the PBD when it
/// boots, so these are not retried and not alerted.
const HOST_DOWN: &[&str] = &["HOST_OFFLINE", "HOST_NOT_LIVE"];

/// The fields of an SR record this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrRecord {
    /// SR ref.
    pub reference: String,
    /// `uuid`.
    pub uuid: String,
    /// `name_label`.
    pub name_label: String,
    /// `type`, e.g. `lvmoiscsi`.
    pub sr_type: String,
}

/// The fields of a PBD record this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbdRecord {
    /// PBD ref.
    pub reference: String,
    /// `uuid`.
    pub uuid: String,
    /// `SR` (ref).
    pub sr: String,
    /// `host` (ref).
    pub host: String,
    /// `device_config` (targetIQN, target, port, SCSIid...).
    pub device_config: BTreeMap<String, String>,
    /// `currently_attached`; a record without a readable value counts as attached, so that
    /// nothing is plugged on a guess.
    pub currently_attached: bool,
}

/// A PBD to plug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugTarget {
    /// PBD ref.
    pub pbd: String,
    /// PBD uuid.
    pub pbd_uuid: String,
    /// SR uuid.
    pub sr_uuid: String,
    /// SR name.
    pub sr_name: String,
    /// Host ref of the PBD.
    pub host: String,
    /// The PBD's `targetIQN`, as configured.
    pub target_iqn: String,
}

fn text(rec: &Value, key: &str) -> String {
    match rec.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Int(i)) => i.to_string(),
        _ => String::new(),
    }
}

fn flag(rec: &Value, key: &str) -> Option<bool> {
    match rec.get(key)? {
        Value::Bool(b) => Some(*b),
        Value::Int(i) => Some(*i != 0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn records<'a>(v: &'a Value, what: &str) -> Result<&'a BTreeMap<String, Value>, XapiError> {
    match v {
        Value::Struct(m) => Ok(m),
        other => Err(XapiError::Unexpected(format!(
            "{what}: expected a struct of records, got {other:?}"
        ))),
    }
}

/// Parses `SR.get_all_records`. Records that are not structs are skipped.
pub fn parse_srs(v: &Value) -> Result<Vec<SrRecord>, XapiError> {
    Ok(records(v, "SR.get_all_records")?
        .iter()
        .filter(|(_, r)| matches!(r, Value::Struct(_)))
        .map(|(reference, r)| SrRecord {
            reference: reference.clone(),
            uuid: text(r, "uuid"),
            name_label: text(r, "name_label"),
            sr_type: text(r, "type"),
        })
        .collect())
}

/// Parses `PBD.get_all_records`. Records that are not structs are skipped.
pub fn parse_pbds(v: &Value) -> Result<Vec<PbdRecord>, XapiError> {
    Ok(records(v, "PBD.get_all_records")?
        .iter()
        .filter(|(_, r)| matches!(r, Value::Struct(_)))
        .map(|(reference, r)| {
            let device_config = match r.get("device_config") {
                Some(Value::Struct(m)) => m
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect(),
                _ => BTreeMap::new(),
            };
            PbdRecord {
                reference: reference.clone(),
                uuid: text(r, "uuid"),
                sr: text(r, "SR"),
                host: text(r, "host"),
                device_config,
                currently_attached: flag(r, "currently_attached").unwrap_or(true),
            }
        })
        .collect())
}

/// Whether a PBD's `targetIQN` names one of `ours`. IQNs compare case-insensitively (RFC 3722
/// folds them to lower case). A comma-separated list (multi-target SRs) matches when any entry
/// does. `*` ("every target the portal reports") never matches on its own: it does not say
/// whose targets those are, and plugging someone else's SR is not ours to do.
pub fn names_our_target(target_iqn: &str, ours: &[String]) -> bool {
    target_iqn
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty() && *i != "*")
        .any(|i| ours.iter().any(|o| o.trim().eq_ignore_ascii_case(i)))
}

/// The unattached PBDs, on any host, of iSCSI SRs ([`ISCSI_SR_TYPES`]) whose PBD `targetIQN`
/// names one of `ours`; sorted by SR uuid, then host, for stable logs.
pub fn pbds_to_plug(srs: &[SrRecord], pbds: &[PbdRecord], ours: &[String]) -> Vec<PlugTarget> {
    let iscsi: HashMap<&str, &SrRecord> = srs
        .iter()
        .filter(|s| {
            ISCSI_SR_TYPES
                .iter()
                .any(|t| t.eq_ignore_ascii_case(s.sr_type.trim()))
        })
        .map(|s| (s.reference.as_str(), s))
        .collect();
    let mut out: Vec<PlugTarget> = pbds
        .iter()
        .filter(|p| !p.currently_attached)
        .filter_map(|p| {
            let sr = iscsi.get(p.sr.as_str())?;
            let iqn = p.device_config.get("targetIQN")?;
            names_our_target(iqn, ours).then(|| PlugTarget {
                pbd: p.reference.clone(),
                pbd_uuid: p.uuid.clone(),
                sr_uuid: sr.uuid.clone(),
                sr_name: sr.name_label.clone(),
                host: p.host.clone(),
                target_iqn: iqn.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.sr_uuid, &a.host, &a.pbd).cmp(&(&b.sr_uuid, &b.host, &b.pbd)));
    out
}

/// The wait before round `round + 1` (`round` >= 1): `first`, doubled per round, at most
/// [`MAX_BACKOFF`] (or `first` when that is longer).
pub fn backoff(first: Duration, round: u32) -> Duration {
    let cap = MAX_BACKOFF.max(first);
    let factor = 1u32
        .checked_shl(round.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    first.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// Settings of [`run`].
#[derive(Debug, Clone)]
pub struct ReplugConfig {
    /// XAPI user.
    pub user: String,
    /// XAPI password.
    pub password: String,
    /// This host's target IQNs.
    pub our_iqns: Vec<String>,
    /// Rounds before giving up (at least 1).
    pub attempts: u32,
    /// Wait before the second round (see [`backoff`]).
    pub first_backoff: Duration,
    /// Deadline of one `PBD.plug` (an SR attach logs in and scans the LUNs).
    pub plug_timeout: Duration,
}

/// One PBD in a report, with its host's uuid (the ref when the uuid could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbdReport {
    /// What was (to be) plugged.
    pub target: PlugTarget,
    /// uuid of the PBD's host.
    pub host_uuid: String,
}

/// How a [`run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing of ours is left unplugged, except on hosts that are down.
    Done {
        /// PBDs plugged by this run.
        plugged: Vec<PbdReport>,
        /// PBDs left alone because their host is down (its xapi plugs them at boot).
        host_down: Vec<PbdReport>,
    },
    /// This host is a pool slave and its master cannot be reached: nothing was done.
    MasterUnreachable {
        /// The master's address.
        master: String,
        /// Why it could not be reached.
        error: String,
    },
    /// Every round failed for some PBD (or XAPI could not be asked).
    GaveUp {
        /// Rounds made.
        attempts: u32,
        /// PBDs plugged by this run before giving up.
        plugged: Vec<PbdReport>,
        /// PBDs whose last plug failed, with the error.
        failed: Vec<(PbdReport, String)>,
        /// Why the last round failed as a whole (login or listing), if it did.
        error: Option<String>,
    },
}

enum RoundError {
    MasterUnreachable { master: String, error: String },
    Xapi(XapiError),
}

impl From<XapiError> for RoundError {
    fn from(e: XapiError) -> Self {
        RoundError::Xapi(e)
    }
}

/// Progress kept across rounds.
#[derive(Default)]
struct Progress {
    plugged: Vec<PbdReport>,
    host_down: BTreeMap<String, PbdReport>,
    host_uuids: HashMap<String, String>,
}

/// Logs in where pool operations are allowed: here, or at the master a slave names.
async fn login(
    client: &XapiClient,
    cfg: &ReplugConfig,
) -> Result<(XapiClient, Session), RoundError> {
    match client.login(&cfg.user, &cfg.password).await {
        Ok(s) => Ok((client.clone(), s)),
        Err(XapiError::HostIsSlave { master }) => {
            debug!(%master, "PBD replug: this host is a pool slave; asking the master");
            let remote = client.at_host(&master);
            match remote.login(&cfg.user, &cfg.password).await {
                Ok(s) => Ok((remote, s)),
                Err(e @ (XapiError::Io(_) | XapiError::Timeout(_) | XapiError::Tls(_))) => {
                    Err(RoundError::MasterUnreachable {
                        master,
                        error: e.to_string(),
                    })
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// One round: list, select, plug each. Returns the PBDs whose plug failed.
async fn round(
    client: &XapiClient,
    cfg: &ReplugConfig,
    attempt: u32,
    progress: &mut Progress,
) -> Result<Vec<(PbdReport, String)>, RoundError> {
    let (via, session) = login(client, cfg).await?;
    let result = plug_selected(&via, &session, cfg, attempt, progress).await;
    if let Err(e) = via.logout(&session).await {
        debug!(error = %e, "PBD replug: logout failed");
    }
    Ok(result?)
}

async fn plug_selected(
    via: &XapiClient,
    s: &Session,
    cfg: &ReplugConfig,
    attempt: u32,
    progress: &mut Progress,
) -> Result<Vec<(PbdReport, String)>, XapiError> {
    let srs = parse_srs(&via.sr_get_all_records(s).await?)?;
    let pbds = parse_pbds(&via.pbd_get_all_records(s).await?)?;
    let todo = pbds_to_plug(&srs, &pbds, &cfg.our_iqns);
    if todo.is_empty() {
        debug!(
            attempt,
            "PBD replug: no unattached PBD of an iSCSI SR served here"
        );
        return Ok(Vec::new());
    }
    let mut failed = Vec::new();
    for t in todo {
        let host_uuid = match progress.host_uuids.get(&t.host) {
            Some(u) => u.clone(),
            None => {
                let u = via.host_get_uuid(s, &t.host).await.unwrap_or_else(|e| {
                    debug!(host = %t.host, error = %e, "PBD replug: host uuid unknown");
                    t.host.clone()
                });
                progress.host_uuids.insert(t.host.clone(), u.clone());
                u
            }
        };
        info!(
            attempt,
            of = cfg.attempts,
            sr = %t.sr_name,
            sr_uuid = %t.sr_uuid,
            pbd = %t.pbd_uuid,
            host = %host_uuid,
            target_iqn = %t.target_iqn,
            "plugging the PBD of an iSCSI SR served here"
        );
        let report = PbdReport {
            target: t.clone(),
            host_uuid,
        };
        match via.pbd_plug(s, &t.pbd, cfg.plug_timeout).await {
            Ok(()) => {
                info!(sr = %t.sr_name, pbd = %t.pbd_uuid, host = %report.host_uuid, "PBD plugged");
                progress.host_down.remove(&t.pbd);
                progress.plugged.push(report);
            }
            Err(XapiError::Failure { code, params }) if HOST_DOWN.contains(&code.as_str()) => {
                info!(
                    sr = %t.sr_name,
                    pbd = %t.pbd_uuid,
                    host = %report.host_uuid,
                    %code,
                    ?params,
                    "PBD not plugged: its host is down (its xapi plugs it when it boots)"
                );
                progress.host_down.insert(t.pbd.clone(), report);
            }
            Err(e) => {
                warn!(
                    attempt,
                    of = cfg.attempts,
                    sr = %t.sr_name,
                    pbd = %t.pbd_uuid,
                    host = %report.host_uuid,
                    error = %e,
                    "PBD plug failed"
                );
                failed.push((report, e.to_string()));
            }
        }
    }
    Ok(failed)
}

/// Plugs the unattached PBDs of our iSCSI SRs: at most `cfg.attempts` rounds, [`backoff`] apart,
/// each re-reading the records (xapi may have plugged some meanwhile). Every call has a deadline,
/// so the whole run is bounded in time too.
pub async fn run(client: XapiClient, cfg: ReplugConfig) -> Outcome {
    let attempts = cfg.attempts.max(1);
    let mut progress = Progress::default();
    let mut failed = Vec::new();
    let mut error = None;
    for attempt in 1..=attempts {
        if attempt > 1 {
            let wait = backoff(cfg.first_backoff, attempt - 1);
            debug!(attempt, ?wait, "PBD replug: next round after a pause");
            tokio::time::sleep(wait).await;
        }
        match round(&client, &cfg, attempt, &mut progress).await {
            Ok(f) if f.is_empty() => {
                return Outcome::Done {
                    plugged: progress.plugged,
                    host_down: progress.host_down.into_values().collect(),
                }
            }
            Ok(f) => {
                failed = f;
                error = None;
            }
            Err(RoundError::MasterUnreachable { master, error }) => {
                return Outcome::MasterUnreachable { master, error }
            }
            Err(RoundError::Xapi(e)) => {
                warn!(attempt, of = attempts, error = %e, "PBD replug: XAPI could not be asked");
                error = Some(e.to_string());
            }
        }
    }
    Outcome::GaveUp {
        attempts,
        plugged: progress.plugged,
        failed,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "iqn.2026-11.org.twinsan:sr";

    fn ours() -> Vec<String> {
        vec![OURS.to_string(), "iqn.2026-11.org.twinsan:second".into()]
    }

    fn sr(r: &str, t: &str) -> SrRecord {
        SrRecord {
            reference: r.into(),
            uuid: format!("uuid-{r}"),
            name_label: format!("name-{r}"),
            sr_type: t.into(),
        }
    }

    fn pbd(r: &str, sr: &str, host: &str, iqn: Option<&str>, attached: bool) -> PbdRecord {
        PbdRecord {
            reference: r.into(),
            uuid: format!("uuid-{r}"),
            sr: sr.into(),
            host: host.into(),
            device_config: iqn
                .map(|i| [("targetIQN".to_string(), i.to_string())].into())
                .unwrap_or_default(),
            currently_attached: attached,
        }
    }

    #[test]
    fn iqn_matching() {
        let o = ours();
        assert!(names_our_target(OURS, &o));
        assert!(names_our_target("IQN.2026-11.ORG.TWINSAN:SR", &o));
        assert!(names_our_target(
            " iqn.other:x , iqn.2026-11.org.twinsan:second",
            &o
        ));
        assert!(!names_our_target("iqn.2026-11.org.twinsan:s", &o));
        assert!(!names_our_target("iqn.2026-11.org.twinsan:sr2", &o));
        assert!(!names_our_target("*", &o));
        assert!(!names_our_target("*,", &o));
        assert!(!names_our_target("", &o));
        assert!(!names_our_target(",,", &o));
        assert!(!names_our_target(OURS, &[]));
    }

    #[test]
    fn selects_unattached_pbds_of_our_iscsi_srs_on_every_host() {
        let srs = vec![
            sr("sr-ours", "lvmoiscsi"),
            sr("sr-other", "lvmoiscsi"),
            sr("sr-nfs", "nfs"),
            sr("sr-raw", "ISCSI"),
            sr("sr-wild", "lvmoiscsi"),
        ];
        let pbds = vec![
            pbd("p1", "sr-ours", "h1", Some(OURS), false),
            pbd("p0", "sr-ours", "h0", Some(OURS), false),
            pbd("p2", "sr-ours", "h2", Some(OURS), true),
            pbd(
                "p3",
                "sr-other",
                "h0",
                Some("iqn.2000-01.com.other:t"),
                false,
            ),
            // An NFS SR never has a targetIQN; even with one it is not an iSCSI SR.
            pbd("p4", "sr-nfs", "h0", Some(OURS), false),
            pbd(
                "p5",
                "sr-raw",
                "h0",
                Some("iqn.2026-11.org.twinsan:SECOND"),
                false,
            ),
            pbd("p6", "sr-wild", "h0", Some("*"), false),
            pbd("p7", "sr-ours", "h3", None, false),
            pbd("p8", "sr-gone", "h0", Some(OURS), false),
        ];
        let got = pbds_to_plug(&srs, &pbds, &ours());
        let refs: Vec<&str> = got.iter().map(|t| t.pbd.as_str()).collect();
        assert_eq!(refs, ["p0", "p1", "p5"]);
        assert_eq!(got[0].sr_uuid, "uuid-sr-ours");
        assert_eq!(got[0].sr_name, "name-sr-ours");
        assert_eq!(got[0].host, "h0");
        assert_eq!(got[0].pbd_uuid, "uuid-p0");
        assert_eq!(got[0].target_iqn, OURS);
        assert!(pbds_to_plug(&srs, &pbds, &[]).is_empty());
        assert!(pbds_to_plug(&[], &pbds, &ours()).is_empty());
    }

    #[test]
    fn parses_xapi_records() {
        let srs = Value::structure([
            (
                "OpaqueRef:sr-1",
                Value::structure([
                    ("uuid", Value::from("u1")),
                    ("name_label", Value::from("twinsan SR")),
                    ("type", Value::from("lvmoiscsi")),
                    ("PBDs", Value::strings(["OpaqueRef:pbd-1"])),
                ]),
            ),
            ("OpaqueRef:junk", Value::from("not a record")),
        ]);
        let srs = parse_srs(&srs).unwrap();
        assert_eq!(
            srs,
            vec![SrRecord {
                reference: "OpaqueRef:sr-1".into(),
                uuid: "u1".into(),
                name_label: "twinsan SR".into(),
                sr_type: "lvmoiscsi".into(),
            }]
        );
        let rec = |attached: Option<Value>| {
            let mut fields = vec![
                ("uuid", Value::from("p")),
                ("SR", Value::from("OpaqueRef:sr-1")),
                ("host", Value::from("OpaqueRef:host-0")),
                (
                    "device_config",
                    Value::structure([
                        ("targetIQN", Value::from(OURS)),
                        ("port", Value::Int(3260)),
                        ("target", Value::from("10.0.0.100")),
                    ]),
                ),
            ];
            if let Some(a) = attached {
                fields.push(("currently_attached", a));
            }
            Value::structure([("OpaqueRef:pbd-1", Value::structure(fields))])
        };
        let p = parse_pbds(&rec(Some(Value::Bool(false)))).unwrap();
        assert_eq!(p.len(), 1);
        assert!(!p[0].currently_attached);
        assert_eq!(p[0].sr, "OpaqueRef:sr-1");
        assert_eq!(p[0].host, "OpaqueRef:host-0");
        assert_eq!(p[0].device_config.get("targetIQN").unwrap(), OURS);
        assert_eq!(p[0].device_config.get("target").unwrap(), "10.0.0.100");
        // Non-string device-config values are dropped, not misread.
        assert!(!p[0].device_config.contains_key("port"));
        assert!(!parse_pbds(&rec(Some(Value::from("false")))).unwrap()[0].currently_attached);
        assert!(parse_pbds(&rec(Some(Value::from("0"))))
            .map(|p| !p[0].currently_attached)
            .unwrap());
        // Missing or unreadable: left alone.
        assert!(parse_pbds(&rec(None)).unwrap()[0].currently_attached);
        assert!(parse_pbds(&rec(Some(Value::from("maybe")))).unwrap()[0].currently_attached);
        assert!(parse_pbds(&rec(Some(Value::Nil))).unwrap()[0].currently_attached);
        assert!(parse_srs(&Value::from("x")).is_err());
        assert!(parse_pbds(&Value::Array(vec![])).is_err());
        assert!(parse_srs(&Value::structure::<_, String>([]))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(2), 1), s(2));
        assert_eq!(backoff(s(2), 2), s(4));
        assert_eq!(backoff(s(2), 5), s(32));
        assert_eq!(backoff(s(2), 6), MAX_BACKOFF);
        assert_eq!(backoff(s(2), u32::MAX), MAX_BACKOFF);
        assert_eq!(backoff(s(600), 3), s(600));
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
        assert_eq!(backoff(Duration::MAX, 40), Duration::MAX);
    }
}
