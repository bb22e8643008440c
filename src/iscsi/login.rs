//! Login phase, target side (RFC 7143 §6.3, §11.12, §11.13), as a sans-IO state machine.
//!
//! [`LoginNegotiation::handle`] consumes one Login Request PDU and returns the Login Response
//! to send ([`LoginStep`]). It covers the stages (SecurityNegotiation → LoginOperational-
//! Negotiation → FullFeaturePhase, §6.3), the T and C bits (multi-PDU text in both
//! directions), version checks, ISID/TSIH/CID handling, InitiatorName / TargetName /
//! SessionType, the initiator ACL, AuthMethod and CHAP (§12.1), and operational negotiation
//! ([`Negotiator`]). Sequence numbers: each response consumes one StatSN starting at the value
//! given to [`LoginNegotiation::new`] (§11.13.4); ExpCmdSN is the request's CmdSN (login does
//! not advance CmdSN, §11.12.8 — login requests are immediate) and MaxCmdSN is
//! `ExpCmdSN + cmd_window - 1`.

use std::sync::Arc;

use bytes::Bytes;
use rand::RngCore;

use super::chap::{ChapAlgorithm, ChapCredentials, ChapExchange};
use super::negotiation::{
    encode_text, key_group, parse_text, split_text, KeyGroup, KeyValue, NegotiationError,
    Negotiator, SessionParams, SessionType, TargetLimits, DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
    MAX_NEGOTIATION_TEXT,
};
use super::pdu::{LoginRequest, LoginResponseBuilder, Opcode, Pdu};

/// The only iSCSI version there is (§11.12.4).
pub const ISCSI_VERSION: u8 = 0x00;
const FLAG_TRANSIT: u8 = 0x80;
const FLAG_CONTINUE: u8 = 0x40;
/// Largest login response data segment we send: the MaxRecvDataSegmentLength default, the
/// only value in force during login (§13.12).
const LOGIN_SEGMENT: usize = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH as usize;
/// A login that takes more request PDUs than this is not going anywhere.
const MAX_LOGIN_PDUS: u32 = 64;
/// Longest iSCSI name (§4.2.7, RFC 3722).
const MAX_NAME_LEN: usize = 223;

/// Login stages as coded in CSG/NSG (§11.12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    SecurityNegotiation = 0,
    LoginOperationalNegotiation = 1,
    FullFeaturePhase = 3,
}

impl Stage {
    fn from_bits(b: u8) -> Option<Stage> {
        match b {
            0 => Some(Stage::SecurityNegotiation),
            1 => Some(Stage::LoginOperationalNegotiation),
            3 => Some(Stage::FullFeaturePhase),
            _ => None,
        }
    }
}

/// Status-Class / Status-Detail of a Login Response (§11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStatus {
    Success = 0x0000,
    TargetMovedTemporarily = 0x0101,
    TargetMovedPermanently = 0x0102,
    InitiatorError = 0x0200,
    AuthenticationFailure = 0x0201,
    AuthorizationFailure = 0x0202,
    NotFound = 0x0203,
    TargetRemoved = 0x0204,
    UnsupportedVersion = 0x0205,
    TooManyConnections = 0x0206,
    MissingParameter = 0x0207,
    CantIncludeInSession = 0x0208,
    SessionTypeNotSupported = 0x0209,
    SessionDoesNotExist = 0x020a,
    InvalidDuringLogin = 0x020b,
    TargetError = 0x0300,
    ServiceUnavailable = 0x0301,
    OutOfResources = 0x0302,
}

impl LoginStatus {
    pub fn class(self) -> u8 {
        ((self as u16) >> 8) as u8
    }
    pub fn detail(self) -> u8 {
        (self as u16) as u8
    }
}

/// Who may log in to a target and how they authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetAuth {
    /// iSCSI name (compared case-insensitively, names being lowercase-normalised, §4.2.7).
    pub name: String,
    pub alias: Option<String>,
    /// InitiatorNames allowed to log in and to see the target in SendTargets; empty = all.
    pub allowed_initiators: Vec<String>,
    /// CHAP credentials the initiator must prove; `None` = no authentication (AuthMethod=None).
    pub chap: Option<ChapCredentials>,
    /// Credentials we answer with when the initiator asks for mutual CHAP.
    pub mutual_chap: Option<ChapCredentials>,
    /// This target's portals for SendTargets; empty = the portal group's.
    pub portals: Vec<std::net::SocketAddr>,
    /// This target's portal group tag; `None` = [`LoginConfig::portal_group_tag`].
    pub portal_group_tag: Option<u16>,
}

impl TargetAuth {
    pub fn new(name: impl Into<String>) -> TargetAuth {
        TargetAuth {
            name: name.into(),
            alias: None,
            allowed_initiators: Vec::new(),
            chap: None,
            mutual_chap: None,
            portals: Vec::new(),
            portal_group_tag: None,
        }
    }

    /// Whether `initiator` passes this target's ACL.
    pub fn allows(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty()
            || self
                .allowed_initiators
                .iter()
                .any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

/// Everything a login needs to know about this target portal group.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// TargetPortalGroupTag returned to Normal-session initiators (§13.9).
    pub portal_group_tag: u16,
    pub targets: Vec<TargetAuth>,
    /// CHAP required for Discovery sessions, if any.
    pub discovery_chap: Option<ChapCredentials>,
    pub discovery_mutual_chap: Option<ChapCredentials>,
    pub limits: TargetLimits,
    /// CHAP algorithms we accept (empty = all of MD5, SHA-1, SHA-256, SHA3-256).
    pub chap_algorithms: Vec<ChapAlgorithm>,
    /// Command window granted in login responses: MaxCmdSN = ExpCmdSN + cmd_window - 1.
    pub cmd_window: u32,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            portal_group_tag: 1,
            targets: Vec::new(),
            discovery_chap: None,
            discovery_mutual_chap: None,
            limits: TargetLimits::default(),
            chap_algorithms: ChapAlgorithm::ALL.to_vec(),
            cmd_window: 128,
        }
    }
}

impl LoginConfig {
    /// The configured target called `name` (case-insensitive).
    pub fn target(&self, name: &str) -> Option<&TargetAuth> {
        self.targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// A login with a non-zero TSIH names an existing session (§6.3.1).
#[derive(Debug, Clone, Copy)]
pub struct SessionQuery<'a> {
    pub tsih: u16,
    pub isid: [u8; 6],
    pub initiator_name: &'a str,
    pub target_name: &'a str,
    pub cid: u16,
}

/// The caller's answer about an existing session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExistingSession {
    /// No session with this TSIH for this initiator, ISID and target: status 0x020a.
    NotFound,
    /// The session exists and `cid` is one of its connections: connection reinstatement
    /// (§6.3.4; targets SHOULD allow it at ErrorRecoveryLevel < 2). When the login completes
    /// the caller must drop the old connection with that CID and terminate its tasks.
    /// `params` are the session's negotiated parameters.
    Reinstate { params: SessionParams },
    /// The session exists but cannot take another connection (MaxConnections): 0x0206.
    TooManyConnections,
}

/// The session registry, as the login needs it.
pub trait SessionDirectory {
    /// A fresh non-zero TSIH for a new session of `initiator_name` / `isid` (`None`: out of
    /// resources, 0x0302: no TSIH left, or the session limits are reached). Called once,
    /// when the final response is built.
    fn allocate_tsih(&mut self, initiator_name: &str, isid: [u8; 6]) -> Option<u16>;
    /// Looks up the session a login with non-zero TSIH wants to join.
    fn find_session(&mut self, query: &SessionQuery<'_>) -> ExistingSession;
}

/// The outcome of a successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// The configured target name (`None` for a Discovery session).
    pub target_name: Option<String>,
    pub isid: [u8; 6],
    /// The TSIH sent in the final response: freshly allocated for a new session.
    pub tsih: u16,
    pub cid: u16,
    pub params: SessionParams,
    /// CmdSN the initiator will use for its first command (the login CmdSN).
    pub exp_cmd_sn: u32,
    /// MaxCmdSN granted in the final response.
    pub max_cmd_sn: u32,
    /// Next StatSN to send on this connection.
    pub stat_sn: u32,
    /// ExpStatSN of the last login request.
    pub exp_stat_sn: u32,
    /// `true` for a new session (TSIH was 0). The caller handles session reinstatement
    /// (§6.3.5): an existing session with the same InitiatorName, ISID and target must be
    /// closed. `false` for connection reinstatement ([`ExistingSession::Reinstate`]).
    pub leading: bool,
    /// The CHAP name the initiator authenticated with, if CHAP was used.
    pub chap_user: Option<String>,
}

/// What to do after a Login Request.
#[derive(Debug)]
pub enum LoginStep {
    /// Send the response and wait for the next Login Request.
    Continue(Pdu),
    /// Send the final response; the connection is in Full Feature Phase.
    Complete {
        response: Pdu,
        result: Box<LoginResult>,
    },
    /// Send the failure response, then close the connection (§11.13.5).
    Fail {
        response: Pdu,
        status: LoginStatus,
        reason: String,
    },
}

/// A failed login: status for the initiator, reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("login failed ({status:?}): {reason}")]
pub struct LoginFailure {
    pub status: LoginStatus,
    pub reason: String,
}

fn fail(status: LoginStatus, reason: impl Into<String>) -> LoginFailure {
    LoginFailure {
        status,
        reason: reason.into(),
    }
}

impl From<NegotiationError> for LoginFailure {
    fn from(e: NegotiationError) -> Self {
        fail(LoginStatus::InitiatorError, e.to_string())
    }
}

/// The Login Request fields we use (§11.12).
#[derive(Debug, Clone, Copy)]
struct Header {
    transit: bool,
    cont: bool,
    csg: u8,
    nsg: u8,
    version_max: u8,
    version_min: u8,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cid: u16,
    cmd_sn: u32,
    exp_stat_sn: u32,
}

impl Header {
    fn parse(p: &Pdu) -> Header {
        let r = LoginRequest(p);
        Header {
            transit: r.transit(),
            cont: r.continue_bit(),
            csg: r.csg(),
            nsg: r.nsg(),
            version_max: r.version_max(),
            version_min: r.version_min(),
            isid: r.isid(),
            tsih: r.tsih(),
            itt: r.itt(),
            cid: r.cid(),
            cmd_sn: r.cmd_sn(),
            exp_stat_sn: r.exp_stat_sn(),
        }
    }
}

#[derive(Debug)]
enum Auth {
    /// No AuthMethod agreed yet.
    Pending,
    /// CHAP chosen, exchange under way.
    Chap(Box<ChapExchange>),
    /// Authenticated (or no authentication required).
    Passed { chap_user: Option<String> },
}

#[derive(Debug, Clone)]
struct Identity {
    session_type: SessionType,
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
}

/// A response split with the C bit; the rest goes out on the initiator's empty requests.
#[derive(Debug)]
struct Outgoing {
    chunks: std::collections::VecDeque<Vec<u8>>,
    final_flags: u8,
    final_tsih: u16,
    stage_after: Stage,
    result: Option<Box<LoginResult>>,
}

/// Target side of one connection's login phase.
pub struct LoginNegotiation {
    config: Arc<LoginConfig>,
    rng: Box<dyn RngCore + Send>,
    stat_sn: u32,
    pdus: u32,
    ended: bool,
    /// ISID, TSIH, CID of the first request; all later requests must repeat them.
    first: Option<([u8; 6], u16, u16)>,
    stage: Stage,
    incoming: Vec<u8>,
    outgoing: Option<Outgoing>,
    identity: Option<Identity>,
    auth_required: bool,
    chap: Option<ChapExchange>,
    auth: Auth,
    negotiator: Option<Negotiator>,
    leading: bool,
}

impl std::fmt::Debug for LoginNegotiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginNegotiation")
            .field("stage", &self.stage)
            .field("stat_sn", &self.stat_sn)
            .field("identity", &self.identity)
            .field("ended", &self.ended)
            .finish()
    }
}

/// Security-stage keys (§12): AuthMethod and the CHAP keys, per the key table.
fn is_security_key(key: &str) -> bool {
    key_group(key) == Some(KeyGroup::Security)
}

/// The keys naming the session (§6.3.1): InitiatorName, InitiatorAlias, TargetName, SessionType.
fn is_identity_key(key: &str) -> bool {
    key_group(key) == Some(KeyGroup::Identity)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control)
}

impl LoginNegotiation {
    /// `initial_stat_sn` is the StatSN of the first Login Response (random or 0).
    pub fn new(config: Arc<LoginConfig>, initial_stat_sn: u32) -> LoginNegotiation {
        Self::with_rng(config, initial_stat_sn, Box::new(rand::rngs::OsRng))
    }

    /// As [`LoginNegotiation::new`] with the random source for CHAP challenges supplied.
    pub fn with_rng(
        config: Arc<LoginConfig>,
        initial_stat_sn: u32,
        rng: Box<dyn RngCore + Send>,
    ) -> LoginNegotiation {
        LoginNegotiation {
            config,
            rng,
            stat_sn: initial_stat_sn,
            pdus: 0,
            ended: false,
            first: None,
            stage: Stage::SecurityNegotiation,
            incoming: Vec::new(),
            outgoing: None,
            identity: None,
            auth_required: false,
            chap: None,
            auth: Auth::Pending,
            negotiator: None,
            leading: true,
        }
    }

    /// The StatSN the next response will carry.
    pub fn next_stat_sn(&self) -> u32 {
        self.stat_sn
    }

    /// The current login stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The InitiatorName of this login, once the first complete request named it.
    pub fn initiator_name(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.initiator_name.as_str())
    }

    /// Whether the CHAP challenge has been issued (it went out in the last response when this
    /// turns true): the initiator's answer to it is the guess an authentication throttle
    /// must space out.
    pub fn chap_challenged(&self) -> bool {
        match &self.auth {
            Auth::Chap(x) => !x.awaiting_algorithm(),
            Auth::Passed { chap_user } => chap_user.is_some(),
            Auth::Pending => false,
        }
    }

    /// Whether the initiator proved the CHAP secret.
    pub fn chap_passed(&self) -> bool {
        matches!(&self.auth, Auth::Passed { chap_user: Some(_) })
    }

    /// Ends the login with `status` without looking at `pdu` (the request it answers): for
    /// the caller's own refusals, such as an authentication throttle's.
    pub fn refuse(
        &mut self,
        pdu: &Pdu,
        status: LoginStatus,
        reason: impl Into<String>,
    ) -> LoginStep {
        self.ended = true;
        self.failure(&Header::parse(pdu), fail(status, reason))
    }

    /// Consumes one PDU received during the login phase. Anything but a Login Request fails
    /// the login with "invalid during login" (0x020b). After `Complete` or `Fail` every
    /// further call fails.
    pub fn handle(&mut self, pdu: &Pdu, sessions: &mut dyn SessionDirectory) -> LoginStep {
        let h = Header::parse(pdu);
        if self.ended {
            return self.failure(&h, fail(LoginStatus::InitiatorError, "login already ended"));
        }
        match self.step(pdu, &h, sessions) {
            Ok(step) => step,
            Err(f) => {
                self.ended = true;
                let who = self
                    .identity
                    .as_ref()
                    .map(|i| i.initiator_name.as_str())
                    .unwrap_or("<unknown initiator>");
                if f.status == LoginStatus::AuthenticationFailure {
                    // The caller logs these once per burst (the authentication throttle): a
                    // guesser must not write a line per attempt.
                    tracing::debug!(initiator = who, "login rejected: {}", f.reason);
                } else {
                    tracing::warn!(
                        initiator = who,
                        status = format_args!("{:#06x}", f.status as u16),
                        "login rejected: {}",
                        f.reason
                    );
                }
                self.failure(&h, f)
            }
        }
    }

    fn failure(&mut self, h: &Header, f: LoginFailure) -> LoginStep {
        let (isid, tsih) = match self.first {
            Some((isid, tsih, _)) => (isid, tsih),
            None => (h.isid, h.tsih),
        };
        let h = Header { isid, tsih, ..*h };
        let response = self.response(&h, 0, h.tsih, f.status, Vec::new());
        LoginStep::Fail {
            response,
            status: f.status,
            reason: f.reason,
        }
    }

    /// Builds a Login Response (§11.13) and consumes a StatSN.
    fn response(
        &mut self,
        h: &Header,
        flags: u8,
        tsih: u16,
        status: LoginStatus,
        data: Vec<u8>,
    ) -> Pdu {
        let p = LoginResponseBuilder::new(flags, h.itt)
            .versions(ISCSI_VERSION, ISCSI_VERSION)
            .isid(h.isid)
            .tsih(tsih)
            .stat_sn(self.stat_sn)
            // Login requests are immediate: ExpCmdSN stays the login's CmdSN.
            .exp_cmd_sn(h.cmd_sn)
            .max_cmd_sn(self.max_cmd_sn(h.cmd_sn))
            .status(status.class(), status.detail())
            .data(Bytes::from(data))
            .build();
        self.stat_sn = self.stat_sn.wrapping_add(1);
        p
    }

    fn max_cmd_sn(&self, exp_cmd_sn: u32) -> u32 {
        exp_cmd_sn.wrapping_add(self.config.cmd_window.max(1) - 1)
    }

    fn step(
        &mut self,
        pdu: &Pdu,
        h: &Header,
        sessions: &mut dyn SessionDirectory,
    ) -> Result<LoginStep, LoginFailure> {
        use LoginStatus::*;
        if pdu.opcode() != Some(Opcode::LoginRequest) {
            return Err(fail(
                InvalidDuringLogin,
                format!("opcode {:#04x} received during login", pdu.raw_opcode()),
            ));
        }
        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return Err(fail(InitiatorError, "too many login requests"));
        }
        match self.first {
            None => {
                // Our only version (0x00) must lie in [Version-min, Version-max] (§11.12.4).
                if h.version_min > ISCSI_VERSION {
                    return Err(fail(
                        UnsupportedVersion,
                        format!(
                            "version range {:#04x}..={:#04x} excludes 0x00",
                            h.version_min, h.version_max
                        ),
                    ));
                }
                self.stage = match Stage::from_bits(h.csg) {
                    Some(s @ (Stage::SecurityNegotiation | Stage::LoginOperationalNegotiation)) => {
                        s
                    }
                    _ => {
                        return Err(fail(
                            InitiatorError,
                            format!("login starts in stage {}", h.csg),
                        ))
                    }
                };
                self.first = Some((h.isid, h.tsih, h.cid));
            }
            Some(first) => {
                if first != (h.isid, h.tsih, h.cid) {
                    return Err(fail(
                        InitiatorError,
                        "ISID, TSIH or CID changed during login",
                    ));
                }
            }
        }
        if h.transit && h.cont {
            return Err(fail(InitiatorError, "T and C bits both set (§11.12.2)"));
        }
        if h.csg != self.stage as u8 {
            return Err(fail(
                InitiatorError,
                format!("CSG {} while in stage {:?}", h.csg, self.stage),
            ));
        }
        let next = if h.transit {
            match Stage::from_bits(h.nsg) {
                Some(n) if n as u8 > h.csg => Some(n),
                _ => {
                    return Err(fail(
                        InitiatorError,
                        format!("invalid stage transition {} -> {}", h.csg, h.nsg),
                    ))
                }
            }
        } else {
            None
        };

        // Our own response is being continued (C bit): the initiator sends empty requests.
        if self.outgoing.is_some() {
            if !pdu.data.is_empty() || h.cont {
                return Err(fail(
                    InitiatorError,
                    "text sent while the target's response was continued",
                ));
            }
            return Ok(self.emit_next_chunk(h));
        }

        if self.incoming.len() + pdu.data.len() > MAX_NEGOTIATION_TEXT {
            return Err(fail(InitiatorError, "login text too large"));
        }
        self.incoming.extend_from_slice(&pdu.data);
        if h.cont {
            // Acknowledge and ask for the rest of the text (§11.12.2 / §11.13.7).
            let flags = (self.stage as u8) << 2;
            return Ok(LoginStep::Continue(self.response(
                h,
                flags,
                h.tsih,
                Success,
                Vec::new(),
            )));
        }
        let text = std::mem::take(&mut self.incoming);
        let pairs = parse_text(&text)
            .map_err(|e| fail(InitiatorError, format!("malformed login text: {e}")))?;

        let mut reply: Vec<(String, String)> = Vec::new();
        let rest = if self.identity.is_none() {
            self.identify(h, &pairs, sessions, &mut reply)?
        } else {
            self.check_identity(&pairs)?
        };
        let (sec, op): (Vec<KeyValue>, Vec<KeyValue>) =
            rest.into_iter().partition(|kv| is_security_key(&kv.key));

        let transit_ok = match self.stage {
            Stage::SecurityNegotiation => {
                self.security(&sec, &mut reply)?;
                let negotiator = self
                    .negotiator
                    .as_mut()
                    .ok_or_else(|| fail(TargetError, "no negotiator"))?;
                reply.extend(negotiator.respond(&op)?);
                if next.is_some() && matches!(self.auth, Auth::Pending) {
                    if self.auth_required {
                        return Err(fail(
                            AuthenticationFailure,
                            "CHAP is required but the initiator left security negotiation without AuthMethod",
                        ));
                    }
                    // No AuthMethod offered and none required: nothing to authenticate.
                    self.auth = Auth::Passed { chap_user: None };
                }
                next.is_some() && matches!(self.auth, Auth::Passed { .. })
            }
            Stage::LoginOperationalNegotiation => {
                if !matches!(self.auth, Auth::Passed { .. }) {
                    if self.auth_required {
                        return Err(fail(
                            AuthenticationFailure,
                            "CHAP is required but the initiator skipped security negotiation",
                        ));
                    }
                    self.auth = Auth::Passed { chap_user: None };
                }
                if let Some(kv) = sec.first() {
                    return Err(fail(
                        InitiatorError,
                        format!("security key {} in operational negotiation", kv.key),
                    ));
                }
                let negotiator = self
                    .negotiator
                    .as_mut()
                    .ok_or_else(|| fail(TargetError, "no negotiator"))?;
                reply.extend(negotiator.respond(&op)?);
                reply.extend(negotiator.declarations(next.is_some()));
                next.is_some() && !negotiator.has_pending_offers()
            }
            Stage::FullFeaturePhase => {
                return Err(fail(InitiatorError, "login request in full feature phase"))
            }
        };

        let mut flags = (self.stage as u8) << 2;
        let mut tsih = h.tsih;
        let mut stage_after = self.stage;
        let mut result = None;
        if let (true, Some(next)) = (transit_ok, next) {
            flags |= FLAG_TRANSIT | next as u8;
            stage_after = next;
            if next == Stage::FullFeaturePhase {
                let r = self.complete(h, sessions)?;
                tsih = r.tsih;
                result = Some(r);
            }
        }
        let data = encode_text(&reply);
        Ok(self.send(h, flags, tsih, data, stage_after, result))
    }

    /// Processes the identity keys of the first complete text and sets up authentication and
    /// negotiation. Returns the remaining pairs.
    fn identify(
        &mut self,
        h: &Header,
        pairs: &[KeyValue],
        sessions: &mut dyn SessionDirectory,
        reply: &mut Vec<(String, String)>,
    ) -> Result<Vec<KeyValue>, LoginFailure> {
        use LoginStatus::*;
        let find = |k: &str| {
            pairs
                .iter()
                .find(|kv| kv.key == k)
                .map(|kv| kv.value.clone())
        };
        // InitiatorName is required in the first login request (§13.5).
        let initiator_name =
            find("InitiatorName").ok_or_else(|| fail(MissingParameter, "no InitiatorName"))?;
        if !valid_name(&initiator_name) {
            return Err(fail(InitiatorError, "invalid InitiatorName"));
        }
        let initiator_alias = find("InitiatorAlias");
        let session_type = match find("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => {
                return Err(fail(
                    SessionTypeNotSupported,
                    format!(
                        "SessionType {:?}",
                        other.chars().take(32).collect::<String>()
                    ),
                ))
            }
        };
        let config = self.config.clone();
        let (target, creds, mutual) = match session_type {
            SessionType::Normal => {
                // TargetName is required for Normal sessions (§13.4).
                let name =
                    find("TargetName").ok_or_else(|| fail(MissingParameter, "no TargetName"))?;
                let target = config.target(&name).ok_or_else(|| {
                    fail(
                        NotFound,
                        format!(
                            "unknown target {:?}",
                            name.chars().take(MAX_NAME_LEN).collect::<String>()
                        ),
                    )
                })?;
                if !target.allows(&initiator_name) {
                    return Err(fail(
                        AuthorizationFailure,
                        format!(
                            "initiator {initiator_name} is not in the allowed_initiators of target {}",
                            target.name
                        ),
                    ));
                }
                (
                    Some(target),
                    target.chap.clone(),
                    target.mutual_chap.clone(),
                )
            }
            SessionType::Discovery => (
                None,
                config.discovery_chap.clone(),
                config.discovery_mutual_chap.clone(),
            ),
        };

        let mut base = SessionParams::default();
        self.leading = h.tsih == 0;
        if h.tsih != 0 {
            let Some(target) = target else {
                return Err(fail(
                    SessionDoesNotExist,
                    "non-zero TSIH on a Discovery session",
                ));
            };
            let query = SessionQuery {
                tsih: h.tsih,
                isid: h.isid,
                initiator_name: &initiator_name,
                target_name: &target.name,
                cid: h.cid,
            };
            match sessions.find_session(&query) {
                ExistingSession::NotFound => {
                    return Err(fail(
                        SessionDoesNotExist,
                        format!("no session with TSIH {:#06x}", h.tsih),
                    ))
                }
                ExistingSession::TooManyConnections => {
                    return Err(fail(
                        TooManyConnections,
                        format!("session TSIH {:#06x} takes no more connections", h.tsih),
                    ))
                }
                ExistingSession::Reinstate { params } => base = params,
            }
        }

        self.auth_required = creds.is_some();
        self.chap = creds.map(|c| ChapExchange::new(c, mutual, &config.chap_algorithms));
        self.negotiator = Some(Negotiator::new(
            config.limits.clone(),
            session_type,
            self.leading,
            base,
        ));
        if let Some(target) = target {
            // Declared in the first response of a Normal session (§13.9, §13.6).
            reply.push((
                "TargetPortalGroupTag".into(),
                target
                    .portal_group_tag
                    .unwrap_or(config.portal_group_tag)
                    .to_string(),
            ));
            if let Some(alias) = &target.alias {
                reply.push(("TargetAlias".into(), alias.clone()));
            }
        }
        tracing::debug!(
            initiator = %initiator_name,
            ?session_type,
            target = target.map(|t| t.name.as_str()).unwrap_or("-"),
            tsih = h.tsih,
            cid = h.cid,
            "login started"
        );
        self.identity = Some(Identity {
            session_type,
            initiator_name,
            initiator_alias,
            target_name: target.map(|t| t.name.clone()),
        });
        Ok(pairs
            .iter()
            .filter(|kv| !is_identity_key(&kv.key))
            .cloned()
            .collect())
    }

    /// Later texts may repeat the identity keys (libiscsi does, entering the operational
    /// stage) but must not change them (§6.2: no renegotiation).
    fn check_identity(&mut self, pairs: &[KeyValue]) -> Result<Vec<KeyValue>, LoginFailure> {
        let id = self
            .identity
            .as_mut()
            .ok_or_else(|| fail(LoginStatus::TargetError, "no identity"))?;
        let mut rest = Vec::new();
        for kv in pairs {
            let same = match kv.key.as_str() {
                "InitiatorName" => kv.value == id.initiator_name,
                "SessionType" => {
                    let current = match id.session_type {
                        SessionType::Normal => "Normal",
                        SessionType::Discovery => "Discovery",
                    };
                    kv.value == current
                }
                "TargetName" => match &id.target_name {
                    Some(t) => kv.value.eq_ignore_ascii_case(t),
                    None => true, // ignored in Discovery sessions
                },
                "InitiatorAlias" => {
                    id.initiator_alias = Some(kv.value.clone());
                    true
                }
                _ => {
                    rest.push(kv.clone());
                    true
                }
            };
            if !same {
                return Err(fail(
                    LoginStatus::InitiatorError,
                    format!("{} changed during login", kv.key),
                ));
            }
        }
        Ok(rest)
    }

    /// AuthMethod and CHAP keys of the security stage (§12.1).
    fn security(
        &mut self,
        sec: &[KeyValue],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), LoginFailure> {
        use LoginStatus::*;
        let get = |k: &str| {
            sec.iter()
                .find(|kv| kv.key == k)
                .map(|kv| kv.value.as_str())
        };
        let auth_fail = |e: super::chap::ChapError| fail(AuthenticationFailure, e.to_string());

        if let Some(methods) = get("AuthMethod") {
            if !matches!(self.auth, Auth::Pending) {
                return Err(fail(InitiatorError, "AuthMethod negotiated twice"));
            }
            let offered: Vec<&str> = methods.split(',').collect();
            if self.auth_required {
                if !offered.contains(&"CHAP") {
                    // §11.13.5: an initiator that will not authenticate as required.
                    return Err(fail(
                        AuthenticationFailure,
                        format!("target requires CHAP, initiator offered {methods:?}"),
                    ));
                }
                let chap = self
                    .chap
                    .take()
                    .ok_or_else(|| fail(TargetError, "CHAP credentials vanished"))?;
                self.auth = Auth::Chap(Box::new(chap));
                reply.push(("AuthMethod".into(), "CHAP".into()));
            } else {
                if !offered.contains(&"None") {
                    return Err(fail(
                        AuthenticationFailure,
                        format!("no authentication configured, initiator offered only {methods:?}"),
                    ));
                }
                self.auth = Auth::Passed { chap_user: None };
                reply.push(("AuthMethod".into(), "None".into()));
            }
        }

        if let Some(algs) = get("CHAP_A") {
            match &mut self.auth {
                Auth::Chap(x) if x.awaiting_algorithm() => {
                    reply.extend(x.on_algorithms(algs, &mut *self.rng).map_err(auth_fail)?);
                }
                _ => {
                    return Err(fail(
                        AuthenticationFailure,
                        "CHAP_A outside a CHAP exchange",
                    ))
                }
            }
        }

        let n = get("CHAP_N");
        let r = get("CHAP_R");
        let i = get("CHAP_I");
        let c = get("CHAP_C");
        if n.is_some() || r.is_some() || i.is_some() || c.is_some() {
            match &mut self.auth {
                Auth::Chap(x) => {
                    let answer = x.on_response(n, r, i, c).map_err(auth_fail)?;
                    let mutual = !answer.is_empty();
                    reply.extend(answer);
                    let user = n.map(str::to_string);
                    tracing::info!(
                        user = user.as_deref().unwrap_or(""),
                        mutual,
                        "CHAP authentication succeeded"
                    );
                    self.auth = Auth::Passed { chap_user: user };
                }
                _ => {
                    return Err(fail(
                        AuthenticationFailure,
                        "CHAP response outside a CHAP exchange",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Builds the login result for the final response (allocating the TSIH of a new session).
    fn complete(
        &mut self,
        h: &Header,
        sessions: &mut dyn SessionDirectory,
    ) -> Result<Box<LoginResult>, LoginFailure> {
        use LoginStatus::*;
        let negotiator = self
            .negotiator
            .take()
            .ok_or_else(|| fail(TargetError, "no negotiator"))?;
        let params = negotiator.finish()?;
        let id = self
            .identity
            .clone()
            .ok_or_else(|| fail(TargetError, "no identity"))?;
        let tsih = if self.leading {
            match sessions.allocate_tsih(&id.initiator_name, h.isid) {
                Some(t) if t != 0 => t,
                _ => {
                    return Err(fail(
                        OutOfResources,
                        "no session available (session limits reached or no TSIH left)",
                    ))
                }
            }
        } else {
            h.tsih
        };
        let chap_user = match &self.auth {
            Auth::Passed { chap_user } => chap_user.clone(),
            _ => None,
        };
        Ok(Box::new(LoginResult {
            session_type: id.session_type,
            initiator_name: id.initiator_name,
            initiator_alias: id.initiator_alias,
            target_name: id.target_name,
            isid: h.isid,
            tsih,
            cid: h.cid,
            params,
            exp_cmd_sn: h.cmd_sn,
            max_cmd_sn: self.max_cmd_sn(h.cmd_sn),
            stat_sn: 0, // set when the final response is built
            exp_stat_sn: h.exp_stat_sn,
            leading: self.leading,
            chap_user,
        }))
    }

    /// Sends `data`, split with the C bit when it exceeds a login data segment.
    fn send(
        &mut self,
        h: &Header,
        flags: u8,
        tsih: u16,
        data: Vec<u8>,
        stage_after: Stage,
        result: Option<Box<LoginResult>>,
    ) -> LoginStep {
        if data.len() <= LOGIN_SEGMENT {
            let response = self.response(h, flags, tsih, LoginStatus::Success, data);
            return self.finish_response(response, stage_after, result, h);
        }
        let mut chunks: std::collections::VecDeque<Vec<u8>> =
            split_text(&data, LOGIN_SEGMENT).into();
        let first = chunks.pop_front().unwrap_or_default();
        self.outgoing = Some(Outgoing {
            chunks,
            final_flags: flags,
            final_tsih: tsih,
            stage_after,
            result,
        });
        // A response with C=1 has T=0 and carries the initiator's TSIH (§11.13.7).
        let partial = ((self.stage as u8) << 2) | FLAG_CONTINUE;
        LoginStep::Continue(self.response(h, partial, h.tsih, LoginStatus::Success, first))
    }

    fn emit_next_chunk(&mut self, h: &Header) -> LoginStep {
        let Some(mut out) = self.outgoing.take() else {
            return LoginStep::Continue(self.response(
                h,
                (self.stage as u8) << 2,
                h.tsih,
                LoginStatus::Success,
                Vec::new(),
            ));
        };
        let chunk = out.chunks.pop_front().unwrap_or_default();
        if !out.chunks.is_empty() {
            let partial = ((self.stage as u8) << 2) | FLAG_CONTINUE;
            self.outgoing = Some(out);
            return LoginStep::Continue(self.response(
                h,
                partial,
                h.tsih,
                LoginStatus::Success,
                chunk,
            ));
        }
        let response = self.response(
            h,
            out.final_flags,
            out.final_tsih,
            LoginStatus::Success,
            chunk,
        );
        let mut result = out.result;
        if let Some(r) = result.as_mut() {
            r.exp_cmd_sn = h.cmd_sn;
            r.max_cmd_sn = self.max_cmd_sn(h.cmd_sn);
            r.exp_stat_sn = h.exp_stat_sn;
        }
        self.finish_response(response, out.stage_after, result, h)
    }

    fn finish_response(
        &mut self,
        response: Pdu,
        stage_after: Stage,
        result: Option<Box<LoginResult>>,
        h: &Header,
    ) -> LoginStep {
        self.stage = stage_after;
        match result {
            Some(mut result) => {
                self.ended = true;
                result.stat_sn = self.stat_sn;
                tracing::debug!(
                    initiator = %result.initiator_name,
                    target = result.target_name.as_deref().unwrap_or("-"),
                    session_type = ?result.session_type,
                    tsih = result.tsih,
                    cid = h.cid,
                    "login complete"
                );
                LoginStep::Complete { response, result }
            }
            None => LoginStep::Continue(response),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::negotiation::{encode_hex, parse_binary, Digest};
    use crate::iscsi::pdu::{LoginRequestBuilder, LoginResponse};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const INI: &str = "iqn.2024-01.org.example:ini";
    const TGT: &str = "iqn.2024-01.org.example:disk1";
    const ISID: [u8; 6] = [0x80, 0, 0x12, 0x34, 0, 1];

    #[derive(Default)]
    struct Dir {
        next: u16,
        existing: Option<ExistingSession>,
        queries: Vec<(u16, u16)>,
    }

    impl SessionDirectory for Dir {
        fn allocate_tsih(&mut self, _: &str, _: [u8; 6]) -> Option<u16> {
            self.next += 1;
            Some(self.next)
        }
        fn find_session(&mut self, q: &SessionQuery<'_>) -> ExistingSession {
            self.queries.push((q.tsih, q.cid));
            self.existing.clone().unwrap_or(ExistingSession::NotFound)
        }
    }

    fn creds(user: &str, secret: &str) -> ChapCredentials {
        ChapCredentials {
            user: user.into(),
            secret: secret.into(),
        }
    }

    fn config() -> Arc<LoginConfig> {
        let mut open = TargetAuth::new(TGT);
        open.alias = Some("disk one".into());
        let mut chap = TargetAuth::new("iqn.2024-01.org.example:secure");
        chap.chap = Some(creds("ini-user", "ini-secret-12345"));
        chap.mutual_chap = Some(creds("tgt-user", "tgt-secret-67890"));
        let mut acl = TargetAuth::new("iqn.2024-01.org.example:private");
        acl.allowed_initiators = vec!["iqn.2024-01.org.example:other".into()];
        Arc::new(LoginConfig {
            portal_group_tag: 7,
            targets: vec![open, chap, acl],
            ..LoginConfig::default()
        })
    }

    fn machine(cfg: Arc<LoginConfig>) -> LoginNegotiation {
        LoginNegotiation::with_rng(cfg, 1000, Box::new(StdRng::seed_from_u64(7)))
    }

    struct Req {
        flags: u8,
        tsih: u16,
        cid: u16,
        cmd_sn: u32,
        data: Vec<u8>,
    }

    fn req(csg: u8, nsg: Option<u8>, text: &[(&str, &str)]) -> Req {
        let mut flags = csg << 2;
        if let Some(n) = nsg {
            flags |= FLAG_TRANSIT | n;
        }
        Req {
            flags,
            tsih: 0,
            cid: 1,
            cmd_sn: 55,
            data: encode_text(text),
        }
    }

    fn pdu(r: &Req) -> Pdu {
        LoginRequestBuilder::new(r.flags, 0xabcd)
            .isid(ISID)
            .tsih(r.tsih)
            .cid(r.cid)
            .cmd_sn(r.cmd_sn)
            .exp_stat_sn(0)
            .data(Bytes::from(r.data.clone()))
            .build()
    }

    fn text_of(p: &Pdu) -> Vec<(String, String)> {
        parse_text(&p.data)
            .unwrap()
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect()
    }

    fn val(p: &Pdu, k: &str) -> Option<String> {
        text_of(p)
            .into_iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v)
    }

    fn status(p: &Pdu) -> u16 {
        LoginResponse(p).status()
    }

    fn expect_continue(step: LoginStep) -> Pdu {
        match step {
            LoginStep::Continue(p) => {
                assert_eq!(status(&p), 0);
                p
            }
            other => panic!("expected Continue, got {other:?}"),
        }
    }

    fn expect_fail(step: LoginStep, want: LoginStatus) -> Pdu {
        match step {
            LoginStep::Fail {
                response,
                status: s,
                ..
            } => {
                assert_eq!(s, want);
                assert_eq!(status(&response), want as u16);
                assert_eq!(response.flags() & FLAG_TRANSIT, 0);
                response
            }
            other => panic!("expected Fail({want:?}), got {other:?}"),
        }
    }

    fn expect_complete(step: LoginStep) -> (Pdu, Box<LoginResult>) {
        match step {
            LoginStep::Complete { response, result } => (response, result),
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    const OPNEG: &[(&str, &str)] = &[
        ("HeaderDigest", "None,CRC32C"),
        ("DataDigest", "None"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "262144"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"),
        ("ErrorRecoveryLevel", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("MaxConnections", "1"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        extra: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, &'static str)> {
        extra.iter().chain(base.iter()).copied().collect()
    }

    /// libiscsi without CHAP: one operational PDU straight to Full Feature Phase.
    #[test]
    fn single_pdu_login_to_full_feature() {
        let mut m = machine(config());
        let mut dir = Dir::default();
        let text = with(
            OPNEG,
            &[
                ("InitiatorName", INI),
                ("InitiatorAlias", "host"),
                ("TargetName", TGT),
                ("SessionType", "Normal"),
            ],
        );
        let (resp, result) = expect_complete(m.handle(&pdu(&req(1, Some(3), &text)), &mut dir));
        assert_eq!(resp.opcode(), Some(Opcode::LoginResponse));
        assert_eq!(resp.flags(), FLAG_TRANSIT | (1 << 2) | 3);
        assert_eq!(LoginResponse(&resp).isid(), ISID);
        assert_eq!(LoginResponse(&resp).tsih(), 1, "TSIH in final response");
        assert_eq!(resp.itt(), 0xabcd);
        assert_eq!(LoginResponse(&resp).stat_sn(), 1000, "StatSN");
        assert_eq!(
            LoginResponse(&resp).exp_cmd_sn(),
            55,
            "ExpCmdSN = login CmdSN"
        );
        assert_eq!(LoginResponse(&resp).max_cmd_sn(), 55 + 127, "MaxCmdSN");
        let r = LoginResponse(&resp);
        assert_eq!((r.version_max(), r.version_active()), (0, 0));
        assert_eq!(val(&resp, "TargetPortalGroupTag").as_deref(), Some("7"));
        assert_eq!(val(&resp, "TargetAlias").as_deref(), Some("disk one"));
        assert_eq!(
            val(&resp, "MaxRecvDataSegmentLength").as_deref(),
            Some("262144")
        );
        assert_eq!(val(&resp, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(val(&resp, "InitiatorName"), None);
        assert_eq!(result.tsih, 1);
        assert_eq!(result.stat_sn, 1001);
        assert_eq!(result.exp_cmd_sn, 55);
        assert_eq!(result.initiator_alias.as_deref(), Some("host"));
        assert_eq!(result.target_name.as_deref(), Some(TGT));
        assert_eq!(result.session_type, SessionType::Normal);
        assert_eq!(result.params.max_xmit_data_segment_length, 262_144);
        assert_eq!(result.params.max_recv_data_segment_length, 262_144);
        assert!(result.leading);
        // Anything after completion fails.
        expect_fail(
            m.handle(&pdu(&req(1, Some(3), &[])), &mut dir),
            LoginStatus::InitiatorError,
        );
    }

    /// open-iscsi style: security stage with AuthMethod=None, then operational.
    #[test]
    fn security_none_then_operational() {
        let mut m = machine(config());
        let mut dir = Dir::default();
        let r1 = expect_continue(m.handle(
            &pdu(&req(
                0,
                Some(1),
                &[
                    ("InitiatorName", INI),
                    ("TargetName", TGT),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "CHAP,None"),
                ],
            )),
            &mut dir,
        ));
        assert_eq!(r1.flags(), FLAG_TRANSIT | 1);
        assert_eq!(val(&r1, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(val(&r1, "TargetPortalGroupTag").as_deref(), Some("7"));
        assert_eq!(
            val(&r1, "MaxRecvDataSegmentLength"),
            None,
            "no operational keys in security stage"
        );
        assert_eq!(
            LoginResponse(&r1).tsih(),
            0,
            "TSIH only in the final response"
        );
        assert_eq!(m.stage(), Stage::LoginOperationalNegotiation);
        let (r2, result) = expect_complete(m.handle(&pdu(&req(1, Some(3), OPNEG)), &mut dir));
        assert_eq!(
            LoginResponse(&r2).stat_sn(),
            1001,
            "each response consumes a StatSN"
        );
        assert_eq!(result.stat_sn, 1002);
        assert_eq!(val(&r2, "TargetPortalGroupTag"), None, "declared once");
    }

    /// Compute an initiator's CHAP reply to a target challenge in `resp`.
    fn chap_reply(resp: &Pdu, user: &str, secret: &str) -> (String, String) {
        let alg = crate::iscsi::chap::ChapAlgorithm::from_code(
            val(resp, "CHAP_A").unwrap().parse().unwrap(),
        )
        .unwrap();
        let id: u8 = val(resp, "CHAP_I").unwrap().parse().unwrap();
        let c = parse_binary(&val(resp, "CHAP_C").unwrap()).unwrap();
        (
            user.to_string(),
            encode_hex(&alg.response(id, secret.as_bytes(), &c)),
        )
    }

    /// libiscsi's CHAP flow, with mutual CHAP, including the repeated identity keys.
    #[test]
    fn chap_mutual_login_like_libiscsi() {
        let secure = "iqn.2024-01.org.example:secure";
        let mut m = machine(config());
        let mut dir = Dir::default();
        let r1 = expect_continue(m.handle(
            &pdu(&req(
                0,
                Some(1),
                &[
                    ("InitiatorName", INI),
                    ("TargetName", secure),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "CHAP,None"),
                ],
            )),
            &mut dir,
        ));
        assert_eq!(val(&r1, "AuthMethod").as_deref(), Some("CHAP"));
        assert_eq!(
            r1.flags() & FLAG_TRANSIT,
            0,
            "CHAP must continue in the security stage"
        );
        let mut r = req(0, None, &[("CHAP_A", "5")]);
        r.flags |= 1; // libiscsi sets NSG even with T=0
        let r2 = expect_continue(m.handle(&pdu(&r), &mut dir));
        assert_eq!(val(&r2, "CHAP_A").as_deref(), Some("5"));
        assert_eq!(
            parse_binary(&val(&r2, "CHAP_C").unwrap()).unwrap().len(),
            16
        );
        let (n, resp) = chap_reply(&r2, "ini-user", "ini-secret-12345");
        let ic = encode_hex(&[0x42u8; 32]);
        let r3 = expect_continue(m.handle(
            &pdu(&req(
                0,
                Some(1),
                &[
                    ("CHAP_N", n.as_str()),
                    ("CHAP_R", resp.as_str()),
                    ("CHAP_I", "9"),
                    ("CHAP_C", ic.as_str()),
                ],
            )),
            &mut dir,
        ));
        assert_eq!(r3.flags(), FLAG_TRANSIT | 1);
        assert_eq!(val(&r3, "CHAP_N").as_deref(), Some("tgt-user"));
        let expected =
            crate::iscsi::chap::ChapAlgorithm::Md5.response(9, b"tgt-secret-67890", &[0x42u8; 32]);
        assert_eq!(
            parse_binary(&val(&r3, "CHAP_R").unwrap()).unwrap(),
            expected
        );
        let text = with(
            OPNEG,
            &[
                ("InitiatorName", INI),
                ("TargetName", secure),
                ("SessionType", "Normal"),
            ],
        );
        let (_, result) = expect_complete(m.handle(&pdu(&req(1, Some(3), &text)), &mut dir));
        assert_eq!(result.chap_user.as_deref(), Some("ini-user"));
        assert_eq!(result.stat_sn, 1004);
    }

    #[test]
    fn the_challenge_and_the_verdict_are_visible_to_the_throttle() {
        let secure = "iqn.2024-01.org.example:secure";
        let first = [
            ("InitiatorName", INI),
            ("TargetName", secure),
            ("AuthMethod", "CHAP"),
        ];
        let mut m = machine(config());
        let mut dir = Dir::default();
        assert_eq!(m.initiator_name(), None);
        expect_continue(m.handle(&pdu(&req(0, Some(1), &first)), &mut dir));
        assert_eq!(m.initiator_name(), Some(INI));
        assert!(!m.chap_challenged(), "AuthMethod alone issues no challenge");
        let r2 = expect_continue(m.handle(&pdu(&req(0, None, &[("CHAP_A", "5")])), &mut dir));
        assert!(m.chap_challenged() && !m.chap_passed());
        let (n, resp) = chap_reply(&r2, "ini-user", "ini-secret-12345");
        m.handle(
            &pdu(&req(
                0,
                Some(1),
                &[("CHAP_N", n.as_str()), ("CHAP_R", resp.as_str())],
            )),
            &mut dir,
        );
        assert!(m.chap_passed());

        // A refusal answers the request it is given and ends the login.
        let mut m = machine(config());
        expect_continue(m.handle(&pdu(&req(0, Some(1), &first)), &mut dir));
        let req2 = pdu(&req(0, None, &[("CHAP_A", "5")]));
        expect_continue(m.handle(&req2, &mut dir));
        expect_fail(
            m.refuse(&req2, LoginStatus::ServiceUnavailable, "throttled"),
            LoginStatus::ServiceUnavailable,
        );
        expect_fail(m.handle(&req2, &mut dir), LoginStatus::InitiatorError);
    }

    #[test]
    fn chap_failures() {
        let secure = "iqn.2024-01.org.example:secure";
        let first = [
            ("InitiatorName", INI),
            ("TargetName", secure),
            ("AuthMethod", "CHAP"),
        ];
        // Wrong secret.
        let mut m = machine(config());
        let mut dir = Dir::default();
        expect_continue(m.handle(&pdu(&req(0, Some(1), &first)), &mut dir));
        let r2 = expect_continue(m.handle(&pdu(&req(0, None, &[("CHAP_A", "6,5")])), &mut dir));
        assert_eq!(val(&r2, "CHAP_A").as_deref(), Some("6"));
        let (n, resp) = chap_reply(&r2, "ini-user", "wrong-secret-000");
        expect_fail(
            m.handle(
                &pdu(&req(
                    0,
                    Some(1),
                    &[("CHAP_N", n.as_str()), ("CHAP_R", resp.as_str())],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );

        // Reflected challenge.
        let mut m = machine(config());
        expect_continue(m.handle(&pdu(&req(0, Some(1), &first)), &mut dir));
        let r2 = expect_continue(m.handle(&pdu(&req(0, None, &[("CHAP_A", "5")])), &mut dir));
        let (n, resp) = chap_reply(&r2, "ini-user", "ini-secret-12345");
        let ours = val(&r2, "CHAP_C").unwrap();
        expect_fail(
            m.handle(
                &pdu(&req(
                    0,
                    Some(1),
                    &[
                        ("CHAP_N", n.as_str()),
                        ("CHAP_R", resp.as_str()),
                        ("CHAP_I", "1"),
                        ("CHAP_C", ours.as_str()),
                    ],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );

        // Initiator that only offers None to a CHAP target.
        let mut m = machine(config());
        expect_fail(
            m.handle(
                &pdu(&req(
                    0,
                    Some(1),
                    &[
                        ("InitiatorName", INI),
                        ("TargetName", secure),
                        ("AuthMethod", "None"),
                    ],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );

        // Skipping the security stage on a CHAP target.
        let mut m = machine(config());
        let text = with(OPNEG, &[("InitiatorName", INI), ("TargetName", secure)]);
        expect_fail(
            m.handle(&pdu(&req(1, Some(3), &text)), &mut dir),
            LoginStatus::AuthenticationFailure,
        );

        // Leaving the security stage without any AuthMethod.
        let mut m = machine(config());
        expect_fail(
            m.handle(
                &pdu(&req(
                    0,
                    Some(1),
                    &[("InitiatorName", INI), ("TargetName", secure)],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );

        // Trying to transit before the CHAP exchange is over is answered with T=0.
        let mut m = machine(config());
        expect_continue(m.handle(&pdu(&req(0, Some(1), &first)), &mut dir));
        let r = expect_continue(m.handle(&pdu(&req(0, Some(1), &[("CHAP_A", "5")])), &mut dir));
        assert_eq!(r.flags() & FLAG_TRANSIT, 0);

        // CHAP keys on a target without CHAP.
        let mut m = machine(config());
        expect_fail(
            m.handle(
                &pdu(&req(
                    0,
                    None,
                    &[("InitiatorName", INI), ("TargetName", TGT), ("CHAP_A", "5")],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );

        // Only CHAP offered to a target without authentication.
        let mut m = machine(config());
        expect_fail(
            m.handle(
                &pdu(&req(
                    0,
                    None,
                    &[
                        ("InitiatorName", INI),
                        ("TargetName", TGT),
                        ("AuthMethod", "CHAP"),
                    ],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );
    }

    #[test]
    fn identity_errors() {
        let mut dir = Dir::default();
        let cases: Vec<(Vec<(&str, &str)>, LoginStatus)> = vec![
            (vec![("TargetName", TGT)], LoginStatus::MissingParameter),
            (vec![("InitiatorName", INI)], LoginStatus::MissingParameter),
            (
                vec![("InitiatorName", INI), ("TargetName", "iqn.nope")],
                LoginStatus::NotFound,
            ),
            (
                vec![
                    ("InitiatorName", INI),
                    ("TargetName", "iqn.2024-01.org.example:private"),
                ],
                LoginStatus::AuthorizationFailure,
            ),
            (
                vec![("InitiatorName", INI), ("SessionType", "Weird")],
                LoginStatus::SessionTypeNotSupported,
            ),
            (
                vec![("InitiatorName", ""), ("TargetName", TGT)],
                LoginStatus::InitiatorError,
            ),
        ];
        for (text, want) in cases {
            let mut m = machine(config());
            expect_fail(m.handle(&pdu(&req(1, Some(3), &text)), &mut dir), want);
        }
        // Target names are case-insensitive; the ACL lets the listed initiator in.
        let mut m = machine(config());
        let text = with(
            OPNEG,
            &[
                ("InitiatorName", "IQN.2024-01.org.example:OTHER"),
                ("TargetName", "iqn.2024-01.org.example:PRIVATE"),
            ],
        );
        let (_, r) = expect_complete(m.handle(&pdu(&req(1, Some(3), &text)), &mut dir));
        assert_eq!(
            r.target_name.as_deref(),
            Some("iqn.2024-01.org.example:private")
        );
    }

    #[test]
    fn discovery_session() {
        let mut m = machine(config());
        let mut dir = Dir::default();
        let text = with(
            OPNEG,
            &[("InitiatorName", INI), ("SessionType", "Discovery")],
        );
        let (resp, result) = expect_complete(m.handle(&pdu(&req(1, Some(3), &text)), &mut dir));
        assert_eq!(val(&resp, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(val(&resp, "TargetPortalGroupTag"), None);
        assert_eq!(result.session_type, SessionType::Discovery);
        assert_eq!(result.target_name, None);
        assert_ne!(result.tsih, 0);

        // open-iscsi may go from security straight to full feature phase.
        let mut m = machine(config());
        let (resp, result) = expect_complete(m.handle(
            &pdu(&req(
                0,
                Some(3),
                &[
                    ("InitiatorName", INI),
                    ("SessionType", "Discovery"),
                    ("AuthMethod", "None"),
                ],
            )),
            &mut dir,
        ));
        assert_eq!(resp.flags(), FLAG_TRANSIT | 3);
        assert_eq!(
            result.params.max_recv_data_segment_length, 8192,
            "never declared"
        );
        assert_eq!(result.params.max_xmit_data_segment_length, 8192);

        // Discovery CHAP.
        let cfg = Arc::new(LoginConfig {
            discovery_chap: Some(creds("disc", "discovery-secret")),
            ..(*config()).clone()
        });
        let mut m = machine(cfg);
        expect_fail(
            m.handle(
                &pdu(&req(
                    1,
                    Some(3),
                    &[("InitiatorName", INI), ("SessionType", "Discovery")],
                )),
                &mut dir,
            ),
            LoginStatus::AuthenticationFailure,
        );
    }

    #[test]
    fn stage_and_flag_errors() {
        let mut dir = Dir::default();
        let id = [("InitiatorName", INI), ("TargetName", TGT)];
        // T and C together.
        let mut m = machine(config());
        let mut r = req(1, Some(3), &id);
        r.flags |= FLAG_CONTINUE;
        expect_fail(m.handle(&pdu(&r), &mut dir), LoginStatus::InitiatorError);
        // Start in full feature phase / reserved stage 2.
        for csg in [2u8, 3] {
            let mut m = machine(config());
            expect_fail(
                m.handle(&pdu(&req(csg, None, &id)), &mut dir),
                LoginStatus::InitiatorError,
            );
        }
        // Transition backwards or to stage 2.
        for (csg, nsg) in [(1u8, 1u8), (1, 0), (0, 2), (1, 2), (0, 0)] {
            let mut m = machine(config());
            expect_fail(
                m.handle(&pdu(&req(csg, Some(nsg), &id)), &mut dir),
                LoginStatus::InitiatorError,
            );
        }
        // CSG that does not match the stage we are in.
        let mut m = machine(config());
        expect_continue(m.handle(
            &pdu(&req(
                0,
                None,
                &[
                    ("InitiatorName", INI),
                    ("TargetName", TGT),
                    ("AuthMethod", "None"),
                ],
            )),
            &mut dir,
        ));
        expect_fail(
            m.handle(&pdu(&req(1, Some(3), OPNEG)), &mut dir),
            LoginStatus::InitiatorError,
        );
        // ISID changes mid-login.
        let mut m = machine(config());
        expect_continue(m.handle(&pdu(&req(1, None, &id)), &mut dir));
        let mut p = pdu(&req(1, Some(3), OPNEG));
        p.bhs[13] ^= 1;
        expect_fail(m.handle(&p, &mut dir), LoginStatus::InitiatorError);
        // Unsupported version.
        let mut m = machine(config());
        let mut p = pdu(&req(1, Some(3), &id));
        p.bhs[2] = 2;
        p.bhs[3] = 1;
        expect_fail(m.handle(&p, &mut dir), LoginStatus::UnsupportedVersion);
        // Non-login PDU during login.
        let mut m = machine(config());
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.set_itt(5);
        let resp = expect_fail(m.handle(&p, &mut dir), LoginStatus::InvalidDuringLogin);
        assert_eq!(resp.itt(), 5);
        // Security keys in the operational stage.
        let mut m = machine(config());
        expect_fail(
            m.handle(
                &pdu(&req(1, Some(3), &with(&id, &[("AuthMethod", "None")]))),
                &mut dir,
            ),
            LoginStatus::InitiatorError,
        );
        // Identity changed later.
        let mut m = machine(config());
        expect_continue(m.handle(&pdu(&req(1, None, &id)), &mut dir));
        expect_fail(
            m.handle(
                &pdu(&req(1, Some(3), &[("InitiatorName", "iqn.x:y")])),
                &mut dir,
            ),
            LoginStatus::InitiatorError,
        );
        // Renegotiating a key.
        let mut m = machine(config());
        expect_continue(m.handle(
            &pdu(&req(1, None, &with(&id, &[("MaxBurstLength", "65536")]))),
            &mut dir,
        ));
        expect_fail(
            m.handle(
                &pdu(&req(1, Some(3), &[("MaxBurstLength", "65536")])),
                &mut dir,
            ),
            LoginStatus::InitiatorError,
        );
    }

    #[test]
    fn multi_pdu_request_text_with_c_bit() {
        let mut m = machine(config());
        let mut dir = Dir::default();
        let full = encode_text(&with(OPNEG, &[("InitiatorName", INI), ("TargetName", TGT)]));
        // Split in the middle of a key=value pair.
        let (a, b) = full.split_at(37);
        let mut r1 = req(1, None, &[]);
        r1.flags |= FLAG_CONTINUE;
        r1.data = a.to_vec();
        let ack = expect_continue(m.handle(&pdu(&r1), &mut dir));
        assert!(ack.data.is_empty());
        assert_eq!(ack.flags() & (FLAG_TRANSIT | FLAG_CONTINUE), 0);
        let mut r2 = req(1, Some(3), &[]);
        r2.data = b.to_vec();
        let (resp, result) = expect_complete(m.handle(&pdu(&r2), &mut dir));
        assert_eq!(val(&resp, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(result.initiator_name, INI);
    }

    #[test]
    fn long_response_is_continued_with_c_bit() {
        let mut m = machine(config());
        let mut dir = Dir::default();
        // 600 unknown keys produce ~600 * 25 bytes of NotUnderstood answers.
        let keys: Vec<String> = (0..600).map(|i| format!("X-org.example.k{i}")).collect();
        let mut text: Vec<(&str, &str)> = vec![("InitiatorName", INI), ("TargetName", TGT)];
        text.extend(OPNEG.iter().copied());
        text.extend(keys.iter().map(|k| (k.as_str(), "1")));
        let first = expect_continue(m.handle(&pdu(&req(1, Some(3), &text)), &mut dir));
        assert_eq!(
            first.flags() & (FLAG_CONTINUE | FLAG_TRANSIT),
            FLAG_CONTINUE
        );
        assert!(first.data.len() <= 8192);
        assert_eq!(LoginResponse(&first).tsih(), 0);
        let mut all = first.data.to_vec();
        // Text sent while we are continuing is an error; empty requests fetch the rest.
        let mut steps = 0;
        let (last, result) = loop {
            steps += 1;
            assert!(steps < 10);
            match m.handle(&pdu(&req(1, Some(3), &[])), &mut dir) {
                LoginStep::Continue(p) => {
                    assert_ne!(p.flags() & FLAG_CONTINUE, 0);
                    all.extend_from_slice(&p.data);
                }
                LoginStep::Complete { response, result } => break (response, result),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(last.flags(), FLAG_TRANSIT | (1 << 2) | 3);
        assert_ne!(LoginResponse(&last).tsih(), 0);
        all.extend_from_slice(&last.data);
        let pairs = parse_text(&all).unwrap();
        assert_eq!(
            pairs
                .iter()
                .filter(|kv| kv.value == "NotUnderstood")
                .count(),
            600
        );
        assert_eq!(
            result.stat_sn,
            LoginResponse(&last).stat_sn().wrapping_add(1)
        );
    }

    #[test]
    fn non_zero_tsih_paths() {
        let text = with(OPNEG, &[("InitiatorName", INI), ("TargetName", TGT)]);
        let mut r = req(1, Some(3), &text);
        r.tsih = 0x77;
        r.cid = 3;
        // Unknown session.
        let mut dir = Dir::default();
        let mut m = machine(config());
        expect_fail(
            m.handle(&pdu(&r), &mut dir),
            LoginStatus::SessionDoesNotExist,
        );
        assert_eq!(dir.queries, vec![(0x77, 3)]);
        // Session full.
        let mut dir = Dir {
            existing: Some(ExistingSession::TooManyConnections),
            ..Dir::default()
        };
        let mut m = machine(config());
        expect_fail(
            m.handle(&pdu(&r), &mut dir),
            LoginStatus::TooManyConnections,
        );
        // Connection reinstatement keeps the session's parameters and its TSIH.
        let session = SessionParams {
            max_burst_length: 65536,
            header_digest: Digest::Crc32c,
            ..SessionParams::default()
        };
        let mut dir = Dir {
            existing: Some(ExistingSession::Reinstate { params: session }),
            ..Dir::default()
        };
        let mut m = machine(config());
        let (resp, result) = expect_complete(m.handle(&pdu(&r), &mut dir));
        assert_eq!(LoginResponse(&resp).tsih(), 0x77);
        assert_eq!(val(&resp, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(result.params.max_burst_length, 65536);
        assert_eq!(
            result.params.header_digest,
            Digest::None,
            "connection keys renegotiated"
        );
        assert!(!result.leading);
        assert_eq!(dir.next, 0, "no TSIH allocated");
        // Discovery with non-zero TSIH.
        let mut r = req(
            1,
            Some(3),
            &[("InitiatorName", INI), ("SessionType", "Discovery")],
        );
        r.tsih = 5;
        let mut m = machine(config());
        expect_fail(
            m.handle(&pdu(&r), &mut Dir::default()),
            LoginStatus::SessionDoesNotExist,
        );
    }

    #[test]
    fn tsih_exhaustion_is_out_of_resources() {
        struct Full;
        impl SessionDirectory for Full {
            fn allocate_tsih(&mut self, _: &str, _: [u8; 6]) -> Option<u16> {
                None
            }
            fn find_session(&mut self, _: &SessionQuery<'_>) -> ExistingSession {
                ExistingSession::NotFound
            }
        }
        let mut m = machine(config());
        let text = with(OPNEG, &[("InitiatorName", INI), ("TargetName", TGT)]);
        expect_fail(
            m.handle(&pdu(&req(1, Some(3), &text)), &mut Full),
            LoginStatus::OutOfResources,
        );
    }

    #[test]
    fn target_offer_makes_response_non_final() {
        let cfg = Arc::new(LoginConfig {
            limits: TargetLimits {
                max_burst_length: 65536,
                first_burst_length: 16384,
                ..TargetLimits::default()
            },
            ..(*config()).clone()
        });
        let mut m = machine(cfg);
        let mut dir = Dir::default();
        let r1 = expect_continue(m.handle(
            &pdu(&req(
                1,
                Some(3),
                &[
                    ("InitiatorName", INI),
                    ("TargetName", TGT),
                    ("MaxRecvDataSegmentLength", "8192"),
                ],
            )),
            &mut dir,
        ));
        assert_eq!(r1.flags() & FLAG_TRANSIT, 0);
        assert_eq!(val(&r1, "MaxBurstLength").as_deref(), Some("65536"));
        assert_eq!(val(&r1, "FirstBurstLength").as_deref(), Some("16384"));
        let (_, result) = expect_complete(m.handle(
            &pdu(&req(
                1,
                Some(3),
                &[("MaxBurstLength", "65536"), ("FirstBurstLength", "8192")],
            )),
            &mut dir,
        ));
        assert_eq!(result.params.max_burst_length, 65536);
        assert_eq!(result.params.first_burst_length, 8192);
    }

    #[test]
    fn garbage_text_and_pdus_fail_cleanly() {
        let mut dir = Dir::default();
        let bad_texts: Vec<Vec<u8>> = vec![
            b"InitiatorName\0".to_vec(),
            b"InitiatorName=a\0InitiatorName=a\0".to_vec(),
            b"InitiatorName=\xff\xfe\0".to_vec(),
            [b"InitiatorName=".to_vec(), vec![b'a'; 300], vec![0]].concat(),
            vec![0xffu8; 5000],
            [b"K=".to_vec(), vec![b'v'; 2 << 20]].concat(),
        ];
        for t in bad_texts {
            let mut m = machine(config());
            let mut r = req(1, Some(3), &[]);
            r.data = t;
            assert!(matches!(
                m.handle(&pdu(&r), &mut dir),
                LoginStep::Fail { .. }
            ));
        }
        // Accumulating too much text with the C bit.
        let mut m = machine(config());
        let mut failed = false;
        for _ in 0..20 {
            let mut r = req(1, None, &[]);
            r.flags |= FLAG_CONTINUE;
            r.data = vec![b'a'; 8192];
            if let LoginStep::Fail { status, .. } = m.handle(&pdu(&r), &mut dir) {
                assert_eq!(status, LoginStatus::InitiatorError);
                failed = true;
                break;
            }
        }
        assert!(failed);
        // Random headers and data never panic.
        let mut seed = 0x2545_f491u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut m = machine(config());
            for _ in 0..4 {
                let mut p = Pdu::new(Opcode::LoginRequest);
                for b in p.bhs.iter_mut() {
                    *b = next() as u8;
                }
                if next() % 2 == 0 {
                    p.bhs[0] = Opcode::LoginRequest as u8;
                }
                let len = (next() % 400) as usize;
                let data: Vec<u8> = (0..len)
                    .map(|_| match next() % 6 {
                        0 => 0,
                        1 => b'=',
                        _ => next() as u8,
                    })
                    .collect();
                p.set_data(Bytes::from(data));
                let _ = m.handle(&p, &mut dir);
            }
        }
    }

    #[test]
    fn too_many_login_pdus() {
        let mut m = machine(config());
        let mut dir = Dir::default();
        expect_continue(m.handle(
            &pdu(&req(
                1,
                None,
                &[("InitiatorName", INI), ("TargetName", TGT)],
            )),
            &mut dir,
        ));
        let mut last = None;
        for _ in 0..MAX_LOGIN_PDUS {
            let step = m.handle(&pdu(&req(1, None, &[])), &mut dir);
            if let LoginStep::Fail { status, .. } = step {
                last = Some(status);
                break;
            }
        }
        assert_eq!(last, Some(LoginStatus::InitiatorError));
    }

    #[test]
    fn status_codes() {
        assert_eq!(LoginStatus::SessionDoesNotExist.class(), 2);
        assert_eq!(LoginStatus::SessionDoesNotExist.detail(), 0x0a);
        assert_eq!(LoginStatus::OutOfResources.class(), 3);
        assert_eq!(LoginStatus::Success.class(), 0);
    }
}
