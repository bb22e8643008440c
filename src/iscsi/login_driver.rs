//! Runs the sans-IO [`LoginNegotiation`] on a connection and turns its result into a session.

use super::context::{AuthKey, IscsiContext};
use super::login::{
    ExistingSession, LoginNegotiation, LoginStatus, LoginStep, SessionDirectory, SessionQuery,
};
use super::negotiation::{Digest, SessionParams, SessionType};
use super::pdu::{encode_pdu, Opcode, PduCodec};
use super::sequencer::FeatureParams;
use super::session::{wait_stopped, NewSession, Session, SessionLimits, SessionRegistry};
use bytes::BytesMut;
use futures::StreamExt;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn};
use twinsan_throttle::{Admitted, Attempt, Ended, LogAction};

/// A connection that completed login.
pub struct LoggedIn {
    pub session: Arc<Session>,
    pub params: FeatureParams,
    pub next_stat_sn: u32,
}

struct Directory<'a> {
    registry: &'a SessionRegistry,
    limits: &'a SessionLimits,
}

impl SessionDirectory for Directory<'_> {
    fn allocate_tsih(&mut self, initiator_name: &str, isid: [u8; 6]) -> Option<u16> {
        if !self.registry.admits(initiator_name, isid, self.limits) {
            warn!(
                initiator = initiator_name,
                max_sessions = self.limits.max_sessions,
                max_sessions_per_initiator = self.limits.max_sessions_per_initiator,
                "login refused: session limit reached (out of resources)"
            );
            return None;
        }
        Some(self.registry.allocate_tsih())
    }

    fn find_session(&mut self, q: &SessionQuery<'_>) -> ExistingSession {
        match self.registry.get(q.tsih) {
            Some(s)
                if s.initiator.eq_ignore_ascii_case(q.initiator_name)
                    && s.isid == q.isid
                    && s.target
                        .as_ref()
                        .is_some_and(|t| t.iqn.eq_ignore_ascii_case(q.target_name)) =>
            {
                // MaxConnections=1: the same CID replaces the connection (§6.3.4); another CID
                // would be a second connection.
                if s.cid == q.cid {
                    ExistingSession::Reinstate {
                        params: s.params.clone(),
                    }
                } else {
                    ExistingSession::TooManyConnections
                }
            }
            _ => ExistingSession::NotFound,
        }
    }
}

/// Drives login to completion. `Ok(None)`: the login failed and the response was sent.
///
/// CHAP logins go through the authentication throttle ([`IscsiContext::auth_throttle`]),
/// keyed by InitiatorName and `peer`'s address: the response carrying the challenge waits for
/// the initiator's slot (an answer needs the challenge, so no guess is checked before it), or
/// the login is refused with "service unavailable" (0x0301, retryable, §11.13.5) after the
/// throttle's longest delay when too many attempts of that initiator are queued. Failures are
/// logged once per burst with counts.
pub async fn drive_login(
    reader: &mut FramedRead<OwnedReadHalf, PduCodec>,
    wr: &mut OwnedWriteHalf,
    ctx: &IscsiContext,
    peer: Option<SocketAddr>,
) -> anyhow::Result<Option<LoggedIn>> {
    let mut login = LoginNegotiation::new(ctx.login.clone(), rand::random::<u32>() & 0x7fff_ffff);
    let mut buf = BytesMut::new();
    let peer_ip = peer.map(|a| a.ip());
    // The throttled CHAP attempt of this login, once its challenge went out; dropped without
    // a verdict (the connection closed, the login timed out) it gives its charge back.
    let mut attempt: Option<Attempt<'_, AuthKey>> = None;
    loop {
        let Some(frame) = reader.next().await else {
            return Ok(None);
        };
        let pdu = match frame? {
            Ok(p) => p,
            Err(bad) => anyhow::bail!("malformed PDU during login: {bad:?}"),
        };
        if pdu.opcode() != Some(Opcode::LoginRequest) {
            anyhow::bail!(
                "PDU with opcode {:#04x} before login completed",
                pdu.raw_opcode()
            );
        }
        let challenged = login.chap_challenged();
        let mut step = login.handle(
            &pdu,
            &mut Directory {
                registry: &ctx.sessions,
                limits: &ctx.limits.sessions,
            },
        );
        if let Some(a) = attempt.take_if(|_| login.chap_passed()) {
            if let Some(burst) = a.succeeded(Instant::now()) {
                info!(
                    initiator = login.initiator_name().unwrap_or_default(),
                    peer = ?peer_ip,
                    "CHAP login succeeded after {} failed attempts ({} refused unheard) in {:.1?}",
                    burst.failures,
                    burst.refused,
                    burst.lasted
                );
            }
        }
        if matches!(step, LoginStep::Continue(_)) && !challenged && login.chap_challenged() {
            if let Some(k) = auth_key(&login, peer_ip) {
                let now = Instant::now();
                log_ended(ctx.auth_throttle.lock().expire(now));
                let max_wait = ctx.auth_throttle.lock().params().max_delay;
                match ctx.auth_throttle.admit(k, now, max_wait) {
                    Admitted::Go { wait, attempt: a } => {
                        attempt = Some(a);
                        if !wait.is_zero() {
                            debug!(
                                ?wait,
                                "CHAP challenge held back by the authentication throttle"
                            );
                            tokio::time::sleep(wait).await;
                        }
                    }
                    Admitted::Refused { after } => {
                        debug!(?after, "login refused unheard: too many CHAP attempts queued for this initiator");
                        tokio::time::sleep(after).await;
                        step = login.refuse(
                            &pdu,
                            LoginStatus::ServiceUnavailable,
                            "too many failed CHAP logins: throttled",
                        );
                    }
                }
            }
        }
        let (response, done) = match step {
            LoginStep::Continue(p) => (p, None),
            LoginStep::Complete { response, result } => (response, Some(result)),
            LoginStep::Fail {
                response,
                status,
                reason,
            } => {
                if status == LoginStatus::AuthenticationFailure {
                    if let Some(k) = auth_key(&login, peer_ip) {
                        let now = Instant::now();
                        let action = match attempt.take() {
                            Some(a) => a.failed(now),
                            None => ctx.auth_throttle.lock().failed(&k, now),
                        };
                        log_failure(&k, action, &reason);
                        log_ended(ctx.auth_throttle.lock().expire(now));
                    }
                }
                debug!(?status, "login refused: {reason}");
                buf.clear();
                encode_pdu(&response, false, false, &mut buf);
                wr.write_all(&buf).await?;
                return Ok(None);
            }
        };
        buf.clear();
        encode_pdu(&response, false, false, &mut buf);
        wr.write_all(&buf).await?;
        let Some(result) = done else { continue };

        let target = match (&result.session_type, &result.target_name) {
            (SessionType::Normal, Some(name)) => Some(
                ctx.target(name)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("login completed for unknown target {name}"))?,
            ),
            _ => None,
        };
        let (session, waiters) = ctx.sessions.register(
            result.tsih,
            NewSession {
                initiator: result.initiator_name.clone(),
                isid: result.isid,
                target,
                exp_cmd_sn: result.exp_cmd_sn,
                queue_depth: ctx.login.cmd_window,
                params: result.params.clone(),
                cid: result.cid,
                budget: ctx.budget.session(ctx.limits.session_inflight_bytes),
            },
        );
        // A reinstated session's tasks must stop before the new one runs commands (§6.3.5).
        wait_stopped(waiters).await;
        if let Some(t) = &session.target {
            t.scsi
                .nexus_established(session.nexus, &session.initiator, session.isid);
        }
        info!(
            initiator = %result.initiator_name,
            target = result.target_name.as_deref().unwrap_or("discovery"),
            tsih = result.tsih,
            chap = result.chap_user.as_deref().unwrap_or("none"),
            header_digest = ?result.params.header_digest,
            data_digest = ?result.params.data_digest,
            "login complete"
        );
        return Ok(Some(LoggedIn {
            session,
            params: feature_params(&result.params, result.cid),
            next_stat_sn: login.next_stat_sn(),
        }));
    }
}

/// The throttle's key of this login, once the initiator named itself.
fn auth_key(login: &LoginNegotiation, ip: Option<IpAddr>) -> Option<AuthKey> {
    Some((login.initiator_name()?.to_ascii_lowercase(), ip?))
}

/// Logs a CHAP failure as the throttle says: the first of a burst with its reason, then a count
/// now and then; the rest only at debug level.
fn log_failure(key: &AuthKey, action: LogAction, reason: &str) {
    let (initiator, ip) = key;
    match action {
        LogAction::First => warn!(
            initiator = %initiator,
            peer = %ip,
            "CHAP authentication failed: {reason}; further failures of this initiator from \
             this address are counted, not logged, and its logins are delayed"
        ),
        LogAction::Ongoing(b) => warn!(
            initiator = %initiator,
            peer = %ip,
            "CHAP authentication still failing: {} failed attempts ({} refused unheard) in {:.0?}",
            b.failures,
            b.refused,
            b.lasted
        ),
        LogAction::Quiet => {
            debug!(initiator = %initiator, peer = %ip, "CHAP authentication failed: {reason}")
        }
    }
}

/// The closing line of bursts whose initiators went quiet (or were evicted).
fn log_ended(ended: Vec<Ended<AuthKey>>) {
    for e in ended {
        let (initiator, ip) = &e.key;
        info!(
            initiator = %initiator,
            peer = %ip,
            "CHAP failures of this initiator ended ({:?}): {} failed attempts ({} refused unheard) in {:.0?}",
            e.reason,
            e.burst.failures,
            e.burst.refused,
            e.burst.lasted
        );
    }
}

fn feature_params(p: &SessionParams, cid: u16) -> FeatureParams {
    FeatureParams {
        header_digest: p.header_digest == Digest::Crc32c,
        data_digest: p.data_digest == Digest::Crc32c,
        max_recv_segment: p.max_recv_data_segment_length,
        max_xmit_segment: p.max_xmit_data_segment_length,
        max_burst: p.max_burst_length,
        first_burst: p.first_burst_length,
        immediate_data: p.immediate_data,
        initial_r2t: p.initial_r2t,
        max_outstanding_r2t: p.max_outstanding_r2t,
        cid,
    }
}
