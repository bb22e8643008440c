//! Helpers for the two-node integration tests: an in-test TCP proxy that can cut or stall
//! the link, and a pair of replicated volumes over 127.0.0.1.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use twinsan_replication::drbd::MdVersion;
use twinsan_replication::store::{BlockStore, MemStore};
use twinsan_replication::volume::{
    create_metadata, skip_sync_uuid, ConnState, InitialSync, MetaLocation, ReplicatedVolume, Role,
    VolumeConfig,
};

pub const MIB: u64 = 1 << 20;

/// Both sides start from identical (skip-identical) data of one generation.
pub fn skip() -> InitialSync {
    InitialSync::SkipIdentical {
        uuid: skip_sync_uuid("vol0", "test"),
    }
}

pub fn connected(n: &Node) -> bool {
    n.vol.status().connection == ConnState::Connected
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A one-direction TCP forwarder (127.0.0.1:0 -> target) that can cut or stall the link.
pub struct Proxy {
    addr: SocketAddr,
    target: Mutex<Option<SocketAddr>>,
    cut: AtomicBool,
    stalled: AtomicBool,
    generation: AtomicU64,
}

impl Proxy {
    pub async fn new() -> Arc<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Arc::new(Proxy {
            addr: l.local_addr().unwrap(),
            target: Mutex::new(None),
            cut: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        });
        let w = Arc::downgrade(&p);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let Some(p) = w.upgrade() else { return };
                let target = *p.target.lock().unwrap();
                if p.cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Some(target) = target else { continue };
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
        p
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_target(&self, t: SocketAddr) {
        *self.target.lock().unwrap() = Some(t);
    }

    /// Closes every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops forwarding bytes but keeps the sockets open (a black hole).
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
    }
}

async fn pump(
    p: Arc<Proxy>,
    gen: u64,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if p.generation.load(Ordering::SeqCst) != gen {
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
        while p.stalled.load(Ordering::SeqCst) && p.generation.load(Ordering::SeqCst) == gen {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if p.generation.load(Ordering::SeqCst) != gen {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Node {
    pub vol: Arc<ReplicatedVolume>,
    pub data: Arc<MemStore>,
    pub meta: MetaLocation,
    pub cfg: VolumeConfig,
}

impl Node {
    pub fn snapshot(&self) -> Vec<u8> {
        let mut s = self.data.snapshot();
        s.truncate(self.vol.size() as usize);
        s
    }

    /// Reopens after a crash or shutdown, with the same data and metadata.
    pub async fn reopen(&mut self, role: Role) {
        let data: Arc<dyn BlockStore> = self.data.clone();
        let mut cfg = self.cfg.clone();
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        self.vol = ReplicatedVolume::open(cfg, data, self.meta.clone(), role)
            .await
            .unwrap();
    }
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
    /// a -> b
    pub ab: Arc<Proxy>,
    /// b -> a
    pub ba: Arc<Proxy>,
}

pub fn config(name: &str) -> VolumeConfig {
    let mut c = VolumeConfig::new(
        name,
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
        b"shared secret".to_vec(),
    );
    c.ping_interval = Duration::from_millis(200);
    c.timeout = Duration::from_millis(1500);
    c.resync_rate = 0;
    c
}

pub fn meta_file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(4 * MIB).unwrap();
    p
}

impl Pair {
    /// Two nodes with `size` bytes of data each and external v08 metadata; `a` opens with
    /// `role_a`, `b` as secondary.
    pub async fn new(
        size: u64,
        init_a: InitialSync,
        init_b: InitialSync,
        role_a: Role,
        tweak: impl Fn(&mut VolumeConfig),
    ) -> Pair {
        Self::build(size, init_a, init_b, role_a, tweak, None).await
    }

    /// Like [`Pair::new`]; `prefill_a` is written into A's backing store before it opens.
    pub async fn build(
        size: u64,
        init_a: InitialSync,
        init_b: InitialSync,
        role_a: Role,
        tweak: impl Fn(&mut VolumeConfig),
        prefill_a: Option<Vec<u8>>,
    ) -> Pair {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let ab = Proxy::new().await;
        let ba = Proxy::new().await;
        let mut nodes = Vec::new();
        for (name, init, role, peer) in [
            ("a", init_a, role_a, ab.addr()),
            ("b", init_b, Role::Secondary, ba.addr()),
        ] {
            let meta = MetaLocation::External(meta_file(dir.path(), &format!("{name}.md")));
            create_metadata(&meta, size, MdVersion::V08, init).unwrap();
            let mem = Arc::new(MemStore::new(size as usize));
            if let (Some(d), "a") = (&prefill_a, name) {
                mem.write(
                    0,
                    bytes::Bytes::from(d.clone()),
                    twinsan_replication::store::WriteMode::Cached,
                )
                .await
                .unwrap();
            }
            let data: Arc<dyn BlockStore> = mem.clone();
            let mut cfg = config("vol0");
            cfg.peer = peer;
            tweak(&mut cfg);
            let vol = ReplicatedVolume::open(cfg.clone(), data, meta.clone(), role)
                .await
                .unwrap();
            nodes.push(Node {
                vol,
                data: mem,
                meta,
                cfg,
            });
        }
        let b = nodes.pop().unwrap();
        let a = nodes.pop().unwrap();
        ab.set_target(b.vol.local_addr());
        ba.set_target(a.vol.local_addr());
        Pair { dir, a, b, ab, ba }
    }

    pub fn cut(&self) {
        self.ab.cut();
        self.ba.cut();
    }

    pub fn restore(&self) {
        self.ab.restore();
        self.ba.restore();
    }

    /// Repoints the proxies after a node was reopened on a new port.
    pub fn repoint(&self) {
        self.ab.set_target(self.b.vol.local_addr());
        self.ba.set_target(self.a.vol.local_addr());
    }

    pub async fn shutdown(self) {
        let _ = self.a.vol.shutdown().await;
        let _ = self.b.vol.shutdown().await;
    }
}
