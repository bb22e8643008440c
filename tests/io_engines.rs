//! The two block-I/O engines seen from outside (issue 9): engine choice and its log line,
//! `twinsan status` naming each LUN's engine, a forced `io_uring` refused with a clear error,
//! the embedded default serving with io_uring denied, a full backing store answering DATA
//! PROTECT / SPACE ALLOCATION FAILED, and a real EIO answered as MEDIUM ERROR for that
//! command only.
//!
//! io_uring is denied with a seccomp filter in the daemon's process (see
//! `common::deny_io_uring`), so the daemon really sees `io_uring_setup` fail.

mod common;

use bytes::Bytes;
use common::raw::Raw;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use twinsan::iscsi::pdu::{Opcode, Pdu};

/// Starts twinsan with target [`IQN`] and one LUN (`lun_toml`, default a 1 GiB sparse file),
/// `server_extra` going into `[server]`.
fn start(dir: &std::path::Path, server_extra: &str, lun_toml: Option<&str>) -> Server {
    Server::start_with_server_keys(dir, server_extra, "", lun_toml, "")
}

fn lun_engines(v: &serde_json::Value) -> Vec<String> {
    v["targets"][0]["luns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["engine"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn status_names_the_engine_of_each_lun() {
    let dir = scratch_dir();
    // auto on this kernel: io_uring.
    let s = Server::start(dir.path(), "", None, "");
    assert!(
        s.log_text()
            .contains("I/O engine io_uring (auto: the kernel offers io_uring)"),
        "{}",
        s.log_text()
    );
    assert_eq!(lun_engines(&status_json(&s.config)), ["io_uring"]);
    let o = run(
        Command::new(bin())
            .args(["status", "--config"])
            .arg(&s.config),
        Duration::from_secs(20),
    );
    assert!(text(&o).contains("engine io_uring"), "{}", text(&o));
    drop(s);
    // Forced threads.
    let dir = scratch_dir();
    let s = start(dir.path(), "io_engine = \"threads\"", None);
    assert!(s.log_text().contains("I/O engine threads (configured)"));
    assert_eq!(lun_engines(&status_json(&s.config)), ["threads"]);
}

/// `io_engine = "io_uring"` on a kernel that refuses it: `serve` exits with an error that
/// names the key, instead of falling back silently.
#[test]
fn forced_io_uring_without_io_uring_is_a_clear_error() {
    deny_io_uring(libc::ENOSYS);
    let dir = scratch_dir();
    let cfg = dir.path().join("twinsan.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ndata_dir = \"{}\"\nio_engine = \"io_uring\"\n\n[[target]]\niqn = \"{IQN}\"\nportals = [\"127.0.0.1:{}\"]\n[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"64MiB\"\n",
            dir.path().join("data").display(),
            free_port(),
            dir.path().join("lun0.img").display()
        ),
    )
    .unwrap();
    let o = run(
        twinsan_command()
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info"),
        Duration::from_secs(30),
    );
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("server.io_engine = \"io_uring\""), "{out}");
    assert!(out.contains("ENOSYS"), "{out}");
}

/// The embedded default (`twinsan serve` with no config: 127.0.0.1:3260, 1 GiB sparse LUN)
/// on a kernel without io_uring: serves, says which engine and why, and libiscsi reads it.
#[test]
fn embedded_default_serves_without_io_uring() {
    deny_io_uring(libc::ENOSYS);
    let dir = scratch_dir();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 3260)).is_err(),
        "something already listens on 127.0.0.1:3260"
    );
    let log = dir.path().join("serve.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = twinsan_command()
        .arg("serve")
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: signalling the child we started, by its PID.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", 3260)).is_err() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "serve exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "not listening on 3260");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        text_log.contains("I/O engine threads (auto: io_uring_setup failed with ENOSYS"),
        "{text_log}"
    );
    let o = run(
        Command::new(tool("iscsi-ls")).args(["-s", "iscsi://127.0.0.1:3260"]),
        Duration::from_secs(30),
    );
    assert!(text(&o).contains("Lun:0"), "{}", text(&o));
    assert!(text(&o).contains("DIRECT_ACCESS"), "{}", text(&o));
    let o = run(
        Command::new(bin())
            .arg("status")
            .arg("--json")
            .current_dir(dir.path()),
        Duration::from_secs(20),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status JSON: {e}: {}", text(&o)));
    assert_eq!(lun_engines(&v), ["threads"]);
}

/// WRITE(10) of `data` at `lba` (512-byte blocks) as immediate data; (status, sense).
fn write10(r: &mut Raw, lba: u32, data: &[u8]) -> (u8, Vec<u8>) {
    let blocks = (data.len() / 512) as u16;
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let p = r.scsi_command(0, &cdb, 0, Some(Bytes::from(data.to_vec())));
    let itt = p.itt();
    r.send(p);
    let resp: Pdu = r
        .wait_for(|p| p.itt() == itt && p.opcode() == Some(Opcode::ScsiResponse))
        .expect("write status");
    let sense = if resp.data.len() > 2 {
        resp.data[2..].to_vec()
    } else {
        Vec::new()
    };
    (resp.bhs[3], sense)
}

/// (key, asc, ascq) of fixed-format sense data.
fn kcq(sense: &[u8]) -> (u8, u8, u8) {
    assert!(sense.len() >= 14, "short sense {sense:?}");
    (sense[2] & 0x0f, sense[12], sense[13])
}

fn mount_tmpfs(at: &std::path::Path, size: &str) -> impl Drop {
    std::fs::create_dir_all(at).unwrap();
    let o = run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "mount tmpfs (needs root): {}", text(&o));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        /// Retried for a few seconds: the kernel drops an exited process's io_uring (and the
        /// file it registered) asynchronously, so the first umount can find the mount busy.
        fn drop(&mut self) {
            for _ in 0..100 {
                let ok = Command::new("umount")
                    .arg(&self.0)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("could not unmount {}", self.0.display());
        }
    }
    Unmount(at.to_path_buf())
}

/// A thin LUN whose filesystem fills up: the write that finds no space answers DATA PROTECT /
/// SPACE ALLOCATION FAILED WRITE PROTECT (27/07), not a medium error; data written before is
/// intact, and the LUN goes on serving reads and writes to allocated blocks.
fn full_backing_store(engine: &str) {
    let dir = scratch_dir();
    let _mnt = mount_tmpfs(&dir.path().join("small"), "2m");
    let lun = format!(
        "[[target.lun]]\nnumber = 0\npath = \"{}\"\nsize = \"64MiB\"\n",
        dir.path().join("small/lun0.img").display()
    );
    let mut s = start(dir.path(), &format!("io_engine = \"{engine}\""), Some(&lun));
    let mut r = Raw::login(s.port, false, false);
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mut full_at = None;
    for i in 0..64u32 {
        let (status, sense) = write10(&mut r, i * 128, &chunk);
        if status != 0 {
            assert_eq!(status, 0x02, "CHECK CONDITION");
            assert_eq!(kcq(&sense), (0x07, 0x27, 0x07), "sense {sense:?}");
            full_at = Some(i);
            break;
        }
    }
    let full_at = full_at.expect("a 2 MiB filesystem never ran out of space");
    assert!(full_at > 4, "full after {full_at} chunks");
    // Written before: intact. Overwriting an allocated block still works.
    let (status, data, _) = r
        .scsi_sync(
            0,
            &[0x28, 0, 0, 0, 0, 0, 0, 0, 128, 0],
            65536,
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(status, 0);
    assert!(data == chunk);
    assert_eq!(write10(&mut r, 0, &chunk).0, 0);
    s.assert_alive();
    assert!(
        s.log_text().contains("backing store is full"),
        "{}",
        s.log_text()
    );
}

#[test]
fn full_backing_store_answers_space_allocation_failed_threads() {
    full_backing_store("threads");
}

#[test]
fn full_backing_store_answers_space_allocation_failed_io_uring() {
    full_backing_store("io_uring");
}

/// EIO from the device (injected into the threads engine's pread64 calls by strace attached
/// to the running daemon) fails that READ with MEDIUM ERROR / UNRECOVERED READ ERROR; once
/// the device recovers (strace detached), the same READ succeeds. Nothing else fails.
#[test]
fn eio_is_a_medium_error_for_that_command_only() {
    let dir = scratch_dir();
    let mut s = start(dir.path(), "io_engine = \"threads\"", None);
    let mut r = Raw::login(s.port, false, false);
    let chunk = vec![0x5au8; 4096];
    assert_eq!(write10(&mut r, 8, &chunk).0, 0);
    let read = |r: &mut Raw| {
        r.scsi_sync(
            0,
            &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0],
            4096,
            Duration::from_secs(10),
        )
        .unwrap()
    };
    assert_eq!(read(&mut r).0, 0);
    let strace_log = dir.path().join("strace.log");
    let mut strace = Command::new(tool("strace"))
        .args(["-f", "-qq", "-o"])
        .arg(&strace_log)
        .args([
            "-e",
            "trace=pread64",
            "-e",
            "inject=pread64:error=EIO",
            "-p",
        ])
        .arg(s.child.id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // strace attaches to every thread; wait until it reports the attach is done by
    // letting one injected failure happen.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, _, sense) = loop {
        let got = read(&mut r);
        if got.0 != 0 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 0x02, "READ during EIO: CHECK CONDITION");
    assert_eq!(kcq(&sense), (0x03, 0x11, 0x00), "sense {sense:?}");
    // Non-I/O commands still answer while the device fails.
    let (status, _, _) = r
        .scsi_sync(0, &[0, 0, 0, 0, 0, 0], 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(status, 0, "TEST UNIT READY");
    // SAFETY: signalling the strace we started, by its PID; it detaches on SIGTERM.
    unsafe { libc::kill(strace.id() as i32, libc::SIGTERM) };
    let _ = strace.wait();
    let (status, data, _) = read(&mut r);
    assert_eq!(status, 0, "READ after the device recovered");
    assert!(data == chunk);
    s.assert_alive();
    assert!(s.log_text().contains("medium error"), "{}", s.log_text());
}
