//! Recent log lines for `twinsan log`: a tracing writer that keeps the last [`CAPACITY`]
//! formatted lines (without colours) in a ring buffer and broadcasts each new one to followers.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use tokio::sync::broadcast;

/// Lines kept for `twinsan log`.
pub const CAPACITY: usize = 1000;

struct LogBuffer {
    lines: Mutex<VecDeque<String>>,
    tx: broadcast::Sender<String>,
}

fn buffer() -> &'static LogBuffer {
    static BUF: OnceLock<LogBuffer> = OnceLock::new();
    BUF.get_or_init(|| LogBuffer {
        lines: Mutex::new(VecDeque::with_capacity(CAPACITY)),
        tx: broadcast::channel(256).0,
    })
}

/// Appends one line (trailing newline removed).
pub fn push(line: &str) {
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        return;
    }
    let b = buffer();
    {
        let mut q = b.lines.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == CAPACITY {
            q.pop_front();
        }
        q.push_back(line.clone());
    }
    let _ = b.tx.send(line);
}

/// The kept lines, oldest first, and a receiver for the ones that follow (no line lost or
/// doubled between the two).
pub fn snapshot_and_follow() -> (Vec<String>, broadcast::Receiver<String>) {
    let b = buffer();
    let q = b.lines.lock().unwrap_or_else(|e| e.into_inner());
    let rx = b.tx.subscribe();
    (q.iter().cloned().collect(), rx)
}

/// A `MakeWriter` for a tracing fmt layer: each event's text goes to the ring buffer.
#[derive(Clone, Copy, Default)]
pub struct RingWriter;

/// Collects one event's output and pushes it on drop.
pub struct EventWriter(Vec<u8>);

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        for line in String::from_utf8_lossy(&self.0).lines() {
            push(line);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RingWriter {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter(Vec::new())
    }
}

/// Installs the process's tracing subscriber: human-readable lines on stderr (no colours under
/// journald, detected by `$JOURNAL_STREAM`; journald tags them with the unit's
/// SyslogIdentifier) plus the ring buffer behind `twinsan log`. `RUST_LOG` filters both.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let stderr = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let ring = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(false)
        .with_writer(RingWriter);
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(ring)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines_and_streams_new_ones() {
        for i in 0..CAPACITY + 5 {
            push(&format!("logbuf-test line {i}\n"));
        }
        let (lines, mut rx) = snapshot_and_follow();
        assert!(lines.len() <= CAPACITY);
        assert_eq!(
            lines.last().map(String::as_str),
            Some(format!("logbuf-test line {}", CAPACITY + 4).as_str())
        );
        {
            let mut w = RingWriter.make_writer_for_test();
            w.write_all(b"logbuf-test new\n").unwrap();
        }
        assert_eq!(rx.try_recv().unwrap(), "logbuf-test new");
    }

    impl RingWriter {
        fn make_writer_for_test(&self) -> EventWriter {
            tracing_subscriber::fmt::MakeWriter::make_writer(self)
        }
    }
}
