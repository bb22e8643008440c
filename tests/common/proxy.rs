//! An in-test TCP proxy on 127.0.0.1 that can cut the link (close every forwarded
//! connection and refuse new ones) or stall it (stop forwarding bytes, keep the sockets:
//! a black hole). It runs on its own small tokio runtime, dropped with the proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct State {
    target: Mutex<Option<SocketAddr>>,
    cut: AtomicBool,
    stalled: AtomicBool,
    /// Bumped by `cut`: pumps of an older generation stop.
    generation: AtomicU64,
    /// Bytes forwarded, both directions.
    forwarded: AtomicU64,
}

/// One listening address forwarding to one target.
pub struct Proxy {
    addr: SocketAddr,
    st: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn new() -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("test-proxy")
            .build()
            .unwrap();
        let st = Arc::new(State {
            target: Mutex::new(None),
            cut: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        });
        let l = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = l.local_addr().unwrap();
        let p = st.clone();
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                if p.cut.load(Ordering::SeqCst) {
                    continue; // dropped: the dialer sees the connection close
                }
                let Some(target) = *p.target.lock().unwrap() else {
                    continue;
                };
                let Ok(Ok(t)) =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await
                else {
                    continue;
                };
                let gen = p.generation.load(Ordering::SeqCst);
                let (r1, w1) = s.into_split();
                let (r2, w2) = t.into_split();
                tokio::spawn(pump(p.clone(), gen, r1, w2));
                tokio::spawn(pump(p.clone(), gen, r2, w1));
            }
        });
        Proxy {
            addr,
            st,
            rt: Some(rt),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_target(&self, t: SocketAddr) {
        *self.st.target.lock().unwrap() = Some(t);
    }

    /// Closes every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.st.cut.store(true, Ordering::SeqCst);
        self.st.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops forwarding bytes but keeps the sockets open (a black hole).
    pub fn stall(&self) {
        self.st.stalled.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.st.cut.store(false, Ordering::SeqCst);
        self.st.stalled.store(false, Ordering::SeqCst);
    }

    pub fn forwarded(&self) -> u64 {
        self.st.forwarded.load(Ordering::Relaxed)
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn pump(
    p: Arc<State>,
    gen: u64,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let current = |p: &State| p.generation.load(Ordering::SeqCst) == gen;
    loop {
        if !current(&p) {
            return;
        }
        if p.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(50), r.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        // Bytes read just before a stall are held back until it ends.
        while p.stalled.load(Ordering::SeqCst) && current(&p) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !current(&p) || w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        p.forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The two proxies of a replication link: A dials B through `ab`, B dials A through `ba`.
pub struct LinkProxy {
    pub ab: Proxy,
    pub ba: Proxy,
}

impl LinkProxy {
    pub fn new() -> LinkProxy {
        LinkProxy {
            ab: Proxy::new(),
            ba: Proxy::new(),
        }
    }

    pub fn cut(&self) {
        self.ab.cut();
        self.ba.cut();
    }

    pub fn stall(&self) {
        self.ab.stall();
        self.ba.stall();
    }

    pub fn restore(&self) {
        self.ab.restore();
        self.ba.restore();
    }
}

impl Default for LinkProxy {
    fn default() -> Self {
        Self::new()
    }
}
