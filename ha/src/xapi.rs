//! XML-RPC client for XAPI, and a watcher that turns XAPI's view of the pool master into role
//! signals.
//!
//! Every call has a timeout, because a slave's xapi forwards calls to the master and hangs when the
//! master is dead. Results are unwrapped from XAPI's `{Status, Value | ErrorDescription}` envelope;
//! `HOST_IS_SLAVE` becomes [`XapiError::HostIsSlave`] carrying the master's address.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::{header, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::role::PoolRole;
use crate::xmlrpc::{self, Response, Value, XmlRpcError};

/// XAPI call failures.
#[derive(Debug, thiserror::Error)]
pub enum XapiError {
    /// Could not connect / read / write.
    #[error("XAPI I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup or handshake failed (including a fingerprint mismatch).
    #[error("XAPI TLS error: {0}")]
    Tls(String),
    /// The call did not finish in time.
    #[error("XAPI call {0} timed out")]
    Timeout(String),
    /// Non-200 HTTP status.
    #[error("XAPI HTTP status {0}")]
    Http(String),
    /// Malformed reply.
    #[error(transparent)]
    Protocol(#[from] XmlRpcError),
    /// XML-RPC `<fault>`.
    #[error("XML-RPC fault {0}: {1}")]
    Fault(i64, String),
    /// XAPI `Failure` with its ErrorDescription.
    #[error("XAPI failure {code} {params:?}")]
    Failure {
        /// First element, e.g. `SESSION_INVALID`.
        code: String,
        /// The remaining elements.
        params: Vec<String>,
    },
    /// Login on a pool slave: the master's address.
    #[error("host is a pool slave; master is {master}")]
    HostIsSlave {
        /// Address of the pool master.
        master: String,
    },
    /// A successful reply of the wrong type.
    #[error("unexpected XAPI reply: {0}")]
    Unexpected(String),
}

/// Plain TCP (tests) or TLS (real XAPI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP; only for the in-process test XAPI.
    Plain,
    /// HTTPS accepting XAPI's self-signed certificate, optionally pinned by SHA-256 fingerprint.
    Tls {
        /// Expected SHA-256 of the server certificate (DER).
        pin: Option<[u8; 32]>,
    },
}

/// Where XAPI listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (443 for real XAPI).
    pub port: u16,
    /// Transport.
    pub transport: Transport,
}

/// An XAPI session reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session(pub String);

/// One event from `event.from`.
#[derive(Debug, Clone, PartialEq)]
pub struct XapiEvent {
    /// Event id.
    pub id: String,
    /// Object class, e.g. `pool`.
    pub class: String,
    /// `add`, `mod` or `del`.
    pub operation: String,
    /// Object reference.
    pub reference: String,
    /// Object record, if sent.
    pub snapshot: Option<Value>,
}

/// The result of `event.from`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Events since the token.
    pub events: Vec<XapiEvent>,
    /// Token for the next call.
    pub token: String,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// XML-RPC client for one XAPI endpoint. Each call uses its own connection, so a hung call never
/// blocks another.
#[derive(Debug, Clone)]
pub struct XapiClient {
    endpoint: Endpoint,
    timeout: Duration,
}

fn unexpected(what: &str, v: &Value) -> XapiError {
    XapiError::Unexpected(format!("{what}: {v:?}"))
}

fn string(v: Value, what: &str) -> Result<String, XapiError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(unexpected(what, &other)),
    }
}

impl XapiClient {
    /// A client whose calls time out after `timeout` (event.from adds its own poll time).
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        XapiClient { endpoint, timeout }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The same client (port, transport, timeout) aimed at another host: the pool master named
    /// by `HOST_IS_SLAVE`, since pool-wide calls must go there.
    pub fn at_host(&self, host: &str) -> XapiClient {
        let mut endpoint = self.endpoint.clone();
        endpoint.host = host.to_string();
        XapiClient {
            endpoint,
            timeout: self.timeout,
        }
    }

    async fn connect(&self) -> Result<Box<dyn Io>, XapiError> {
        let ep = &self.endpoint;
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        tcp.set_nodelay(true)?;
        match &ep.transport {
            Transport::Plain => Ok(Box::new(tcp)),
            Transport::Tls { pin } => {
                let cfg =
                    crate::tls::pinned_config(*pin).map_err(|e| XapiError::Tls(e.to_string()))?;
                let name =
                    crate::tls::server_name(&ep.host).map_err(|e| XapiError::Tls(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| XapiError::Tls(e.to_string()))?;
                Ok(Box::new(tls))
            }
        }
    }

    async fn post(&self, body: String) -> Result<String, XapiError> {
        let conn = self.connect().await?;
        let host = if self.endpoint.host.contains(':') {
            format!("[{}]", self.endpoint.host)
        } else {
            self.endpoint.host.clone()
        };
        let reply = exchange(conn, &host, body).await?;
        if reply.status != StatusCode::OK {
            return Err(XapiError::Http(reply.start));
        }
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }

    /// Calls a method with a timeout and unwraps XAPI's result envelope.
    pub async fn call(&self, method: &str, params: Vec<Value>) -> Result<Value, XapiError> {
        self.call_with_timeout(method, params, self.timeout).await
    }

    async fn call_with_timeout(
        &self,
        method: &str,
        params: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, XapiError> {
        let body = xmlrpc::encode_call(method, &params);
        debug!(method, "XAPI call");
        let reply = tokio::time::timeout(timeout, self.post(body))
            .await
            .map_err(|_| XapiError::Timeout(method.to_string()))??;
        unwrap_envelope(xmlrpc::parse_response(&reply)?)
    }

    /// `session.login_with_password`; on a slave this fails with [`XapiError::HostIsSlave`].
    pub async fn login(&self, user: &str, password: &str) -> Result<Session, XapiError> {
        let v = self
            .call(
                "session.login_with_password",
                vec![user.into(), password.into(), "1.0".into(), "twinsan".into()],
            )
            .await?;
        Ok(Session(string(v, "session ref")?))
    }

    /// `session.slave_local_login_with_password`: talks only to this host (emergency mode).
    pub async fn slave_local_login(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Session, XapiError> {
        let v = self
            .call(
                "session.slave_local_login_with_password",
                vec![user.into(), password.into()],
            )
            .await?;
        Ok(Session(string(v, "session ref")?))
    }

    /// `session.logout`.
    pub async fn logout(&self, s: &Session) -> Result<(), XapiError> {
        self.call("session.logout", vec![s.0.as_str().into()])
            .await
            .map(|_| ())
    }

    /// `pool.get_all`.
    pub async fn pool_get_all(&self, s: &Session) -> Result<Vec<String>, XapiError> {
        let v = self.call("pool.get_all", vec![s.0.as_str().into()]).await?;
        match v {
            Value::Array(items) => items.into_iter().map(|i| string(i, "pool ref")).collect(),
            other => Err(unexpected("pool.get_all", &other)),
        }
    }

    /// `pool.get_master` -> host ref.
    pub async fn pool_get_master(&self, s: &Session, pool: &str) -> Result<String, XapiError> {
        let v = self
            .call("pool.get_master", vec![s.0.as_str().into(), pool.into()])
            .await?;
        string(v, "host ref")
    }

    /// `host.get_uuid`.
    pub async fn host_get_uuid(&self, s: &Session, host: &str) -> Result<String, XapiError> {
        string(
            self.call("host.get_uuid", vec![s.0.as_str().into(), host.into()])
                .await?,
            "uuid",
        )
    }

    /// `host.get_address`.
    pub async fn host_get_address(&self, s: &Session, host: &str) -> Result<String, XapiError> {
        let v = self
            .call("host.get_address", vec![s.0.as_str().into(), host.into()])
            .await?;
        string(v, "address")
    }

    /// `host.get_by_uuid` -> host ref.
    pub async fn host_get_by_uuid(&self, s: &Session, uuid: &str) -> Result<String, XapiError> {
        let v = self
            .call("host.get_by_uuid", vec![s.0.as_str().into(), uuid.into()])
            .await?;
        string(v, "host ref")
    }

    /// `event.from(classes, token, timeout)`: long-polls up to `timeout` seconds; the call's own
    /// deadline is that plus the client timeout.
    pub async fn event_from(
        &self,
        s: &Session,
        classes: &[&str],
        token: &str,
        timeout: f64,
    ) -> Result<EventBatch, XapiError> {
        let deadline = self.timeout + Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
        let v = self
            .call_with_timeout(
                "event.from",
                vec![
                    s.0.as_str().into(),
                    Value::strings(classes.iter().copied()),
                    token.into(),
                    Value::Double(timeout),
                ],
                deadline,
            )
            .await?;
        parse_event_batch(&v)
    }

    /// `SR.get_all_records`: a struct from SR ref to SR record.
    pub async fn sr_get_all_records(&self, s: &Session) -> Result<Value, XapiError> {
        self.call("SR.get_all_records", vec![s.0.as_str().into()])
            .await
    }

    /// `PBD.get_all_records`: a struct from PBD ref to PBD record.
    pub async fn pbd_get_all_records(&self, s: &Session) -> Result<Value, XapiError> {
        self.call("PBD.get_all_records", vec![s.0.as_str().into()])
            .await
    }

    /// `PBD.plug`. Attaching an SR logs in to the target and scans it, which can take far longer
    /// than an ordinary call: the caller passes the deadline.
    pub async fn pbd_plug(
        &self,
        s: &Session,
        pbd: &str,
        timeout: Duration,
    ) -> Result<(), XapiError> {
        self.call_with_timeout("PBD.plug", vec![s.0.as_str().into(), pbd.into()], timeout)
            .await
            .map(|_| ())
    }

    /// `message.create(name, priority, cls, obj_uuid, body)`: a XenCenter alert.
    pub async fn message_create(
        &self,
        s: &Session,
        name: &str,
        priority: i64,
        cls: &str,
        obj_uuid: &str,
        body: &str,
    ) -> Result<String, XapiError> {
        let v = self
            .call(
                "message.create",
                vec![
                    s.0.as_str().into(),
                    name.into(),
                    Value::Int(priority),
                    cls.into(),
                    obj_uuid.into(),
                    body.into(),
                ],
            )
            .await?;
        string(v, "message ref")
    }
}

/// One HTTP reply as the XAPI client needs it.
#[derive(Debug)]
struct HttpReply {
    /// Status line as sent, e.g. `HTTP/1.1 200 OK` (used in [`XapiError::Http`]).
    start: String,
    status: StatusCode,
    /// Only the framing test looks at headers; the client needs status and body.
    #[cfg(test)]
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl HttpReply {
    #[cfg(test)]
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn hyper_error(e: hyper::Error) -> XapiError {
    // A failing socket stays an I/O error, as it was with the hand-written client; everything
    // else hyper reports (bad status line, bad chunk, early EOF) is broken HTTP framing.
    let io = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|io| std::io::Error::new(io.kind(), io.to_string()));
    match io {
        Some(io) => XapiError::Io(io),
        None => XapiError::Protocol(XmlRpcError::Http(e.to_string())),
    }
}

/// One `POST /` with a `text/xml` body over `io`, read back in full. HTTP/1.1 (RFC 9112) framing
/// is hyper's: Content-Length, chunked or close-delimited bodies. `Connection: close`, because
/// every call has its own connection (a hung call must never block another). The body is
/// bounded by [`xmlrpc::MAX_BODY`] so a confused peer cannot exhaust memory.
async fn exchange<S>(io: S, host: &str, body: String) -> Result<HttpReply, XapiError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(hyper_error)?;
    let req = hyper::Request::post("/")
        .header(header::HOST, host)
        .header(header::USER_AGENT, "twinsan")
        .header(header::CONTENT_TYPE, "text/xml")
        .header(header::CONNECTION, "close")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| XapiError::Protocol(XmlRpcError::Http(e.to_string())))?;
    let call = async move {
        let resp = sender.send_request(req).await.map_err(hyper_error)?;
        let (parts, incoming) = resp.into_parts();
        let too_large = || XapiError::Protocol(XmlRpcError::Http("body too large".into()));
        if incoming.size_hint().lower() > xmlrpc::MAX_BODY as u64 {
            return Err(too_large());
        }
        let body = Limited::new(incoming, xmlrpc::MAX_BODY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => hyper_error(*e),
                Err(_) => too_large(),
            })?
            .to_bytes();
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| parts.status.canonical_reason().map(str::to_string))
            .unwrap_or_default();
        Ok(HttpReply {
            start: format!("{:?} {} {reason}", parts.version, parts.status.as_u16())
                .trim_end()
                .to_string(),
            status: parts.status,
            #[cfg(test)]
            headers: parts.headers,
            body,
        })
    };
    // The connection future drives the socket; both run here, not in a spawned task, so the
    // call's timeout drops the socket too. With `Connection: close` hyper ends the connection
    // itself once the reply is read, without waiting for the peer to close (tested below). Its
    // own result only matters when the call failed, and then the call's error says it.
    let (reply, _conn) = tokio::join!(call, conn);
    reply
}

/// Unwraps `{Status: "Success", Value}` / `{Status: "Failure", ErrorDescription}`.
pub fn unwrap_envelope(r: Response) -> Result<Value, XapiError> {
    let v = match r {
        Response::Fault(code, text) => return Err(XapiError::Fault(code, text)),
        Response::Value(v) => v,
    };
    match v.get("Status").and_then(Value::as_str) {
        Some("Success") => Ok(v.get("Value").cloned().unwrap_or(Value::Nil)),
        Some("Failure") => {
            let desc: Vec<String> = v
                .get("ErrorDescription")
                .and_then(Value::as_array)
                .unwrap_or(&[])
                .iter()
                .map(|d| match d {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect();
            let code = desc.first().cloned().unwrap_or_default();
            let params = desc.into_iter().skip(1).collect::<Vec<_>>();
            if code == "HOST_IS_SLAVE" {
                return Err(XapiError::HostIsSlave {
                    master: params.first().cloned().unwrap_or_default(),
                });
            }
            Err(XapiError::Failure { code, params })
        }
        _ => Err(unexpected("result envelope", &v)),
    }
}

fn parse_event_batch(v: &Value) -> Result<EventBatch, XapiError> {
    let token = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| unexpected("event.from token", v))?
        .to_string();
    let mut events = Vec::new();
    for e in v.get("events").and_then(Value::as_array).unwrap_or(&[]) {
        let field = |k: &str| match e.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Int(i)) => i.to_string(),
            _ => String::new(),
        };
        events.push(XapiEvent {
            id: field("id"),
            class: field("class"),
            operation: field("operation"),
            reference: field("ref"),
            snapshot: e.get("snapshot").cloned(),
        });
    }
    Ok(EventBatch { events, token })
}

/// Configuration of [`watch_master`].
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// User (usually root).
    pub user: String,
    /// Password.
    pub password: String,
    /// This host's uuid (`INSTALLATION_UUID` in /etc/xensource-inventory).
    pub host_uuid: String,
    /// `event.from` long-poll timeout, seconds.
    pub event_timeout: f64,
    /// Pause before retrying after an error.
    pub retry: Duration,
}

/// A confirmed role signal from XAPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterSignal {
    /// Master or slave.
    pub role: PoolRole,
    /// The master's address when known.
    pub master_address: Option<String>,
}

/// Reads `INSTALLATION_UUID` from an xensource-inventory text.
pub fn inventory_host_uuid(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("INSTALLATION_UUID=")?;
        Some(v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
    })
}

/// Holds a session and long-polls `event.from(["pool"])`, sending a [`MasterSignal`] whenever the
/// master (as XAPI reports it) differs from the last one sent. Runs until the receiver is dropped.
///
/// On a slave, the local login fails with `HOST_IS_SLAVE`: that is itself a signal, and the
/// watcher then follows the pool from the master's XAPI (same port and transport), so a master
/// change reaches the slave as a pool event too instead of waiting for the next login attempt.
/// Errors are logged and retried after `cfg.retry`.
pub async fn watch_master(client: XapiClient, cfg: WatchConfig, tx: mpsc::Sender<MasterSignal>) {
    let mut last: Option<MasterSignal> = None;
    while !tx.is_closed() {
        let (via, session) = match client.login(&cfg.user, &cfg.password).await {
            Ok(s) => (client.clone(), s),
            Err(XapiError::HostIsSlave { master }) => {
                let sig = MasterSignal {
                    role: PoolRole::Slave,
                    master_address: Some(master.clone()),
                };
                if last.as_ref() != Some(&sig) {
                    info!(?sig, "XAPI: this host is a pool slave");
                    last = Some(sig.clone());
                    if tx.send(sig).await.is_err() {
                        return;
                    }
                }
                let mut ep = client.endpoint.clone();
                ep.host = master;
                let remote = XapiClient::new(ep, client.timeout);
                match remote.login(&cfg.user, &cfg.password).await {
                    Ok(s) => (remote, s),
                    Err(e) => {
                        warn!(error = %e, "login at the pool master failed");
                        tokio::time::sleep(cfg.retry).await;
                        continue;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "XAPI login failed; relying on pool.conf meanwhile");
                tokio::time::sleep(cfg.retry).await;
                continue;
            }
        };
        if let Err(e) = follow(&via, &cfg, &session, &tx, &mut last).await {
            warn!(error = %e, "XAPI session lost; logging in again");
        }
        let _ = via.logout(&session).await;
        if !tx.is_closed() {
            tokio::time::sleep(cfg.retry).await;
        }
    }
}

async fn follow(
    client: &XapiClient,
    cfg: &WatchConfig,
    s: &Session,
    tx: &mpsc::Sender<MasterSignal>,
    last: &mut Option<MasterSignal>,
) -> Result<(), XapiError> {
    let me = client.host_get_by_uuid(s, &cfg.host_uuid).await?;
    let mut token = String::new();
    loop {
        let pool = client
            .pool_get_all(s)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| XapiError::Unexpected("no pool".into()))?;
        let master = client.pool_get_master(s, &pool).await?;
        let sig = if master == me {
            MasterSignal {
                role: PoolRole::Master,
                master_address: None,
            }
        } else {
            let addr = client.host_get_address(s, &master).await.ok();
            MasterSignal {
                role: PoolRole::Slave,
                master_address: addr,
            }
        };
        if last.as_ref() != Some(&sig) {
            info!(?sig, "XAPI: pool master");
            *last = Some(sig.clone());
            if tx.send(sig).await.is_err() {
                return Ok(());
            }
        }
        let batch = tokio::select! {
            b = client.event_from(s, &["pool"], &token, cfg.event_timeout) => b?,
            _ = tx.closed() => return Ok(()),
        };
        debug!(n = batch.events.len(), "XAPI pool events");
        token = batch.token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope() {
        let ok = Value::structure([("Status", "Success".into()), ("Value", "x".into())]);
        assert_eq!(
            unwrap_envelope(Response::Value(ok)).unwrap(),
            Value::from("x")
        );
        let slave = Value::structure([
            ("Status", "Failure".into()),
            (
                "ErrorDescription",
                Value::strings(["HOST_IS_SLAVE", "fe80::1"]),
            ),
        ]);
        match unwrap_envelope(Response::Value(slave)) {
            Err(XapiError::HostIsSlave { master }) => assert_eq!(master, "fe80::1"),
            other => panic!("{other:?}"),
        }
        let fail = Value::structure([
            ("Status", "Failure".into()),
            (
                "ErrorDescription",
                Value::strings(["SESSION_INVALID", "OpaqueRef:x"]),
            ),
        ]);
        match unwrap_envelope(Response::Value(fail)) {
            Err(XapiError::Failure { code, params }) => {
                assert_eq!(code, "SESSION_INVALID");
                assert_eq!(params, vec!["OpaqueRef:x".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        let empty = Value::structure([("Status", "Failure".into())]);
        assert!(matches!(
            unwrap_envelope(Response::Value(empty)),
            Err(XapiError::Failure { .. })
        ));
        assert!(matches!(
            unwrap_envelope(Response::Value(Value::from("junk"))),
            Err(XapiError::Unexpected(_))
        ));
        assert!(matches!(
            unwrap_envelope(Response::Fault(1, "f".into())),
            Err(XapiError::Fault(1, _))
        ));
    }

    #[test]
    fn event_batch() {
        let v = Value::structure([
            ("token", "42,1".into()),
            ("valid_ref_counts", Value::structure::<_, String>([])),
            (
                "events",
                Value::Array(vec![Value::structure([
                    ("id", Value::from("7")),
                    ("class", "pool".into()),
                    ("operation", "mod".into()),
                    ("ref", "OpaqueRef:p".into()),
                ])]),
            ),
        ]);
        let b = parse_event_batch(&v).unwrap();
        assert_eq!(b.token, "42,1");
        assert_eq!(b.events[0].operation, "mod");
        assert_eq!(b.events[0].reference, "OpaqueRef:p");
        assert!(parse_event_batch(&Value::Nil).is_err());
    }

    /// Feeds `raw` as the server's whole answer to one [`exchange`] (moved from the hand-written
    /// parser's `http_framing` test in xmlrpc.rs: same inputs, same assertions).
    async fn reply_to(raw: &'static [u8]) -> Result<HttpReply, XapiError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let peer = tokio::spawn(async move {
            server.write_all(raw).await.unwrap();
            // End of our reply (close-delimited bodies end here); keep reading the request.
            server.shutdown().await.unwrap();
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink).await;
        });
        let r = exchange(client, "xapi", "<x/>".into()).await;
        peer.abort();
        r
    }

    #[tokio::test]
    async fn http_framing() {
        let m = reply_to(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\nabcEXTRA")
            .await
            .unwrap();
        assert_eq!(m.start, "HTTP/1.1 200 OK");
        assert_eq!(m.header("x"), Some("y"));
        assert_eq!(m.body, &b"abc"[..]);

        let m = reply_to(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext\r\nde\r\n0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(m.body, &b"abcde"[..]);

        let m = reply_to(b"HTTP/1.1 200 OK\r\n\r\nto the end")
            .await
            .unwrap();
        assert_eq!(m.body, &b"to the end"[..]);

        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(reply_to(bad).await.is_err(), "accepted {bad:?}");
        }
    }

    /// The reply comes back while the server still holds the connection open: the client does
    /// not wait for the peer's close (a real XAPI may linger).
    #[tokio::test]
    async fn reply_does_not_wait_for_the_peer_to_close() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let peer = tokio::spawn(async move {
            let mut req = [0u8; 4096];
            let _ = server.read(&mut req).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let m = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(client, "xapi", "<x/>".into()),
        )
        .await
        .expect("the client waited for the server to close")
        .unwrap();
        peer.abort();
        assert_eq!(m.body, &b"ok"[..]);
    }

    /// A non-200 status is an HTTP error carrying the status line, as before.
    #[tokio::test]
    async fn non_200_is_an_http_error_with_the_status_line() {
        let m = reply_to(b"HTTP/1.1 503 Busy Now\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(m.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(m.start, "HTTP/1.1 503 Busy Now");
    }

    #[test]
    fn inventory() {
        let t = "BUILD_NUMBER='x'\nINSTALLATION_UUID='8c4e-11'\nOTHER=1\n";
        assert_eq!(inventory_host_uuid(t), Some("8c4e-11".into()));
        assert_eq!(inventory_host_uuid("garbage"), None);
    }
}
