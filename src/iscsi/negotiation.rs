//! Text key=value format (RFC 7143 §6.1) and operational parameter negotiation (§6.2, §13).
//!
//! [`parse_text`] turns a (complete, reassembled) data segment into key=value pairs and never
//! panics: malformed input yields a [`TextError`]. [`Negotiator`] plays the target's part in
//! login-time negotiation of the §13 keys and produces [`SessionParams`].

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

/// Keys of §13 that only the leading connection may carry ("LO").
const LEADING_ONLY: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "TaskReporting",
    "iSCSIProtocolLevel",
];

/// Keys that are Irrelevant in a Discovery session (§13, "Irrelevant when: SessionType=Discovery").
const IRRELEVANT_IN_DISCOVERY: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "TaskReporting",
];

/// Keys we know from §12/§13 (and the obsolete marker keys); anything else is NotUnderstood.
pub const KNOWN_KEYS: &[&str] = &[
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
        if !KNOWN_KEYS.contains(&key) {
            return Ok(Some("NotUnderstood".into()));
        }
        if LEADING_ONLY.contains(&key) && !self.leading {
            return Ok(Some("Irrelevant".into()));
        }
        if self.session_type == SessionType::Discovery && IRRELEVANT_IN_DISCOVERY.contains(&key) {
            return Ok(Some("Irrelevant".into()));
        }

        let l = &self.limits;
        let p = &mut self.params;
        let reject = || Ok(Some("Reject".to_string()));
        let num = |min: u64, max: u64| parse_numeric(value).filter(|v| (min..=max).contains(v));
        Ok(Some(match key {
            "HeaderDigest" | "DataDigest" => {
                let allowed = if key == "HeaderDigest" {
                    &l.header_digest
                } else {
                    &l.data_digest
                };
                // List negotiation: the first of the initiator's values we support (§6.2.1).
                match value
                    .split(',')
                    .filter_map(Digest::parse)
                    .find(|d| allowed.contains(d))
                {
                    Some(d) => {
                        if key == "HeaderDigest" {
                            p.header_digest = d
                        } else {
                            p.data_digest = d
                        }
                        d.as_str().to_string()
                    }
                    None => return reject(),
                }
            }
            "MaxRecvDataSegmentLength" => {
                // Declarative: how much we may send the initiator (§13.12). Ours is declared
                // separately by `declarations`.
                match num(MIN_SEGMENT as u64, MAX_SEGMENT as u64) {
                    Some(v) => p.max_xmit_data_segment_length = v as u32,
                    None => {
                        return Err(NegotiationError::BadDeclaration(
                            value.chars().take(64).collect(),
                        ))
                    }
                }
                return Ok(None);
            }
            "MaxConnections" => match num(1, 65535) {
                Some(v) => {
                    p.max_connections = v.min(l.max_connections as u64) as u32;
                    p.max_connections.to_string()
                }
                None => return reject(),
            },
            "InitialR2T" => match parse_bool(value) {
                // Result function OR (§13.10).
                Some(v) => {
                    p.initial_r2t = v || l.initial_r2t;
                    yes_no(p.initial_r2t)
                }
                None => return reject(),
            },
            "ImmediateData" => match parse_bool(value) {
                // Result function AND (§13.11).
                Some(v) => {
                    p.immediate_data = v && l.immediate_data;
                    yes_no(p.immediate_data)
                }
                None => return reject(),
            },
            "MaxBurstLength" => match num(MIN_SEGMENT as u64, MAX_SEGMENT as u64) {
                Some(v) => {
                    p.max_burst_length = v.min(l.max_burst_length as u64) as u32;
                    p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                    p.max_burst_length.to_string()
                }
                None => return reject(),
            },
            "FirstBurstLength" => {
                // Irrelevant when InitialR2T=Yes and ImmediateData=No (§13.14).
                if p.initial_r2t && !p.immediate_data {
                    "Irrelevant".to_string()
                } else {
                    match num(MIN_SEGMENT as u64, MAX_SEGMENT as u64) {
                        // Minimum, and never above MaxBurstLength (§13.14).
                        Some(v) => {
                            p.first_burst_length = v
                                .min(l.first_burst_length as u64)
                                .min(p.max_burst_length as u64)
                                as u32;
                            p.first_burst_length.to_string()
                        }
                        None => return reject(),
                    }
                }
            }
            "DefaultTime2Wait" => match num(0, 3600) {
                // Result function maximum (§13.15).
                Some(v) => {
                    p.default_time2wait = v.max(l.default_time2wait as u64) as u32;
                    p.default_time2wait.to_string()
                }
                None => return reject(),
            },
            "DefaultTime2Retain" => match num(0, 3600) {
                Some(v) => {
                    p.default_time2retain = v.min(l.default_time2retain as u64) as u32;
                    p.default_time2retain.to_string()
                }
                None => return reject(),
            },
            "MaxOutstandingR2T" => match num(1, 65535) {
                Some(v) => {
                    p.max_outstanding_r2t = v.min(l.max_outstanding_r2t as u64) as u32;
                    p.max_outstanding_r2t.to_string()
                }
                None => return reject(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
                // Result function OR (§13.18, §13.19); we only do in-order, so always Yes.
                Some(_) => {
                    if key == "DataPDUInOrder" {
                        p.data_pdu_in_order = true
                    } else {
                        p.data_sequence_in_order = true
                    }
                    yes_no(true)
                }
                None => return reject(),
            },
            "ErrorRecoveryLevel" => match num(0, 2) {
                // Minimum; we implement level 0 only (§13.20).
                Some(_) => {
                    p.error_recovery_level = 0;
                    "0".to_string()
                }
                None => return reject(),
            },
            "TaskReporting" => {
                // List; only the RFC3720 semantics are implemented (§13.23).
                if value.split(',').any(|v| v == "RFC3720") {
                    "RFC3720".to_string()
                } else {
                    return reject();
                }
            }
            "iSCSIProtocolLevel" => match num(0, 31) {
                Some(v) => {
                    p.protocol_level = v.min(PROTOCOL_LEVEL) as u8;
                    p.protocol_level.to_string()
                }
                None => return reject(),
            },
            // Markers are obsolete in RFC 7143 (§13, obsoleted keys): "No" is allowed for the boolean ones, the
            // interval keys must be rejected.
            "IFMarker" | "OFMarker" => match parse_bool(value) {
                Some(_) => yes_no(false),
                None => return reject(),
            },
            "IFMarkInt" | "OFMarkInt" => return reject(),
            // Full Feature Phase only (§13.3).
            "SendTargets" => "Irrelevant".to_string(),
            // Keys only a target sends (§13.6, §13.8, §13.9).
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => return reject(),
            // Identity and security keys are the login state machine's; should one reach us,
            // it does not belong to operational negotiation.
            _ => "Irrelevant".to_string(),
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
                match key {
                    "MaxBurstLength" => self.params.max_burst_length = v,
                    "FirstBurstLength" => self.params.first_burst_length = v,
                    _ => return Err(bad()),
                }
            }
            Offer::Digests(list) => {
                let d = Digest::parse(value)
                    .filter(|d| list.contains(d))
                    .ok_or_else(bad)?;
                match key {
                    "HeaderDigest" => self.params.header_digest = d,
                    "DataDigest" => self.params.data_digest = d,
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
