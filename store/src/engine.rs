//! Which engine file stores use: io_uring where the kernel offers it (probed once at start),
//! else the I/O thread pool; and opening a LUN's file with it.

use crate::backing::{FileStoreOptions, OpenError};
use crate::sys;
use crate::threads::ThreadStore;
use crate::uring::UringStore;
use crate::BlockStore;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// `[server] io_engine`: how file stores reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngineSetting {
    /// io_uring where the kernel offers it, else threads.
    #[default]
    Auto,
    /// io_uring or refuse to start.
    IoUring,
    /// The I/O thread pool, whatever the kernel offers.
    Threads,
}

impl IoEngineSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            IoEngineSetting::Auto => "auto",
            IoEngineSetting::IoUring => "io_uring",
            IoEngineSetting::Threads => "threads",
        }
    }
}

/// The engine in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    IoUring,
    Threads,
}

impl IoEngine {
    pub fn as_str(self) -> &'static str {
        match self {
            IoEngine::IoUring => "io_uring",
            IoEngine::Threads => "threads",
        }
    }
}

/// The engine decided at start, and why (for the one log line that says so).
#[derive(Debug, Clone)]
pub struct EngineChoice {
    pub setting: IoEngineSetting,
    pub engine: IoEngine,
    pub reason: String,
    /// `[server] io_threads`: threads per store for the threads engine (0 = its default).
    pub io_threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "server.io_engine = \"io_uring\", but this kernel refuses io_uring: {0}; \
         set server.io_engine = \"auto\" or \"threads\""
    )]
    IoUringUnavailable(String),
}

/// Why `io_uring_setup` failed, in words an operator can act on.
fn ring_refusal(e: &std::io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (added in Linux 5.1)",
        Some(libc::EPERM) => {
            "not permitted (a seccomp filter such as a container's default profile, \
             or sysctl kernel.io_uring_disabled)"
        }
        Some(libc::EINVAL) => {
            "the kernel's io_uring lacks the operations twinsan uses (READ, WRITE, FALLOCATE: 5.6)"
        }
        Some(libc::ENOMEM) => "not enough locked memory for the ring (RLIMIT_MEMLOCK)",
        _ => "unexpected error",
    };
    format!("io_uring_setup failed with {} ({why})", sys::errno_name(e))
}

/// Sets up a tiny ring and asks which operations it supports: 5.1-5.5 kernels accept
/// `io_uring_setup` but lack the READ / WRITE / FALLOCATE opcodes the store uses (5.6), and
/// have no IORING_REGISTER_PROBE either, which fails with EINVAL there.
fn probe_io_uring() -> std::io::Result<()> {
    use io_uring::opcode;
    let ring = io_uring::IoUring::new(4)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
    ];
    if needed.iter().all(|&code| probe.is_supported(code)) {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// Picks the engine once at start. `auto` probes io_uring with a tiny ring and falls back to
/// threads when the kernel refuses it; a forced `io_uring` that is refused is an error naming
/// the key.
pub fn choose_engine(
    setting: IoEngineSetting,
    io_threads: usize,
) -> Result<EngineChoice, EngineError> {
    let mut choice = choose_engine_with(setting, probe_io_uring)?;
    choice.io_threads = io_threads;
    Ok(choice)
}

fn choose_engine_with(
    setting: IoEngineSetting,
    probe: impl FnOnce() -> std::io::Result<()>,
) -> Result<EngineChoice, EngineError> {
    let (engine, reason) = match setting {
        IoEngineSetting::Threads => (IoEngine::Threads, "configured".to_owned()),
        IoEngineSetting::IoUring => match probe() {
            Ok(()) => (IoEngine::IoUring, "configured".to_owned()),
            Err(e) => return Err(EngineError::IoUringUnavailable(ring_refusal(&e))),
        },
        IoEngineSetting::Auto => match probe() {
            Ok(()) => (
                IoEngine::IoUring,
                "auto: the kernel offers io_uring".to_owned(),
            ),
            Err(e) => (IoEngine::Threads, format!("auto: {}", ring_refusal(&e))),
        },
    };
    Ok(EngineChoice {
        setting,
        engine,
        reason,
        io_threads: 0,
    })
}

/// Opens a file or block device with the chosen engine. Under `auto`, a ring that the kernel
/// refuses for this one store (locked-memory limit reached after several LUNs) falls back to
/// threads for it, with a warning.
pub fn open_file_store(
    mut opts: FileStoreOptions,
    choice: &EngineChoice,
) -> Result<Arc<dyn BlockStore>, OpenError> {
    opts.io_threads = choice.io_threads;
    match choice.engine {
        IoEngine::Threads => Ok(Arc::new(ThreadStore::open(opts)?)),
        IoEngine::IoUring => match UringStore::open(opts.clone()) {
            Ok(s) => Ok(Arc::new(s)),
            Err(OpenError::RingSetup { path, source })
                if choice.setting == IoEngineSetting::Auto =>
            {
                tracing::warn!(path = %path.display(), reason = %ring_refusal(&source),
                    "cannot set up an io_uring for this store; it uses I/O threads");
                Ok(Arc::new(ThreadStore::open(opts)?))
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod choice_tests {
    use super::*;

    fn refused(errno: i32) -> impl FnOnce() -> std::io::Result<()> {
        move || Err(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn auto_falls_back_and_says_why() {
        for (errno, words) in [
            (libc::ENOSYS, "ENOSYS (the kernel has no io_uring"),
            (libc::EPERM, "EPERM (not permitted"),
            (libc::EINVAL, "EINVAL"),
        ] {
            let c = choose_engine_with(IoEngineSetting::Auto, refused(errno)).unwrap();
            assert_eq!(c.engine, IoEngine::Threads);
            assert!(c.reason.contains(words), "{}", c.reason);
        }
        let c = choose_engine_with(IoEngineSetting::Auto, || Ok(())).unwrap();
        assert_eq!(c.engine, IoEngine::IoUring);
    }

    #[test]
    fn forced_io_uring_refused_names_the_key() {
        let e = choose_engine_with(IoEngineSetting::IoUring, refused(libc::ENOSYS)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("server.io_engine"), "{msg}");
        assert!(msg.contains("ENOSYS"), "{msg}");
    }

    /// This machine's kernel (6.x) has every opcode the store uses.
    #[test]
    fn probe_accepts_a_kernel_with_the_needed_opcodes() {
        probe_io_uring().unwrap();
    }

    #[test]
    fn forced_threads_never_probes() {
        let c = choose_engine_with(IoEngineSetting::Threads, || panic!("probed")).unwrap();
        assert_eq!(c.engine, IoEngine::Threads);
    }

    #[test]
    fn setting_parses_from_toml_names() {
        #[derive(Deserialize)]
        struct T {
            e: IoEngineSetting,
        }
        for (s, want) in [
            ("auto", IoEngineSetting::Auto),
            ("io_uring", IoEngineSetting::IoUring),
            ("threads", IoEngineSetting::Threads),
        ] {
            let t: T = toml::from_str(&format!("e = \"{s}\"")).unwrap();
            assert_eq!(t.e, want);
            assert_eq!(want.as_str(), s);
        }
        assert!(toml::from_str::<T>("e = \"aio\"").is_err());
    }
}
