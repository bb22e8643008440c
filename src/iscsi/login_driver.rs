//! Runs the sans-IO [`LoginNegotiation`] on a connection and turns its result into a session.

use super::chap::ChapCredentials;
use super::connection::FeatureParams;
use super::login::{
    ExistingSession, LoginConfig, LoginNegotiation, LoginStep, SessionDirectory, SessionQuery,
    TargetAuth,
};
use super::negotiation::{Digest, SessionParams, SessionType, TargetLimits};
use super::pdu::{encode_pdu, Opcode, PduCodec};
use super::session::{wait_stopped, NewSession, Session, SessionRegistry};
use crate::config::{Config, Credentials};
use crate::server::ServerState;
use bytes::BytesMut;
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;
use tracing::{debug, info};

/// A connection that completed login.
pub struct LoggedIn {
    pub session: Arc<Session>,
    pub params: FeatureParams,
    pub next_stat_sn: u32,
}

struct Directory<'a> {
    registry: &'a SessionRegistry,
}

impl SessionDirectory for Directory<'_> {
    fn allocate_tsih(&mut self) -> Option<u16> {
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
    state: &Arc<ServerState>,
    local: Option<SocketAddr>,
) -> anyhow::Result<Option<LoggedIn>> {
    let _ = local;
    let mut login = LoginNegotiation::new(state.login.clone(), rand::random::<u32>() & 0x7fff_ffff);
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
                registry: &state.sessions,
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
                state
                    .targets
                    .get(&name.to_ascii_lowercase())
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("login completed for unknown target {name}"))?,
            ),
            _ => None,
        };
        let (session, waiters) = state.sessions.register(
            result.tsih,
            NewSession {
                initiator: result.initiator_name.clone(),
                isid: result.isid,
                target,
                exp_cmd_sn: result.exp_cmd_sn,
                queue_depth: state.login.cmd_window,
                params: result.params.clone(),
                cid: result.cid,
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

fn chap(c: &Option<Credentials>) -> Option<ChapCredentials> {
    c.as_ref().map(|c| ChapCredentials {
        user: c.user.clone(),
        secret: c.secret.clone(),
    })
}

/// Maps the configuration to what login needs.
pub fn build_login_config(config: &Config) -> Arc<LoginConfig> {
    let n = &config.negotiation;
    let d = TargetLimits::default();
    let digests = |v: &Option<Vec<String>>, default: &Vec<Digest>| {
        v.as_ref()
            .map(|l| l.iter().filter_map(|s| Digest::parse(s)).collect())
            .unwrap_or_else(|| default.clone())
    };
    let limits = TargetLimits {
        max_recv_data_segment_length: n
            .max_recv_data_segment_length
            .unwrap_or(d.max_recv_data_segment_length),
        max_burst_length: n.max_burst_length.unwrap_or(d.max_burst_length),
        first_burst_length: n.first_burst_length.unwrap_or(d.first_burst_length),
        immediate_data: n.immediate_data.unwrap_or(d.immediate_data),
        initial_r2t: n.initial_r2t.unwrap_or(d.initial_r2t),
        max_outstanding_r2t: n.max_outstanding_r2t.unwrap_or(d.max_outstanding_r2t),
        header_digest: digests(&n.header_digest, &d.header_digest),
        data_digest: digests(&n.data_digest, &d.data_digest),
        default_time2wait: n.default_time2wait.unwrap_or(d.default_time2wait),
        // Sessions end with their connection (ErrorRecoveryLevel 0, no retention).
        default_time2retain: n.default_time2retain.unwrap_or(0),
        max_connections: 1,
    };
    let targets = config
        .targets
        .iter()
        .map(|t| {
            let mut a = TargetAuth::new(t.iqn.clone());
            a.alias = t.alias.clone();
            a.allowed_initiators = t.allowed_initiators.clone();
            a.chap = chap(&t.chap);
            a.mutual_chap = chap(&t.mutual_chap);
            a.portals = t.portals.iter().filter_map(|p| p.parse().ok()).collect();
            a.portal_group_tag = Some(t.tpgt);
            a
        })
        .collect();
    Arc::new(LoginConfig {
        portal_group_tag: config.targets.first().map(|t| t.tpgt).unwrap_or(1),
        targets,
        discovery_chap: chap(&config.discovery.chap),
        discovery_mutual_chap: chap(&config.discovery.mutual_chap),
        limits,
        cmd_window: config.server.queue_depth,
        ..LoginConfig::default()
    })
}
