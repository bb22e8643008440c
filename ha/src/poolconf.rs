//! `/etc/xensource/pool.conf`: the local xapi's idea of who is pool master.
//!
//! The file holds `master`, `slave:<master-address>` (joined on the first ':' so IPv6 works) or
//! `broken`. It is watched with inotify on its directory, because xapi (and operators) may rewrite
//! it by renaming a temporary file over it, which a watch on the file itself would miss. A slow
//! re-read (every [`FALLBACK_POLL`]) covers events lost to a recreated directory or queue overflow.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{Stream, StreamExt};
use inotify::{EventStream, Inotify, WatchMask};
use tracing::{debug, info, warn};

use crate::role::PoolRole;

/// Default location on XenServer / XCP-ng.
pub const DEFAULT_PATH: &str = "/etc/xensource/pool.conf";

/// Safety-net re-read interval next to inotify.
pub const FALLBACK_POLL: Duration = Duration::from_secs(2);

/// Parsed content of pool.conf.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PoolConf {
    /// This host is pool master.
    Master,
    /// This host is a slave of the master at this address (IPv4, IPv6 or name).
    Slave(String),
    /// xapi marked the pool as broken.
    Broken,
    /// Anything else (garbage, empty, unreadable): the raw text or error, for status and logs.
    Unknown(String),
}

impl PoolConf {
    /// Parses the file content; never fails (garbage becomes [`PoolConf::Unknown`]).
    pub fn parse(text: &str) -> PoolConf {
        let t = text.trim();
        match t {
            "master" => PoolConf::Master,
            "broken" => PoolConf::Broken,
            _ => match t.split_once(':') {
                Some(("slave", addr)) if !addr.trim().is_empty() => {
                    PoolConf::Slave(addr.trim().to_string())
                }
                _ => PoolConf::Unknown(t.to_string()),
            },
        }
    }

    /// Reads and parses a file; a missing or unreadable file is [`PoolConf::Unknown`].
    pub fn read(path: &Path) -> PoolConf {
        match std::fs::read(path) {
            Ok(bytes) => PoolConf::parse(&String::from_utf8_lossy(&bytes)),
            Err(e) => PoolConf::Unknown(format!("<{}: {e}>", path.display())),
        }
    }

    /// The role this implies for the role machine.
    pub fn role(&self) -> PoolRole {
        match self {
            PoolConf::Master => PoolRole::Master,
            PoolConf::Slave(_) => PoolRole::Slave,
            PoolConf::Broken | PoolConf::Unknown(_) => PoolRole::Unknown,
        }
    }
}

/// Watches pool.conf and yields its value: first the current one, then each change.
pub struct PoolConfWatcher {
    path: PathBuf,
    name: OsString,
    events: EventStream<[u8; 4096]>,
    last: Option<PoolConf>,
    poll: Duration,
}

impl PoolConfWatcher {
    /// Starts watching `path` (its parent directory must exist). Must be called inside a tokio
    /// runtime.
    pub fn new(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::with_poll(path, FALLBACK_POLL)
    }

    /// Same as [`PoolConfWatcher::new`] with a custom fallback re-read interval.
    pub fn with_poll(path: impl Into<PathBuf>, poll: Duration) -> std::io::Result<Self> {
        let path = path.into();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| std::io::Error::other("pool.conf path has no file name"))?;
        // CLOSE_WRITE rather than CREATE/MODIFY: those fire before the new content is complete.
        let inotify = Inotify::init()?;
        inotify.watches().add(
            &dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE,
        )?;
        let events = inotify.into_event_stream([0u8; 4096])?;
        info!(path = %path.display(), "watching pool.conf");
        Ok(PoolConfWatcher {
            path,
            name,
            events,
            last: None,
            poll,
        })
    }

    /// Waits for the next distinct value (the first call returns the current value at once).
    pub async fn next(&mut self) -> PoolConf {
        loop {
            let cur = PoolConf::read(&self.path);
            if self.last.as_ref() != Some(&cur) {
                info!(path = %self.path.display(), value = ?cur, "pool.conf value");
                self.last = Some(cur.clone());
                return cur;
            }
            self.wait_event().await;
        }
    }

    /// Waits until an inotify event names our file, or the fallback interval passes.
    async fn wait_event(&mut self) {
        let deadline = tokio::time::sleep(self.poll);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                ev = self.events.next() => match ev {
                    Some(Ok(ev)) => {
                        // Overflow or events without a name: just re-read.
                        if ev.name.as_deref().is_none_or(|n| n == self.name.as_os_str()) {
                            debug!(mask = ?ev.mask, "pool.conf event");
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "inotify read failed; falling back to polling");
                        (&mut deadline).await;
                        return;
                    }
                    None => {
                        (&mut deadline).await;
                        return;
                    }
                },
            }
        }
    }

    /// Turns the watcher into a stream of values.
    pub fn into_stream(self) -> impl Stream<Item = PoolConf> + Send {
        futures::stream::unfold(self, |mut w| async move {
            let v = w.next().await;
            Some((v, w))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_values() {
        assert_eq!(PoolConf::parse("master"), PoolConf::Master);
        assert_eq!(PoolConf::parse("master\n"), PoolConf::Master);
        assert_eq!(PoolConf::parse("broken"), PoolConf::Broken);
        assert_eq!(
            PoolConf::parse("slave:10.0.0.1"),
            PoolConf::Slave("10.0.0.1".into())
        );
        assert_eq!(
            PoolConf::parse("slave:fe80::1:2"),
            PoolConf::Slave("fe80::1:2".into()),
            "IPv6 must split at the first ':' only"
        );
        assert_eq!(
            PoolConf::parse(" slave:host.example \n"),
            PoolConf::Slave("host.example".into())
        );
        assert_eq!(
            PoolConf::parse("slave:"),
            PoolConf::Unknown("slave:".into())
        );
        assert_eq!(PoolConf::parse(""), PoolConf::Unknown("".into()));
        assert_eq!(
            PoolConf::parse("MASTER"),
            PoolConf::Unknown("MASTER".into())
        );
        assert_eq!(
            PoolConf::parse("master:x"),
            PoolConf::Unknown("master:x".into())
        );
        assert_eq!(
            PoolConf::parse("\u{0}\u{ff}garbage"),
            PoolConf::Unknown("\u{0}\u{ff}garbage".into())
        );
    }

    #[test]
    fn roles() {
        assert_eq!(PoolConf::Master.role(), PoolRole::Master);
        assert_eq!(PoolConf::Slave("a".into()).role(), PoolRole::Slave);
        assert_eq!(PoolConf::Broken.role(), PoolRole::Unknown);
        assert_eq!(PoolConf::Unknown("x".into()).role(), PoolRole::Unknown);
    }

    #[test]
    fn read_missing_and_binary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pool.conf");
        assert!(matches!(PoolConf::read(&p), PoolConf::Unknown(_)));
        std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(PoolConf::read(&p), PoolConf::Unknown(_)));
    }

    async fn next_within(w: &mut PoolConfWatcher, ms: u64) -> Option<PoolConf> {
        tokio::time::timeout(Duration::from_millis(ms), w.next())
            .await
            .ok()
    }

    #[tokio::test]
    async fn watcher_sees_writes_and_renames() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pool.conf");
        std::fs::write(&p, "slave:192.0.2.1").unwrap();
        // Long fallback poll: the test proves inotify does the work.
        let mut w = PoolConfWatcher::with_poll(&p, Duration::from_secs(60)).unwrap();
        assert_eq!(
            next_within(&mut w, 1000).await,
            Some(PoolConf::Slave("192.0.2.1".into()))
        );
        // Nothing changed: nothing yielded.
        assert_eq!(next_within(&mut w, 200).await, None);
        // Unrelated file in the directory: nothing yielded.
        std::fs::write(d.path().join("other"), "master").unwrap();
        assert_eq!(next_within(&mut w, 200).await, None);

        // In-place write.
        std::fs::write(&p, "master").unwrap();
        assert_eq!(next_within(&mut w, 1000).await, Some(PoolConf::Master));

        // Rewrite by rename (what xapi does).
        let tmp = d.path().join("pool.conf.tmp");
        std::fs::write(&tmp, "slave:fe80::2").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_eq!(
            next_within(&mut w, 1000).await,
            Some(PoolConf::Slave("fe80::2".into()))
        );

        // Deleted, then recreated.
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            next_within(&mut w, 1000).await,
            Some(PoolConf::Unknown(_))
        ));
        std::fs::write(&p, "broken").unwrap();
        assert_eq!(next_within(&mut w, 1000).await, Some(PoolConf::Broken));
    }

    #[tokio::test]
    async fn stream_yields_current_then_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pool.conf");
        std::fs::write(&p, "master").unwrap();
        let w = PoolConfWatcher::new(&p).unwrap();
        let mut s = Box::pin(w.into_stream());
        let first = tokio::time::timeout(Duration::from_secs(1), s.next())
            .await
            .unwrap();
        assert_eq!(first, Some(PoolConf::Master));
        std::fs::write(&p, "slave:10.1.1.1").unwrap();
        let second = tokio::time::timeout(Duration::from_secs(1), s.next())
            .await
            .unwrap();
        assert_eq!(second, Some(PoolConf::Slave("10.1.1.1".into())));
    }

    #[tokio::test]
    async fn missing_directory_is_an_error() {
        assert!(PoolConfWatcher::new("/nonexistent-twinsan-dir/pool.conf").is_err());
    }
}
