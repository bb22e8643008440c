//! Runs the sans-IO [`LoginNegotiation`] on a connection and turns its result into a session.

use super::context::IscsiContext;
use super::login::{ExistingSession, LoginNegotiation, LoginStep, SessionDirectory, SessionQuery};
use super::negotiation::{Digest, SessionParams, SessionType};
use super::pdu::{encode_pdu, Opcode, PduCodec};
use super::sequencer::FeatureParams;
use super::session::{wait_stopped, NewSession, Session, SessionLimits, SessionRegistry};
use bytes::BytesMut;
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn};

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
pub async fn drive_login(
    reader: &mut FramedRead<OwnedReadHalf, PduCodec>,
    wr: &mut OwnedWriteHalf,
    ctx: &IscsiContext,
    local: Option<SocketAddr>,
) -> anyhow::Result<Option<LoggedIn>> {
    let _ = local;
    let mut login = LoginNegotiation::new(ctx.login.clone(), rand::random::<u32>() & 0x7fff_ffff);
    let mut buf = BytesMut::new();
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
        let step = login.handle(
            &pdu,
            &mut Directory {
                registry: &ctx.sessions,
                limits: &ctx.limits.sessions,
            },
        );
        let (response, done) = match step {
            LoginStep::Continue(p) => (p, None),
            LoginStep::Complete { response, result } => (response, Some(result)),
            LoginStep::Fail {
                response,
                status,
                reason,
            } => {
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
