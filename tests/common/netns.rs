//! Network-namespace lab for the HA acceptance tests: a bridge that lives in a namespace of its
//! own, host A, host B and a client on it (veth pairs), plus a direct A-B cable for the
//! replication link. All addresses are private and every packet stays inside the namespaces the
//! lab created.
//!
//! ```text
//!   client 10.231.0.10 ─┐
//!   A      10.231.0.1  ─┼─ br0 in "bridge" (10.231.0.254, XAPI .251/.252)
//!   B      10.231.0.2  ─┘
//!   A repl 10.231.1.1 ───── B repl 10.231.1.2   (direct veth: the replication link)
//! ```
//!
//! Namespaces are named `tsn<pid>-<test>-<role>` so parallel test binaries never clash; a lab
//! deletes its namespaces on drop (also when the test panics) after killing, by PID, every process
//! it started in them. Namespaces left by a test process that no longer exists (killed by a
//! timeout) are removed when the next lab starts.
//!
//! Tests need root and `ip`: [`Lab::new_or_skip`] returns `None` with a message otherwise.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{run, text};

/// Prefix of every namespace a lab creates.
const PREFIX: &str = "tsn";
/// Bound of one `ip` call.
const IP_LIMIT: Duration = Duration::from_secs(20);

/// Address plan (the /24s are private, RFC 1918, and exist only inside the lab).
pub const A_ADDR: &str = "10.231.0.1";
pub const B_ADDR: &str = "10.231.0.2";
pub const CLIENT_ADDR: &str = "10.231.0.10";
/// The bridge namespace's own address: a witness that answers.
pub const BRIDGE_ADDR: &str = "10.231.0.254";
/// Addresses of the test XAPI's two hosts (in the bridge namespace).
pub const XAPI_ADDRS: [&str; 2] = ["10.231.0.251", "10.231.0.252"];
/// Replication link (direct A-B veth).
pub const A_REPL: &str = "10.231.1.1";
pub const B_REPL: &str = "10.231.1.2";
pub const PREFIX_LEN: u8 = 24;
/// Interface name of the LAN port inside A, B and the client.
pub const LAN_IF: &str = "lan0";
/// Interface name of the replication port inside A and B.
pub const REPL_IF: &str = "repl0";

/// Runs `ip args...` (bounded); Err with its stderr when it fails.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let o = run(Command::new("ip").args(args), IP_LIMIT);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!("ip {}: {}", args.join(" "), text(&o).trim()))
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// One named network namespace (`/run/netns/<name>`).
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A command that runs `program` inside this namespace (`ip netns exec` execs the program,
    /// so the child's PID is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args` in the namespace with a time bound.
    pub fn run(&self, program: &str, args: &[&str], limit: Duration) -> Output {
        run(self.command(program).args(args), limit)
    }

    /// Runs `f` on a new thread that entered this namespace (sockets it creates stay in it).
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn with<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.thread(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> args...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        ip(&v).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: setns(2) with a valid namespace fd; it only changes the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A process started in a namespace; SIGKILLed by PID on drop if still running.
pub struct NsChild {
    pub child: Child,
    pub what: String,
}

impl NsChild {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of our own child (not yet reaped: we hold the Child).
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.running() {
            self.signal(libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, wait up to `limit`; SIGKILL after that. Returns the exit status if it exited by
    /// itself.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Waits (bounded) for the exit; kills it after `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} still running after {limit:?}: killed", self.what);
        self.kill();
        None
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether this process can create namespaces (root and `ip` present).
fn capable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    ip(&["-V"])
        .map(|_| ())
        .map_err(|e| format!("no usable `ip`: {e}"))
}

/// Deletes namespaces `tsn<pid>-...` whose test process no longer exists.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing namespace {name} left by dead test process {pid}");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// The four namespaces and their links. Dropping it kills the processes started through
/// [`Lab::spawn`] and deletes the namespaces.
pub struct Lab {
    pub bridge: Netns,
    pub a: Netns,
    pub b: Netns,
    pub client: Netns,
    children: Mutex<Vec<NsChild>>,
    created: Vec<String>,
}

impl Lab {
    /// Builds the lab for test `test`, or prints why it cannot and returns `None` (no root, no
    /// `ip`). A failure after the capability check panics: CI runs as root and must run these.
    pub fn new_or_skip(test: &str) -> Option<Lab> {
        if let Err(why) = capable() {
            eprintln!("SKIPPED {test}: network-namespace tests need root and iproute2 ({why})");
            return None;
        }
        Some(Lab::new(test))
    }

    pub fn new(test: &str) -> Lab {
        remove_stale();
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let short: String = test
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(24)
            .collect();
        let base = format!("{PREFIX}{}-{short}{n}", std::process::id());
        let ns = |role: &str| Netns {
            name: format!("{base}-{role}"),
        };
        let mut lab = Lab {
            bridge: ns("br"),
            a: ns("a"),
            b: ns("b"),
            client: ns("cl"),
            children: Mutex::new(Vec::new()),
            created: Vec::new(),
        };
        for n in [&lab.bridge, &lab.a, &lab.b, &lab.client].map(|n| n.name.clone()) {
            ip_ok(&["netns", "add", &n]);
            lab.created.push(n);
        }
        lab.wire();
        lab
    }

    fn wire(&self) {
        for n in [&self.bridge, &self.a, &self.b, &self.client] {
            n.ip(&["link", "set", "lo", "up"]);
            // Learn neighbours from gratuitous ARP (the VIP announcements), as switches and
            // hosts on a real LAN do, and keep the client's view of the VIP inspectable.
            let _ = n.run(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.conf.all.arp_accept=1",
                    "net.ipv4.conf.default.arp_accept=1",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
                IP_LIMIT,
            );
        }
        let br = &self.bridge;
        br.ip(&["link", "add", "br0", "type", "bridge"]);
        // Forward at once (no STP listening/learning delay on new ports).
        br.ip(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"]);
        br.ip(&["link", "set", "br0", "up"]);
        for (port, ns, addr) in [
            ("pa", &self.a, A_ADDR),
            ("pb", &self.b, B_ADDR),
            ("pc", &self.client, CLIENT_ADDR),
        ] {
            br.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", LAN_IF, "netns", &ns.name,
            ]);
            br.ip(&["link", "set", port, "master", "br0"]);
            br.ip(&["link", "set", port, "up"]);
            ns.ip(&["link", "set", LAN_IF, "up"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr}/{PREFIX_LEN}"),
                "dev",
                LAN_IF,
            ]);
        }
        for addr in [BRIDGE_ADDR, XAPI_ADDRS[0], XAPI_ADDRS[1]] {
            br.ip(&["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", "br0"]);
        }
        self.a.ip(&[
            "link",
            "add",
            REPL_IF,
            "type",
            "veth",
            "peer",
            "name",
            REPL_IF,
            "netns",
            &self.b.name,
        ]);
        for (ns, addr) in [(&self.a, A_REPL), (&self.b, B_REPL)] {
            ns.ip(&["link", "set", REPL_IF, "up"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr}/{PREFIX_LEN}"),
                "dev",
                REPL_IF,
            ]);
        }
    }

    /// Starts `cmd` (built with [`Netns::command`]) with stdout and stderr appended to `log`;
    /// the lab kills it on drop unless the caller took it with [`Lab::take`] first.
    pub fn spawn(&self, mut cmd: Command, what: &str, log: &Path) -> u32 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(NsChild {
            child,
            what: what.to_string(),
        });
        pid
    }

    /// Takes the process with `pid` out of the lab's care.
    pub fn take(&self, pid: u32) -> Option<NsChild> {
        let mut v = self.children.lock().unwrap();
        let i = v.iter().position(|c| c.child.id() == pid)?;
        Some(v.remove(i))
    }

    /// Runs `f` with the process `pid`, if the lab still holds it.
    pub fn with_child<T>(&self, pid: u32, f: impl FnOnce(&mut NsChild) -> T) -> Option<T> {
        let mut v = self.children.lock().unwrap();
        v.iter_mut().find(|c| c.child.id() == pid).map(f)
    }

    /// Whether `ns` can reach `addr` (one ping, 1 s).
    pub fn ping(&self, ns: &Netns, addr: &str) -> bool {
        ns.run(
            "ping",
            &["-c", "1", "-W", "1", addr],
            Duration::from_secs(5),
        )
        .status
        .success()
    }

    /// Link-layer addresses the client's neighbour table holds for `addr` (empty if none or
    /// the entry is FAILED/INCOMPLETE).
    pub fn client_neigh(&self, addr: &str) -> Vec<String> {
        neigh_macs(&self.client.ip(&["neigh", "show", addr]))
    }

    /// MAC of `ifname` in `ns`.
    pub fn mac(ns: &Netns, ifname: &str) -> String {
        let out = ns.ip(&["-o", "link", "show", ifname]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC in {out}"))
            .to_string()
    }

    /// Whether `addr` is configured on an interface in `ns`.
    pub fn has_addr(ns: &Netns, addr: &str) -> bool {
        let out = ns.ip(&["-o", "addr", "show"]);
        out.split_whitespace()
            .any(|w| w.split('/').next() == Some(addr))
    }
}

/// The `lladdr` values of `ip neigh show` output, for entries that are usable.
pub fn neigh_macs(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.contains("FAILED") && !l.contains("INCOMPLETE"))
        .filter_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "lladdr")
                .nth(1)
                .map(str::to_string)
        })
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut kids =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &mut kids {
            c.kill();
        }
        drop(kids);
        for n in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", n]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
