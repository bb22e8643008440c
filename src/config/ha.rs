//! The `[ha]` configuration table: role source, heartbeats, witnesses, floating IPs, alerts.
//!
//! Key names follow the shared interface contract (README "High availability"), so configurations
//! imported from iscsi-ha and the namespace tests agree on them. Validation names the key
//! (`ha.vip[0].address`) like the rest of [`crate::config`].

use crate::config::{check_range, ConfigError};

/// `[ha.alerts]` `suppress_minutes` at most: a week.
pub const MAX_SUPPRESS_MINUTES: u64 = 7 * 24 * 60;
/// `[ha.alerts]` `startup_quiet_secs` at most: a day.
pub const MAX_STARTUP_QUIET_SECS: u64 = 86_400;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use twinsan_ha::role::{RoleConfig, SourceKind};
use twinsan_ha::vip::Vip;
use twinsan_ha::xapi::{Endpoint, Transport};

/// `[ha]`: present = this host takes part in an HA pair; absent = always serving.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// "xapi" (follow the XenServer pool master), "standalone" (the pair decides by heartbeats
    /// and witnesses) or "manual" (start in manual mode; roles change only by command).
    pub source: String,
    /// This host's name (logs, status, alerts, heartbeats).
    pub node: String,
    /// Heartbeat UDP socket on the replication link ("ip:port").
    pub listen: String,
    /// The peer's heartbeat socket on the replication link.
    pub peer: String,
    /// Optional second heartbeat path over the management network.
    #[serde(default)]
    pub management_listen: Option<String>,
    /// The peer's heartbeat socket on the management network.
    #[serde(default)]
    pub management_peer: Option<String>,
    /// Shared secret for the heartbeats' HMAC-SHA256 (identical on both hosts).
    pub secret: String,
    /// Heartbeat period.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Silence after which the peer counts as unreachable on a path.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Standalone: IPs of which at least one must answer before a secondary promotes.
    #[serde(default)]
    pub witnesses: Vec<String>,
    /// 0 = ICMP echo; otherwise a TCP connect to this port (a refusal also proves the witness
    /// is up).
    #[serde(default)]
    pub witness_port: u16,
    /// How often the witnesses are probed.
    #[serde(default = "default_witness_interval_ms")]
    pub witness_interval_ms: u64,
    /// How long one witness probe waits for an answer.
    #[serde(default = "default_witness_timeout_ms")]
    pub witness_timeout_ms: u64,
    /// Standalone: who is primary when both hosts start fresh.
    #[serde(default)]
    pub preferred_primary: bool,
    /// xapi source: the local xapi's pool.conf.
    #[serde(default = "default_pool_conf")]
    pub pool_conf: PathBuf,
    /// Where the manual-mode flag persists; "" = `<data_dir>/ha-state.toml`.
    #[serde(default)]
    pub state_file: String,
    /// Gratuitous ARPs / unsolicited neighbour advertisements after adding a VIP.
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    /// Spacing of those announcements.
    #[serde(default = "default_garp_interval_ms")]
    pub garp_interval_ms: u64,
    /// ARP/ND duplicate-detection probes sent before adding a VIP (RFC 5227 §2.1.1 uses 3).
    #[serde(default = "default_vip_probe_count")]
    pub vip_probe_count: u32,
    /// Wait for an answer after each probe (RFC 5227 uses 1-2 s; see the README for why a
    /// shorter wait is safe here).
    #[serde(default = "default_vip_probe_wait_ms")]
    pub vip_probe_wait_ms: u64,
    /// The VIP is added with this lifetime and refreshed every second while primary, so the
    /// kernel removes it by itself when the daemon is killed; 0 = permanent address.
    #[serde(default = "default_vip_lifetime_secs")]
    pub vip_lifetime_secs: u64,
    /// On demotion: how long in-flight SCSI commands may take to finish before their sessions
    /// are dropped anyway.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// With `[ha.xapi]`: once this host serves, plug the unattached PBDs of the iSCSI SRs that
    /// name one of its target IQNs (XenServer does not always plug them after a hard reboot:
    /// xapi tried before the target was up). iscsi-ha's `replug_pbd`.
    #[serde(default = "default_true")]
    pub replug_pbds: bool,
    /// Rounds of PBD plugging before giving up with an alert.
    #[serde(default = "default_replug_attempts")]
    pub replug_attempts: u32,
    /// Pause before the second round; doubled for each further round, at most 60 s.
    #[serde(default = "default_replug_backoff_ms")]
    pub replug_backoff_ms: u64,
    /// Live XAPI session and `event.from` long-poll (xapi source).
    #[serde(default)]
    pub xapi: Option<HaXapiConfig>,
    /// Floating IPs that follow the primary.
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    /// E-mail and XenCenter alerts.
    #[serde(default)]
    pub alerts: Option<AlertsConfig>,
}

/// `[ha.xapi]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HaXapiConfig {
    /// "https://host[:port]/" (XAPI) or "http://..." (only for test XAPIs).
    pub url: String,
    #[serde(default = "default_xapi_user")]
    pub user: String,
    pub password: String,
    /// Optional SHA-256 pin of the server certificate (hex, colons allowed).
    #[serde(default)]
    pub fingerprint: String,
    /// Deadline of every XAPI call (a slave's xapi hangs while the master is dead).
    #[serde(default = "default_xapi_timeout_ms")]
    pub timeout_ms: u64,
    /// This host's uuid; "" = read `INSTALLATION_UUID` from `inventory`.
    #[serde(default)]
    pub host_uuid: String,
    /// xensource-inventory file holding this host's uuid.
    #[serde(default = "default_inventory")]
    pub inventory: PathBuf,
    /// `event.from` long-poll timeout, seconds.
    #[serde(default = "default_event_timeout_secs")]
    pub event_timeout_secs: u64,
}

/// `[[ha.vip]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// "10.99.0.100/24" or "fd00::100/64".
    pub address: String,
    /// Interface the address goes on.
    pub interface: String,
    /// IPv4 label suffix: the address is labelled `<interface>:<label>` (15 characters at most).
    #[serde(default = "default_label")]
    pub label: String,
}

/// `[ha.alerts]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// SMTP relay; "" = no e-mail.
    #[serde(default)]
    pub smtp_server: String,
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    /// "none" | "starttls" | "tls".
    #[serde(default = "default_smtp_tls")]
    pub smtp_tls: String,
    /// Check the relay's certificate against the system trust store.
    #[serde(default = "default_true")]
    pub smtp_verify_cert: bool,
    #[serde(default)]
    pub smtp_user: String,
    #[serde(default)]
    pub smtp_password: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The same alert text is not resent within this many minutes.
    #[serde(default = "default_suppress_minutes")]
    pub suppress_minutes: u64,
    /// Non-critical alerts are muted this long after start.
    #[serde(default = "default_startup_quiet_secs")]
    pub startup_quiet_secs: u64,
    /// Also create XenCenter messages (XAPI `message.create`) when `[ha.xapi]` is configured.
    #[serde(default = "default_true")]
    pub xencenter: bool,
}

fn default_heartbeat_interval_ms() -> u64 {
    250
}
fn default_peer_timeout_ms() -> u64 {
    1500
}
fn default_witness_interval_ms() -> u64 {
    1000
}
fn default_witness_timeout_ms() -> u64 {
    500
}
fn default_pool_conf() -> PathBuf {
    PathBuf::from(twinsan_ha::poolconf::DEFAULT_PATH)
}
fn default_garp_count() -> u32 {
    5
}
fn default_garp_interval_ms() -> u64 {
    200
}
fn default_vip_probe_count() -> u32 {
    2
}
fn default_vip_probe_wait_ms() -> u64 {
    100
}
fn default_vip_lifetime_secs() -> u64 {
    5
}
fn default_drain_timeout_ms() -> u64 {
    1000
}
fn default_replug_attempts() -> u32 {
    8
}
fn default_replug_backoff_ms() -> u64 {
    2000
}
fn default_xapi_user() -> String {
    "root".into()
}
fn default_xapi_timeout_ms() -> u64 {
    5000
}
fn default_inventory() -> PathBuf {
    PathBuf::from("/etc/xensource-inventory")
}
fn default_event_timeout_secs() -> u64 {
    30
}
fn default_label() -> String {
    "twinsan".into()
}
fn default_smtp_port() -> u16 {
    25
}
fn default_smtp_tls() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}
fn default_subject() -> String {
    "twinsan alert".into()
}
fn default_suppress_minutes() -> u64 {
    30
}
fn default_startup_quiet_secs() -> u64 {
    60
}

/// Parses "ip/prefix" into a [`Vip`] on `interface`.
pub fn parse_vip(v: &VipConfig) -> Result<Vip, String> {
    let (ip, prefix) = v
        .address
        .split_once('/')
        .ok_or_else(|| format!("`{}` needs a prefix length, e.g. 10.0.0.100/24", v.address))?;
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("`{ip}` is not an IP address"))?;
    let prefix_len: u8 = prefix
        .parse()
        .map_err(|_| format!("`{prefix}` is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix_len == 0 || prefix_len > max {
        return Err(format!("prefix length {prefix_len} is outside 1..={max}"));
    }
    Ok(Vip {
        addr,
        prefix_len,
        ifname: v.interface.clone(),
        label: v.label.clone(),
    })
}

/// Parses an XAPI URL ("https://host[:port]/", IPv6 in brackets) into an [`Endpoint`].
pub fn parse_xapi_url(url: &str, fingerprint: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL (https://host/)"))?;
    let pin = if fingerprint.trim().is_empty() {
        None
    } else {
        Some(
            twinsan_ha::tls::parse_fingerprint(fingerprint).ok_or_else(|| {
                format!("fingerprint `{fingerprint}` is not 64 hex digits (colons allowed)")
            })?,
        )
    };
    let (transport, default_port) = match scheme {
        "https" => (Transport::Tls { pin }, 443),
        "http" => (Transport::Plain, 80),
        other => return Err(format!("scheme `{other}` is not https or http")),
    };
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed '['"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("`{p}` is not a port"))?,
            None if tail.is_empty() => default_port,
            None => return Err(format!("`{url}`: junk after ']'")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("`{p}` is not a port"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(Endpoint {
        host,
        port,
        transport,
    })
}

impl HaConfig {
    /// Validates every key; `err(key, message)` builds the error naming the file.
    pub fn validate(
        &self,
        err: &impl Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let e = |k: &str, m: String| Err(err(format!("ha.{k}"), m));
        if !["xapi", "standalone", "manual"].contains(&self.source.as_str()) {
            return e(
                "source",
                format!("`{}` is not one of xapi, standalone, manual", self.source),
            );
        }
        if self.node.is_empty() || self.node.len() > 64 || self.node.chars().any(char::is_control) {
            return e("node", "must be 1..=64 printable characters".into());
        }
        let addr = |k: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse::<SocketAddr>()
                .map_err(|_| err(format!("ha.{k}"), format!("`{v}` is not an address:port")))
        };
        let listen = addr("listen", &self.listen)?;
        let peer = addr("peer", &self.peer)?;
        if listen == peer {
            return e("peer", "must differ from `listen`".into());
        }
        match (&self.management_listen, &self.management_peer) {
            (Some(l), Some(p)) => {
                let l = addr("management_listen", l)?;
                let p = addr("management_peer", p)?;
                if l == p {
                    return e(
                        "management_peer",
                        "must differ from `management_listen`".into(),
                    );
                }
                if l == listen {
                    return e(
                        "management_listen",
                        "must differ from `listen` (it is a second path)".into(),
                    );
                }
            }
            (None, None) => {}
            (Some(_), None) => {
                return e(
                    "management_peer",
                    "is required when management_listen is set".into(),
                )
            }
            (None, Some(_)) => {
                return e(
                    "management_listen",
                    "is required when management_peer is set".into(),
                )
            }
        }
        if self.secret.len() < crate::config::MIN_SECRET_LEN {
            return e(
                "secret",
                format!("must be at least {} bytes", crate::config::MIN_SECRET_LEN),
            );
        }
        if !(10..=10_000).contains(&self.heartbeat_interval_ms) {
            return e(
                "heartbeat_interval_ms",
                format!("{} is outside 10..=10000", self.heartbeat_interval_ms),
            );
        }
        if self.peer_timeout_ms < 2 * self.heartbeat_interval_ms || self.peer_timeout_ms > 600_000 {
            return e(
                "peer_timeout_ms",
                format!(
                    "{} must be at least twice heartbeat_interval_ms ({}) and at most 600000",
                    self.peer_timeout_ms, self.heartbeat_interval_ms
                ),
            );
        }
        for w in &self.witnesses {
            if w.parse::<IpAddr>().is_err() {
                return e("witnesses", format!("`{w}` is not an IP address"));
            }
        }
        if !(100..=60_000).contains(&self.witness_interval_ms) {
            return e("witness_interval_ms", "must be within 100..=60000".into());
        }
        if self.witness_timeout_ms == 0 || self.witness_timeout_ms > self.witness_interval_ms {
            return e(
                "witness_timeout_ms",
                "must be above 0 and at most witness_interval_ms".into(),
            );
        }
        if self.source == "xapi" && self.pool_conf.as_os_str().is_empty() {
            return e(
                "pool_conf",
                "must not be empty with source = \"xapi\"".into(),
            );
        }
        if self.garp_count == 0 || self.garp_count > 100 {
            return e("garp_count", "must be within 1..=100".into());
        }
        if self.garp_interval_ms > 10_000 {
            return e("garp_interval_ms", "must be at most 10000".into());
        }
        if self.vip_probe_count == 0 || self.vip_probe_count > 10 {
            return e("vip_probe_count", "must be within 1..=10".into());
        }
        if !(10..=5_000).contains(&self.vip_probe_wait_ms) {
            return e("vip_probe_wait_ms", "must be within 10..=5000".into());
        }
        if self.vip_lifetime_secs != 0 && !(3..=3600).contains(&self.vip_lifetime_secs) {
            return e(
                "vip_lifetime_secs",
                "must be 0 (permanent) or within 3..=3600".into(),
            );
        }
        if self.drain_timeout_ms > 60_000 {
            return e("drain_timeout_ms", "must be at most 60000".into());
        }
        if !(1..=100).contains(&self.replug_attempts) {
            return e("replug_attempts", "must be within 1..=100".into());
        }
        if !(10..=600_000).contains(&self.replug_backoff_ms) {
            return e("replug_backoff_ms", "must be within 10..=600000".into());
        }
        if let Some(x) = &self.xapi {
            if let Err(m) = parse_xapi_url(&x.url, &x.fingerprint) {
                let key = if m.starts_with("fingerprint") {
                    "xapi.fingerprint"
                } else {
                    "xapi.url"
                };
                return e(key, m);
            }
            if x.user.is_empty() {
                return e("xapi.user", "must not be empty".into());
            }
            if !(100..=120_000).contains(&x.timeout_ms) {
                return e("xapi.timeout_ms", "must be within 100..=120000".into());
            }
            if x.event_timeout_secs == 0 || x.event_timeout_secs > 3600 {
                return e("xapi.event_timeout_secs", "must be within 1..=3600".into());
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, v) in self.vips.iter().enumerate() {
            let k = format!("vip[{i}]");
            let vip = parse_vip(v).map_err(|m| err(format!("ha.{k}.address"), m))?;
            if v.interface.is_empty() || v.interface.len() > 15 || v.interface.contains(':') {
                return e(
                    &format!("{k}.interface"),
                    format!("`{}` is not an interface name", v.interface),
                );
            }
            if v.label.is_empty()
                || !v
                    .label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return e(
                    &format!("{k}.label"),
                    "must be letters, digits, '-', '_', '.'".into(),
                );
            }
            if let Err(m) = twinsan_ha::vip::vip_label(&v.interface, &v.label) {
                return e(&format!("{k}.label"), m.to_string());
            }
            if !seen.insert(vip.addr) {
                return e(
                    &format!("{k}.address"),
                    format!("{} is configured twice", vip.addr),
                );
            }
        }
        if let Some(a) = &self.alerts {
            if !["none", "starttls", "tls"].contains(&a.smtp_tls.as_str()) {
                return e(
                    "alerts.smtp_tls",
                    format!("`{}` is not one of none, starttls, tls", a.smtp_tls),
                );
            }
            if !a.smtp_server.is_empty() {
                if a.from.is_empty() {
                    return e("alerts.from", "is required with smtp_server".into());
                }
                if a.to.is_empty() || a.to.iter().any(|t| !t.contains('@')) {
                    return e(
                        "alerts.to",
                        "needs at least one address, each with '@'".into(),
                    );
                }
                if a.smtp_port == 0 {
                    return e("alerts.smtp_port", "must not be 0".into());
                }
            }
            check_range(
                err,
                "ha.alerts.suppress_minutes",
                a.suppress_minutes,
                0,
                MAX_SUPPRESS_MINUTES,
                "minutes, at most a week",
            )?;
            check_range(
                err,
                "ha.alerts.startup_quiet_secs",
                a.startup_quiet_secs,
                0,
                MAX_STARTUP_QUIET_SECS,
                "seconds, at most a day",
            )?;
            if a.smtp_user.is_empty() != a.smtp_password.is_empty() {
                return e(
                    "alerts.smtp_password",
                    "smtp_user and smtp_password go together".into(),
                );
            }
        }
        Ok(())
    }

    /// The role source kind for the role machine (manual mode runs the standalone rules for
    /// operator commands: the peer must not be primary).
    pub fn source_kind(&self) -> SourceKind {
        if self.source == "xapi" {
            SourceKind::Xapi
        } else {
            SourceKind::Standalone
        }
    }

    /// Static configuration of the role machine.
    pub fn role_config(&self) -> RoleConfig {
        RoleConfig {
            source: self.source_kind(),
            management_path: self.management_listen.is_some(),
            preferred_primary: self.preferred_primary,
            garp_count: self.garp_count,
            garp_interval: Duration::from_millis(self.garp_interval_ms),
        }
    }

    /// The manual-mode state file.
    pub fn state_file_path(&self, data_dir: &Path) -> PathBuf {
        if self.state_file.is_empty() {
            data_dir.join("ha-state.toml")
        } else {
            PathBuf::from(&self.state_file)
        }
    }

    /// The VIP lifetime (None = permanent).
    pub fn vip_lifetime(&self) -> Option<Duration> {
        (self.vip_lifetime_secs > 0).then(|| Duration::from_secs(self.vip_lifetime_secs))
    }

    /// Validated VIPs.
    pub fn vip_list(&self) -> Vec<Vip> {
        self.vips.iter().filter_map(|v| parse_vip(v).ok()).collect()
    }

    /// Whether the PBD replug runs: `replug_pbds` and a live XAPI to ask (`[ha.xapi]`).
    pub fn replug_enabled(&self) -> bool {
        self.replug_pbds && self.xapi.is_some()
    }

    /// The PBD replug's round count and first pause.
    pub fn replug_schedule(&self) -> (u32, Duration) {
        (
            self.replug_attempts,
            Duration::from_millis(self.replug_backoff_ms),
        )
    }
}

/// Replaces every value whose key names a secret with "***" (for `twinsan get`).
pub fn mask_secrets(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let secret = k == "secret" || k.ends_with("password");
                if secret && x.as_str().is_some_and(|s| !s.is_empty()) {
                    *x = serde_json::Value::String("***".into());
                } else {
                    mask_secrets(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[[target]]
iqn = "iqn.2026-11.org.twinsan:t"
portals = ["10.99.0.100:3260"]
[[target.lun]]
number = 0
path = "/tmp/x"
"#;

    const HA: &str = r#"
[ha]
source = "xapi"
node = "host-a"
listen = "10.99.0.1:7789"
peer = "10.99.0.2:7789"
management_listen = "192.168.77.1:7789"
management_peer = "192.168.77.2:7789"
secret = "shared-ha-secret"
witnesses = ["10.99.0.254"]

[ha.xapi]
url = "https://127.0.0.1/"
password = "pw"
fingerprint = "00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff"

[[ha.vip]]
address = "10.99.0.100/24"
interface = "eth1"

[[ha.vip]]
address = "fd00::100/64"
interface = "eth1"

[ha.alerts]
smtp_server = "127.0.0.1"
from = "twinsan@host-a"
to = ["ops@example.org"]
"#;

    fn parse(ha: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{ha}"), Path::new("/etc/twinsan.toml"))
    }

    fn key_of(ha: &str) -> String {
        match parse(ha) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn full_table_parses_with_defaults() {
        let c = parse(HA).unwrap();
        let ha = c.ha.unwrap();
        assert_eq!(ha.heartbeat_interval_ms, 250);
        assert_eq!(ha.peer_timeout_ms, 1500);
        assert_eq!(ha.pool_conf, Path::new("/etc/xensource/pool.conf"));
        assert_eq!(ha.vips[0].label, "twinsan");
        let vips = ha.vip_list();
        assert_eq!(vips.len(), 2);
        assert_eq!(vips[0].prefix_len, 24);
        assert_eq!(vips[1].prefix_len, 64);
        let rc = ha.role_config();
        assert_eq!(rc.source, SourceKind::Xapi);
        assert!(rc.management_path);
        assert_eq!(
            ha.state_file_path(Path::new("/var/lib/twinsan")),
            Path::new("/var/lib/twinsan/ha-state.toml")
        );
        assert!(ha.replug_pbds && ha.replug_enabled());
        assert_eq!(ha.replug_schedule(), (8, Duration::from_secs(2)));
        let x = ha.xapi.unwrap();
        let ep = parse_xapi_url(&x.url, &x.fingerprint).unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("127.0.0.1", 443));
        assert!(matches!(ep.transport, Transport::Tls { pin: Some(_) }));
    }

    #[test]
    fn absent_table_means_no_ha() {
        assert!(parse("").unwrap().ha.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let sub = |from: &str, to: &str| HA.replacen(from, to, 1);
        assert_eq!(key_of(&sub("\"xapi\"", "\"pacemaker\"")), "ha.source");
        assert_eq!(key_of(&sub("10.99.0.2:7789", "nowhere")), "ha.peer");
        assert_eq!(key_of(&sub("10.99.0.2:7789", "10.99.0.1:7789")), "ha.peer");
        assert_eq!(
            key_of(&sub("management_peer = \"192.168.77.2:7789\"", "")),
            "ha.management_peer"
        );
        assert_eq!(key_of(&sub("shared-ha-secret", "short")), "ha.secret");
        assert_eq!(key_of(&sub("shared-ha-secret", "shared-ha-s")), "ha.secret");
        parse(&sub("shared-ha-secret", "shared-ha-se")).unwrap();
        assert_eq!(
            key_of(&sub(
                "smtp_server",
                "suppress_minutes = 9223372036854775807\nsmtp_server"
            )),
            "ha.alerts.suppress_minutes"
        );
        assert_eq!(
            key_of(&sub(
                "smtp_server",
                "startup_quiet_secs = 86401\nsmtp_server"
            )),
            "ha.alerts.startup_quiet_secs"
        );
        assert_eq!(key_of(&sub("10.99.0.254", "not-an-ip")), "ha.witnesses");
        assert_eq!(
            key_of(&sub("10.99.0.100/24", "10.99.0.100")),
            "ha.vip[0].address"
        );
        assert_eq!(
            key_of(&sub("fd00::100/64", "fd00::100/129")),
            "ha.vip[1].address"
        );
        assert_eq!(
            key_of(&sub(
                "interface = \"eth1\"",
                "interface = \"eth1\"\nlabel = \"much-too-long\""
            )),
            "ha.vip[0].label"
        );
        assert_eq!(
            key_of(&sub("https://127.0.0.1/", "ftp://x/")),
            "ha.xapi.url"
        );
        assert_eq!(key_of(&sub("00:11:22", "zz:11:22")), "ha.xapi.fingerprint");
        assert_eq!(
            key_of(&sub("to = [\"ops@example.org\"]", "to = []")),
            "ha.alerts.to"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let r = parse(&HA.replacen("secret =", "secrett =", 1));
        assert!(matches!(r, Err(ConfigError::Syntax { .. })), "{r:?}");
    }

    #[test]
    fn timing_rules() {
        let with = |k: &str| HA.replacen("secret =", &format!("{k}\nsecret ="), 1);
        assert_eq!(key_of(&with("peer_timeout_ms = 300")), "ha.peer_timeout_ms");
        assert_eq!(
            key_of(&with("heartbeat_interval_ms = 5")),
            "ha.heartbeat_interval_ms"
        );
        assert_eq!(key_of(&with("vip_probe_count = 0")), "ha.vip_probe_count");
        assert_eq!(key_of(&with("replug_attempts = 0")), "ha.replug_attempts");
        assert_eq!(key_of(&with("replug_attempts = 101")), "ha.replug_attempts");
        assert_eq!(
            key_of(&with("replug_backoff_ms = 5")),
            "ha.replug_backoff_ms"
        );
        assert_eq!(
            key_of(&with("replug_backoff_ms = 600001")),
            "ha.replug_backoff_ms"
        );
    }

    #[test]
    fn replug_keys() {
        let with = |k: &str| HA.replacen("secret =", &format!("{k}\nsecret ="), 1);
        let ha = parse(&with("replug_pbds = false")).unwrap().ha.unwrap();
        assert!(!ha.replug_enabled());
        let ha = parse(&with("replug_attempts = 3\nreplug_backoff_ms = 50"))
            .unwrap()
            .ha
            .unwrap();
        assert_eq!(ha.replug_schedule(), (3, Duration::from_millis(50)));
        // Without [ha.xapi] there is nobody to ask.
        let no_xapi = HA.replacen("[ha.xapi]", "[ha.unused]", 1);
        let start = no_xapi.find("[ha.unused]").unwrap();
        let end = no_xapi.find("[[ha.vip]]").unwrap();
        let no_xapi = format!("{}{}", &no_xapi[..start], &no_xapi[end..]);
        let ha = parse(&no_xapi).unwrap().ha.unwrap();
        assert!(ha.replug_pbds && !ha.replug_enabled());
    }

    #[test]
    fn urls() {
        let ep = parse_xapi_url("http://[::1]:8080/", "").unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("::1", 8080));
        assert_eq!(ep.transport, Transport::Plain);
        let ep = parse_xapi_url("https://xs1.example:4443", "").unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("xs1.example", 4443));
        assert!(parse_xapi_url("https:///", "").is_err());
        assert!(parse_xapi_url("127.0.0.1", "").is_err());
    }

    #[test]
    fn secrets_are_masked() {
        let c = parse(HA).unwrap();
        let mut v = serde_json::to_value(c.ha.as_ref().unwrap()).unwrap();
        mask_secrets(&mut v);
        assert_eq!(v["secret"], "***");
        assert_eq!(v["xapi"]["password"], "***");
        assert_eq!(v["alerts"]["smtp_password"], "");
        assert_eq!(v["node"], "host-a");
    }
}
