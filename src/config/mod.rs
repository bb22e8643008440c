//! twinsan configuration: one TOML file.
//!
//! Parsing is two steps: serde into raw structs (unknown keys refused, so a typo is an
//! error, not a silently ignored setting), then validation that names the key and says what
//! is wrong. Every error names the file.
//!
//! The `[ha]` table has its own module, [`ha`], so every configuration type lives in this folder.

pub mod ha;

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("config file {file}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// The shortest secret accepted anywhere: CHAP and mutual CHAP (RFC 7143 §12.1.3 asks for
/// at least 12 bytes where CHAP secrets are not random), the replication link and the HA
/// heartbeats.
pub const MIN_SECRET_LEN: usize = 12;

/// The longest timer of the iSCSI connection (login, NOP-In interval and answer): an hour.
pub const MAX_CONNECTION_TIMER_SECS: u64 = 3600;

/// The largest LUN file `size` creates: 1 PiB (sparse).
pub const MAX_LUN_SIZE: u64 = 1 << 50;

/// Replication: the largest `ping_interval_secs` and `timeout_secs` (DRBD's ping-int and
/// timeout allow 120 s and 60 s).
pub const MAX_REPLICATION_PING_SECS: u64 = 120;
pub const MAX_REPLICATION_TIMEOUT_SECS: u64 = 600;

/// Replication: `resync_rate` bounds, bytes per second (1 MiB/s ..= 1 TiB/s).
pub const MIN_RESYNC_RATE: u64 = 1 << 20;
pub const MAX_RESYNC_RATE: u64 = 1 << 40;

/// `sanitize_rate` bounds and default, bytes per second: the resync rates' range.
pub const MIN_SANITIZE_RATE: u64 = MIN_RESYNC_RATE;
pub const MAX_SANITIZE_RATE: u64 = MAX_RESYNC_RATE;
pub const DEFAULT_SANITIZE_RATE: u64 = 100 << 20;

/// Refuses `v` outside `lo..=hi`, naming the key and the range; `note` explains special values.
pub(crate) fn check_range<T: PartialOrd + std::fmt::Display>(
    err: &impl Fn(String, String) -> ConfigError,
    key: &str,
    v: T,
    lo: T,
    hi: T,
    note: &str,
) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        let note = if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        };
        return Err(err(
            key.to_string(),
            format!("{v} is outside {lo}..={hi}{note}"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub negotiation: NegotiationConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// High availability (role loop, heartbeats, VIPs, alerts); absent = always serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<ha::HaConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where generated identities and default LUN files live.
    pub data_dir: PathBuf,
    /// Seconds of silence on a connection before the target sends a NOP-In ping (0 = never).
    pub nop_in_interval_secs: u64,
    /// Seconds to wait for the NOP-Out answering a ping before dropping the connection.
    pub nop_in_timeout_secs: u64,
    /// Commands an initiator may have outstanding per session (the CmdSN window).
    pub queue_depth: u32,
    /// Seconds a login may take before the connection is dropped.
    pub login_timeout_secs: u64,
    /// Unix socket the `twinsan status` family of commands talks to; default
    /// `<data_dir>/twinsan.sock`.
    pub control_socket: Option<PathBuf>,
    /// Threads running the async runtime; 0 = half the CPUs (at least one), leaving the
    /// rest to the kernel's TCP stack, io_uring workers and the page cache copies.
    pub worker_threads: usize,
    /// How LUN files reach the kernel: "auto" (io_uring where the kernel has it, else I/O
    /// threads), "io_uring" (refuse to start without it) or "threads".
    pub io_engine: crate::store::IoEngineSetting,
    /// Threads engine: I/O threads per LUN at most; 0 = 16 for O_DIRECT LUNs, 4 for
    /// buffered ones.
    pub io_threads: usize,
    /// Bytes of command data (READ and WRITE buffers) all sessions may hold at once; over
    /// it new commands wait and the CmdSN window closes. 0 = an eighth of the host's memory,
    /// between 256 MiB and 8 GiB.
    pub max_inflight_bytes: u64,
    /// The same for one session; 0 = 256 MiB (never more than `max_inflight_bytes`).
    pub max_session_inflight_bytes: u64,
    /// Sessions the target serves at once (discovery ones included).
    pub max_sessions: u32,
    /// Sessions one initiator name may have at once.
    pub max_sessions_per_initiator: u32,
    /// Connections in the login phase at once; more are closed as they arrive.
    pub max_logins_in_progress: u32,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. "127.0.0.1:9942"; empty =
    /// off. No authentication: a non-loopback address serves anyone who can reach it.
    pub metrics_listen: String,
}

impl ServerConfig {
    /// `max_inflight_bytes` with 0 resolved from the host's memory.
    pub fn effective_max_inflight_bytes(&self) -> u64 {
        match self.max_inflight_bytes {
            0 => crate::iscsi::budget::default_limit(),
            n => n,
        }
    }

    /// `max_session_inflight_bytes` with 0 resolved; never above the server's budget.
    pub fn effective_max_session_inflight_bytes(&self) -> u64 {
        let server = self.effective_max_inflight_bytes();
        match self.max_session_inflight_bytes {
            0 => crate::iscsi::budget::default_session_limit(server),
            n => n.min(server),
        }
    }

    /// `metrics_listen` parsed: `None` when empty (no endpoint).
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        match self.metrics_listen.trim() {
            "" => Ok(None),
            a => a.parse().map(Some).map_err(|_| {
                format!("`{a}` is not an address:port (e.g. \"127.0.0.1:9942\"; empty = off)")
            }),
        }
    }

    /// The runtime's thread count after resolving `worker_threads = 0`.
    pub fn effective_worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./twinsan-data"),
            nop_in_interval_secs: 10,
            nop_in_timeout_secs: 15,
            queue_depth: 128,
            login_timeout_secs: 15,
            control_socket: None,
            worker_threads: 0,
            io_engine: crate::store::IoEngineSetting::Auto,
            io_threads: 0,
            max_inflight_bytes: 0,
            max_session_inflight_bytes: 0,
            max_sessions: 4096,
            max_sessions_per_initiator: 256,
            max_logins_in_progress: 256,
            metrics_listen: String::new(),
        }
    }
}

/// Target-side limits for login negotiation (RFC 7143 §13). Unset keys take twinsan's defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NegotiationConfig {
    pub max_recv_data_segment_length: Option<u32>,
    pub max_burst_length: Option<u32>,
    pub first_burst_length: Option<u32>,
    pub immediate_data: Option<bool>,
    pub initial_r2t: Option<bool>,
    pub max_outstanding_r2t: Option<u32>,
    /// Digests the target accepts, in preference order: "CRC32C", "None".
    pub header_digest: Option<Vec<String>>,
    pub data_digest: Option<Vec<String>>,
    pub default_time2wait: Option<u32>,
    pub default_time2retain: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub user: String,
    pub secret: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// CHAP the initiator must pass for a discovery session.
    pub chap: Option<Credentials>,
    /// Credentials the target answers with when the initiator asks for mutual CHAP.
    pub mutual_chap: Option<Credentials>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub iqn: String,
    pub alias: Option<String>,
    /// Addresses to listen on and advertise in SendTargets ("ip:port", IPv6 as "[addr]:port").
    #[serde(default = "default_portals")]
    pub portals: Vec<String>,
    /// Target portal group tag advertised with every portal.
    #[serde(default = "default_tpgt")]
    pub tpgt: u16,
    /// Initiator IQNs allowed to log in; empty means every initiator.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    pub chap: Option<Credentials>,
    pub mutual_chap: Option<Credentials>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
    /// ALUA across the pair (SPC-4 5.16): each host is a target port group, the primary's
    /// active/optimized, the secondary's standby. Every LUN must be replicated. Off by
    /// default: INQUIRY and VPD pages stay what they were.
    #[serde(default)]
    pub alua: bool,
    /// With `alua`: this host's own portals, bound in both roles so that initiators keep a
    /// path to the standby group (with `[ha]` the `portals`, e.g. the VIP, are bound only
    /// while primary); advertised in SendTargets after `portals`.
    #[serde(default)]
    pub host_portals: Vec<String>,
}

impl TargetConfig {
    /// Every address this target answers SendTargets with: `portals`, then `host_portals`.
    pub fn advertised_portals(&self) -> impl Iterator<Item = &String> {
        self.portals.iter().chain(&self.host_portals)
    }
}

fn default_portals() -> Vec<String> {
    vec!["127.0.0.1:3260".to_string()]
}
fn default_tpgt() -> u16 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    pub number: u64,
    /// Backing file or block device.
    pub path: PathBuf,
    /// Size of a file to create (sparse) when `path` does not exist, e.g. "1GiB", "512M", 1073741824.
    pub size: Option<SizeValue>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Physical block size READ CAPACITY(16) reports (LOGICAL BLOCKS PER PHYSICAL BLOCK
    /// EXPONENT, SBC-3 5.16.2): a power of two from block_size to 65536. Unset: block_size
    /// (exponent 0, what earlier versions reported, so migrated initiators see no change);
    /// 4096 on a 512-byte LUN over 4 KiB storage reports 512e. Configured rather than probed
    /// so both hosts of a pair report the same whatever their hardware.
    pub physical_block_size: Option<u32>,
    #[serde(default)]
    pub read_only: bool,
    /// Use O_DIRECT when the backing allows it.
    #[serde(default = "default_true")]
    pub direct: bool,
    /// Advertise a volatile write cache (WCE=1): writes without FUA are acknowledged before
    /// they are stable and SYNCHRONIZE CACHE makes them so. false = every write is FUA.
    #[serde(default = "default_true")]
    pub write_cache: bool,
    /// Offer UNMAP / WRITE SAME unmap (thin provisioning).
    #[serde(default = "default_true")]
    pub thin_provisioning: bool,
    /// Most bytes per second a SANITIZE OVERWRITE writes (each pass), e.g. "100M": a sanitize
    /// of a large LUN does not starve the other volumes of the storage or the replication
    /// link. 1M..=1T; default 100M.
    #[serde(default = "default_sanitize_rate")]
    pub sanitize_rate: SizeValue,
    /// A removable-medium disk (RMB=1): PREVENT ALLOW MEDIUM REMOVAL, and START STOP UNIT
    /// with LOEJ ejects and loads the medium (SBC-3 5.12, 5.25). The medium state and the
    /// preventions are in memory on this host only. Default false.
    #[serde(default)]
    pub removable: bool,
    /// Soft threshold (1..=99 percent of the backing file's filesystem in use): crossing it
    /// raises UNIT ATTENTION THIN PROVISIONING SOFT THRESHOLD REACHED, a warn line and an
    /// alert; off when unset. Files only, with thin_provisioning.
    pub thin_threshold_percent: Option<u8>,
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub revision: Option<String>,
    /// VPD 0x80 unit serial number.
    pub serial: Option<String>,
    /// VPD 0x83 NAA designator as hex (16 or 32 hex digits).
    pub naa: Option<String>,
    /// Vendor-specific part of the T10 vendor-id designator.
    pub t10_vendor_specific: Option<String>,
    /// Replicate this LUN synchronously to the peer host.
    pub replication: Option<ReplicationConfig>,
    /// Whose disk identity the LUN presents: twinsan's own (default), or exactly what tgt
    /// or IET presented (standard INQUIRY, VPD 0x00/0x80/0x83), for migrations.
    #[serde(default)]
    pub identity: IdentityMode,
    /// identity = "tgt": the target id (tid) tgt gave this LUN's target; tgt's default
    /// identity is derived from it and the LUN number.
    pub tgt_tid: Option<u32>,
    /// identity = "tgt" / "iet": tgt's `scsi_id` or IET's `ScsiId`, when one was configured.
    pub scsi_id: Option<String>,
    /// identity = "tgt" / "iet": tgt's `scsi_sn` or IET's `ScsiSN`, when one was configured.
    pub scsi_sn: Option<String>,
}

/// Which target's disk identity a LUN presents.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// twinsan's own: configured or derived from IQN and LUN, persisted (see identity.rs).
    #[default]
    Twinsan,
    /// Byte-identical to tgt 1.0.x for the same tid, LUN, scsi_id, scsi_sn, vendor_id,
    /// product_id and product_rev.
    Tgt,
    /// Byte-identical to IET for the same target name, LUN, ScsiId and ScsiSN.
    Iet,
}

/// A replicated volume (DRBD-like, protocol C). Both hosts configure the same `name`,
/// `secret` and size; `listen`/`peer` mirror each other.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Volume name, identical on both hosts (checked when the peers connect).
    pub name: String,
    /// Address this host accepts the peer link on ("ip:port").
    pub listen: String,
    /// The peer's link address ("ip:port").
    pub peer: String,
    /// Shared secret for the link's HMAC challenge-response.
    pub secret: String,
    /// Where DRBD-format metadata lives: "internal" (end of the backing device), a file or
    /// device path (flexible external), or "path[N]" (indexed external, 128 MiB slot N).
    #[serde(default = "default_meta")]
    pub meta: String,
    /// Role at start-up until the HA layer (or an operator) decides: "primary" or "secondary".
    #[serde(default = "default_role")]
    pub role: String,
    /// On peer loss: "dont-care" keeps serving and records changes in the bitmap;
    /// "suspend-io" holds writes until the peer is back or I/O is resumed.
    #[serde(default = "default_fencing")]
    pub fencing: String,
    /// Maximum resync rate, e.g. "100M" (bytes per second).
    #[serde(default = "default_resync_rate")]
    pub resync_rate: SizeValue,
    #[serde(default = "default_ping")]
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the peer before it is declared dead.
    #[serde(default = "default_peer_timeout")]
    pub timeout_secs: u64,
    /// Split-brain recovery policies (DRBD's after-sb-0pri / 1pri / 2pri).
    #[serde(default = "default_sb0")]
    pub after_sb_0pri: String,
    #[serde(default = "default_sb1")]
    pub after_sb_1pri: String,
    #[serde(default = "default_sb2")]
    pub after_sb_2pri: String,
    /// Online-verify digest: "crc32c" or "sha256".
    #[serde(default = "default_verify_digest")]
    pub verify_digest: String,
}

fn default_meta() -> String {
    "internal".into()
}
fn default_role() -> String {
    "secondary".into()
}
fn default_fencing() -> String {
    "dont-care".into()
}
fn default_resync_rate() -> SizeValue {
    SizeValue(100 << 20)
}
fn default_ping() -> u64 {
    2
}
fn default_peer_timeout() -> u64 {
    6
}
fn default_sb0() -> String {
    "discard-zero-changes".into()
}
fn default_sb1() -> String {
    "consensus".into()
}
fn default_sb2() -> String {
    "disconnect".into()
}
fn default_verify_digest() -> String {
    "crc32c".into()
}

pub const SPLIT_BRAIN_POLICIES_0PRI: &[&str] = &[
    "disconnect",
    "discard-zero-changes",
    "discard-younger-primary",
    "discard-older-primary",
    "discard-least-changes",
];
pub const SPLIT_BRAIN_POLICIES_1PRI: &[&str] = &["disconnect", "consensus", "discard-secondary"];
pub const SPLIT_BRAIN_POLICIES_2PRI: &[&str] = &["disconnect"];

impl ReplicationConfig {
    fn validate(
        &self,
        key: &str,
        err: &impl Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(err(
                format!("{key}.name"),
                format!(
                    "`{}` must be 1..=64 characters of letters, digits, '-', '_', '.'",
                    self.name
                ),
            ));
        }
        for (k, v) in [("listen", &self.listen), ("peer", &self.peer)] {
            if v.parse::<SocketAddr>().is_err() {
                return Err(err(
                    format!("{key}.{k}"),
                    format!("`{v}` is not an address:port"),
                ));
            }
        }
        if self.listen == self.peer {
            return Err(err(
                format!("{key}.peer"),
                "must differ from `listen`".into(),
            ));
        }
        if self.secret.len() < MIN_SECRET_LEN {
            return Err(err(
                format!("{key}.secret"),
                format!("must be at least {MIN_SECRET_LEN} bytes"),
            ));
        }
        let choice = |k: &str, v: &str, allowed: &[&str]| {
            if allowed.contains(&v) {
                Ok(())
            } else {
                Err(err(
                    format!("{key}.{k}"),
                    format!("`{v}` is not one of {}", allowed.join(", ")),
                ))
            }
        };
        choice("role", &self.role, &["primary", "secondary"])?;
        choice("fencing", &self.fencing, &["dont-care", "suspend-io"])?;
        choice(
            "after_sb_0pri",
            &self.after_sb_0pri,
            SPLIT_BRAIN_POLICIES_0PRI,
        )?;
        choice(
            "after_sb_1pri",
            &self.after_sb_1pri,
            SPLIT_BRAIN_POLICIES_1PRI,
        )?;
        choice(
            "after_sb_2pri",
            &self.after_sb_2pri,
            SPLIT_BRAIN_POLICIES_2PRI,
        )?;
        choice("verify_digest", &self.verify_digest, &["crc32c", "sha256"])?;
        check_range(
            err,
            &format!("{key}.ping_interval_secs"),
            self.ping_interval_secs,
            1,
            MAX_REPLICATION_PING_SECS,
            "seconds",
        )?;
        check_range(
            err,
            &format!("{key}.timeout_secs"),
            self.timeout_secs,
            2,
            MAX_REPLICATION_TIMEOUT_SECS,
            "seconds",
        )?;
        if self.timeout_secs <= self.ping_interval_secs {
            return Err(err(
                format!("{key}.timeout_secs"),
                format!(
                    "{} must be greater than ping_interval_secs ({})",
                    self.timeout_secs, self.ping_interval_secs
                ),
            ));
        }
        check_range(
            err,
            &format!("{key}.resync_rate"),
            self.resync_rate.0,
            MIN_RESYNC_RATE,
            MAX_RESYNC_RATE,
            "bytes per second, 1M..=1T",
        )?;
        parse_meta(&self.meta).map_err(|m| err(format!("{key}.meta"), m))?;
        Ok(())
    }
}

/// Where a replicated volume keeps its DRBD-format metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    Internal,
    External(PathBuf),
    Indexed(PathBuf, u32),
}

/// Parses `meta`: "internal", "/dev/x" or "/dev/x[3]".
pub fn parse_meta(s: &str) -> Result<MetaDisk, String> {
    let s = s.trim();
    if s == "internal" {
        return Ok(MetaDisk::Internal);
    }
    if s.is_empty() {
        return Err("must be \"internal\", a path, or \"path[index]\"".into());
    }
    if let Some(open) = s
        .strip_suffix(']')
        .and_then(|x| x.rfind('[').map(|i| (x, i)))
    {
        let (body, i) = open;
        let idx: u32 = body[i + 1..]
            .parse()
            .map_err(|_| format!("`{s}`: the index in [] must be a number"))?;
        return Ok(MetaDisk::Indexed(PathBuf::from(&body[..i]), idx));
    }
    Ok(MetaDisk::External(PathBuf::from(s)))
}

fn default_sanitize_rate() -> SizeValue {
    SizeValue(DEFAULT_SANITIZE_RATE)
}
fn default_block_size() -> u32 {
    512
}
fn default_true() -> bool {
    true
}

/// A size given as bytes or with a unit suffix (K, M, G, T with optional "iB"; powers of 1024).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "SizeRepr")]
pub struct SizeValue(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for SizeValue {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Bytes(b) => Ok(SizeValue(b)),
            SizeRepr::Text(s) => parse_size(&s).map(SizeValue),
        }
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 1073741824, \"512MiB\", \"1G\")"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

impl ServerConfig {
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("twinsan.sock"))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// The configuration `twinsan serve` runs without `--config`: one target with one 1 GiB
    /// sparse LUN under `data_dir`, on 127.0.0.1:3260.
    pub fn embedded_default(data_dir: &Path) -> Config {
        Config {
            server: ServerConfig {
                data_dir: data_dir.to_path_buf(),
                ..ServerConfig::default()
            },
            negotiation: NegotiationConfig::default(),
            discovery: DiscoveryConfig::default(),
            targets: vec![TargetConfig {
                iqn: "iqn.2026-11.org.twinsan:default".into(),
                alias: Some("twinsan default".into()),
                portals: default_portals(),
                tpgt: 1,
                allowed_initiators: vec![],
                chap: None,
                mutual_chap: None,
                alua: false,
                host_portals: vec![],
                luns: vec![LunConfig {
                    number: 0,
                    path: data_dir.join("lun0.img"),
                    size: Some(SizeValue(1 << 30)),
                    block_size: 512,
                    physical_block_size: None,
                    read_only: false,
                    direct: true,
                    write_cache: true,
                    thin_provisioning: true,
                    sanitize_rate: default_sanitize_rate(),
                    removable: false,
                    thin_threshold_percent: None,
                    vendor: None,
                    product: None,
                    revision: None,
                    serial: None,
                    naa: None,
                    t10_vendor_specific: None,
                    replication: None,
                    identity: IdentityMode::Twinsan,
                    tgt_tid: None,
                    scsi_id: None,
                    scsi_sn: None,
                }],
            }],
            ha: None,
        }
    }

    /// The effective configuration (defaults filled in) as JSON with secrets masked.
    pub fn masked_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        ha::mask_secrets(&mut v);
        v
    }

    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            message,
        };
        if self.targets.is_empty() {
            return Err(err(
                "target".into(),
                "no target configured: add a [[target]] table".into(),
            ));
        }
        let s = &self.server;
        for (key, v, lo, hi, note) in [
            (
                "worker_threads",
                s.worker_threads as u64,
                0,
                1024,
                "0 = half the CPUs",
            ),
            (
                "io_threads",
                s.io_threads as u64,
                0,
                256,
                "0 = 16 per O_DIRECT LUN, 4 per buffered one",
            ),
            ("queue_depth", s.queue_depth as u64, 1, 4096, ""),
            (
                "max_inflight_bytes",
                s.max_inflight_bytes,
                0,
                1 << 40,
                "bytes, 0 = an eighth of the memory",
            ),
            (
                "max_session_inflight_bytes",
                s.max_session_inflight_bytes,
                0,
                1 << 40,
                "bytes, 0 = 256 MiB",
            ),
            ("max_sessions", s.max_sessions as u64, 1, 65535, ""),
            (
                "max_sessions_per_initiator",
                s.max_sessions_per_initiator as u64,
                1,
                65535,
                "",
            ),
            (
                "max_logins_in_progress",
                s.max_logins_in_progress as u64,
                1,
                65535,
                "",
            ),
            (
                "login_timeout_secs",
                s.login_timeout_secs,
                1,
                MAX_CONNECTION_TIMER_SECS,
                "seconds",
            ),
            (
                "nop_in_interval_secs",
                s.nop_in_interval_secs,
                0,
                MAX_CONNECTION_TIMER_SECS,
                "seconds, 0 = no NOP-In pings",
            ),
            (
                "nop_in_timeout_secs",
                s.nop_in_timeout_secs,
                1,
                MAX_CONNECTION_TIMER_SECS,
                "seconds",
            ),
        ] {
            check_range(&err, &format!("server.{key}"), v, lo, hi, note)?;
        }
        if let Err(e) = s.metrics_addr() {
            return Err(err("server.metrics_listen".into(), e));
        }
        let n = &self.negotiation;
        for (key, v, min, max) in [
            (
                "max_recv_data_segment_length",
                n.max_recv_data_segment_length,
                512,
                (1 << 24) - 1,
            ),
            ("max_burst_length", n.max_burst_length, 512, (1 << 24) - 1),
            (
                "first_burst_length",
                n.first_burst_length,
                512,
                (1 << 24) - 1,
            ),
            ("max_outstanding_r2t", n.max_outstanding_r2t, 1, 65535),
            ("default_time2wait", n.default_time2wait, 0, 3600),
            ("default_time2retain", n.default_time2retain, 0, 3600),
        ] {
            if let Some(v) = v {
                if v < min || v > max {
                    return Err(err(
                        format!("negotiation.{key}"),
                        format!("{v} is outside {min}..={max} (RFC 7143 §13)"),
                    ));
                }
            }
        }
        if let (Some(f), Some(m)) = (n.first_burst_length, n.max_burst_length) {
            if f > m {
                return Err(err(
                    "negotiation.first_burst_length".into(),
                    format!("{f} exceeds max_burst_length {m}"),
                ));
            }
        }
        for (key, list) in [
            ("header_digest", &n.header_digest),
            ("data_digest", &n.data_digest),
        ] {
            if let Some(list) = list {
                if list.is_empty() {
                    return Err(err(
                        format!("negotiation.{key}"),
                        "must not be empty".into(),
                    ));
                }
                for d in list {
                    if d != "CRC32C" && d != "None" {
                        return Err(err(
                            format!("negotiation.{key}"),
                            format!("`{d}` is not a digest (use \"CRC32C\" or \"None\")"),
                        ));
                    }
                }
            }
        }
        check_credentials(&self.discovery.chap, "discovery.chap", &err)?;
        check_credentials(&self.discovery.mutual_chap, "discovery.mutual_chap", &err)?;
        if self.discovery.mutual_chap.is_some() && self.discovery.chap.is_none() {
            return Err(err(
                "discovery.mutual_chap".into(),
                "mutual CHAP needs discovery.chap as well (the initiator authenticates first)"
                    .into(),
            ));
        }

        let mut iqns = HashSet::new();
        let mut paths = HashSet::new();
        let mut replication_names = HashSet::new();
        for (ti, t) in self.targets.iter().enumerate() {
            let tk = format!("target[{ti}]");
            if let Err(m) = check_iscsi_name(&t.iqn) {
                return Err(err(format!("{tk}.iqn"), m));
            }
            if !iqns.insert(t.iqn.to_ascii_lowercase()) {
                return Err(err(
                    format!("{tk}.iqn"),
                    format!("`{}` is configured twice", t.iqn),
                ));
            }
            if t.portals.is_empty() {
                return Err(err(
                    format!("{tk}.portals"),
                    "needs at least one portal".into(),
                ));
            }
            for (key, list) in [("portals", &t.portals), ("host_portals", &t.host_portals)] {
                for p in list {
                    if p.parse::<SocketAddr>().is_err() {
                        return Err(err(
                            format!("{tk}.{key}"),
                            format!("`{p}` is not an address:port (IPv6 as \"[::1]:3260\")"),
                        ));
                    }
                }
            }
            if let Err((key, m)) = check_alua(t) {
                return Err(err(format!("{tk}.{key}"), m));
            }
            for i in &t.allowed_initiators {
                if let Err(m) = check_iscsi_name(i) {
                    return Err(err(format!("{tk}.allowed_initiators"), m));
                }
            }
            check_credentials(&t.chap, &format!("{tk}.chap"), &err)?;
            check_credentials(&t.mutual_chap, &format!("{tk}.mutual_chap"), &err)?;
            if t.mutual_chap.is_some() && t.chap.is_none() {
                return Err(err(
                    format!("{tk}.mutual_chap"),
                    "mutual CHAP needs `chap` as well".into(),
                ));
            }
            if t.luns.is_empty() {
                return Err(err(
                    format!("{tk}.lun"),
                    "target has no LUN: add a [[target.lun]]".into(),
                ));
            }
            let mut numbers = HashSet::new();
            for (li, l) in t.luns.iter().enumerate() {
                let lk = format!("{tk}.lun[{li}]");
                if l.number >= 16384 {
                    return Err(err(
                        format!("{lk}.number"),
                        format!("{} is above 16383", l.number),
                    ));
                }
                if !numbers.insert(l.number) {
                    return Err(err(
                        format!("{lk}.number"),
                        format!("LUN {} is configured twice", l.number),
                    ));
                }
                if !paths.insert(l.path.clone()) {
                    return Err(err(
                        format!("{lk}.path"),
                        format!("{} is already used by another LUN", l.path.display()),
                    ));
                }
                if l.block_size != 512 && l.block_size != 4096 {
                    return Err(err(
                        format!("{lk}.block_size"),
                        format!("{} is not supported (use 512 or 4096)", l.block_size),
                    ));
                }
                if let Some(p) = l.physical_block_size {
                    if !p.is_power_of_two() || p < l.block_size || p > 65536 {
                        return Err(err(
                            format!("{lk}.physical_block_size"),
                            format!(
                                "{p} is not supported (a power of two from block_size {} to 65536)",
                                l.block_size
                            ),
                        ));
                    }
                }
                if let Some(SizeValue(s)) = l.size {
                    check_range(
                        &err,
                        &format!("{lk}.size"),
                        s,
                        l.block_size as u64,
                        MAX_LUN_SIZE,
                        "bytes, at most 1 PiB",
                    )?;
                    if s % l.block_size as u64 != 0 {
                        return Err(err(
                            format!("{lk}.size"),
                            format!(
                                "{s} bytes is not a positive multiple of block_size {}",
                                l.block_size
                            ),
                        ));
                    }
                }
                for (key, val, max) in [
                    ("vendor", &l.vendor, 8),
                    ("product", &l.product, 16),
                    ("revision", &l.revision, 4),
                    ("serial", &l.serial, 252),
                    ("t10_vendor_specific", &l.t10_vendor_specific, 200),
                ] {
                    if let Some(v) = val {
                        if v.len() > max || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                            return Err(err(
                                format!("{lk}.{key}"),
                                format!("`{v}` must be at most {max} printable ASCII characters"),
                            ));
                        }
                    }
                }
                check_range(
                    &err,
                    &format!("{lk}.sanitize_rate"),
                    l.sanitize_rate.0,
                    MIN_SANITIZE_RATE,
                    MAX_SANITIZE_RATE,
                    "bytes per second, 1M..=1T",
                )?;
                if let Some(p) = l.thin_threshold_percent {
                    if let Err(m) = check_thin_threshold(l, p) {
                        return Err(err(format!("{lk}.thin_threshold_percent"), m));
                    }
                }
                if let Some(naa) = &l.naa {
                    if let Err(m) = parse_naa(naa) {
                        return Err(err(format!("{lk}.naa"), m));
                    }
                }
                if let Err((key, m)) = check_identity_mode(l) {
                    return Err(err(format!("{lk}.{key}"), m));
                }
                if let Some(r) = &l.replication {
                    r.validate(&format!("{lk}.replication"), &err)?;
                    if !replication_names.insert(r.name.clone()) {
                        return Err(err(
                            format!("{lk}.replication.name"),
                            format!("volume `{}` is configured twice", r.name),
                        ));
                    }
                }
            }
        }
        if let Some(ha) = &self.ha {
            ha.validate(&err)?;
        }
        Ok(())
    }
}

/// `thin_threshold_percent = p` of LUN `l`: 1..=99, on a thin, writable LUN whose path is a
/// file (or will be created as one): a block device has no filesystem usage to watch.
fn check_thin_threshold(l: &LunConfig, p: u8) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    if !(1..=99).contains(&p) {
        return Err(format!(
            "{p} is outside 1..=99 (percent of the backing filesystem in use)"
        ));
    }
    if !l.thin_provisioning {
        return Err(
            "needs thin_provisioning = true (the soft threshold is a thin provisioning threshold)"
                .into(),
        );
    }
    if l.read_only {
        return Err("a read-only LUN allocates nothing: remove the key".into());
    }
    if std::fs::metadata(&l.path).is_ok_and(|m| m.file_type().is_block_device()) {
        return Err(format!(
            "{} is a block device: the threshold watches a file's filesystem (statvfs) and does not apply",
            l.path.display()
        ));
    }
    Ok(())
}

/// The identity-mode keys of one LUN: which keys each mode needs or refuses, and the field
/// lengths tgt (usr/tgtd.h) and IET (kernel/iscsi.h) accept.
/// `alua` and `host_portals` of a target: ALUA needs every LUN replicated, with twinsan's own
/// identity (tgt / IET never reported ALUA), and the port group numbering (from each
/// replication link's `listen` and `peer`, see `scsi::alua::PortGroups`) the same for all.
fn check_alua(t: &TargetConfig) -> Result<(), (&'static str, String)> {
    if !t.alua {
        if !t.host_portals.is_empty() {
            return Err(("host_portals", "only applies with alua = true".into()));
        }
        return Ok(());
    }
    if let Some(p) = t.host_portals.iter().find(|p| t.portals.contains(p)) {
        return Err((
            "host_portals",
            format!("`{p}` is in `portals` already (host_portals are this host's own addresses, portals the shared one)"),
        ));
    }
    let mut groups = None;
    for l in &t.luns {
        let Some(r) = &l.replication else {
            return Err((
                "alua",
                format!("LUN {} is not replicated: ALUA reports the two hosts of a replicated pair as its target port groups", l.number),
            ));
        };
        if l.identity != IdentityMode::Twinsan {
            return Err((
                "alua",
                format!("LUN {} presents tgt's or IET's identity, which had no ALUA: alua needs identity = \"twinsan\"", l.number),
            ));
        }
        let (Ok(listen), Ok(peer)) = (r.listen.parse::<SocketAddr>(), r.peer.parse::<SocketAddr>())
        else {
            continue; // reported by the replication table's own checks
        };
        if listen.ip().is_unspecified() {
            return Err((
                "alua",
                format!("LUN {}: replication.listen {listen} is a wildcard: the port groups are numbered from the link's addresses, so both hosts need their own", l.number),
            ));
        }
        let g = crate::scsi::alua::PortGroups::from_link(listen, peer).ok_or((
            "alua",
            format!(
                "LUN {}: replication.listen and peer are the same address",
                l.number
            ),
        ))?;
        if groups.is_some_and(|first| first != g) {
            return Err((
                "alua",
                format!("LUN {}: its replication link numbers this host's port group {} unlike the target's first LUN (the host whose listen address is lower is group 1): order the links' addresses alike", l.number, g.own),
            ));
        }
        groups = Some(g);
    }
    Ok(())
}

fn check_identity_mode(l: &LunConfig) -> Result<(), (&'static str, String)> {
    use crate::scsi::compat::{IET_ID_LEN, IET_SN_LEN, TGT_ID_LEN, TGT_SN_LEN};
    let printable = |v: &str| v.bytes().all(|b| (0x20..0x7f).contains(&b));
    let (id_max, sn_max) = match l.identity {
        IdentityMode::Twinsan => {
            for (key, set) in [
                ("tgt_tid", l.tgt_tid.is_some()),
                ("scsi_id", l.scsi_id.is_some()),
                ("scsi_sn", l.scsi_sn.is_some()),
            ] {
                if set {
                    return Err((
                        key,
                        "only applies with identity = \"tgt\" or \"iet\" (use serial / naa for twinsan's own identity)".into(),
                    ));
                }
            }
            return Ok(());
        }
        IdentityMode::Tgt => {
            match l.tgt_tid {
                None => {
                    return Err((
                        "tgt_tid",
                        "identity = \"tgt\" needs the target id tgt used (`tgtadm --mode target --op show`)".into(),
                    ))
                }
                Some(0) => return Err(("tgt_tid", "tgt target ids start at 1".into())),
                Some(_) => {}
            }
            (TGT_ID_LEN, TGT_SN_LEN)
        }
        IdentityMode::Iet => {
            if l.tgt_tid.is_some() {
                return Err(("tgt_tid", "only applies with identity = \"tgt\"".into()));
            }
            (IET_ID_LEN, IET_SN_LEN)
        }
    };
    for (key, val, max) in [
        ("scsi_id", &l.scsi_id, id_max),
        ("scsi_sn", &l.scsi_sn, sn_max),
    ] {
        if let Some(v) = val {
            if v.is_empty() || v.len() > max || !printable(v) {
                return Err((
                    key,
                    format!("`{v}` must be 1..={max} printable ASCII characters"),
                ));
            }
        }
    }
    for (key, set) in [
        ("naa", l.naa.is_some()),
        ("serial", l.serial.is_some()),
        ("t10_vendor_specific", l.t10_vendor_specific.is_some()),
    ] {
        if set {
            return Err((
                key,
                "does not apply with a tgt/IET identity (set scsi_id / scsi_sn instead)".into(),
            ));
        }
    }
    Ok(())
}

fn check_credentials(
    c: &Option<Credentials>,
    key: &str,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if let Some(c) = c {
        if c.user.is_empty() {
            return Err(err(format!("{key}.user"), "must not be empty".into()));
        }
        if c.secret.len() < MIN_SECRET_LEN || c.secret.len() > 255 {
            return Err(err(
                format!("{key}.secret"),
                format!(
                    "is {} bytes, must be {MIN_SECRET_LEN}..=255 bytes (RFC 7143 §12.1.3)",
                    c.secret.len()
                ),
            ));
        }
    }
    Ok(())
}

/// iSCSI names (RFC 7143 §4.2.7): iqn., eui. or naa. forms, at most 223 bytes.
pub fn check_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 223 {
        return Err(format!("`{name}` must be 1..=223 bytes"));
    }
    let lower = name.to_ascii_lowercase();
    let ok_chars = lower
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    let form_ok = lower.starts_with("iqn.")
        || (lower.starts_with("eui.") && lower.len() == 20)
        || lower.starts_with("naa.");
    if !ok_chars || !form_ok {
        return Err(format!(
            "`{name}` is not an iSCSI name (e.g. iqn.2026-11.com.example:disk1; letters, digits, '-', '.', ':')"
        ));
    }
    Ok(())
}

/// Parses an NAA designator given as hex (8 or 16 bytes; NAA type in the top nibble).
pub fn parse_naa(s: &str) -> Result<Vec<u8>, String> {
    let hexs = s.trim().trim_start_matches("0x").trim_start_matches("naa.");
    let bytes = hex::decode(hexs).map_err(|e| format!("`{s}` is not hex: {e}"))?;
    let naa = bytes.first().map(|b| b >> 4).unwrap_or(0);
    match (bytes.len(), naa) {
        (8, 2 | 3 | 5) | (16, 6) => Ok(bytes),
        _ => Err(format!(
            "`{s}` must be 16 hex digits (NAA 2, 3 or 5) or 32 hex digits (NAA 6)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
data_dir = "/tmp/x"

[[target]]
iqn = "iqn.2026-11.org.example:disk1"
portals = ["127.0.0.1:3260", "[::1]:3260"]
allowed_initiators = ["iqn.1994-05.com.redhat:abc"]
chap = { user = "u", secret = "secretsecret" }

[[target.lun]]
number = 1
path = "/tmp/x/disk"
size = "1GiB"
block_size = 4096
naa = "600140512345678901234567890abcde"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/twinsan.toml"))
    }

    #[test]
    fn parses_good_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.targets[0].luns[0].size, Some(SizeValue(1 << 30)));
        assert_eq!(c.targets[0].portals.len(), 2);
        assert_eq!(c.server.queue_depth, 128);
    }

    #[test]
    fn embedded_default_is_valid() {
        Config::embedded_default(Path::new("./twinsan-data"))
            .validate(Path::new("<embedded>"))
            .unwrap();
    }

    fn invalid_key(s: &str) -> String {
        match parse(s) {
            Err(ConfigError::Invalid { key, file, .. }) => {
                assert_eq!(file, Path::new("/etc/twinsan.toml"));
                key
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn sanitize_rate_is_checked() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.targets[0].luns[0].sanitize_rate, SizeValue(100 << 20));
        let with = |v: &str| {
            GOOD.replace(
                "block_size = 4096\n",
                &format!("block_size = 4096\nsanitize_rate = {v}\n"),
            )
        };
        let c = parse(&with("\"10M\"")).unwrap();
        assert_eq!(c.targets[0].luns[0].sanitize_rate, SizeValue(10 << 20));
        for bad in ["1048575", "\"2T\"", "0"] {
            assert_eq!(
                invalid_key(&with(bad)),
                "target[0].lun[0].sanitize_rate",
                "{bad}"
            );
        }
        let e = parse(&with("0")).unwrap_err().to_string();
        assert!(e.contains("sanitize_rate") && e.contains("1M..=1T"), "{e}");
        assert!(matches!(
            parse(&with("\"fast\"")),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn removable_is_a_boolean_defaulting_to_false() {
        assert!(!parse(GOOD).unwrap().targets[0].luns[0].removable);
        let with = |v: &str| {
            GOOD.replace(
                "block_size = 4096\n",
                &format!("block_size = 4096\nremovable = {v}\n"),
            )
        };
        assert!(parse(&with("true")).unwrap().targets[0].luns[0].removable);
        for bad in ["1", "\"yes\""] {
            let e = parse(&with(bad)).unwrap_err();
            assert!(matches!(e, ConfigError::Syntax { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("removable"), "{bad}: {e}");
        }
    }

    #[test]
    fn physical_block_size_is_checked() {
        for bad in [
            "physical_block_size = 512",
            "physical_block_size = 6000",
            "physical_block_size = 131072",
        ] {
            assert_eq!(
                invalid_key(
                    &GOOD.replace("block_size = 4096", &format!("block_size = 4096\n{bad}"))
                ),
                "target[0].lun[0].physical_block_size",
                "{bad}"
            );
        }
        let c = parse(&GOOD.replace(
            "block_size = 4096",
            "block_size = 512\nphysical_block_size = 4096",
        ))
        .unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_size, Some(4096));
        assert_eq!(
            parse(GOOD).unwrap().targets[0].luns[0].physical_block_size,
            None
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        assert_eq!(
            invalid_key(&GOOD.replace("block_size = 4096", "block_size = 1000")),
            "target[0].lun[0].block_size"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("127.0.0.1:3260\",", "localhost\",")),
            "target[0].portals"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("iqn.2026-11.org.example:disk1", "bad name")),
            "target[0].iqn"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("600140512345678901234567890abcde", "zz")),
            "target[0].lun[0].naa"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("\"1GiB\"", "1000")),
            "target[0].lun[0].size"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("data_dir = \"/tmp/x\"", "worker_threads = 5000")),
            "server.worker_threads"
        );
    }

    #[test]
    fn thin_threshold_percent_is_checked() {
        let with = |extra: &str| {
            GOOD.replace(
                "block_size = 4096\n",
                &format!("block_size = 4096\n{extra}\n"),
            )
        };
        let c = parse(&with("thin_threshold_percent = 80")).unwrap();
        assert_eq!(c.targets[0].luns[0].thin_threshold_percent, Some(80));
        assert_eq!(
            parse(GOOD).unwrap().targets[0].luns[0].thin_threshold_percent,
            None
        );
        for ok in [1, 99] {
            parse(&with(&format!("thin_threshold_percent = {ok}"))).unwrap();
        }
        let key = "target[0].lun[0].thin_threshold_percent";
        for bad in [
            "thin_threshold_percent = 0",
            "thin_threshold_percent = 100",
            "thin_threshold_percent = 80\nthin_provisioning = false",
            "thin_threshold_percent = 80\nread_only = true",
        ] {
            assert_eq!(invalid_key(&with(bad)), key, "{bad}");
        }
        // Does not fit a u8: refused by the parser, with the key in the message.
        match parse(&with("thin_threshold_percent = 256")) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains("thin_threshold_percent"), "{message}")
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        // A block device has no filesystem usage to watch.
        let loop_dev = ["/dev/loop0"].into_iter().find(|d| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(d).is_ok_and(|m| m.file_type().is_block_device())
        });
        if let Some(dev) = loop_dev {
            let cfg = with("thin_threshold_percent = 80").replace("/tmp/x/disk", dev);
            match parse(&cfg) {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, key);
                    assert!(message.contains("block device"), "{message}");
                }
                other => panic!("expected invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn io_engine_and_io_threads_are_checked() {
        let c = parse(&GOOD.replace(
            "data_dir = \"/tmp/x\"",
            "io_engine = \"threads\"\nio_threads = 8",
        ))
        .unwrap();
        assert_eq!(c.server.io_engine, crate::store::IoEngineSetting::Threads);
        assert_eq!(c.server.io_threads, 8);
        assert_eq!(
            invalid_key(&GOOD.replace("data_dir = \"/tmp/x\"", "io_threads = 1000")),
            "server.io_threads"
        );
        let e = parse(&GOOD.replace("data_dir = \"/tmp/x\"", "io_engine = \"aio\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("io_engine") && e.contains("threads"), "{e}");
    }

    #[test]
    fn worker_threads_default_to_half_the_cpus() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        let c = parse(GOOD).unwrap();
        assert_eq!(c.server.worker_threads, 0);
        assert_eq!(c.server.effective_worker_threads(), (cpus / 2).max(1));
        let c = parse(&GOOD.replace("data_dir = \"/tmp/x\"", "worker_threads = 3")).unwrap();
        assert_eq!(c.server.effective_worker_threads(), 3);
    }

    #[test]
    fn unknown_key_and_syntax_errors_are_clear() {
        match parse(&GOOD.replace("block_size", "blok_size")) {
            Err(ConfigError::Syntax { message, file }) => {
                assert!(message.contains("blok_size"), "{message}");
                assert!(file.ends_with("twinsan.toml"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("[[target]\n"),
            Err(ConfigError::Syntax { .. })
        ));
        assert!(matches!(
            parse(&GOOD.replace("\"1GiB\"", "\"1QB\"")),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn replication_section_is_validated() {
        let with = |extra: &str| {
            format!(
                "{GOOD}\n[target.lun.replication]\nname = \"r0\"\nlisten = \"127.0.0.1:7788\"\npeer = \"127.0.0.1:7789\"\nsecret = \"sharedsecret\"\n{extra}"
            )
        };
        let c = parse(&with("")).unwrap();
        let r = c.targets[0].luns[0].replication.as_ref().unwrap();
        assert_eq!(
            (r.role.as_str(), r.meta.as_str()),
            ("secondary", "internal")
        );
        assert_eq!(
            invalid_key(&with("after_sb_0pri = \"merge\"")),
            "target[0].lun[0].replication.after_sb_0pri"
        );
        assert_eq!(
            invalid_key(&with("role = \"both\"")),
            "target[0].lun[0].replication.role"
        );
        assert_eq!(
            invalid_key(&with("timeout_secs = 1\nping_interval_secs = 2")),
            "target[0].lun[0].replication.timeout_secs"
        );
        assert_eq!(
            parse_meta("/dev/x[3]").unwrap(),
            MetaDisk::Indexed("/dev/x".into(), 3)
        );
        assert_eq!(parse_meta("/m").unwrap(), MetaDisk::External("/m".into()));
        assert!(parse_meta("/dev/x[a]").is_err());
    }

    #[test]
    fn numeric_keys_are_bounded_with_file_key_and_range_in_the_message() {
        let server = |k: &str| GOOD.replace("data_dir = \"/tmp/x\"", k);
        for (k, v) in [
            ("login_timeout_secs", 0),
            ("login_timeout_secs", 3601),
            ("nop_in_interval_secs", 3601),
            ("nop_in_interval_secs", i64::MAX),
            ("nop_in_timeout_secs", 0),
            ("nop_in_timeout_secs", i64::MAX),
            ("queue_depth", 0),
            ("io_threads", i64::MAX),
        ] {
            assert_eq!(
                invalid_key(&server(&format!("{k} = {v}"))),
                format!("server.{k}")
            );
        }
        let e = parse(&server("login_timeout_secs = 0"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/twinsan.toml")
                && e.contains("server.login_timeout_secs")
                && e.contains("1..=3600"),
            "{e}"
        );
        parse(&server(
            "login_timeout_secs = 1\nnop_in_interval_secs = 0\nnop_in_timeout_secs = 3600",
        ))
        .unwrap();
        assert_eq!(
            invalid_key(&GOOD.replace("\"1GiB\"", "\"2048T\"")),
            "target[0].lun[0].size"
        );
        let repl = |extra: &str| {
            format!(
                "{GOOD}\n[target.lun.replication]\nname = \"r0\"\nlisten = \"127.0.0.1:7788\"\npeer = \"127.0.0.1:7789\"\nsecret = \"sharedsecret\"\n{extra}"
            )
        };
        for (k, v) in [
            ("timeout_secs", "9223372036854775807"),
            ("timeout_secs", "601"),
            ("ping_interval_secs", "0"),
            ("ping_interval_secs", "121"),
            ("resync_rate", "\"2T\""),
            ("resync_rate", "1048575"),
        ] {
            assert_eq!(
                invalid_key(&repl(&format!("{k} = {v}"))),
                format!("target[0].lun[0].replication.{k}")
            );
        }
        parse(&repl(
            "ping_interval_secs = 120\ntimeout_secs = 600\nresync_rate = \"1T\"",
        ))
        .unwrap();
    }

    #[test]
    fn secrets_share_one_minimum_length() {
        assert_eq!(MIN_SECRET_LEN, 12);
        let short = "x".repeat(MIN_SECRET_LEN - 1);
        let e = parse(&GOOD.replace("secretsecret", &short))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target[0].chap.secret") && e.contains("12..=255"),
            "{e}"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("secretsecret", "abc")),
            "target[0].chap.secret"
        );
        let repl = format!(
            "{GOOD}\n[target.lun.replication]\nname = \"r0\"\nlisten = \"127.0.0.1:7788\"\npeer = \"127.0.0.1:7789\"\nsecret = \"{short}\"\n"
        );
        assert_eq!(invalid_key(&repl), "target[0].lun[0].replication.secret");
        parse(&repl.replace(&short, &"x".repeat(MIN_SECRET_LEN))).unwrap();
    }

    #[test]
    fn alua_needs_replicated_luns_with_distinct_link_addresses() {
        let on = GOOD.replace(
            "chap = { user = \"u\", secret = \"secretsecret\" }",
            "chap = { user = \"u\", secret = \"secretsecret\" }\nalua = true\nhost_portals = [\"127.0.0.2:3260\"]",
        );
        let repl = |s: &str, listen: &str| {
            format!(
                "{s}\n[target.lun.replication]\nname = \"r0\"\nlisten = \"{listen}\"\npeer = \"127.0.0.1:7789\"\nsecret = \"sharedsecret\"\n"
            )
        };
        let c = parse(&repl(&on, "127.0.0.1:7788")).unwrap();
        assert!(c.targets[0].alua);
        let advertised: Vec<_> = c.targets[0].advertised_portals().collect();
        assert_eq!(advertised.len(), 3);
        assert!(!parse(GOOD).unwrap().targets[0].alua, "off by default");
        assert_eq!(invalid_key(&on), "target[0].alua", "LUN not replicated");
        for listen in ["0.0.0.0:7788", "127.0.0.1:7789"] {
            assert_eq!(
                invalid_key(&repl(&on, listen)),
                "target[0].alua",
                "{listen}"
            );
        }
        let tgt = repl(&on, "127.0.0.1:7788").replace(
            "block_size = 4096",
            "block_size = 4096\nidentity = \"tgt\"\ntgt_tid = 1",
        );
        assert_eq!(invalid_key(&tgt), "target[0].alua");
        let dup = repl(&on, "127.0.0.1:7788").replace("127.0.0.2:3260", "127.0.0.1:3260");
        assert_eq!(invalid_key(&dup), "target[0].host_portals");
        let off = repl(&on, "127.0.0.1:7788").replace("alua = true", "alua = false");
        assert_eq!(invalid_key(&off), "target[0].host_portals");
        let bad = repl(&on, "127.0.0.1:7788").replace("127.0.0.2:3260", "nowhere");
        assert_eq!(invalid_key(&bad), "target[0].host_portals");
    }

    #[test]
    fn identity_mode_keys_are_checked() {
        let no_naa = GOOD.replace("naa = \"600140512345678901234567890abcde\"\n", "");
        let with = |base: &str, extra: &str| {
            base.replace(
                "block_size = 4096\n",
                &format!("block_size = 4096\n{extra}\n"),
            )
        };
        let c = parse(&with(
            &no_naa,
            "identity = \"tgt\"\ntgt_tid = 2\nscsi_sn = \"beaf21\"",
        ))
        .unwrap();
        assert_eq!(c.targets[0].luns[0].identity, IdentityMode::Tgt);
        assert_eq!(
            invalid_key(&with(&no_naa, "identity = \"tgt\"")),
            "target[0].lun[0].tgt_tid"
        );
        assert_eq!(
            invalid_key(&with(&no_naa, "scsi_id = \"x\"")),
            "target[0].lun[0].scsi_id"
        );
        assert_eq!(
            invalid_key(&with(
                &no_naa,
                "identity = \"iet\"\nscsi_id = \"0123456789abcdefX\""
            )),
            "target[0].lun[0].scsi_id"
        );
        // naa is twinsan's own identity: it cannot be combined with tgt's.
        assert_eq!(
            invalid_key(&with(GOOD, "identity = \"tgt\"\ntgt_tid = 1")),
            "target[0].lun[0].naa"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("x").is_err());
    }
}
