//! Per-logical-unit command statistics: counts, bytes, errors by sense key (SPC-4 4.5.6),
//! latency histograms and the commands in flight. Each [`LogicalUnit`](super::LogicalUnit)
//! owns one; the target updates it with relaxed atomics on every command (no lock, no
//! allocation, no lookup), `twinsan status` and the Prometheus endpoint read it.

use super::cdb::Command;
use super::{ScsiResponse, Status};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use twinsan_replication::latency::{HistogramSnapshot, LatencyHistogram};

/// What kind of command, for the counters and histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandClass {
    /// READ(6/10/12/16).
    Read,
    /// Commands that write data to the medium: WRITE, WRITE ATOMIC, WRITE AND VERIFY, ORWRITE,
    /// COMPARE AND WRITE, WRITE SAME (UNMAP is `Other`: it moves no data).
    Write,
    /// SYNCHRONIZE CACHE.
    Flush,
    /// Everything else (INQUIRY, TEST UNIT READY, MODE SENSE, UNMAP, reservations...).
    Other,
}

impl CommandClass {
    pub fn of(cmd: &Command) -> Self {
        match cmd {
            Command::Read(_) => CommandClass::Read,
            Command::Write(_)
            | Command::WriteAtomic(_)
            | Command::OrWrite(_)
            | Command::WriteAndVerify { .. }
            | Command::CompareAndWrite { .. }
            | Command::WriteSame(_) => CommandClass::Write,
            Command::SynchronizeCache { .. } => CommandClass::Flush,
            _ => CommandClass::Other,
        }
    }
}

/// The sense keys of SPC-4 table 27 as Prometheus label values, indexed by key (0x0..=0xF).
pub const SENSE_KEY_NAMES: [&str; 16] = [
    "NO SENSE",
    "RECOVERED ERROR",
    "NOT READY",
    "MEDIUM ERROR",
    "HARDWARE ERROR",
    "ILLEGAL REQUEST",
    "UNIT ATTENTION",
    "DATA PROTECT",
    "BLANK CHECK",
    "VENDOR SPECIFIC",
    "COPY ABORTED",
    "ABORTED COMMAND",
    "RESERVED 0Ch",
    "VOLUME OVERFLOW",
    "MISCOMPARE",
    "RESERVED 0Fh",
];

/// The counters of one logical unit.
#[derive(Debug, Default)]
pub struct LunStats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    others: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    /// CHECK CONDITIONs by sense key, whether refused before data or failed in execution.
    check_conditions: [AtomicU64; 16],
    reservation_conflicts: AtomicU64,
    in_flight: AtomicU64,
    read_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
    flush_latency: LatencyHistogram,
}

/// A command running on a logical unit: in flight until dropped (also when its future is
/// dropped, e.g. by an aborted connection).
pub struct InFlight<'a>(&'a LunStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy of [`LunStats`] for `twinsan status --json` and the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LunStatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub others: u64,
    /// Data-In bytes of READs that completed GOOD.
    pub read_bytes: u64,
    /// Data-Out bytes of write commands that completed GOOD.
    pub written_bytes: u64,
    /// CHECK CONDITIONs by sense key name (keys never returned are left out).
    pub check_conditions: std::collections::BTreeMap<String, u64>,
    pub reservation_conflicts: u64,
    /// Commands running now (the queue depth this LUN sees).
    pub in_flight: u64,
    /// Total time the READs and the write commands took, in nanoseconds (the sums of the
    /// latency histograms): `status --watch` divides their growth by the commands'.
    #[serde(default)]
    pub read_latency_ns: u64,
    #[serde(default)]
    pub write_latency_ns: u64,
}

impl LunStats {
    /// Counts a command starting; the guard keeps it in flight.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Counts a command that ran: its class, its bytes when GOOD, its latency (read, write
    /// and flush), and its error.
    pub fn finish(
        &self,
        class: CommandClass,
        data_out_len: usize,
        response: &ScsiResponse,
        took: Duration,
    ) {
        let good = response.status == Status::Good;
        match class {
            CommandClass::Read => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                if good {
                    self.read_bytes
                        .fetch_add(response.data_in.len() as u64, Ordering::Relaxed);
                }
                self.read_latency.observe(took);
            }
            CommandClass::Write => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                if good {
                    self.written_bytes
                        .fetch_add(data_out_len as u64, Ordering::Relaxed);
                }
                self.write_latency.observe(took);
            }
            CommandClass::Flush => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                self.flush_latency.observe(took);
            }
            CommandClass::Other => {
                self.others.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !good {
            self.failed(response);
        }
    }

    /// Counts the error of a command that failed (also one refused before any data moved).
    pub fn failed(&self, response: &ScsiResponse) {
        match response.status {
            Status::CheckCondition => {
                // Fixed format: the sense key is the low nibble of byte 2 (SPC-4 4.5.3).
                let key = response
                    .sense
                    .as_ref()
                    .and_then(|s| s.get(2))
                    .map_or(0, |b| b & 0x0f);
                self.check_conditions[usize::from(key)].fetch_add(1, Ordering::Relaxed);
            }
            Status::ReservationConflict => {
                self.reservation_conflicts.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub fn snapshot(&self) -> LunStatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LunStatsSnapshot {
            reads: load(&self.reads),
            writes: load(&self.writes),
            flushes: load(&self.flushes),
            others: load(&self.others),
            read_bytes: load(&self.read_bytes),
            written_bytes: load(&self.written_bytes),
            check_conditions: SENSE_KEY_NAMES
                .iter()
                .zip(&self.check_conditions)
                .filter(|(_, n)| load(n) > 0)
                .map(|(k, n)| (k.to_string(), load(n)))
                .collect(),
            reservation_conflicts: load(&self.reservation_conflicts),
            in_flight: load(&self.in_flight),
            read_latency_ns: self.read_latency.sum_ns(),
            write_latency_ns: self.write_latency.sum_ns(),
        }
    }

    /// Latency of (reads, writes, flushes).
    pub fn latencies(&self) -> [(CommandClass, HistogramSnapshot); 3] {
        [
            (CommandClass::Read, self.read_latency.snapshot()),
            (CommandClass::Write, self.write_latency.snapshot()),
            (CommandClass::Flush, self.flush_latency.snapshot()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::Sense;
    use crate::scsi::SenseKey;
    use bytes::Bytes;

    #[test]
    fn commands_are_counted_by_class_with_bytes_only_when_good() {
        let s = LunStats::default();
        let ok = ScsiResponse::good(Bytes::from_static(&[0; 4096]));
        let bad = ScsiResponse::check(Sense::new(SenseKey::MediumError, 0x11, 0));
        s.finish(CommandClass::Read, 0, &ok, Duration::from_micros(50));
        s.finish(CommandClass::Read, 0, &bad, Duration::from_micros(50));
        s.finish(
            CommandClass::Write,
            512,
            &ScsiResponse::good(Bytes::new()),
            Duration::ZERO,
        );
        s.finish(
            CommandClass::Flush,
            0,
            &ScsiResponse::good(Bytes::new()),
            Duration::ZERO,
        );
        s.finish(
            CommandClass::Other,
            0,
            &ScsiResponse::good(Bytes::new()),
            Duration::ZERO,
        );
        let snap = s.snapshot();
        assert_eq!(
            (snap.reads, snap.writes, snap.flushes, snap.others),
            (2, 1, 1, 1)
        );
        assert_eq!((snap.read_bytes, snap.written_bytes), (4096, 512));
        assert_eq!(snap.check_conditions.get("MEDIUM ERROR"), Some(&1));
        assert_eq!(snap.check_conditions.len(), 1);
        let [(_, reads), (_, writes), (_, flushes)] = s.latencies();
        assert_eq!((reads.count, writes.count, flushes.count), (2, 1, 1));
    }

    #[test]
    fn refusals_count_by_sense_key_and_conflicts_apart() {
        let s = LunStats::default();
        s.failed(&ScsiResponse::check(Sense::new(
            SenseKey::UnitAttention,
            0x29,
            0,
        )));
        s.failed(&ScsiResponse {
            status: Status::ReservationConflict,
            sense: None,
            data_in: Bytes::new(),
        });
        let snap = s.snapshot();
        assert_eq!(snap.check_conditions.get("UNIT ATTENTION"), Some(&1));
        assert_eq!(snap.reservation_conflicts, 1);
        assert_eq!(snap.reads + snap.writes + snap.flushes + snap.others, 0);
    }

    #[test]
    fn in_flight_follows_the_guards() {
        let s = LunStats::default();
        let a = s.start();
        let b = s.start();
        assert_eq!(s.snapshot().in_flight, 2);
        drop(a);
        assert_eq!(s.snapshot().in_flight, 1);
        drop(b);
        assert_eq!(s.snapshot().in_flight, 0);
    }

    #[test]
    fn classes() {
        let read = crate::scsi::cdb::parse(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap();
        let write = crate::scsi::cdb::parse(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap();
        let sync = crate::scsi::cdb::parse(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let tur = crate::scsi::cdb::parse(&[0; 6]).unwrap();
        assert_eq!(CommandClass::of(&read), CommandClass::Read);
        assert_eq!(CommandClass::of(&write), CommandClass::Write);
        assert_eq!(CommandClass::of(&sync), CommandClass::Flush);
        assert_eq!(CommandClass::of(&tur), CommandClass::Other);
    }
}
