//! SANITIZE (SBC-4 5.30, 4.11): the CDB and parameter list checks, the overwrite pattern, the
//! state a logical unit is in while a sanitize runs or after one failed, and the pacing of
//! the bytes written. All pure; the job that writes (through the unit's store, so that a
//! replicated LUN replicates it) is the target's.
//!
//! * Service actions: OVERWRITE (01h, SBC-4 5.30.2), BLOCK ERASE (02h, 5.30.3: on a file or
//!   block device, every block deallocated so that it reads back as zeroes; thin LUNs only),
//!   EXIT FAILURE MODE (1Fh, 5.30.5). CRYPTO ERASE (03h) is not supported: INVALID FIELD IN
//!   CDB.
//! * While a sanitize operation runs (4.11.2) only INQUIRY, REPORT LUNS and REQUEST SENSE are
//!   processed; everything else is NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS
//!   with the PROGRESS INDICATION, which REQUEST SENSE also returns. The operation belongs to
//!   the logical unit: task aborts, resets and the end of the session do not stop it.
//! * A failed sanitize (4.11.4) leaves the unit in failure mode: medium access commands are
//!   MEDIUM ERROR, SANITIZE COMMAND FAILED until a SANITIZE succeeds, or EXIT FAILURE MODE
//!   when the failed one had AUSE set (with AUSE clear EXIT FAILURE MODE is INVALID FIELD IN
//!   CDB).

use super::cdb::{Command, Sanitize, SA_SANITIZE_BLOCK_ERASE, SA_SANITIZE_OVERWRITE};
use super::sense::Sense;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of the OVERWRITE parameter list header (SBC-4 table 100).
const OVERWRITE_HEADER: usize = 4;

/// CDB checks that need the logical unit: BLOCK ERASE only where blocks can be deallocated
/// (thin provisioning, LBPRZ=1), and the PARAMETER LIST LENGTH each service action allows
/// (SBC-4 5.30.1: OVERWRITE 5 ..= block length + 4, the others 0; otherwise INVALID FIELD IN
/// CDB).
pub fn check_cdb(s: &Sanitize, block_size: u32, thin: bool) -> Result<(), Sense> {
    let len_field = Sense::invalid_field_in_cdb(7, None);
    match s.service_action {
        SA_SANITIZE_OVERWRITE => {
            let len = u32::from(s.param_len);
            if len <= OVERWRITE_HEADER as u32 || len > block_size + OVERWRITE_HEADER as u32 {
                return Err(len_field);
            }
        }
        SA_SANITIZE_BLOCK_ERASE if !thin => return Err(Sense::invalid_field_in_cdb(1, Some(4))),
        _ if s.param_len != 0 => return Err(len_field),
        _ => {}
    }
    Ok(())
}

/// An OVERWRITE parameter list (SBC-4 5.30.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwrite {
    /// The pattern is inverted between consecutive passes.
    pub invert: bool,
    /// OVERWRITE COUNT: passes over the whole medium, 1..=31.
    pub passes: u8,
    /// INITIALIZATION PATTERN, 1 ..= block length bytes, repeated to fill each block.
    pub pattern: Vec<u8>,
}

/// Parses and checks an OVERWRITE parameter list: TEST 00b, OVERWRITE COUNT not zero,
/// INITIALIZATION PATTERN LENGTH 1 ..= block length and the list exactly the pattern plus its
/// 4-byte header; otherwise INVALID FIELD IN PARAMETER LIST pointing at the field.
pub fn parse_overwrite(params: &[u8], block_size: u32) -> Result<Overwrite, Sense> {
    let bad = |byte: u16, bit: Option<u8>| Sense::invalid_field_in_parameter_list(byte, bit);
    if params.len() < OVERWRITE_HEADER {
        return Err(Sense::parameter_list_length_error());
    }
    if params[0] & 0x60 != 0 {
        return Err(bad(0, Some(6)));
    }
    let passes = params[0] & 0x1F;
    if passes == 0 {
        return Err(bad(0, Some(4)));
    }
    let len = usize::from(u16::from_be_bytes([params[2], params[3]]));
    if len == 0 || len > block_size as usize || params.len() != OVERWRITE_HEADER + len {
        return Err(bad(2, None));
    }
    Ok(Overwrite {
        invert: params[0] & 0x80 != 0,
        passes,
        pattern: params[OVERWRITE_HEADER..].to_vec(),
    })
}

impl Overwrite {
    /// One logical block as pass `pass` (0-based) writes it: the pattern repeated from the
    /// block's first byte, inverted on odd passes when INVERT is set.
    pub fn block(&self, pass: u8, block_size: u32) -> Vec<u8> {
        let flip = if self.invert && pass % 2 == 1 {
            0xFF
        } else {
            0x00
        };
        self.pattern
            .iter()
            .cycle()
            .take(block_size as usize)
            .map(|b| b ^ flip)
            .collect()
    }
}

/// What a sanitize does to the medium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Overwrite(Overwrite),
    BlockErase,
}

impl Operation {
    /// Bytes the operation goes through on a medium of `capacity` bytes: the progress
    /// indication's denominator.
    pub fn total_bytes(&self, capacity: u64) -> u64 {
        match self {
            Operation::Overwrite(o) => capacity.saturating_mul(u64::from(o.passes)),
            Operation::BlockErase => capacity,
        }
    }
}

/// Where the logical unit stands with respect to sanitize operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Running { done: u64, total: u64, ause: bool },
    Failed { ause: bool },
}

/// A logical unit's sanitize state (one per unit, shared by every I_T nexus).
#[derive(Debug)]
pub struct SanitizeState {
    phase: Mutex<Phase>,
}

impl Default for SanitizeState {
    fn default() -> Self {
        SanitizeState {
            phase: Mutex::new(Phase::Idle),
        }
    }
}

/// PROGRESS INDICATION: `done` of `total` in 65536ths (SPC-4 4.5.2.4.4).
pub fn progress_indication(done: u64, total: u64) -> u16 {
    if total == 0 {
        return 0;
    }
    let p = u128::from(done.min(total)) * 65536 / u128::from(total);
    u16::try_from(p).unwrap_or(u16::MAX)
}

/// Commands that access the medium: refused in sanitize failure mode.
fn accesses_medium(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Read(_)
            | Command::Write(_)
            | Command::OrWrite(_)
            | Command::WriteAtomic(_)
            | Command::WriteAndVerify { .. }
            | Command::Verify { .. }
            | Command::WriteSame(_)
            | Command::Unmap { .. }
            | Command::CompareAndWrite { .. }
            | Command::PreFetch { .. }
            | Command::SynchronizeCache { .. }
            | Command::GetLbaStatus { .. }
            | Command::ExtendedCopy { .. }
    )
}

impl SanitizeState {
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `cmd` may run now: while a sanitize runs only INQUIRY, REPORT LUNS and REQUEST
    /// SENSE (04/1B with the progress otherwise); in failure mode no medium access (31/03).
    pub fn admit(&self, cmd: &Command) -> Result<(), Sense> {
        match *self.phase() {
            Phase::Idle => Ok(()),
            Phase::Running { done, total, .. } => match cmd {
                Command::Inquiry { .. }
                | Command::ReportLuns { .. }
                | Command::RequestSense { .. } => Ok(()),
                _ => Err(Sense::sanitize_in_progress(progress_indication(
                    done, total,
                ))),
            },
            Phase::Failed { .. } if accesses_medium(cmd) => Err(Sense::sanitize_failed()),
            Phase::Failed { .. } => Ok(()),
        }
    }

    /// What REQUEST SENSE reports when no unit attention is pending: SANITIZE IN PROGRESS
    /// with the progress while one runs.
    pub fn request_sense(&self) -> Option<Sense> {
        match *self.phase() {
            Phase::Running { done, total, .. } => Some(Sense::sanitize_in_progress(
                progress_indication(done, total),
            )),
            _ => None,
        }
    }

    /// Whether a sanitize operation is running.
    pub fn running(&self) -> bool {
        matches!(*self.phase(), Phase::Running { .. })
    }

    /// Starts a sanitize of `total` bytes (a failure mode ends with it). Refused while one
    /// runs.
    pub fn begin(&self, total: u64, ause: bool) -> Result<(), Sense> {
        let mut phase = self.phase();
        if let Phase::Running { done, total, .. } = *phase {
            return Err(Sense::sanitize_in_progress(progress_indication(
                done, total,
            )));
        }
        *phase = Phase::Running {
            done: 0,
            total,
            ause,
        };
        Ok(())
    }

    /// `bytes` more of the running sanitize are done.
    pub fn advance(&self, bytes: u64) {
        if let Phase::Running { done, .. } = &mut *self.phase() {
            *done = done.saturating_add(bytes);
        }
    }

    /// The running sanitize ended: back to normal, or into failure mode.
    pub fn finish(&self, ok: bool) {
        let mut phase = self.phase();
        if let Phase::Running { ause, .. } = *phase {
            *phase = if ok {
                Phase::Idle
            } else {
                Phase::Failed { ause }
            };
        }
    }

    /// EXIT FAILURE MODE (SBC-4 5.30.5): ends a failure mode entered by a sanitize with AUSE
    /// set; after one with AUSE clear it is INVALID FIELD IN CDB (only a sanitize that
    /// succeeds ends that one). Outside failure mode there is nothing to exit: GOOD.
    pub fn exit_failure_mode(&self) -> Result<(), Sense> {
        let mut phase = self.phase();
        match *phase {
            Phase::Running { done, total, .. } => Err(Sense::sanitize_in_progress(
                progress_indication(done, total),
            )),
            Phase::Failed { ause: false } => Err(Sense::invalid_field_in_cdb(1, Some(4))),
            Phase::Failed { ause: true } => {
                *phase = Phase::Idle;
                Ok(())
            }
            Phase::Idle => Ok(()),
        }
    }
}

/// Paces a sanitize to `rate` bytes per second (`sanitize_rate`, 0 = unlimited): how long to
/// wait before the next chunk so that the bytes written since the start stay within the rate.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    started: Instant,
    sent: u64,
}

impl Pacer {
    pub fn new(rate: u64, now: Instant) -> Self {
        Pacer {
            rate,
            started: now,
            sent: 0,
        }
    }

    /// Counts `bytes` about to be written at `now`; returns how long to wait first.
    pub fn delay(&mut self, bytes: u64, now: Instant) -> Duration {
        let due = if self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.sent as f64 / self.rate as f64)
        };
        self.sent = self.sent.saturating_add(bytes);
        (self.started + due).saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{parse, SA_SANITIZE_EXIT_FAILURE_MODE};
    use crate::scsi::SenseKey;

    fn cdb(flags: u8, param_len: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = crate::scsi::cdb::opcode::SANITIZE;
        c[1] = flags;
        c[7..9].copy_from_slice(&param_len.to_be_bytes());
        c
    }

    fn sanitize(flags: u8, param_len: u16) -> Result<Sanitize, Sense> {
        match parse(&cdb(flags, param_len))? {
            Command::Sanitize(s) => Ok(s),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn params(byte0: u8, pattern: &[u8]) -> Vec<u8> {
        let mut p = vec![byte0, 0];
        p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
        p.extend_from_slice(pattern);
        p
    }

    #[test]
    fn cdb_fields_and_reserved_bits() {
        let s = sanitize(0x80 | 0x20 | 0x01, 516).unwrap();
        assert!(s.immed && s.ause);
        assert_eq!((s.service_action, s.param_len), (1, 516));
        // ZNR / reserved bit 6 and reserved bytes 2..=6.
        let e = sanitize(0x40 | 0x01, 8).unwrap_err();
        assert_eq!(
            (e.asc, e.sks.unwrap().byte, e.sks.unwrap().bit),
            (0x24, 1, Some(6))
        );
        for byte in 2..=6 {
            let mut c = cdb(0x01, 8);
            c[byte] = 1;
            let e = parse(&c).unwrap_err();
            assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, byte as u16));
        }
        // Every service action but 01h, 02h and 1Fh (CRYPTO ERASE included).
        for sa in (0..=0x1Fu8).filter(|sa| ![1, 2, 0x1F].contains(sa)) {
            let e = sanitize(sa, 0).unwrap_err();
            assert_eq!(
                (e.key, e.asc, e.sks.unwrap().byte),
                (SenseKey::IllegalRequest, 0x24, 1)
            );
        }
    }

    #[test]
    fn parameter_list_length_per_service_action() {
        let ow = |len| sanitize(SA_SANITIZE_OVERWRITE, len).unwrap();
        for len in [0u16, 1, 4, 517, 1000] {
            let e = check_cdb(&ow(len), 512, true).unwrap_err();
            assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 7), "len {len}");
        }
        for len in [5u16, 8, 260, 516] {
            assert!(check_cdb(&ow(len), 512, true).is_ok(), "len {len}");
        }
        for sa in [SA_SANITIZE_BLOCK_ERASE, SA_SANITIZE_EXIT_FAILURE_MODE] {
            assert!(check_cdb(&sanitize(sa, 0).unwrap(), 512, true).is_ok());
            let e = check_cdb(&sanitize(sa, 8).unwrap(), 512, true).unwrap_err();
            assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 7));
        }
        // BLOCK ERASE needs blocks that can be deallocated.
        let e = check_cdb(&sanitize(SA_SANITIZE_BLOCK_ERASE, 0).unwrap(), 512, false).unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 1));
        assert!(check_cdb(
            &sanitize(SA_SANITIZE_EXIT_FAILURE_MODE, 0).unwrap(),
            512,
            false
        )
        .is_ok());
    }

    #[test]
    fn overwrite_parameter_list() {
        let o = parse_overwrite(&params(0x83, &[1, 2, 3]), 512).unwrap();
        assert_eq!(
            o,
            Overwrite {
                invert: true,
                passes: 3,
                pattern: vec![1, 2, 3]
            }
        );
        let field = |p: &[u8]| {
            let e = parse_overwrite(p, 512).unwrap_err();
            (e.asc, e.sks.map(|s| (s.in_cdb, s.byte)))
        };
        // OVERWRITE COUNT 0, TEST not 00b.
        assert_eq!(field(&params(0x00, &[0xAA; 512])), (0x26, Some((false, 0))));
        assert_eq!(field(&params(0x21, &[0xAA; 4])), (0x26, Some((false, 0))));
        // Pattern length 0, above the block length, or not what the list holds.
        assert_eq!(field(&params(0x01, &[])), (0x26, Some((false, 2))));
        assert_eq!(field(&params(0x01, &[0; 513])), (0x26, Some((false, 2))));
        let mut p = params(0x01, &[0xAA; 8]);
        p[3] = 4;
        assert_eq!(field(&p), (0x26, Some((false, 2))));
        let mut p = params(0x01, &[0xAA; 4]);
        p[3] = 8;
        assert_eq!(field(&p), (0x26, Some((false, 2))));
        assert_eq!(field(&[1, 0, 0]), (0x1A, None));
        assert!(parse_overwrite(&params(0x1F, &[7; 512]), 512).is_ok());
    }

    #[test]
    fn pattern_fills_the_block_and_inverts_on_odd_passes() {
        let o = parse_overwrite(&params(0x82, &[0x0F, 0x01, 0x80]), 8).unwrap();
        assert_eq!(
            o.block(0, 8),
            [0x0F, 0x01, 0x80, 0x0F, 0x01, 0x80, 0x0F, 0x01]
        );
        assert_eq!(
            o.block(1, 8),
            [0xF0, 0xFE, 0x7F, 0xF0, 0xFE, 0x7F, 0xF0, 0xFE]
        );
        assert_eq!(o.block(2, 8), o.block(0, 8));
        let plain = Overwrite {
            invert: false,
            ..o.clone()
        };
        assert_eq!(plain.block(1, 8), o.block(0, 8));
        assert_eq!(Operation::Overwrite(o).total_bytes(1000), 2000);
        assert_eq!(Operation::BlockErase.total_bytes(1000), 1000);
    }

    #[test]
    fn state_machine() {
        let s = SanitizeState::default();
        let read = Command::Read(crate::scsi::cdb::Transfer {
            lba: 0,
            blocks: 1,
            dpo: false,
            fua: false,
        });
        let inquiry = Command::Inquiry {
            evpd: false,
            page: 0,
            alloc_len: 96,
        };
        assert!(s.admit(&read).is_ok() && s.request_sense().is_none());
        s.begin(1000, false).unwrap();
        s.advance(250);
        let e = s.admit(&read).unwrap_err();
        assert_eq!(
            (e.key, e.asc, e.ascq, e.progress),
            (SenseKey::NotReady, 0x04, 0x1B, Some(16384))
        );
        assert!(s.admit(&Command::TestUnitReady).is_err());
        assert!(s.admit(&inquiry).is_ok());
        assert_eq!(s.request_sense().unwrap().progress, Some(16384));
        // A second sanitize, or EXIT FAILURE MODE, while one runs.
        assert_eq!(s.begin(10, true).unwrap_err().ascq, 0x1B);
        assert_eq!(s.exit_failure_mode().unwrap_err().ascq, 0x1B);
        // Failure with AUSE clear: medium access is 31/03, EXIT FAILURE MODE refused.
        s.finish(false);
        assert_eq!(s.admit(&read).unwrap_err(), Sense::sanitize_failed());
        assert!(s.admit(&Command::TestUnitReady).is_ok());
        assert_eq!(s.exit_failure_mode().unwrap_err().asc, 0x24);
        // A sanitize that succeeds ends the failure mode.
        s.begin(10, true).unwrap();
        s.finish(true);
        assert!(s.admit(&read).is_ok());
        // Failure with AUSE set: EXIT FAILURE MODE ends it.
        s.begin(10, true).unwrap();
        s.finish(false);
        assert!(s.admit(&read).is_err());
        s.exit_failure_mode().unwrap();
        assert!(s.admit(&read).is_ok());
        assert!(s.exit_failure_mode().is_ok(), "nothing to exit");
    }

    #[test]
    fn progress_and_pacing() {
        assert_eq!(progress_indication(0, 0), 0);
        assert_eq!(progress_indication(1, 2), 32768);
        assert_eq!(progress_indication(5, 5), u16::MAX);
        assert_eq!(progress_indication(u64::MAX / 2, u64::MAX), 32767);
        let t0 = Instant::now();
        let mut p = Pacer::new(1 << 20, t0);
        assert_eq!(p.delay(1 << 20, t0), Duration::ZERO);
        assert_eq!(p.delay(1 << 20, t0), Duration::from_secs(1));
        assert_eq!(
            p.delay(1 << 20, t0 + Duration::from_secs(3)),
            Duration::ZERO
        );
        let mut unlimited = Pacer::new(0, t0);
        unlimited.delay(1 << 40, t0);
        assert_eq!(unlimited.delay(1, t0), Duration::ZERO);
    }
}
