//! Shared harness for integration tests: runs the real `twinsan` binary on a free loopback
//! port with a generated configuration, and the real clients (libiscsi tools, qemu-img, fio)
//! against it. Every server is stopped by its PID when the test ends.

#![allow(dead_code)]

pub mod guest;
pub mod ha;
pub mod netns;
pub mod pair;
pub mod proxy;
pub mod raw;

use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const IQN: &str = "iqn.2026-11.org.twinsan.test:disk";
pub const INIT1: &str = "iqn.2026-11.org.twinsan.test:init1";
pub const INIT2: &str = "iqn.2026-11.org.twinsan.test:init2";

pub fn bin() -> PathBuf {
    std::env::var_os("TWINSAN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_twinsan")))
}

thread_local! {
    /// When non-zero, every daemon this test's thread starts has `io_uring_setup` fail with
    /// this errno. Per thread: `cargo test` runs the tests of one binary as threads of one
    /// process, and a test that denies io_uring must not change its neighbours' daemons.
    static DENY_IO_URING: Cell<i32> = const { Cell::new(0) };
}

/// Makes every `twinsan serve` this test starts see a kernel without io_uring: a seccomp
/// filter installed in the child before exec answers `io_uring_setup` with `errno` (ENOSYS as
/// on XenServer's 4.19 dom0 kernel, EPERM as under a container's default seccomp profile).
/// Unlike strace's fault injection, the daemon keeps its own PID, so SIGKILL tests still kill
/// the daemon itself.
pub fn deny_io_uring(errno: i32) {
    DENY_IO_URING.set(errno);
}

/// The fallback line the daemon must log when io_uring was denied with `errno`.
fn expected_fallback(errno: i32) -> String {
    let name = match errno {
        libc::ENOSYS => "ENOSYS",
        libc::EPERM => "EPERM",
        _ => "errno",
    };
    format!("I/O engine threads (auto: io_uring_setup failed with {name}")
}

/// Installs a seccomp filter that fails `io_uring_setup` with `errno`. Runs in the forked
/// child before exec: only async-signal-safe system calls.
fn install_io_uring_filter(errno: i32) -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const SYS_IO_URING_SETUP: u32 = 425;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
    const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| libc::sock_filter {
        code: BPF_JEQ_K,
        jt,
        jf,
        k,
    };
    // seccomp_data: nr at offset 0, arch at offset 4.
    let filter = [
        stmt(BPF_LD_W_ABS, 4),
        jump(AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        stmt(BPF_LD_W_ABS, 0),
        jump(SYS_IO_URING_SETUP, 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | (errno as u32 & 0xffff)),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with valid arguments; `prog` and `filter` outlive the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `twinsan` as a command, with io_uring denied when the test asked for it.
pub fn twinsan_command() -> Command {
    let mut cmd = Command::new(bin());
    let errno = DENY_IO_URING.get();
    if errno != 0 {
        // SAFETY: the closure only makes system calls (prctl), which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || install_io_uring_filter(errno));
        }
    }
    cmd
}

/// The last `n` lines of `s` (logs and consoles in failure messages).
pub fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// `twinsan status --json` of the daemon running with `config`.
pub fn status_json(config: &Path) -> serde_json::Value {
    let o = run(
        Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(config),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "status: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A tool the test needs; the test suite's install step provides it, so a missing one fails.
pub fn tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !p.is_empty(),
        "{name} not found: run scripts/install-deps.sh (bash scripts/test.sh does)"
    );
    PathBuf::from(p)
}

/// fio built with the libiscsi engine (scripts/build-fio.sh).
pub fn fio() -> PathBuf {
    let p = std::env::var_os("TWINSAN_FIO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/twinsan-tools/bin/fio-libiscsi"));
    assert!(
        p.exists(),
        "{} missing: run scripts/build-fio.sh",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory on the real disk (O_DIRECT needs a filesystem that supports it).
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("TWINSAN_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts twinsan with `extra` appended to a config that has target [`IQN`] and LUN 0
    /// (a 1 GiB sparse file unless `lun_toml` replaces the LUN table).
    pub fn start(dir: &Path, target_extra: &str, lun_toml: Option<&str>, top: &str) -> Server {
        Self::start_with_server_keys(dir, "", target_extra, lun_toml, top)
    }

    /// Like [`Server::start`], with `server_extra` lines added to the `[server]` table.
    pub fn start_with_server_keys(
        dir: &Path,
        server_extra: &str,
        target_extra: &str,
        lun_toml: Option<&str>,
        top: &str,
    ) -> Server {
        let port = free_port();
        let lun = lun_toml.map(str::to_string).unwrap_or_else(|| {
            format!(
                "[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"1GiB\"\n",
                dir.join("lun0.img").display()
            )
        });
        let config = format!(
            "{top}\n[server]\ndata_dir = \"{data}\"\n{server_extra}\n\n[[target]]\niqn = \"{IQN}\"\nportals = [\"127.0.0.1:{port}\"]\n{target_extra}\n{lun}\n",
            data = dir.join("data").display(),
        );
        let path = dir.join("twinsan.toml");
        std::fs::write(&path, config).unwrap();
        Self::start_with_config(dir, &path, port)
    }

    pub fn start_with_config(dir: &Path, config: &Path, port: u16) -> Server {
        let log = dir.join(format!("twinsan-{port}.log"));
        std::fs::File::create(&log).unwrap();
        Self::start_logged(dir, config, port, &log)
    }

    /// Like [`Server::start_with_config`], appending the server's output to `log`.
    pub fn start_logged(dir: &Path, config: &Path, port: u16, log: &Path) -> Server {
        let log = log.to_path_buf();
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = twinsan_command()
            .args(["serve", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("TWINSAN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start twinsan");
        let mut s = Server {
            child,
            port,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log,
        };
        s.wait_listening();
        s
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.assert_engine();
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "twinsan exited ({st}) before listening on {}; log:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "twinsan did not listen on {}; log:\n{}",
            self.port,
            self.log_text()
        );
    }

    /// With io_uring denied, the daemon must have said so and chosen the threads engine.
    fn assert_engine(&self) {
        let errno = DENY_IO_URING.get();
        if errno != 0 {
            let log = self.log_text();
            assert!(
                log.contains(&expected_fallback(errno)),
                "io_uring was denied ({errno}) but the daemon did not log the fallback:\n{log}"
            );
        }
    }

    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, lun: u32) -> String {
        format!("iscsi://127.0.0.1:{}/{IQN}/{lun}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, then SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Sends SIGTERM (if still running) and waits up to `limit` for the exit; None when it
    /// is still running then.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the server with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics with the server log if the process died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("twinsan exited ({st}); log:\n{}", self.log_text());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command with a time bound; returns its output.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out_pipe = child.stdout.take().unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || read_all(out_pipe));
    let t_err = std::thread::spawn(move || read_all(err_pipe));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().unwrap();
            eprintln!("{cmd:?} exceeded {limit:?}: killed");
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn read_all(r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let mut br = BufReader::new(r);
    loop {
        let buf = br.fill_buf().unwrap_or(&[]);
        if buf.is_empty() {
            break;
        }
        v.extend_from_slice(buf);
        let n = buf.len();
        br.consume(n);
    }
    v
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Per-suite counts from `iscsi-test-cu` verbose output.
#[derive(Debug, Default, Clone)]
pub struct CuCounts {
    pub passed: usize,
    pub skipped: usize,
    pub failed: Vec<String>,
}

/// Parses iscsi-test-cu verbose output. CUnit's verdict is `passed`/`FAILED` right after
/// "..." or at the start of a line; a "[SKIPPED]" printed between a test's start and its
/// verdict makes a pass a skip (text after the verdict belongs to the next setup).
pub fn parse_cu(out: &str) -> CuCounts {
    let mut c = CuCounts::default();
    let mut suite = String::new();
    let mut current: Option<(String, bool)> = None;
    let mut verdict = |cur: &mut Option<(String, bool)>, ok: bool| {
        if let Some((name, skipped)) = cur.take() {
            if !ok {
                c.failed.push(name);
            } else if skipped {
                c.skipped += 1;
            } else {
                c.passed += 1;
            }
        }
    };
    for line in out.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim().to_string();
            continue;
        }
        let rest = if let Some(t) = line.strip_prefix("  Test: ") {
            let (name, rest) = t.split_once(" ...").unwrap_or((t, ""));
            current = Some((format!("{suite}.{name}"), false));
            rest
        } else {
            line
        };
        if current.is_none() {
            continue;
        }
        let trimmed = rest.trim_start();
        if trimmed.starts_with("passed") && !rest.starts_with(' ') || rest.starts_with("passed") {
            verdict(&mut current, true);
        } else if rest.starts_with("FAILED") {
            verdict(&mut current, false);
        } else if rest.contains("[SKIPPED]") {
            if let Some(cur) = current.as_mut() {
                cur.1 = true;
            }
        }
    }
    if let Some((name, _)) = current.take() {
        c.failed.push(format!("{name} (no verdict)"));
    }
    c
}
