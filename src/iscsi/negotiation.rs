//! Text key=value format (RFC 7143 §6.1) and operational parameter negotiation (§6.2, §13).
//!
//! [`parse_text`] turns a (complete, reassembled) data segment into key=value pairs and never
//! panics: malformed input yields a [`TextError`]. [`KEYS`] declares every key of §12/§13 once
//! (stage, Use, scope, senders, type and result function, default, range). [`Negotiator`]
//! plays the target's part in login-time negotiation of those keys, reading the table, and
//! produces [`SessionParams`]; the few rules one key has on its own stay explicit there.

use std::collections::{HashMap, HashSet};

/// Longest key name (§6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value, except binary values (§6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest decoded binary value we take (CHAP_C / CHAP_R, §12.1.3).
pub const MAX_BINARY_LEN: usize = 1024;
/// Longest text of one negotiation sequence we accept (a target must take at least 8192, §6.1).
pub const MAX_NEGOTIATION_TEXT: usize = 64 * 1024;
/// Smallest / largest data segment and burst lengths (§13.12 – §13.14).
pub const MIN_SEGMENT: u32 = 512;
pub const MAX_SEGMENT: u32 = (1 << 24) - 1;
/// Default MaxRecvDataSegmentLength when a side declares none (§13.12).
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;
/// The iSCSIProtocolLevel this implementation claims (RFC 7143 is level 1, §13.24).
pub const PROTOCOL_LEVEL: u64 = 1;

/// One key=value pair as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

/// Malformed text (§6.1). Any of these ends a login with an initiator error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text of {0} bytes exceeds the {MAX_NEGOTIATION_TEXT}-byte limit")]
    TooLarge(usize),
    #[error("key=value pair at offset {0} has no '='")]
    MissingEquals(usize),
    #[error("empty key name at offset {0}")]
    EmptyKey(usize),
    #[error("key name at offset {0} is longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong(usize),
    #[error("key name at offset {0} has a character outside [A-Za-z0-9.+@_-]")]
    BadKeyChar(usize),
    #[error("value of {key} is {len} bytes, above the {max}-byte limit")]
    ValueTooLong { key: String, len: usize, max: usize },
    #[error("text at offset {0} is not UTF-8")]
    NotUtf8(usize),
    #[error("key {0} appears twice")]
    DuplicateKey(String),
}

/// The largest encoded value accepted for `key`: binary CHAP values may be up to 1024 bytes
/// (hex encoded: 2 + 2048 characters), everything else 255 (§6.1, §12.1.3).
fn max_value_len(key: &str) -> usize {
    match key {
        "CHAP_C" | "CHAP_R" => 2 + 2 * MAX_BINARY_LEN,
        _ => MAX_VALUE_LEN,
    }
}

fn valid_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_')
}

/// Parses NUL-separated `key=value` pairs (§6.1). Empty segments (repeated NULs, padding) are
/// skipped and the final NUL may be missing. Keys are case-sensitive; a key repeated in one
/// text is an error (§6.2). Never panics.
pub fn parse_text(data: &[u8]) -> Result<Vec<KeyValue>, TextError> {
    if data.len() > MAX_NEGOTIATION_TEXT {
        return Err(TextError::TooLarge(data.len()));
    }
    let mut out: Vec<KeyValue> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut offset = 0usize;
    for segment in data.split(|b| *b == 0) {
        let start = offset;
        offset += segment.len() + 1;
        if segment.is_empty() {
            continue;
        }
        let eq = segment
            .iter()
            .position(|b| *b == b'=')
            .ok_or(TextError::MissingEquals(start))?;
        let (key, value) = (&segment[..eq], &segment[eq + 1..]);
        if key.is_empty() {
            return Err(TextError::EmptyKey(start));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(TextError::KeyTooLong(start));
        }
        // '#' is allowed as the second character of IANA-registered "X#" keys (§6.1, §13).
        let key_ok = key
            .iter()
            .enumerate()
            .all(|(i, b)| valid_key_byte(*b) || (i == 1 && *b == b'#' && key[0] == b'X'));
        if !key_ok {
            return Err(TextError::BadKeyChar(start));
        }
        let key = std::str::from_utf8(key).map_err(|_| TextError::NotUtf8(start))?;
        let max = max_value_len(key);
        if value.len() > max {
            return Err(TextError::ValueTooLong {
                key: key.to_string(),
                len: value.len(),
                max,
            });
        }
        let value = std::str::from_utf8(value).map_err(|_| TextError::NotUtf8(start + eq + 1))?;
        if !seen.insert(key.to_string()) {
            return Err(TextError::DuplicateKey(key.to_string()));
        }
        out.push(KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(out)
}

/// Serialises pairs as `key=value\0...` (§6.1).
pub fn encode_text<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// Splits encoded text into chunks of at most `max` bytes, preferring to cut after a NUL so
/// that no key=value pair spans two PDUs (a pair longer than `max` is cut where it must be).
pub fn split_text(text: &[u8], max: usize) -> Vec<Vec<u8>> {
    let max = max.max(1);
    let mut chunks = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let cut = rest[..max]
            .iter()
            .rposition(|b| *b == 0)
            .map(|p| p + 1)
            .unwrap_or(max);
        chunks.push(rest[..cut].to_vec());
        rest = &rest[cut..];
    }
    if !rest.is_empty() || chunks.is_empty() {
        chunks.push(rest.to_vec());
    }
    chunks
}

/// The reserved constants of §6.2 that must never be proposed as values.
pub fn is_reserved_value(v: &str) -> bool {
    matches!(v, "Reject" | "Irrelevant" | "NotUnderstood")
}

/// A numerical value: decimal, `0x` hex or `0b` base64 (big-endian), up to 64 bits (§6.1).
pub fn parse_numeric(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let digits = hex.trim_start_matches('0');
        if digits.len() > 16 {
            return None;
        }
        return if digits.is_empty() {
            Some(0)
        } else {
            u64::from_str_radix(digits, 16).ok()
        };
    }
    if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        let bytes = base64_decode(b64)?;
        let significant: Vec<u8> = bytes.into_iter().skip_while(|b| *b == 0).collect();
        if significant.len() > 8 {
            return None;
        }
        return Some(
            significant
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | *b as u64),
        );
    }
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u64>().ok()
}

/// A binary value in `0x` hex or `0b` base64 encoding (§6.1); at most [`MAX_BINARY_LEN`]
/// bytes. An odd number of hex digits is read with an implied leading zero.
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    let bytes = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 2 * MAX_BINARY_LEN + 1 {
            return None;
        }
        let padded;
        let hex = if hex.len() % 2 == 1 {
            padded = format!("0{hex}");
            padded.as_str()
        } else {
            hex
        };
        hex::decode(hex).ok()?
    } else if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b64)?
    } else {
        return None;
    };
    if bytes.is_empty() || bytes.len() > MAX_BINARY_LEN {
        return None;
    }
    Some(bytes)
}

/// `0x`-prefixed lowercase hex, the encoding we send binary values in.
pub fn encode_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// RFC 4648 base64 (standard alphabet); padding optional, anything else (and an empty value)
/// rejected.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine;
    const PADDING_OPTIONAL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    PADDING_OPTIONAL.decode(s).ok().filter(|b| !b.is_empty())
}

/// `Yes` / `No` (§6.1; values are case-sensitive).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// Digest algorithms for HeaderDigest / DataDigest (§13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Digest {
    None,
    Crc32c,
}

impl Digest {
    pub fn as_str(self) -> &'static str {
        match self {
            Digest::None => "None",
            Digest::Crc32c => "CRC32C",
        }
    }
    pub fn parse(s: &str) -> Option<Digest> {
        match s {
            "None" => Some(Digest::None),
            "CRC32C" => Some(Digest::Crc32c),
            _ => None,
        }
    }
}

/// SessionType (§13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// What this target is willing to do; the inputs of every negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLimits {
    /// Largest data segment we accept; declared to the initiator (§13.12).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    /// Allowed header digests, in our preference order (used when we propose).
    pub header_digest: Vec<Digest>,
    pub data_digest: Vec<Digest>,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_connections: u32,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 1,
            header_digest: vec![Digest::Crc32c, Digest::None],
            data_digest: vec![Digest::Crc32c, Digest::None],
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
        }
    }
}

impl TargetLimits {
    /// Checks the limits against the ranges of §13; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let seg = MIN_SEGMENT..=MAX_SEGMENT;
        if !seg.contains(&self.max_recv_data_segment_length) {
            return Err("max_recv_data_segment_length must be 512..=16777215".into());
        }
        if !seg.contains(&self.max_burst_length) {
            return Err("max_burst_length must be 512..=16777215".into());
        }
        if !seg.contains(&self.first_burst_length) {
            return Err("first_burst_length must be 512..=16777215".into());
        }
        if self.first_burst_length > self.max_burst_length {
            return Err("first_burst_length must not exceed max_burst_length".into());
        }
        if !(1..=65535).contains(&self.max_outstanding_r2t) {
            return Err("max_outstanding_r2t must be 1..=65535".into());
        }
        if !(1..=65535).contains(&self.max_connections) {
            return Err("max_connections must be 1..=65535".into());
        }
        if self.default_time2wait > 3600 || self.default_time2retain > 3600 {
            return Err("default_time2wait/default_time2retain must be 0..=3600".into());
        }
        if self.header_digest.is_empty() || self.data_digest.is_empty() {
            return Err("header_digest/data_digest must allow at least one digest".into());
        }
        Ok(())
    }
}

/// Operational parameters in force after login (§13). Defaults are the RFC defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: Digest,
    pub data_digest: Digest,
    /// What we declared: the largest data segment the initiator may send us.
    pub max_recv_data_segment_length: u32,
    /// What the initiator declared: the largest data segment we may send it (8192 if undeclared).
    pub max_xmit_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub max_connections: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u8,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    /// iSCSIProtocolLevel (§13.24); 0 unless negotiated.
    pub protocol_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: Digest::None,
            data_digest: Digest::None,
            max_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_xmit_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            protocol_level: 0,
        }
    }
}

/// Negotiation failures that end the login with an initiator error (§6.2, §11.13.5).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("key {0} negotiated more than once")]
    Renegotiated(String),
    #[error("invalid MaxRecvDataSegmentLength declaration {0:?}")]
    BadDeclaration(String),
    #[error("invalid answer {value:?} to our offer of {key}")]
    BadAnswer { key: String, value: String },
    #[error("the initiator did not answer our offer of {0}")]
    Unanswered(String),
    #[error("{key} ended as {value}, which this target does not allow")]
    Unacceptable { key: &'static str, value: String },
}

/// When a key may be exchanged: the "Use" line of each §13 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// LO: only in the login of the leading connection; the value is fixed for the session.
    LeadingOnly,
    /// IO: only during login (any connection).
    LoginOnly,
    /// ALL: during login and in Full Feature Phase Text Requests.
    All,
    /// FFPO: only in Full Feature Phase.
    FfpOnly,
}

/// Which part of the login processes a key (§6.3): the security stage's authentication
/// (§12), the session identity read from the first Login Request (§6.3.1), or operational
/// negotiation ([`Negotiator`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyGroup {
    Security,
    Identity,
    Operational,
}

/// The "Scope" line of a §13 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// SW: one value for the whole session.
    Session,
    /// CO: negotiated per connection.
    Connection,
}

/// The "Senders" line of a §13 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Senders {
    Initiator,
    Target,
    Both,
}

/// Result function of a Boolean key (§6.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolFn {
    And,
    Or,
}

/// Result function of a numerical key (§6.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumFn {
    Minimum,
    Maximum,
}

/// Value type of a key and, for the negotiated ones, where the result goes. `ours` reads
/// what this target offers from [`TargetLimits`]; `set` stores the result in [`SessionParams`].
#[derive(Clone, Copy)]
pub enum KeyType {
    /// Boolean `Yes`/`No` with a result function (§6.2.2).
    Bool {
        func: BoolFn,
        default: bool,
        ours: fn(&TargetLimits) -> bool,
        set: fn(&mut SessionParams, bool),
    },
    /// Numerical value in `min..=max` with a result function (§6.2.2).
    Number {
        func: NumFn,
        default: u32,
        min: u32,
        max: u32,
        ours: fn(&TargetLimits) -> u32,
        set: fn(&mut SessionParams, u32),
    },
    /// List of values; the result is the first of the proposer's values the acceptor
    /// supports (§6.2.1).
    List {
        default: &'static str,
        ours: fn(&TargetLimits) -> Vec<&'static str>,
        set: fn(&mut SessionParams, &str),
    },
    /// Declarative number in `min..=max`: each side states its own value and nothing is
    /// answered (§6.2, §13.12). `set` stores the initiator's declaration.
    DeclaredNumber {
        default: u32,
        min: u32,
        max: u32,
        set: fn(&mut SessionParams, u32),
    },
    /// Text, name, address or binary values the login state machine or SendTargets handle;
    /// operational negotiation has nothing to compute for them.
    Text { default: Option<&'static str> },
    /// Obsolete in RFC 7143 (§13.25): never negotiated.
    Obsolete,
}

impl std::fmt::Debug for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyType::Bool { func, default, .. } => write!(f, "Bool({func:?}, default {default})"),
            KeyType::Number {
                func,
                default,
                min,
                max,
                ..
            } => write!(f, "Number({func:?}, {min}..={max}, default {default})"),
            KeyType::List { default, .. } => write!(f, "List(default {default})"),
            KeyType::DeclaredNumber {
                default, min, max, ..
            } => write!(f, "Declared({min}..={max}, default {default})"),
            KeyType::Text { default } => write!(f, "Text(default {default:?})"),
            KeyType::Obsolete => f.write_str("Obsolete"),
        }
    }
}

/// One login/text key: everything §12/§13 say about it, declared once (the layout follows
/// LIO's `iscsi_target_parameters.c`).
#[derive(Debug, Clone, Copy)]
pub struct KeyDef {
    pub name: &'static str,
    pub group: KeyGroup,
    pub usage: Usage,
    pub scope: Scope,
    pub senders: Senders,
    pub kind: KeyType,
    /// "Irrelevant when: SessionType=Discovery".
    pub irrelevant_in_discovery: bool,
    /// Where the rule comes from, e.g. "RFC 7143 §13.10".
    pub section: &'static str,
}

fn digest_names(list: &[Digest]) -> Vec<&'static str> {
    list.iter().map(|d| d.as_str()).collect()
}

/// Shorthand for the table: a key with no value the negotiator computes.
const fn text_key(
    name: &'static str,
    group: KeyGroup,
    usage: Usage,
    senders: Senders,
    default: Option<&'static str>,
    section: &'static str,
) -> KeyDef {
    KeyDef {
        name,
        group,
        usage,
        scope: Scope::Session,
        senders,
        kind: KeyType::Text { default },
        irrelevant_in_discovery: false,
        section,
    }
}

/// Shorthand for the table: a leading-only, session-wide key both sides negotiate.
const fn lo_key(
    name: &'static str,
    kind: KeyType,
    irrelevant_in_discovery: bool,
    section: &'static str,
) -> KeyDef {
    KeyDef {
        name,
        group: KeyGroup::Operational,
        usage: Usage::LeadingOnly,
        scope: Scope::Session,
        senders: Senders::Both,
        kind,
        irrelevant_in_discovery,
        section,
    }
}

/// Every key this target knows (§12.1, §13, and the obsolete marker keys); anything else is
/// answered NotUnderstood. Defaults are the RFC defaults, the same values as
/// [`SessionParams::default`] (a unit test holds the two together).
pub static KEYS: &[KeyDef] = &[
    KeyDef {
        name: "HeaderDigest",
        group: KeyGroup::Operational,
        usage: Usage::LoginOnly,
        scope: Scope::Connection,
        senders: Senders::Both,
        kind: KeyType::List {
            default: "None",
            ours: |l| digest_names(&l.header_digest),
            set: |p, v| {
                if let Some(d) = Digest::parse(v) {
                    p.header_digest = d
                }
            },
        },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.1",
    },
    KeyDef {
        name: "DataDigest",
        group: KeyGroup::Operational,
        usage: Usage::LoginOnly,
        scope: Scope::Connection,
        senders: Senders::Both,
        kind: KeyType::List {
            default: "None",
            ours: |l| digest_names(&l.data_digest),
            set: |p, v| {
                if let Some(d) = Digest::parse(v) {
                    p.data_digest = d
                }
            },
        },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.1",
    },
    lo_key(
        "MaxConnections",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 1,
            min: 1,
            max: 65535,
            ours: |l| l.max_connections,
            set: |p, v| p.max_connections = v,
        },
        true,
        "RFC 7143 §13.2",
    ),
    KeyDef {
        name: "SendTargets",
        group: KeyGroup::Operational,
        usage: Usage::FfpOnly,
        scope: Scope::Session,
        senders: Senders::Initiator,
        kind: KeyType::Text { default: None },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.3",
    },
    // IO by the initiator, FFPO by the target (in SendTargets answers).
    text_key(
        "TargetName",
        KeyGroup::Identity,
        Usage::LoginOnly,
        Senders::Both,
        None,
        "RFC 7143 §13.4",
    ),
    text_key(
        "InitiatorName",
        KeyGroup::Identity,
        Usage::LoginOnly,
        Senders::Initiator,
        None,
        "RFC 7143 §13.5",
    ),
    text_key(
        "TargetAlias",
        KeyGroup::Operational,
        Usage::All,
        Senders::Target,
        None,
        "RFC 7143 §13.6",
    ),
    text_key(
        "InitiatorAlias",
        KeyGroup::Identity,
        Usage::All,
        Senders::Initiator,
        None,
        "RFC 7143 §13.7",
    ),
    text_key(
        "TargetAddress",
        KeyGroup::Operational,
        Usage::All,
        Senders::Target,
        None,
        "RFC 7143 §13.8",
    ),
    text_key(
        "TargetPortalGroupTag",
        KeyGroup::Operational,
        Usage::LoginOnly,
        Senders::Target,
        None,
        "RFC 7143 §13.9",
    ),
    lo_key(
        "InitialR2T",
        KeyType::Bool {
            func: BoolFn::Or,
            default: true,
            ours: |l| l.initial_r2t,
            set: |p, v| p.initial_r2t = v,
        },
        true,
        "RFC 7143 §13.10",
    ),
    lo_key(
        "ImmediateData",
        KeyType::Bool {
            func: BoolFn::And,
            default: true,
            ours: |l| l.immediate_data,
            set: |p, v| p.immediate_data = v,
        },
        true,
        "RFC 7143 §13.11",
    ),
    KeyDef {
        name: "MaxRecvDataSegmentLength",
        group: KeyGroup::Operational,
        usage: Usage::All,
        scope: Scope::Connection,
        senders: Senders::Both,
        // Declarative per direction: the initiator's value bounds what we send it; ours is
        // declared by `Negotiator::declarations` (§13.12).
        kind: KeyType::DeclaredNumber {
            default: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            min: MIN_SEGMENT,
            max: MAX_SEGMENT,
            set: |p, v| p.max_xmit_data_segment_length = v,
        },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.12",
    },
    lo_key(
        "MaxBurstLength",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 262_144,
            min: MIN_SEGMENT,
            max: MAX_SEGMENT,
            ours: |l| l.max_burst_length,
            set: |p, v| p.max_burst_length = v,
        },
        true,
        "RFC 7143 §13.13",
    ),
    lo_key(
        "FirstBurstLength",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 65_536,
            min: MIN_SEGMENT,
            max: MAX_SEGMENT,
            ours: |l| l.first_burst_length,
            set: |p, v| p.first_burst_length = v,
        },
        true,
        "RFC 7143 §13.14",
    ),
    lo_key(
        "DefaultTime2Wait",
        KeyType::Number {
            func: NumFn::Maximum,
            default: 2,
            min: 0,
            max: 3600,
            ours: |l| l.default_time2wait,
            set: |p, v| p.default_time2wait = v,
        },
        false,
        "RFC 7143 §13.15",
    ),
    lo_key(
        "DefaultTime2Retain",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 20,
            min: 0,
            max: 3600,
            ours: |l| l.default_time2retain,
            set: |p, v| p.default_time2retain = v,
        },
        false,
        "RFC 7143 §13.16",
    ),
    lo_key(
        "MaxOutstandingR2T",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 1,
            min: 1,
            max: 65535,
            ours: |l| l.max_outstanding_r2t,
            set: |p, v| p.max_outstanding_r2t = v,
        },
        true,
        "RFC 7143 §13.17",
    ),
    // We only deliver in order, so our side of the OR is always Yes.
    lo_key(
        "DataPDUInOrder",
        KeyType::Bool {
            func: BoolFn::Or,
            default: true,
            ours: |_| true,
            set: |p, v| p.data_pdu_in_order = v,
        },
        true,
        "RFC 7143 §13.18",
    ),
    lo_key(
        "DataSequenceInOrder",
        KeyType::Bool {
            func: BoolFn::Or,
            default: true,
            ours: |_| true,
            set: |p, v| p.data_sequence_in_order = v,
        },
        true,
        "RFC 7143 §13.19",
    ),
    // We implement ErrorRecoveryLevel 0 only.
    lo_key(
        "ErrorRecoveryLevel",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 0,
            min: 0,
            max: 2,
            ours: |_| 0,
            set: |p, v| p.error_recovery_level = v as u8,
        },
        false,
        "RFC 7143 §13.20",
    ),
    KeyDef {
        name: "SessionType",
        group: KeyGroup::Identity,
        usage: Usage::LeadingOnly,
        scope: Scope::Session,
        senders: Senders::Initiator,
        kind: KeyType::Text {
            default: Some("Normal"),
        },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.21",
    },
    // Only the RFC 3720 semantics are implemented.
    lo_key(
        "TaskReporting",
        KeyType::List {
            default: "RFC3720",
            ours: |_| vec!["RFC3720"],
            set: |_, _| {},
        },
        true,
        "RFC 7143 §13.23",
    ),
    // The default recorded is what `SessionParams` holds while the key is not exchanged.
    lo_key(
        "iSCSIProtocolLevel",
        KeyType::Number {
            func: NumFn::Minimum,
            default: 0,
            min: 0,
            max: 31,
            ours: |_| PROTOCOL_LEVEL as u32,
            set: |p, v| p.protocol_level = v as u8,
        },
        false,
        "RFC 7143 §13.24",
    ),
    // Markers are obsolete: "No" is the only answer to the Boolean ones (AND with our No),
    // the interval keys are rejected.
    KeyDef {
        name: "IFMarker",
        group: KeyGroup::Operational,
        usage: Usage::LoginOnly,
        scope: Scope::Connection,
        senders: Senders::Both,
        kind: KeyType::Bool {
            func: BoolFn::And,
            default: false,
            ours: |_| false,
            set: |_, _| {},
        },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.25",
    },
    KeyDef {
        name: "OFMarker",
        group: KeyGroup::Operational,
        usage: Usage::LoginOnly,
        scope: Scope::Connection,
        senders: Senders::Both,
        kind: KeyType::Bool {
            func: BoolFn::And,
            default: false,
            ours: |_| false,
            set: |_, _| {},
        },
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.25",
    },
    KeyDef {
        name: "IFMarkInt",
        group: KeyGroup::Operational,
        usage: Usage::LoginOnly,
        scope: Scope::Connection,
        senders: Senders::Both,
        kind: KeyType::Obsolete,
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.25",
    },
    KeyDef {
        name: "OFMarkInt",
        group: KeyGroup::Operational,
        usage: Usage::LoginOnly,
        scope: Scope::Connection,
        senders: Senders::Both,
        kind: KeyType::Obsolete,
        irrelevant_in_discovery: false,
        section: "RFC 7143 §13.25",
    },
    text_key(
        "AuthMethod",
        KeyGroup::Security,
        Usage::LoginOnly,
        Senders::Both,
        Some("None"),
        "RFC 7143 §12.1",
    ),
    text_key(
        "CHAP_A",
        KeyGroup::Security,
        Usage::LoginOnly,
        Senders::Both,
        None,
        "RFC 7143 §12.1.3",
    ),
    // CHAP_I and CHAP_C come from the initiator too when it wants mutual CHAP.
    text_key(
        "CHAP_I",
        KeyGroup::Security,
        Usage::LoginOnly,
        Senders::Both,
        None,
        "RFC 7143 §12.1.3",
    ),
    text_key(
        "CHAP_C",
        KeyGroup::Security,
        Usage::LoginOnly,
        Senders::Both,
        None,
        "RFC 7143 §12.1.3",
    ),
    text_key(
        "CHAP_N",
        KeyGroup::Security,
        Usage::LoginOnly,
        Senders::Both,
        None,
        "RFC 7143 §12.1.3",
    ),
    text_key(
        "CHAP_R",
        KeyGroup::Security,
        Usage::LoginOnly,
        Senders::Both,
        None,
        "RFC 7143 §12.1.3",
    ),
];

/// The table entry of `name` (keys are case-sensitive, §6.1). `X-` private and `X#` public
/// extension keys (§13.22) are never in the table, so they are answered NotUnderstood.
pub fn key_def(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.name == name)
}

/// The group `name` belongs to, or `None` for an unknown key.
pub fn key_group(name: &str) -> Option<KeyGroup> {
    key_def(name).map(|k| k.group)
}

/// An offer we made as originator and still expect an answer to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Offer {
    /// Numeric, result function minimum: the answer must be a number in 512..=offered.
    MinLength(u32),
    /// List: the answer must be one of these.
    Digests(Vec<Digest>),
}

/// The target side of login-time operational negotiation (§6.2, §13).
///
/// Feed every operational key=value pair of a login text to [`Negotiator::respond`]; add
/// [`Negotiator::declarations`] to each Operational-stage response; [`Negotiator::finish`]
/// yields the parameters once the initiator may enter Full Feature Phase.
#[derive(Debug, Clone)]
pub struct Negotiator {
    limits: TargetLimits,
    session_type: SessionType,
    leading: bool,
    params: SessionParams,
    /// Keys already negotiated or declared by the initiator.
    seen: HashSet<String>,
    mrdsl_declared: bool,
    /// Offers we made that need an answer.
    offers: HashMap<&'static str, Offer>,
    /// Offers whose answer is optional (ImmediateData=No, §6.2.2).
    optional_answers: HashSet<&'static str>,
    /// Offers were outstanding before the last text was processed.
    offers_sent: bool,
}

impl Negotiator {
    /// `base` is the starting point: [`SessionParams::default`] for a new session, the
    /// session's parameters for a non-leading connection (whose session-wide keys are fixed).
    pub fn new(
        limits: TargetLimits,
        session_type: SessionType,
        leading: bool,
        base: SessionParams,
    ) -> Negotiator {
        let mut params = base;
        // Connection-only parameters always start from the defaults (§13.1, §13.12).
        params.header_digest = Digest::None;
        params.data_digest = Digest::None;
        params.max_recv_data_segment_length = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH;
        params.max_xmit_data_segment_length = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH;
        Negotiator {
            limits,
            session_type,
            leading,
            params,
            seen: HashSet::new(),
            mrdsl_declared: false,
            offers: HashMap::new(),
            optional_answers: HashSet::new(),
            offers_sent: false,
        }
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Offers of ours still waiting for the initiator's answer.
    pub fn has_pending_offers(&self) -> bool {
        !self.offers.is_empty()
    }

    /// Answers the initiator's operational keys of one complete text, in the order received.
    /// Unknown keys (including `X-` / `X#` extension keys) get `NotUnderstood`, bad values
    /// `Reject`, keys that do not apply `Irrelevant` (§6.2).
    pub fn respond(
        &mut self,
        pairs: &[KeyValue],
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        let had_offers = self.offers_sent && !self.offers.is_empty();
        let mut slots: Vec<Option<(String, String)>> = vec![None; pairs.len()];
        // FirstBurstLength depends on MaxBurstLength, InitialR2T and ImmediateData: do it last.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|i| pairs[*i].key == "FirstBurstLength");
        for i in order {
            let kv = &pairs[i];
            if let Some(value) = self.respond_one(kv)? {
                slots[i] = Some((kv.key.clone(), value));
            }
        }
        if had_offers && !self.offers.is_empty() {
            let mut keys: Vec<&str> = self.offers.keys().copied().collect();
            keys.sort_unstable();
            return Err(NegotiationError::Unanswered(keys.join(",")));
        }
        Ok(slots.into_iter().flatten().collect())
    }

    fn respond_one(&mut self, kv: &KeyValue) -> Result<Option<String>, NegotiationError> {
        let key = kv.key.as_str();
        let value = kv.value.as_str();

        // An answer to one of our offers.
        if let Some(offer) = self.offers.remove(key) {
            self.answer(key, offer, value)?;
            self.seen.insert(key.to_string());
            return Ok(None);
        }
        if self.optional_answers.remove(key) {
            // ImmediateData=No was final whatever the answer (AND, §6.2.2).
            return Ok(None);
        }

        if self.seen.contains(key) {
            // Some initiators echo "key=Irrelevant" back in later PDUs; that is harmless.
            if is_reserved_value(value) {
                return Ok(None);
            }
            return Err(NegotiationError::Renegotiated(key.to_string()));
        }
        self.seen.insert(key.to_string());

        if is_reserved_value(value) {
            // Reject/Irrelevant/NotUnderstood are never valid proposals (§6.2); we have made no
            // offer for this key, so there is nothing to answer.
            tracing::debug!(key, value, "ignoring reserved constant sent as a proposal");
            return Ok(None);
        }
        let Some(def) = key_def(key) else {
            return Ok(Some("NotUnderstood".into()));
        };
        if def.usage == Usage::LeadingOnly && def.group == KeyGroup::Operational && !self.leading {
            // Session-wide keys are fixed by the leading connection (§13 "LO").
            return Ok(Some("Irrelevant".into()));
        }
        if self.session_type == SessionType::Discovery && def.irrelevant_in_discovery {
            return Ok(Some("Irrelevant".into()));
        }

        let l = &self.limits;
        let p = &mut self.params;
        let reject = || Ok(Some("Reject".to_string()));
        // Rules of single keys that the table cannot express.
        if key == "FirstBurstLength" && p.initial_r2t && !p.immediate_data {
            // Irrelevant when InitialR2T=Yes and ImmediateData=No (§13.14).
            return Ok(Some("Irrelevant".into()));
        }
        if def.group != KeyGroup::Operational {
            // Identity and security keys are the login state machine's; should one reach us,
            // it does not belong to operational negotiation.
            return Ok(Some("Irrelevant".into()));
        }
        if def.senders == Senders::Target {
            // Only a target may send these (§13.6, §13.8, §13.9).
            return reject();
        }
        if def.usage == Usage::FfpOnly {
            // Not a login key (SendTargets, §13.3).
            return Ok(Some("Irrelevant".into()));
        }
        Ok(Some(match def.kind {
            KeyType::List { ours, set, .. } => {
                // The first of the initiator's values we support (§6.2.1).
                let ours = ours(l);
                match value.split(',').find(|v| ours.contains(v)) {
                    Some(v) => {
                        set(p, v);
                        v.to_string()
                    }
                    None => return reject(),
                }
            }
            KeyType::DeclaredNumber { min, max, set, .. } => {
                // A declaration is not answered; a bad one fails the login (§6.2, §13.12).
                match parse_numeric(value).filter(|v| (min as u64..=max as u64).contains(v)) {
                    Some(v) => set(p, v as u32),
                    None => {
                        return Err(NegotiationError::BadDeclaration(
                            value.chars().take(64).collect(),
                        ))
                    }
                }
                return Ok(None);
            }
            KeyType::Bool {
                func, ours, set, ..
            } => match parse_bool(value) {
                Some(v) => {
                    let result = match func {
                        BoolFn::And => v && ours(l),
                        BoolFn::Or => v || ours(l),
                    };
                    set(p, result);
                    yes_no(result)
                }
                None => return reject(),
            },
            KeyType::Number {
                func,
                min,
                max,
                ours,
                set,
                ..
            } => match parse_numeric(value).filter(|v| (min as u64..=max as u64).contains(v)) {
                Some(v) => {
                    let mut result = match func {
                        NumFn::Minimum => v.min(ours(l) as u64),
                        NumFn::Maximum => v.max(ours(l) as u64),
                    } as u32;
                    if key == "FirstBurstLength" {
                        // Never above MaxBurstLength (§13.14).
                        result = result.min(p.max_burst_length);
                    }
                    set(p, result);
                    if key == "MaxBurstLength" {
                        p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                    }
                    result.to_string()
                }
                None => return reject(),
            },
            KeyType::Obsolete => return reject(),
            KeyType::Text { .. } => "Irrelevant".to_string(),
        }))
    }

    fn answer(&mut self, key: &str, offer: Offer, value: &str) -> Result<(), NegotiationError> {
        let bad = || NegotiationError::BadAnswer {
            key: key.to_string(),
            value: value.chars().take(64).collect(),
        };
        if is_reserved_value(value) {
            // The key keeps its default (§6.2); `finish` checks it is still acceptable.
            tracing::warn!(key, value, "initiator declined our offer");
            return Ok(());
        }
        match offer {
            Offer::MinLength(ours) => {
                let v = parse_numeric(value)
                    .filter(|v| (MIN_SEGMENT as u64..=ours as u64).contains(v))
                    .ok_or_else(bad)? as u32;
                match key_def(key).map(|k| k.kind) {
                    Some(KeyType::Number { set, .. }) => set(&mut self.params, v),
                    _ => return Err(bad()),
                }
            }
            Offer::Digests(list) => {
                let d = Digest::parse(value)
                    .filter(|d| list.contains(d))
                    .ok_or_else(bad)?;
                match key_def(key).map(|k| k.kind) {
                    Some(KeyType::List { set, .. }) => set(&mut self.params, d.as_str()),
                    _ => return Err(bad()),
                }
            }
        }
        Ok(())
    }

    /// Keys we send on our own in an Operational-stage response: our MaxRecvDataSegmentLength
    /// once (§13.12), and, when the initiator wants to leave the stage (`transit`), offers for
    /// keys it left at a default we cannot live with. Offers make the response non-final.
    pub fn declarations(&mut self, transit: bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.mrdsl_declared {
            self.mrdsl_declared = true;
            self.params.max_recv_data_segment_length = self.limits.max_recv_data_segment_length;
            out.push((
                "MaxRecvDataSegmentLength".to_string(),
                self.limits.max_recv_data_segment_length.to_string(),
            ));
        }
        if !transit {
            return out;
        }
        for (key, allowed) in [
            ("HeaderDigest", self.limits.header_digest.clone()),
            ("DataDigest", self.limits.data_digest.clone()),
        ] {
            if !self.seen.contains(key)
                && !allowed.contains(&Digest::None)
                && !self.offers.contains_key(key)
            {
                let list: Vec<&str> = allowed.iter().map(|d| d.as_str()).collect();
                out.push((key.to_string(), list.join(",")));
                self.offers.insert(key, Offer::Digests(allowed));
            }
        }
        if self.leading && self.session_type == SessionType::Normal {
            if !self.seen.contains("MaxBurstLength")
                && self.limits.max_burst_length < self.params.max_burst_length
                && !self.offers.contains_key("MaxBurstLength")
            {
                let v = self.limits.max_burst_length;
                out.push(("MaxBurstLength".into(), v.to_string()));
                self.offers.insert("MaxBurstLength", Offer::MinLength(v));
            }
            let fbl_relevant = !self.params.initial_r2t || self.params.immediate_data;
            let fbl_limit = self
                .limits
                .first_burst_length
                .min(self.limits.max_burst_length);
            if fbl_relevant
                && !self.seen.contains("FirstBurstLength")
                && fbl_limit < self.params.first_burst_length
                && !self.offers.contains_key("FirstBurstLength")
            {
                out.push(("FirstBurstLength".into(), fbl_limit.to_string()));
                self.offers
                    .insert("FirstBurstLength", Offer::MinLength(fbl_limit));
            }
            if !self.seen.contains("ImmediateData")
                && !self.limits.immediate_data
                && self.params.immediate_data
            {
                // AND with No: final without an answer (§6.2.2).
                self.params.immediate_data = false;
                self.seen.insert("ImmediateData".into());
                self.optional_answers.insert("ImmediateData");
                out.push(("ImmediateData".into(), "No".into()));
            }
        }
        if !self.offers.is_empty() {
            self.offers_sent = true;
        }
        out
    }

    /// The negotiated parameters, checked against what this target requires.
    pub fn finish(self) -> Result<SessionParams, NegotiationError> {
        if let Some(key) = self.offers.keys().next() {
            return Err(NegotiationError::Unanswered(key.to_string()));
        }
        let mut p = self.params;
        if !self.limits.header_digest.contains(&p.header_digest) {
            return Err(NegotiationError::Unacceptable {
                key: "HeaderDigest",
                value: p.header_digest.as_str().into(),
            });
        }
        if !self.limits.data_digest.contains(&p.data_digest) {
            return Err(NegotiationError::Unacceptable {
                key: "DataDigest",
                value: p.data_digest.as_str().into(),
            });
        }
        // Both sides must honour FirstBurstLength <= MaxBurstLength (§13.14).
        p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: v.into(),
        }
    }

    fn get<'a>(r: &'a [(String, String)], k: &str) -> Option<&'a str> {
        r.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    fn normal() -> Negotiator {
        Negotiator::new(
            TargetLimits::default(),
            SessionType::Normal,
            true,
            SessionParams::default(),
        )
    }

    #[test]
    fn parses_pairs_and_tolerates_missing_final_nul() {
        let r = parse_text(b"A=1\0B=x,y\0\0C=").unwrap();
        assert_eq!(r, vec![kv("A", "1"), kv("B", "x,y"), kv("C", "")]);
        assert_eq!(parse_text(b"").unwrap(), vec![]);
        // '=' inside the value belongs to the value.
        assert_eq!(parse_text(b"K=a=b\0").unwrap(), vec![kv("K", "a=b")]);
    }

    #[test]
    fn rejects_malformed_text() {
        assert!(matches!(
            parse_text(b"NoEquals\0"),
            Err(TextError::MissingEquals(0))
        ));
        assert!(matches!(parse_text(b"=v\0"), Err(TextError::EmptyKey(0))));
        assert!(matches!(
            parse_text(b"A=1\0A=1\0"),
            Err(TextError::DuplicateKey(_))
        ));
        assert!(matches!(
            parse_text(b"Bad Key=1\0"),
            Err(TextError::BadKeyChar(_))
        ));
        let long_key = format!("{}=1\0", "K".repeat(64));
        assert!(matches!(
            parse_text(long_key.as_bytes()),
            Err(TextError::KeyTooLong(_))
        ));
        let long_val = format!("K={}\0", "v".repeat(256));
        assert!(matches!(
            parse_text(long_val.as_bytes()),
            Err(TextError::ValueTooLong { .. })
        ));
        assert!(matches!(
            parse_text(b"K=\xff\xfe\0"),
            Err(TextError::NotUtf8(_))
        ));
        assert!(matches!(
            parse_text(b"\xffK=1\0"),
            Err(TextError::BadKeyChar(_))
        ));
        let huge = vec![b'a'; 2 << 20];
        assert!(matches!(parse_text(&huge), Err(TextError::TooLarge(_))));
        let mut big_value = b"K=".to_vec();
        big_value.extend(std::iter::repeat_n(b'v', 60_000));
        assert!(matches!(
            parse_text(&big_value),
            Err(TextError::ValueTooLong { .. })
        ));
        // X# keys are legal names; a '#' elsewhere is not.
        assert!(parse_text(b"X#Foo=1\0").is_ok());
        assert!(parse_text(b"A#Foo=1\0").is_err());
    }

    #[test]
    fn parser_never_panics_on_random_bytes() {
        let mut seed = 0x9e37_79b9u32;
        for round in 0..5000 {
            let n = (seed as usize % 300) + round % 3;
            let mut buf = Vec::with_capacity(n);
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                // Bias towards the interesting bytes.
                let b = match seed % 7 {
                    0 => 0,
                    1 => b'=',
                    2 => b',',
                    _ => (seed >> 8) as u8,
                };
                buf.push(b);
            }
            let _ = parse_text(&buf);
            if let Ok(pairs) = parse_text(&buf) {
                let _ = normal().respond(&pairs);
                for p in &pairs {
                    let _ = parse_numeric(&p.value);
                    let _ = parse_binary(&p.value);
                }
            }
        }
    }

    #[test]
    fn numeric_encodings() {
        assert_eq!(parse_numeric("0"), Some(0));
        assert_eq!(parse_numeric("8192"), Some(8192));
        assert_eq!(parse_numeric("0x2000"), Some(8192));
        assert_eq!(parse_numeric("0X00000000000000002000"), Some(8192));
        assert_eq!(parse_numeric("0bIAA="), Some(8192));
        assert_eq!(parse_numeric("18446744073709551616"), None);
        assert_eq!(parse_numeric("0x1ffffffffffffffff"), None);
        for bad in ["", "-1", "+1", "1 ", "0x", "0b", "12a", "0xg", "0b!!!!"] {
            assert_eq!(parse_numeric(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(parse_binary("0x0102ff"), Some(vec![1, 2, 0xff]));
        assert_eq!(parse_binary("0X102FF"), Some(vec![1, 2, 0xff]));
        assert_eq!(parse_binary("0bAQL/"), Some(vec![1, 2, 0xff]));
        assert_eq!(parse_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(parse_binary("0bAQI"), Some(vec![1, 2]));
        assert_eq!(parse_binary("0102"), None);
        assert_eq!(parse_binary("0x"), None);
        assert_eq!(parse_binary("0xzz"), None);
        assert_eq!(parse_binary("0bA"), None);
        assert_eq!(parse_binary("0bAQ==="), None);
        let too_long = format!("0x{}", "00".repeat(MAX_BINARY_LEN + 1));
        assert_eq!(parse_binary(&too_long), None);
        assert_eq!(encode_hex(&[0xab, 1]), "0xab01");
    }

    #[test]
    fn operational_keys_from_libiscsi() {
        let mut n = normal();
        let pairs = parse_text(
            b"HeaderDigest=None,CRC32C\0DataDigest=None\0InitialR2T=Yes\0ImmediateData=Yes\0\
              MaxBurstLength=262144\0FirstBurstLength=262144\0DefaultTime2Wait=2\0\
              DefaultTime2Retain=0\0MaxOutstandingR2T=1\0ErrorRecoveryLevel=0\0IFMarker=No\0\
              OFMarker=No\0MaxConnections=1\0MaxRecvDataSegmentLength=262144\0\
              DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0",
        )
        .unwrap();
        let r = n.respond(&pairs).unwrap();
        assert_eq!(get(&r, "HeaderDigest"), Some("None"));
        assert_eq!(get(&r, "DataDigest"), Some("None"));
        assert_eq!(get(&r, "InitialR2T"), Some("Yes"));
        assert_eq!(get(&r, "ImmediateData"), Some("Yes"));
        assert_eq!(get(&r, "MaxBurstLength"), Some("262144"));
        assert_eq!(get(&r, "FirstBurstLength"), Some("262144"));
        assert_eq!(get(&r, "DefaultTime2Wait"), Some("2"));
        assert_eq!(get(&r, "DefaultTime2Retain"), Some("0"));
        assert_eq!(get(&r, "MaxOutstandingR2T"), Some("1"));
        assert_eq!(get(&r, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get(&r, "IFMarker"), Some("No"));
        assert_eq!(get(&r, "MaxConnections"), Some("1"));
        assert_eq!(
            get(&r, "MaxRecvDataSegmentLength"),
            None,
            "declarative, no answer"
        );
        assert_eq!(get(&r, "DataPDUInOrder"), Some("Yes"));
        // Responses keep the request order.
        assert_eq!(r[0].0, "HeaderDigest");
        let d = n.declarations(true);
        assert_eq!(
            d,
            vec![("MaxRecvDataSegmentLength".to_string(), "262144".to_string())]
        );
        let p = n.finish().unwrap();
        assert_eq!(p.max_xmit_data_segment_length, 262_144);
        assert_eq!(p.max_recv_data_segment_length, 262_144);
        assert!(p.initial_r2t && p.immediate_data);
        assert_eq!(p.first_burst_length, 262_144);
    }

    #[test]
    fn list_negotiation_picks_initiators_first_supported() {
        let mut n = normal();
        let r = n
            .respond(&[
                kv("HeaderDigest", "CRC32C,None"),
                kv("DataDigest", "Foo,CRC32C"),
            ])
            .unwrap();
        assert_eq!(get(&r, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(get(&r, "DataDigest"), Some("CRC32C"));
        let mut n = normal();
        let r = n.respond(&[kv("HeaderDigest", "MD5,SHA1")]).unwrap();
        assert_eq!(get(&r, "HeaderDigest"), Some("Reject"));
        // A target that insists on CRC32C refuses None.
        let limits = TargetLimits {
            header_digest: vec![Digest::Crc32c],
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, true, SessionParams::default());
        let r = n.respond(&[kv("HeaderDigest", "None")]).unwrap();
        assert_eq!(get(&r, "HeaderDigest"), Some("Reject"));
        assert!(matches!(
            n.finish(),
            Err(NegotiationError::Unacceptable { .. })
        ));
    }

    #[test]
    fn numeric_and_boolean_functions() {
        let mut n = normal();
        let r = n
            .respond(&[
                kv("MaxBurstLength", "16777215"),
                kv("FirstBurstLength", "16777215"),
                kv("DefaultTime2Wait", "0"),
                kv("DefaultTime2Retain", "3600"),
                kv("MaxOutstandingR2T", "16"),
                kv("InitialR2T", "No"),
                kv("ImmediateData", "No"),
                kv("MaxConnections", "8"),
                kv("ErrorRecoveryLevel", "2"),
                kv("DataPDUInOrder", "No"),
            ])
            .unwrap();
        assert_eq!(get(&r, "MaxBurstLength"), Some("1048576"));
        assert_eq!(get(&r, "FirstBurstLength"), Some("262144"));
        assert_eq!(get(&r, "DefaultTime2Wait"), Some("2"), "maximum");
        assert_eq!(get(&r, "DefaultTime2Retain"), Some("20"), "minimum");
        assert_eq!(get(&r, "MaxOutstandingR2T"), Some("1"));
        assert_eq!(get(&r, "InitialR2T"), Some("No"), "OR of No and No");
        assert_eq!(get(&r, "ImmediateData"), Some("No"), "AND");
        assert_eq!(get(&r, "MaxConnections"), Some("1"));
        assert_eq!(get(&r, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get(&r, "DataPDUInOrder"), Some("Yes"), "OR with our Yes");
    }

    #[test]
    fn first_burst_is_clamped_to_max_burst_and_can_be_irrelevant() {
        let mut n = normal();
        // FirstBurstLength listed first must still see the MaxBurstLength result.
        let r = n
            .respond(&[
                kv("FirstBurstLength", "262144"),
                kv("MaxBurstLength", "65536"),
            ])
            .unwrap();
        assert_eq!(get(&r, "MaxBurstLength"), Some("65536"));
        assert_eq!(get(&r, "FirstBurstLength"), Some("65536"));
        assert_eq!(r[0].0, "FirstBurstLength");

        let mut n = normal();
        let r = n
            .respond(&[
                kv("InitialR2T", "Yes"),
                kv("ImmediateData", "No"),
                kv("FirstBurstLength", "65536"),
            ])
            .unwrap();
        assert_eq!(get(&r, "FirstBurstLength"), Some("Irrelevant"));
    }

    #[test]
    fn out_of_range_and_garbage_values_are_rejected() {
        let mut n = normal();
        let r = n
            .respond(&[
                kv("MaxBurstLength", "511"),
                kv("FirstBurstLength", "16777216"),
                kv("DefaultTime2Wait", "3601"),
                kv("MaxOutstandingR2T", "0"),
                kv("ErrorRecoveryLevel", "3"),
                kv("InitialR2T", "yes"),
                kv("MaxConnections", "0x"),
                kv("IFMarkInt", "1~65535"),
                kv("TaskReporting", "FastAbort"),
            ])
            .unwrap();
        for (k, v) in &r {
            assert_eq!(v, "Reject", "{k}");
        }
        assert_eq!(r.len(), 9);
        // Bad values leave the defaults in place.
        let p = n.finish().unwrap();
        assert_eq!(p.max_burst_length, 262_144);
        assert!(p.initial_r2t);
    }

    #[test]
    fn unknown_extension_and_irrelevant_keys() {
        let mut n = normal();
        let r = n
            .respond(&[
                kv("X-com.example.Foo", "1"),
                kv("X#Bar", "1"),
                kv("Whatever", "1"),
                kv("SendTargets", "All"),
                kv("TaskReporting", "ResponseFence,RFC3720"),
                kv("iSCSIProtocolLevel", "2"),
            ])
            .unwrap();
        assert_eq!(get(&r, "X-com.example.Foo"), Some("NotUnderstood"));
        assert_eq!(get(&r, "X#Bar"), Some("NotUnderstood"));
        assert_eq!(get(&r, "Whatever"), Some("NotUnderstood"));
        assert_eq!(get(&r, "SendTargets"), Some("Irrelevant"));
        assert_eq!(get(&r, "TaskReporting"), Some("RFC3720"));
        assert_eq!(get(&r, "iSCSIProtocolLevel"), Some("1"));

        let mut d = Negotiator::new(
            TargetLimits::default(),
            SessionType::Discovery,
            true,
            SessionParams::default(),
        );
        let r = d
            .respond(&[
                kv("MaxBurstLength", "262144"),
                kv("InitialR2T", "Yes"),
                kv("HeaderDigest", "None"),
                kv("ErrorRecoveryLevel", "0"),
                kv("DefaultTime2Wait", "2"),
            ])
            .unwrap();
        assert_eq!(get(&r, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(get(&r, "InitialR2T"), Some("Irrelevant"));
        assert_eq!(get(&r, "HeaderDigest"), Some("None"));
        assert_eq!(get(&r, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get(&r, "DefaultTime2Wait"), Some("2"));
    }

    #[test]
    fn non_leading_connection_keeps_session_values() {
        let base = SessionParams {
            max_burst_length: 65536,
            ..SessionParams::default()
        };
        let mut n = Negotiator::new(TargetLimits::default(), SessionType::Normal, false, base);
        let r = n
            .respond(&[
                kv("MaxBurstLength", "262144"),
                kv("HeaderDigest", "CRC32C"),
                kv("MaxRecvDataSegmentLength", "65536"),
            ])
            .unwrap();
        assert_eq!(get(&r, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(get(&r, "HeaderDigest"), Some("CRC32C"));
        n.declarations(true);
        let p = n.finish().unwrap();
        assert_eq!(p.max_burst_length, 65536);
        assert_eq!(p.max_xmit_data_segment_length, 65536);
        assert_eq!(p.header_digest, Digest::Crc32c);
    }

    #[test]
    fn renegotiation_is_an_error_but_irrelevant_echo_is_not() {
        let mut n = normal();
        n.respond(&[kv("MaxBurstLength", "65536"), kv("MaxConnections", "1")])
            .unwrap();
        assert!(matches!(
            n.respond(&[kv("MaxBurstLength", "65536")]),
            Err(NegotiationError::Renegotiated(_))
        ));
        let mut d = Negotiator::new(
            TargetLimits::default(),
            SessionType::Discovery,
            true,
            SessionParams::default(),
        );
        d.respond(&[kv("MaxConnections", "1")]).unwrap();
        assert_eq!(
            d.respond(&[kv("MaxConnections", "Irrelevant")]).unwrap(),
            vec![]
        );
        // A reserved constant as a fresh proposal is ignored, not answered.
        assert_eq!(
            normal().respond(&[kv("MaxBurstLength", "Reject")]).unwrap(),
            vec![]
        );
    }

    #[test]
    fn bad_mrdsl_declaration_fails() {
        for v in ["511", "16777216", "x", ""] {
            assert!(matches!(
                normal().respond(&[kv("MaxRecvDataSegmentLength", v)]),
                Err(NegotiationError::BadDeclaration(_))
            ));
        }
    }

    #[test]
    fn target_offers_when_defaults_do_not_fit() {
        let limits = TargetLimits {
            max_burst_length: 131_072,
            first_burst_length: 32_768,
            immediate_data: false,
            header_digest: vec![Digest::Crc32c],
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, true, SessionParams::default());
        n.respond(&[kv("MaxRecvDataSegmentLength", "8192")])
            .unwrap();
        // Not transiting yet: only our declaration.
        assert_eq!(n.declarations(false).len(), 1);
        let d = n.declarations(true);
        assert_eq!(get(&d, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(get(&d, "MaxBurstLength"), Some("131072"));
        assert_eq!(get(&d, "FirstBurstLength"), Some("32768"));
        assert_eq!(get(&d, "ImmediateData"), Some("No"));
        assert!(n.has_pending_offers());
        // The initiator answers.
        let r = n
            .respond(&[
                kv("HeaderDigest", "CRC32C"),
                kv("MaxBurstLength", "65536"),
                kv("FirstBurstLength", "16384"),
                kv("ImmediateData", "No"),
            ])
            .unwrap();
        assert!(r.is_empty(), "answers are not answered: {r:?}");
        assert!(!n.has_pending_offers());
        let p = n.finish().unwrap();
        assert_eq!(p.header_digest, Digest::Crc32c);
        assert_eq!(p.max_burst_length, 65536);
        assert_eq!(p.first_burst_length, 16384);
        assert!(!p.immediate_data);
    }

    #[test]
    fn bad_or_missing_answers_to_offers_fail() {
        let limits = TargetLimits {
            max_burst_length: 131_072,
            first_burst_length: 32_768,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(
            limits.clone(),
            SessionType::Normal,
            true,
            SessionParams::default(),
        );
        n.declarations(true);
        assert!(matches!(
            n.respond(&[
                kv("MaxBurstLength", "262144"),
                kv("FirstBurstLength", "1024")
            ]),
            Err(NegotiationError::BadAnswer { .. })
        ));
        let mut n = Negotiator::new(limits, SessionType::Normal, true, SessionParams::default());
        n.declarations(true);
        assert!(matches!(
            n.respond(&[kv("DefaultTime2Wait", "2")]),
            Err(NegotiationError::Unanswered(_))
        ));
    }

    #[test]
    fn split_text_prefers_pair_boundaries() {
        let text = encode_text(&[("A", "1111"), ("B", "2222"), ("C", "3")]);
        let chunks = split_text(&text, 14);
        assert_eq!(
            chunks,
            vec![b"A=1111\0B=2222\0".to_vec(), b"C=3\0".to_vec()]
        );
        let chunks = split_text(&text, 4);
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| c.len() <= 4));
        assert_eq!(split_text(b"", 10), vec![Vec::<u8>::new()]);
    }

    /// The value a key proposes when it keeps its RFC default, as text.
    fn default_text(def: &KeyDef) -> Option<String> {
        match def.kind {
            KeyType::Bool { default, .. } => Some(yes_no(default)),
            KeyType::Number { default, .. } | KeyType::DeclaredNumber { default, .. } => {
                Some(default.to_string())
            }
            KeyType::List { default, .. } => Some(default.to_string()),
            KeyType::Text { .. } | KeyType::Obsolete => None,
        }
    }

    fn operational() -> impl Iterator<Item = &'static KeyDef> {
        KEYS.iter().filter(|k| k.group == KeyGroup::Operational)
    }

    #[test]
    fn key_table_is_consistent() {
        let mut names = HashSet::new();
        for k in KEYS {
            assert!(names.insert(k.name), "{} declared twice", k.name);
            assert!(k.section.starts_with("RFC 7143 §1"), "{}", k.name);
            if k.usage == Usage::LeadingOnly {
                assert_eq!(
                    k.scope,
                    Scope::Session,
                    "{}: LO keys are session-wide",
                    k.name
                );
            }
            if let KeyType::Number {
                default, min, max, ..
            }
            | KeyType::DeclaredNumber {
                default, min, max, ..
            } = k.kind
            {
                assert!((min..=max).contains(&default), "{}", k.name);
            }
        }
        // The lists login.rs used to spell out by hand.
        let group = |g| {
            let mut v: Vec<&str> = KEYS
                .iter()
                .filter(|k| k.group == g)
                .map(|k| k.name)
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            group(KeyGroup::Security),
            [
                "AuthMethod",
                "CHAP_A",
                "CHAP_C",
                "CHAP_I",
                "CHAP_N",
                "CHAP_R"
            ]
        );
        assert_eq!(
            group(KeyGroup::Identity),
            [
                "InitiatorAlias",
                "InitiatorName",
                "SessionType",
                "TargetName"
            ]
        );
        // Exactly the keys answered before the table existed; anything else is NotUnderstood.
        let mut known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        known.sort_unstable();
        let mut expected = vec![
            "HeaderDigest",
            "DataDigest",
            "MaxConnections",
            "SendTargets",
            "TargetName",
            "InitiatorName",
            "TargetAlias",
            "InitiatorAlias",
            "TargetAddress",
            "TargetPortalGroupTag",
            "InitialR2T",
            "ImmediateData",
            "MaxRecvDataSegmentLength",
            "MaxBurstLength",
            "FirstBurstLength",
            "DefaultTime2Wait",
            "DefaultTime2Retain",
            "MaxOutstandingR2T",
            "DataPDUInOrder",
            "DataSequenceInOrder",
            "ErrorRecoveryLevel",
            "SessionType",
            "TaskReporting",
            "iSCSIProtocolLevel",
            "IFMarker",
            "OFMarker",
            "IFMarkInt",
            "OFMarkInt",
            "AuthMethod",
            "CHAP_A",
            "CHAP_I",
            "CHAP_C",
            "CHAP_N",
            "CHAP_R",
        ];
        expected.sort_unstable();
        assert_eq!(known, expected);
        assert!(key_def("headerdigest").is_none(), "keys are case-sensitive");
        assert!(key_def("X-com.example.Foo").is_none() && key_def("X#Foo").is_none());
    }

    #[test]
    fn table_defaults_are_the_session_defaults() {
        // Storing a key's default changes nothing in the default parameters ...
        for k in KEYS {
            let mut p = SessionParams::default();
            match k.kind {
                KeyType::Bool { default, set, .. } => set(&mut p, default),
                KeyType::Number { default, set, .. } => set(&mut p, default),
                KeyType::DeclaredNumber { default, set, .. } => set(&mut p, default),
                KeyType::List { default, set, .. } => set(&mut p, default),
                KeyType::Text { .. } | KeyType::Obsolete => {}
            }
            assert_eq!(p, SessionParams::default(), "{}", k.name);
        }
        // ... and every setter but the markers' and TaskReporting's writes a field.
        for k in KEYS {
            let mut p = SessionParams::default();
            match k.kind {
                KeyType::Bool { default, set, .. } => set(&mut p, !default),
                KeyType::Number {
                    default,
                    min,
                    max,
                    set,
                    ..
                }
                | KeyType::DeclaredNumber {
                    default,
                    min,
                    max,
                    set,
                } => set(&mut p, if default == max { min } else { max }),
                KeyType::List { set, .. } => set(&mut p, "CRC32C"),
                KeyType::Text { .. } | KeyType::Obsolete => continue,
            }
            let writes = !matches!(k.name, "IFMarker" | "OFMarker" | "TaskReporting");
            assert_eq!(p != SessionParams::default(), writes, "{}", k.name);
        }
    }

    #[test]
    fn every_key_negotiates_its_default() {
        let pairs: Vec<KeyValue> = operational()
            .filter_map(|k| default_text(k).map(|v| kv(k.name, &v)))
            .collect();
        assert!(pairs.len() >= 18, "{pairs:?}");
        let mut n = normal();
        let r = n.respond(&pairs).unwrap();
        for pair in &pairs {
            let answer = get(&r, &pair.key);
            if pair.key == "MaxRecvDataSegmentLength" {
                assert_eq!(answer, None, "declarative");
            } else {
                assert_eq!(answer, Some(pair.value.as_str()), "{}", pair.key);
            }
        }
        assert_eq!(n.finish().unwrap(), SessionParams::default());
        // One key at a time too, so no key relies on another's result.
        for pair in &pairs {
            let r = normal().respond(std::slice::from_ref(pair)).unwrap();
            if pair.key != "MaxRecvDataSegmentLength" {
                assert_eq!(
                    get(&r, &pair.key),
                    Some(pair.value.as_str()),
                    "{}",
                    pair.key
                );
            }
        }
    }

    #[test]
    fn numeric_keys_take_their_range_and_reject_outside_it() {
        for k in operational() {
            let (min, max) = match k.kind {
                KeyType::Number { min, max, .. } | KeyType::DeclaredNumber { min, max, .. } => {
                    (min as u64, max as u64)
                }
                _ => continue,
            };
            let declared = matches!(k.kind, KeyType::DeclaredNumber { .. });
            let mut bad = vec![max + 1];
            if min > 0 {
                bad.push(min - 1);
            }
            for v in bad {
                let r = normal().respond(&[kv(k.name, &v.to_string())]);
                if declared {
                    assert!(
                        matches!(r, Err(NegotiationError::BadDeclaration(_))),
                        "{}={v}",
                        k.name
                    );
                } else {
                    assert_eq!(get(&r.unwrap(), k.name), Some("Reject"), "{}={v}", k.name);
                }
            }
            for v in [min, max] {
                let r = normal().respond(&[kv(k.name, &v.to_string())]).unwrap();
                assert_ne!(get(&r, k.name), Some("Reject"), "{}={v}", k.name);
            }
        }
    }

    #[test]
    fn boolean_keys_apply_their_result_function() {
        let strict = TargetLimits {
            initial_r2t: true,
            immediate_data: false,
            ..TargetLimits::default()
        };
        for limits in [TargetLimits::default(), strict] {
            for k in operational() {
                let KeyType::Bool { func, ours, .. } = k.kind else {
                    continue;
                };
                for v in [true, false] {
                    let expected = match func {
                        BoolFn::And => v && ours(&limits),
                        BoolFn::Or => v || ours(&limits),
                    };
                    let mut n = Negotiator::new(
                        limits.clone(),
                        SessionType::Normal,
                        true,
                        SessionParams::default(),
                    );
                    let r = n.respond(&[kv(k.name, &yes_no(v))]).unwrap();
                    assert_eq!(
                        get(&r, k.name),
                        Some(yes_no(expected).as_str()),
                        "{}",
                        k.name
                    );
                    let r = normal().respond(&[kv(k.name, "yes")]).unwrap();
                    assert_eq!(
                        get(&r, k.name),
                        Some("Reject"),
                        "{}: values are case-sensitive",
                        k.name
                    );
                }
            }
        }
        // The functions §13.10, §13.11 and §13.18–19 give.
        let func = |name| match key_def(name).unwrap().kind {
            KeyType::Bool { func, .. } => func,
            _ => unreachable!(),
        };
        assert_eq!(func("InitialR2T"), BoolFn::Or);
        assert_eq!(func("ImmediateData"), BoolFn::And);
        assert_eq!(func("DataPDUInOrder"), BoolFn::Or);
        assert_eq!(func("DataSequenceInOrder"), BoolFn::Or);
    }

    #[test]
    fn leading_only_keys_are_irrelevant_on_a_second_connection() {
        let mut lo = 0;
        for k in operational() {
            let Some(v) = default_text(k) else { continue };
            let mut n = Negotiator::new(
                TargetLimits::default(),
                SessionType::Normal,
                false,
                SessionParams::default(),
            );
            let r = n.respond(&[kv(k.name, &v)]).unwrap();
            if k.usage == Usage::LeadingOnly {
                lo += 1;
                assert_eq!(get(&r, k.name), Some("Irrelevant"), "{}", k.name);
            } else {
                assert_ne!(get(&r, k.name), Some("Irrelevant"), "{}", k.name);
            }
        }
        assert_eq!(lo, 13);
    }

    #[test]
    fn discovery_irrelevant_keys_follow_the_table() {
        for k in operational() {
            let Some(v) = default_text(k) else { continue };
            let mut d = Negotiator::new(
                TargetLimits::default(),
                SessionType::Discovery,
                true,
                SessionParams::default(),
            );
            let r = d.respond(&[kv(k.name, &v)]).unwrap();
            assert_eq!(
                get(&r, k.name) == Some("Irrelevant"),
                k.irrelevant_in_discovery,
                "{}",
                k.name
            );
        }
    }

    #[test]
    fn target_only_and_ffp_only_keys_in_a_login() {
        let mut checked = 0;
        for k in operational().filter(|k| k.senders == Senders::Target || k.usage == Usage::FfpOnly)
        {
            checked += 1;
            let r = normal().respond(&[kv(k.name, "x")]).unwrap();
            if k.senders == Senders::Target {
                assert_eq!(get(&r, k.name), Some("Reject"), "{}", k.name);
            }
            if k.usage == Usage::FfpOnly {
                assert_eq!(get(&r, k.name), Some("Irrelevant"), "{}", k.name);
            }
        }
        assert_eq!(
            checked, 4,
            "TargetAlias, TargetAddress, TargetPortalGroupTag, SendTargets"
        );
        // Identity and security keys reaching the negotiator are not its business.
        for k in KEYS.iter().filter(|k| k.group != KeyGroup::Operational) {
            let r = normal().respond(&[kv(k.name, "x")]).unwrap();
            assert_eq!(get(&r, k.name), Some("Irrelevant"), "{}", k.name);
        }
    }

    #[test]
    fn limits_validation() {
        assert!(TargetLimits::default().validate().is_ok());
        let bad = TargetLimits {
            first_burst_length: 2_000_000,
            ..TargetLimits::default()
        };
        assert!(bad.validate().is_err());
        let bad = TargetLimits {
            max_recv_data_segment_length: 100,
            ..TargetLimits::default()
        };
        assert!(bad.validate().is_err());
    }
}
