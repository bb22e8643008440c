//! A small in-process XAPI for tests: two hosts of one pool, each with its own XML-RPC server on
//! loopback (host 0 on 127.0.0.1, host 1 on 127.0.0.2, same port), speaking XAPI's wire format.
//!
//! The test flips the pool master with [`TestXapi::set_master`]; `event.from` long-polls and
//! returns a pool `mod` event when that happens; `session.login_with_password` on the slave's
//! server fails with `HOST_IS_SLAVE [master address]`; `message.create` records messages for
//! assertions. [`TestXapi::set_hang`] makes a host's server accept calls and never answer, as a
//! slave's xapi does when the master is dead.
//!
//! Tests add SRs and PBDs ([`TestXapi::add_sr`], [`TestXapi::add_pbd`]); `SR.get_all_records` and
//! `PBD.get_all_records` list them, `PBD.plug` records the call and attaches the PBD, or fails
//! with a chosen error code as often as [`TestXapi::fail_plugs`] says.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::xapi::{Endpoint, Transport};
use crate::xmlrpc::{self, Value};

/// Accepted user name.
pub const USER: &str = "root";
/// Accepted password.
pub const PASSWORD: &str = "secret";
const POOL_REF: &str = "OpaqueRef:pool-0";

/// A message recorded from `message.create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMessage {
    /// Message name.
    pub name: String,
    /// Priority (1 = most severe).
    pub priority: i64,
    /// Object class.
    pub cls: String,
    /// Object uuid.
    pub obj_uuid: String,
    /// Body.
    pub body: String,
}

#[derive(Debug, Clone)]
struct TestSr {
    uuid: String,
    name_label: String,
    sr_type: String,
}

#[derive(Debug, Clone)]
struct TestPbd {
    uuid: String,
    sr: String,
    host: usize,
    device_config: Vec<(String, String)>,
    attached: bool,
    /// Plugs still to fail, and with which error code.
    failures: u32,
    failure_code: String,
}

#[derive(Debug)]
struct State {
    master: usize,
    /// Event counter: bumped on every pool change.
    generation: u64,
    sessions: HashSet<String>,
    next_session: u64,
    messages: Vec<RecordedMessage>,
    hang: [bool; 2],
    calls: Vec<(usize, String)>,
    srs: BTreeMap<String, TestSr>,
    pbds: BTreeMap<String, TestPbd>,
    /// PBD refs `PBD.plug` was called on, in order, whatever the outcome.
    plugs: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    addrs: [IpAddr; 2],
}

/// The running test XAPI. Dropping it stops the servers.
pub struct TestXapi {
    shared: Arc<Shared>,
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

fn host_ref(i: usize) -> String {
    format!("OpaqueRef:host-{i}")
}

/// uuid of test host `i`.
pub fn host_uuid(i: usize) -> String {
    format!("00000000-0000-0000-0000-00000000000{i}")
}

fn ok(v: Value) -> Value {
    Value::structure([("Status", Value::from("Success")), ("Value", v)])
}

fn fail<I: IntoIterator<Item = String>>(desc: I) -> Value {
    Value::structure([
        ("Status", Value::from("Failure")),
        ("ErrorDescription", Value::strings(desc)),
    ])
}

impl TestXapi {
    /// Starts both servers on loopback (host 0 on 127.0.0.1, host 1 on 127.0.0.2); host 0 is
    /// master.
    pub async fn start() -> std::io::Result<TestXapi> {
        Self::start_on([
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        ])
        .await
    }

    /// Starts host 0's server on `addrs[0]` and host 1's on `addrs[1]`, same port; host 0 is
    /// master. The listeners live in the network namespace of the calling thread, so a test can
    /// serve hosts in other namespaces from a thread that entered a shared one.
    pub async fn start_on(addrs: [IpAddr; 2]) -> std::io::Result<TestXapi> {
        let [a0, a1] = addrs;
        // Find a port free on both loopback addresses.
        let mut tries = 0;
        let (l0, l1) = loop {
            let l0 = TcpListener::bind(SocketAddr::new(a0, 0)).await?;
            let port = l0.local_addr()?.port();
            match TcpListener::bind(SocketAddr::new(a1, port)).await {
                Ok(l1) => break (l0, l1),
                Err(e) if tries >= 20 => return Err(e),
                Err(_) => tries += 1,
            }
        };
        let port = l0.local_addr()?.port();
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                master: 0,
                generation: 1,
                sessions: HashSet::new(),
                next_session: 1,
                messages: Vec::new(),
                hang: [false; 2],
                calls: Vec::new(),
                srs: BTreeMap::new(),
                pbds: BTreeMap::new(),
                plugs: Vec::new(),
            }),
            changed,
            addrs: [a0, a1],
        });
        let tasks = vec![
            tokio::spawn(serve(shared.clone(), 0, l0)),
            tokio::spawn(serve(shared.clone(), 1, l1)),
        ];
        Ok(TestXapi {
            shared,
            port,
            tasks,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Endpoint of host `i`'s XAPI (plain HTTP).
    pub fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint {
            host: self.shared.addrs[i].to_string(),
            port: self.port,
            transport: Transport::Plain,
        }
    }

    /// Management address of host `i`.
    pub fn address(&self, i: usize) -> String {
        self.shared.addrs[i].to_string()
    }

    /// Makes host `i` the pool master and wakes pending `event.from` calls.
    pub fn set_master(&self, i: usize) {
        let gen = {
            let mut s = self.lock();
            if s.master == i {
                return;
            }
            s.master = i;
            s.generation += 1;
            s.generation
        };
        self.shared.changed.send_replace(gen);
    }

    /// Current master.
    pub fn master(&self) -> usize {
        self.lock().master
    }

    /// Host `i`'s server stops answering (calls hang) or answers again.
    pub fn set_hang(&self, i: usize, hang: bool) {
        self.lock().hang[i] = hang;
    }

    /// Messages recorded so far.
    pub fn messages(&self) -> Vec<RecordedMessage> {
        self.lock().messages.clone()
    }

    /// Methods called so far, with the host index that served them.
    pub fn calls(&self) -> Vec<(usize, String)> {
        self.lock().calls.clone()
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Adds an SR of type `sr_type` (e.g. `lvmoiscsi`); returns its ref.
    pub fn add_sr(&self, name_label: &str, sr_type: &str) -> String {
        let mut s = self.lock();
        let n = s.srs.len() + 1;
        let r = format!("OpaqueRef:sr-{n}");
        s.srs.insert(
            r.clone(),
            TestSr {
                uuid: format!("5a000000-0000-0000-0000-{n:012}"),
                name_label: name_label.to_string(),
                sr_type: sr_type.to_string(),
            },
        );
        r
    }

    /// Adds a PBD connecting SR `sr` (a ref from [`TestXapi::add_sr`]) to host `host`; returns
    /// its ref.
    pub fn add_pbd(
        &self,
        sr: &str,
        host: usize,
        device_config: &[(&str, &str)],
        attached: bool,
    ) -> String {
        let mut s = self.lock();
        let n = s.pbds.len() + 1;
        let r = format!("OpaqueRef:pbd-{n}");
        s.pbds.insert(
            r.clone(),
            TestPbd {
                uuid: format!("9b000000-0000-0000-0000-{n:012}"),
                sr: sr.to_string(),
                host,
                device_config: device_config
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                attached,
                failures: 0,
                failure_code: String::new(),
            },
        );
        r
    }

    /// uuid of an SR or PBD by ref.
    pub fn uuid_of(&self, r: &str) -> Option<String> {
        let s = self.lock();
        s.srs
            .get(r)
            .map(|x| x.uuid.clone())
            .or_else(|| s.pbds.get(r).map(|p| p.uuid.clone()))
    }

    /// `currently_attached` of a PBD.
    pub fn pbd_attached(&self, pbd: &str) -> Option<bool> {
        self.lock().pbds.get(pbd).map(|p| p.attached)
    }

    /// Sets `currently_attached` of a PBD.
    pub fn set_pbd_attached(&self, pbd: &str, attached: bool) {
        if let Some(p) = self.lock().pbds.get_mut(pbd) {
            p.attached = attached;
        }
    }

    /// The next `times` calls of `PBD.plug` on `pbd` fail with XAPI error `code`.
    pub fn fail_plugs(&self, pbd: &str, times: u32, code: &str) {
        if let Some(p) = self.lock().pbds.get_mut(pbd) {
            p.failures = times;
            p.failure_code = code.to_string();
        }
    }

    /// PBD refs `PBD.plug` was called on, in order, whatever the outcome.
    pub fn plug_calls(&self) -> Vec<String> {
        self.lock().plugs.clone()
    }
}

impl Drop for TestXapi {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve(shared: Arc<Shared>, host: usize, listener: TcpListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // Bounded: no test connection lives longer than this.
            let _ =
                tokio::time::timeout(Duration::from_secs(120), handle(shared, host, conn)).await;
        });
    }
}

async fn handle(shared: Arc<Shared>, host: usize, conn: TcpStream) {
    // One call per connection, as the client sends `Connection: close`; hyper does the HTTP/1.1
    // framing on this side too.
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let shared = shared.clone();
        async move { answer(&shared, host, req).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(conn), service)
        .await;
}

/// The reply to one XML-RPC request; an error (unreadable request) drops the connection
/// without an answer.
async fn answer(
    shared: &Shared,
    host: usize,
    req: hyper::Request<Incoming>,
) -> std::io::Result<hyper::Response<Full<Bytes>>> {
    let req_body = Limited::new(req.into_body(), xmlrpc::MAX_BODY)
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    let hang = shared.state.lock().map(|s| s.hang[host]).unwrap_or(false);
    if hang {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return Err(std::io::Error::other("hung host"));
    }
    let body = match xmlrpc::parse_call(&String::from_utf8_lossy(&req_body)) {
        Ok((method, params)) => {
            if let Ok(mut s) = shared.state.lock() {
                s.calls.push((host, method.clone()));
            }
            xmlrpc::encode_response(&dispatch(shared, host, &method, &params).await)
        }
        Err(e) => xmlrpc::encode_fault(-1, &e.to_string()),
    };
    hyper::Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/xml")
        .header(hyper::header::CONNECTION, "close")
        .body(Full::new(Bytes::from(body)))
        .map_err(std::io::Error::other)
}

fn arg(params: &[Value], i: usize) -> String {
    match params.get(i) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Int(n)) => n.to_string(),
        _ => String::new(),
    }
}

async fn dispatch(shared: &Shared, host: usize, method: &str, params: &[Value]) -> Value {
    let lock = || shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let addr = |i: usize| shared.addrs[i].to_string();
    match method {
        "session.login_with_password" | "session.slave_local_login_with_password" => {
            if arg(params, 0) != USER || arg(params, 1) != PASSWORD {
                return fail([
                    "SESSION_AUTHENTICATION_FAILED".to_string(),
                    arg(params, 0),
                    "Authentication failure".into(),
                ]);
            }
            let mut s = lock();
            if method == "session.login_with_password" && s.master != host {
                return fail(["HOST_IS_SLAVE".to_string(), addr(s.master)]);
            }
            let r = format!("OpaqueRef:session-{}", s.next_session);
            s.next_session += 1;
            s.sessions.insert(r.clone());
            return ok(Value::String(r));
        }
        _ => {}
    }
    let session = arg(params, 0);
    if !lock().sessions.contains(&session) {
        return fail(["SESSION_INVALID".to_string(), session]);
    }
    match method {
        "session.logout" => {
            lock().sessions.remove(&session);
            ok(Value::String(String::new()))
        }
        "pool.get_all" => ok(Value::strings([POOL_REF])),
        "pool.get_master" => {
            if arg(params, 1) != POOL_REF {
                return fail(["HANDLE_INVALID".to_string(), "pool".into(), arg(params, 1)]);
            }
            ok(Value::String(host_ref(lock().master)))
        }
        "host.get_uuid" | "host.get_address" => {
            let r = arg(params, 1);
            let Some(i) = (0..2).find(|i| host_ref(*i) == r) else {
                return fail(["HANDLE_INVALID".to_string(), "host".into(), r]);
            };
            if method == "host.get_uuid" {
                ok(Value::String(host_uuid(i)))
            } else {
                ok(Value::String(addr(i)))
            }
        }
        "host.get_by_uuid" => {
            let u = arg(params, 1);
            match (0..2).find(|i| host_uuid(*i) == u) {
                Some(i) => ok(Value::String(host_ref(i))),
                None => fail(["UUID_INVALID".to_string(), "host".into(), u]),
            }
        }
        "event.from" => event_from(shared, params).await,
        "SR.get_all_records" => {
            let s = lock();
            ok(Value::Struct(
                s.srs
                    .iter()
                    .map(|(r, sr)| {
                        let pbds = s
                            .pbds
                            .iter()
                            .filter(|(_, p)| p.sr == *r)
                            .map(|(pr, _)| pr.clone());
                        let rec = Value::structure([
                            ("uuid", Value::from(sr.uuid.as_str())),
                            ("name_label", Value::from(sr.name_label.as_str())),
                            ("name_description", Value::from("")),
                            ("type", Value::from(sr.sr_type.as_str())),
                            ("content_type", Value::from("")),
                            ("shared", Value::Bool(true)),
                            ("PBDs", Value::strings(pbds)),
                            ("other_config", Value::structure::<_, String>([])),
                        ]);
                        (r.clone(), rec)
                    })
                    .collect(),
            ))
        }
        "PBD.get_all_records" => {
            let s = lock();
            ok(Value::Struct(
                s.pbds
                    .iter()
                    .map(|(r, p)| {
                        let rec = Value::structure([
                            ("uuid", Value::from(p.uuid.as_str())),
                            ("host", Value::String(host_ref(p.host))),
                            ("SR", Value::from(p.sr.as_str())),
                            (
                                "device_config",
                                Value::structure(
                                    p.device_config
                                        .iter()
                                        .map(|(k, v)| (k.clone(), Value::from(v.as_str()))),
                                ),
                            ),
                            ("currently_attached", Value::Bool(p.attached)),
                            ("other_config", Value::structure::<_, String>([])),
                        ]);
                        (r.clone(), rec)
                    })
                    .collect(),
            ))
        }
        "PBD.plug" => {
            let r = arg(params, 1);
            let mut s = lock();
            s.plugs.push(r.clone());
            let Some(p) = s.pbds.get_mut(&r) else {
                return fail(["HANDLE_INVALID".to_string(), "PBD".into(), r]);
            };
            if p.failures > 0 {
                p.failures -= 1;
                let host = host_ref(p.host);
                return fail([p.failure_code.clone(), host]);
            }
            p.attached = true;
            ok(Value::String(String::new()))
        }
        "message.create" => {
            let priority = params.get(2).and_then(Value::as_i64).unwrap_or(-1);
            let m = RecordedMessage {
                name: arg(params, 1),
                priority,
                cls: arg(params, 3),
                obj_uuid: arg(params, 4),
                body: arg(params, 5),
            };
            let mut s = lock();
            s.messages.push(m);
            ok(Value::String(format!(
                "OpaqueRef:message-{}",
                s.messages.len()
            )))
        }
        _ => fail(["MESSAGE_METHOD_UNKNOWN".to_string(), method.to_string()]),
    }
}

async fn event_from(shared: &Shared, params: &[Value]) -> Value {
    let classes: Vec<String> = params
        .get(1)
        .and_then(Value::as_array)
        .unwrap_or(&[])
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let token = arg(params, 2);
    let timeout = match params.get(3) {
        Some(Value::Double(d)) => *d,
        Some(v) => v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0.0),
        None => 0.0,
    };
    let wants_pool = classes.iter().any(|c| c == "pool" || c == "*");
    let since: u64 = if token.is_empty() {
        0
    } else {
        match token.parse() {
            Ok(t) => t,
            Err(_) => return fail(["EVENT_FROM_TOKEN_PARSE_FAILURE".to_string(), token]),
        }
    };
    let mut rx = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
    loop {
        let (gen, master) = {
            let s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            (s.generation, s.master)
        };
        if gen > since || tokio::time::Instant::now() >= deadline {
            let mut events = Vec::new();
            if gen > since && wants_pool {
                let op = if since == 0 { "add" } else { "mod" };
                events.push(Value::structure([
                    ("id", Value::String(gen.to_string())),
                    ("timestamp", Value::from("20250101T00:00:00Z")),
                    ("class", Value::from("pool")),
                    ("operation", Value::from(op)),
                    ("ref", Value::from(POOL_REF)),
                    (
                        "snapshot",
                        Value::structure([("master", Value::String(host_ref(master)))]),
                    ),
                ]));
            }
            return ok(Value::structure([
                ("events", Value::Array(events)),
                ("valid_ref_counts", Value::structure::<_, String>([])),
                ("token", Value::String(gen.max(since).to_string())),
            ]));
        }
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::PoolRole;
    use crate::xapi::{watch_master, MasterSignal, WatchConfig, XapiClient, XapiError};
    use tokio::sync::mpsc;

    fn client(x: &TestXapi, i: usize) -> XapiClient {
        XapiClient::new(x.endpoint(i), Duration::from_secs(2))
    }

    #[tokio::test]
    async fn login_master_and_slave() {
        let x = TestXapi::start().await.unwrap();
        let c0 = client(&x, 0);
        let c1 = client(&x, 1);
        let s = c0.login(USER, PASSWORD).await.unwrap();
        match c1.login(USER, PASSWORD).await {
            Err(XapiError::HostIsSlave { master }) => assert_eq!(master, "127.0.0.1"),
            other => panic!("{other:?}"),
        }
        let local = c1.slave_local_login(USER, PASSWORD).await.unwrap();
        assert!(matches!(
            c0.login(USER, "wrong").await,
            Err(XapiError::Failure { code, .. }) if code == "SESSION_AUTHENTICATION_FAILED"
        ));
        let pools = c0.pool_get_all(&s).await.unwrap();
        assert_eq!(pools.len(), 1);
        let m = c0.pool_get_master(&s, &pools[0]).await.unwrap();
        assert_eq!(c0.host_get_uuid(&s, &m).await.unwrap(), host_uuid(0));
        assert_eq!(c0.host_get_address(&s, &m).await.unwrap(), "127.0.0.1");
        assert_eq!(
            c0.host_get_by_uuid(&s, &host_uuid(1)).await.unwrap(),
            host_ref(1)
        );
        assert!(matches!(
            c0.host_get_by_uuid(&s, "nope").await,
            Err(XapiError::Failure { code, .. }) if code == "UUID_INVALID"
        ));
        c1.logout(&local).await.unwrap();
        c0.logout(&s).await.unwrap();
        assert!(matches!(
            c0.pool_get_all(&s).await,
            Err(XapiError::Failure { code, .. }) if code == "SESSION_INVALID"
        ));
        assert_eq!(x.session_count(), 0);
    }

    #[tokio::test]
    async fn event_from_long_polls_until_master_changes() {
        let x = TestXapi::start().await.unwrap();
        let c = client(&x, 0);
        let s = c.login(USER, PASSWORD).await.unwrap();
        let first = c.event_from(&s, &["pool"], "", 5.0).await.unwrap();
        assert_eq!(first.events.len(), 1);
        assert_eq!(first.events[0].operation, "add");
        // Nothing happens: returns empty after the poll timeout.
        let t0 = std::time::Instant::now();
        let idle = c
            .event_from(&s, &["pool"], &first.token, 0.3)
            .await
            .unwrap();
        assert!(idle.events.is_empty());
        assert!(t0.elapsed() >= Duration::from_millis(250));
        // A master flip wakes a pending long poll promptly.
        let token = idle.token.clone();
        let c2 = c.clone();
        let s2 = s.clone();
        let pending =
            tokio::spawn(async move { c2.event_from(&s2, &["pool"], &token, 10.0).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = std::time::Instant::now();
        x.set_master(1);
        let b = pending.await.unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].class, "pool");
        assert_eq!(b.events[0].operation, "mod");
        assert!(matches!(
            c.event_from(&s, &["pool"], "garbage", 0.0).await,
            Err(XapiError::Failure { .. })
        ));
    }

    #[tokio::test]
    async fn message_create_is_recorded() {
        let x = TestXapi::start().await.unwrap();
        let c = client(&x, 0);
        let s = c.login(USER, PASSWORD).await.unwrap();
        c.message_create(&s, "TWINSAN_X", 2, "Host", &host_uuid(0), "body <&>")
            .await
            .unwrap();
        let m = x.messages();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].priority, 2);
        assert_eq!(m[0].body, "body <&>");
        assert_eq!(m[0].cls, "Host");
    }

    #[tokio::test]
    async fn calls_time_out_when_xapi_hangs() {
        let x = TestXapi::start().await.unwrap();
        x.set_hang(0, true);
        let c = XapiClient::new(x.endpoint(0), Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        assert!(matches!(
            c.login(USER, PASSWORD).await,
            Err(XapiError::Timeout(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(2));
        // Unknown method.
        x.set_hang(0, false);
        let s = c.login(USER, PASSWORD).await.unwrap();
        assert!(matches!(
            c.call("VM.start", vec![s.0.as_str().into()]).await,
            Err(XapiError::Failure { code, .. }) if code == "MESSAGE_METHOD_UNKNOWN"
        ));
    }

    /// A client of a loopback port nobody listens on.
    fn client_of_nothing() -> XapiClient {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        XapiClient::new(
            Endpoint {
                host: "127.0.0.1".into(),
                port,
                transport: Transport::Plain,
            },
            Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn nothing_listening_is_an_io_error() {
        let c = client_of_nothing();
        assert!(matches!(
            c.login(USER, PASSWORD).await,
            Err(XapiError::Io(_))
        ));
    }

    async fn recv(rx: &mut mpsc::Receiver<MasterSignal>) -> MasterSignal {
        tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn watchers_follow_master_flips_within_a_second() {
        let x = TestXapi::start().await.unwrap();
        let mut rxs = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..2 {
            let (tx, rx) = mpsc::channel(8);
            let cfg = WatchConfig {
                user: USER.into(),
                password: PASSWORD.into(),
                host_uuid: host_uuid(i),
                event_timeout: 5.0,
                retry: Duration::from_millis(100),
            };
            tasks.push(tokio::spawn(watch_master(client(&x, i), cfg, tx)));
            rxs.push(rx);
        }
        assert_eq!(recv(&mut rxs[0]).await.role, PoolRole::Master);
        let s1 = recv(&mut rxs[1]).await;
        assert_eq!(s1.role, PoolRole::Slave);
        assert_eq!(s1.master_address.as_deref(), Some("127.0.0.1"));

        let t0 = std::time::Instant::now();
        x.set_master(1);
        assert_eq!(recv(&mut rxs[1]).await.role, PoolRole::Master);
        let s0 = recv(&mut rxs[0]).await;
        assert_eq!(s0.role, PoolRole::Slave);
        assert_eq!(s0.master_address.as_deref(), Some("127.0.0.2"));
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t0.elapsed()
        );

        // Receivers dropped: watchers end by themselves.
        drop(rxs);
        x.set_master(0);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(3), t)
                .await
                .unwrap()
                .unwrap();
        }
    }

    mod replug {
        use super::*;
        use crate::replug::{run, Outcome, ReplugConfig};

        const OURS: &str = "iqn.2026-11.org.twinsan:sr";

        fn cfg(attempts: u32) -> ReplugConfig {
            ReplugConfig {
                user: USER.into(),
                password: PASSWORD.into(),
                our_iqns: vec![OURS.into()],
                attempts,
                first_backoff: Duration::from_millis(20),
                plug_timeout: Duration::from_secs(2),
            }
        }

        fn iscsi(iqn: &str) -> [(&str, &str); 3] {
            [
                ("target", "10.0.0.100"),
                ("port", "3260"),
                ("targetIQN", iqn),
            ]
        }

        #[tokio::test]
        async fn plugs_ours_on_every_host_retries_and_gives_up() {
            let x = TestXapi::start().await.unwrap();
            let ours = x.add_sr("twinsan", "lvmoiscsi");
            let p0 = x.add_pbd(&ours, 0, &iscsi("IQN.2026-11.org.twinsan:SR"), false);
            let p1 = x.add_pbd(&ours, 1, &iscsi(OURS), false);
            x.fail_plugs(&p1, 2, "SR_BACKEND_FAILURE_202");
            let other = x.add_sr("other", "lvmoiscsi");
            let o0 = x.add_pbd(&other, 0, &iscsi("iqn.2000-01.com.other:t"), false);
            let wild = x.add_sr("wildcard", "lvmoiscsi");
            let w0 = x.add_pbd(&wild, 0, &iscsi("*"), false);
            let broken = x.add_sr("broken", "lvmoiscsi");
            let b0 = x.add_pbd(&broken, 0, &iscsi(OURS), false);
            x.fail_plugs(&b0, 100, "SR_BACKEND_FAILURE_47");
            let attached = x.add_pbd(&broken, 1, &iscsi(OURS), true);

            let t0 = std::time::Instant::now();
            let out = run(client(&x, 0), cfg(3)).await;
            // Two pauses: 20 ms, then 40 ms.
            assert!(t0.elapsed() >= Duration::from_millis(60));
            let Outcome::GaveUp {
                attempts,
                plugged,
                failed,
                error,
            } = out
            else {
                panic!("{out:?}")
            };
            assert_eq!(attempts, 3);
            assert_eq!(error, None);
            let mut got: Vec<_> = plugged.iter().map(|r| r.target.pbd.clone()).collect();
            got.sort();
            assert_eq!(got, [p0.clone(), p1.clone()]);
            let r1 = plugged.iter().find(|r| r.target.pbd == p1).unwrap();
            assert_eq!(r1.host_uuid, host_uuid(1));
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0.target.pbd, b0);
            assert_eq!(failed[0].0.target.sr_name, "broken");
            assert_eq!(failed[0].0.host_uuid, host_uuid(0));
            assert!(
                failed[0].1.contains("SR_BACKEND_FAILURE_47"),
                "{}",
                failed[0].1
            );
            assert_eq!(x.pbd_attached(&p0), Some(true));
            assert_eq!(x.pbd_attached(&p1), Some(true));
            assert_eq!(x.pbd_attached(&b0), Some(false));
            let calls = x.plug_calls();
            let count = |r: &str| calls.iter().filter(|c| *c == r).count();
            assert_eq!(count(&p0), 1);
            assert_eq!(count(&p1), 3);
            assert_eq!(count(&b0), 3);
            for untouched in [&o0, &w0, &attached] {
                assert_eq!(count(untouched), 0, "{untouched} plugged: {calls:?}");
            }
            assert_eq!(x.pbd_attached(&o0), Some(false));
            // Every round logged out.
            assert_eq!(x.session_count(), 0);

            // Nothing left to do: one round, done.
            x.fail_plugs(&b0, 0, "");
            let out = run(client(&x, 0), cfg(3)).await;
            assert!(
                matches!(&out, Outcome::Done { plugged, host_down } if plugged.len() == 1 && host_down.is_empty()),
                "{out:?}"
            );
            assert_eq!(
                run(client(&x, 0), cfg(3)).await,
                Outcome::Done {
                    plugged: vec![],
                    host_down: vec![]
                }
            );
        }

        #[tokio::test]
        async fn a_slave_plugs_through_the_master() {
            let x = TestXapi::start().await.unwrap();
            let sr = x.add_sr("twinsan", "lvmoiscsi");
            let p0 = x.add_pbd(&sr, 0, &iscsi(OURS), false);
            let p1 = x.add_pbd(&sr, 1, &iscsi(OURS), false);
            // The peer host is down: left to its own xapi, no retry, no failure.
            x.fail_plugs(&p0, 100, "HOST_OFFLINE");
            let out = run(client(&x, 1), cfg(5)).await;
            let Outcome::Done { plugged, host_down } = out else {
                panic!("{out:?}")
            };
            assert_eq!(plugged.len(), 1);
            assert_eq!(plugged[0].target.pbd, p1);
            assert_eq!(host_down.len(), 1);
            assert_eq!(host_down[0].target.pbd, p0);
            assert_eq!(x.plug_calls(), [p0.clone(), p1.clone()]);
            // PBD.plug went to the master.
            assert!(x.calls().iter().any(|(h, m)| *h == 0 && m == "PBD.plug"));
            assert!(!x.calls().iter().any(|(h, m)| *h == 1 && m == "PBD.plug"));
        }

        #[tokio::test]
        async fn a_slave_that_cannot_reach_its_master_does_nothing() {
            let x = TestXapi::start().await.unwrap();
            let sr = x.add_sr("twinsan", "lvmoiscsi");
            let p1 = x.add_pbd(&sr, 1, &iscsi(OURS), false);
            x.set_hang(0, true);
            let c = XapiClient::new(x.endpoint(1), Duration::from_millis(300));
            let t0 = std::time::Instant::now();
            let out = run(c, cfg(5)).await;
            assert!(
                matches!(&out, Outcome::MasterUnreachable { master, error }
                    if master == "127.0.0.1" && error.contains("timed out")),
                "{out:?}"
            );
            // One login at the master, no retry rounds.
            assert!(t0.elapsed() < Duration::from_secs(2));
            assert!(x.plug_calls().is_empty());
            assert_eq!(x.pbd_attached(&p1), Some(false));
        }

        #[tokio::test]
        async fn xapi_down_gives_up_after_the_rounds() {
            let out = run(client_of_nothing(), cfg(2)).await;
            assert!(
                matches!(&out, Outcome::GaveUp { attempts: 2, plugged, failed, error: Some(_) }
                    if plugged.is_empty() && failed.is_empty()),
                "{out:?}"
            );
        }
    }
}
