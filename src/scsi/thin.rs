//! Thin provisioning soft threshold (`thin_threshold_percent`): after writes, the used space of
//! the filesystem holding a thin LUN's backing file is compared with the threshold; crossing
//! it upward raises, once, UNIT ATTENTION 38/07 THIN PROVISIONING SOFT THRESHOLD REACHED
//! (SBC-3 4.7.3.8) for the logical unit's I_T nexuses, a warn line and an alert; falling below
//! it again re-arms.
//!
//! The "pool" is the backing filesystem (statvfs), shared with whatever else lives there, so
//! the threshold is a percentage of it rather than an SBC threshold descriptor an application
//! client sets with the Logical Block Provisioning mode page (not implemented).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// ASC/ASCQ of UNIT ATTENTION THIN PROVISIONING SOFT THRESHOLD REACHED (SBC-3 4.7.3.8).
pub const UA_SOFT_THRESHOLD: (u8, u8) = (0x38, 0x07);

/// Statvfs at most this often per logical unit while writes keep coming (a full pool, or one
/// about to be, is checked right away: see [`ThinMonitor::after_write`]).
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The configured soft threshold of one LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinThreshold {
    /// 1..=99: percent of the backing filesystem in use.
    pub percent: u8,
    /// The backing file; its filesystem is the pool.
    pub path: PathBuf,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdEvent {
    /// Usage crossed the threshold upward (`used` percent): raise the unit attention.
    Reached { used: u8 },
    /// Usage fell below the threshold again: re-armed.
    Cleared { used: u8 },
}

/// Used space of a filesystem in percent, rounded up as df(1) does: used / (used + available
/// to unprivileged users).
pub fn used_percent(path: &Path) -> std::io::Result<u8> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(percent_of(
        st.f_blocks as u64,
        st.f_bfree as u64,
        st.f_bavail as u64,
    ))
}

/// df's Use%: used / (used + avail), rounded up; 0 for an empty or unknown filesystem.
pub fn percent_of(blocks: u64, bfree: u64, bavail: u64) -> u8 {
    let used = blocks.saturating_sub(bfree) as u128;
    let total = used + bavail as u128;
    if total == 0 {
        return 0;
    }
    (used * 100).div_ceil(total).min(100) as u8
}

/// The soft-threshold state of one logical unit.
#[derive(Debug)]
pub struct ThinMonitor {
    pub threshold: ThinThreshold,
    /// Reached and not yet re-armed.
    reached: AtomicBool,
    last_check: Mutex<Option<Instant>>,
    interval: Duration,
    /// Statvfs failed once (logged once).
    warned: AtomicBool,
}

impl ThinMonitor {
    pub fn new(threshold: ThinThreshold) -> Self {
        Self::with_interval(threshold, CHECK_INTERVAL)
    }

    pub fn with_interval(threshold: ThinThreshold, interval: Duration) -> Self {
        ThinMonitor {
            threshold,
            reached: AtomicBool::new(false),
            last_check: Mutex::new(None),
            interval,
            warned: AtomicBool::new(false),
        }
    }

    /// Called after a command that writes (or unmaps) finished; `full` when it failed for
    /// want of space (checked at once, whatever the interval). Returns what changed.
    pub fn after_write(&self, full: bool) -> Option<ThresholdEvent> {
        {
            let mut last = self.last_check.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if !full && last.is_some_and(|t| now.duration_since(t) < self.interval) {
                return None;
            }
            *last = Some(now);
        }
        match used_percent(&self.threshold.path) {
            Ok(used) => self.judge(used),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.threshold.path.display(), error = %e,
                        "cannot read the backing filesystem's usage (statvfs); thin threshold not checked");
                }
                None
            }
        }
    }

    /// The state change for usage `used` percent.
    pub fn judge(&self, used: u8) -> Option<ThresholdEvent> {
        if used >= self.threshold.percent {
            (!self.reached.swap(true, Ordering::AcqRel)).then_some(ThresholdEvent::Reached { used })
        } else {
            self.reached
                .swap(false, Ordering::AcqRel)
                .then_some(ThresholdEvent::Cleared { used })
        }
    }
}

/// THRESHOLD EXPONENT for the Logical Block Provisioning VPD page (SBC-3 6.6.4) of a LUN of
/// `num_blocks` logical blocks with a soft threshold: the smallest exponent (at least 1) for
/// which the LUN's capacity in threshold sets (2^exponent blocks) fits the 32-bit threshold
/// count of a threshold descriptor. 0 (no thresholds) without one.
pub fn threshold_exponent(num_blocks: u64, enabled: bool) -> u8 {
    if !enabled {
        return 0;
    }
    let mut e = 1u8;
    while e < 63 && (num_blocks >> e) > u64::from(u32::MAX) {
        e += 1;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor(percent: u8) -> ThinMonitor {
        ThinMonitor::with_interval(
            ThinThreshold {
                percent,
                path: "/".into(),
            },
            Duration::ZERO,
        )
    }

    #[test]
    fn raised_once_and_rearmed_below() {
        let m = monitor(80);
        assert_eq!(m.judge(10), None);
        assert_eq!(m.judge(79), None);
        assert_eq!(m.judge(80), Some(ThresholdEvent::Reached { used: 80 }));
        assert_eq!(m.judge(95), None, "once until re-armed");
        assert_eq!(m.judge(100), None);
        assert_eq!(m.judge(60), Some(ThresholdEvent::Cleared { used: 60 }));
        assert_eq!(m.judge(61), None);
        assert_eq!(m.judge(81), Some(ThresholdEvent::Reached { used: 81 }));
    }

    #[test]
    fn df_rounding() {
        assert_eq!(percent_of(0, 0, 0), 0);
        assert_eq!(percent_of(100, 100, 100), 0);
        assert_eq!(percent_of(100, 0, 0), 100);
        // 50 used, 45 available to users (5 reserved): 50/95 = 52.6 -> 53.
        assert_eq!(percent_of(100, 50, 45), 53);
        assert_eq!(percent_of(1000, 999, 999), 1);
    }

    #[test]
    fn statvfs_of_a_real_path() {
        let p = used_percent(Path::new("/")).unwrap();
        assert!(p <= 100);
        assert!(used_percent(Path::new("/nonexistent/twinsan")).is_err());
        // A path that cannot be checked is logged and skipped, never an event.
        let m = ThinMonitor::with_interval(
            ThinThreshold {
                percent: 1,
                path: "/nonexistent/twinsan".into(),
            },
            Duration::ZERO,
        );
        assert_eq!(m.after_write(true), None);
    }

    #[test]
    fn interval_limits_checks_unless_full() {
        let m = ThinMonitor::with_interval(
            ThinThreshold {
                percent: 1,
                path: "/".into(),
            },
            Duration::from_secs(3600),
        );
        // "/" is in use at least 1 %: the first check reaches it.
        if used_percent(Path::new("/")).unwrap() >= 1 {
            assert!(matches!(
                m.after_write(false),
                Some(ThresholdEvent::Reached { .. })
            ));
            m.reached.store(false, Ordering::Relaxed);
            assert_eq!(m.after_write(false), None, "within the interval");
            assert!(
                m.after_write(true).is_some(),
                "a full pool is checked at once"
            );
        }
    }

    #[test]
    fn exponent() {
        assert_eq!(threshold_exponent(1 << 20, false), 0);
        assert_eq!(threshold_exponent(1 << 20, true), 1);
        assert_eq!(threshold_exponent(u64::from(u32::MAX) * 2 + 1, true), 1);
        assert_eq!(threshold_exponent(u64::from(u32::MAX) * 2 + 2, true), 2);
        assert_eq!(threshold_exponent(1 << 40, true), 9);
        assert_eq!(threshold_exponent(u64::MAX, true), 32);
    }
}
