//! A removable medium (`removable = true`): whether it is loaded and which I_T nexuses
//! prevent its removal. All pure; the target moves the medium (START STOP UNIT with LOEJ)
//! and establishes the unit attention of a load.
//!
//! * PREVENT ALLOW MEDIUM REMOVAL (SBC-3 5.12): the prevention is kept per I_T nexus; the
//!   medium may not move while any nexus holds one. It ends for a nexus with PREVENT 00b
//!   from it or the loss of the nexus, and for every nexus with a logical unit reset or a
//!   hard reset (SBC-3 5.12, SAM-5 6.3).
//! * START STOP UNIT (SBC-3 5.25): with POWER CONDITION 0 and LOEJ set, START 0 unloads and
//!   START 1 loads the medium; either is MEDIUM REMOVAL PREVENTED while a prevention holds
//!   (a load too: the medium stays where it is, as tgt does and libiscsi's PreventAllow.Eject
//!   expects).
//! * Unloaded (SBC-3 4.2.1): the commands that need the medium ([`needs_medium`]) are NOT
//!   READY, MEDIUM NOT PRESENT; INQUIRY, REQUEST SENSE, MODE SENSE / SELECT, REPORT LUNS,
//!   the reservations, START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL still work.
//!
//! The state is in memory on this host only, neither saved nor replicated: a restart starts
//! loaded with no prevention (a power on ends every prevention, SBC-3 5.12), and so does the
//! peer that takes over in a failover.

use super::cdb::{Command, StartStopUnit};
use super::sense::Sense;
use super::NexusId;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Unit attention of a load: 28/00 NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED
/// (SPC-4 D.2), for every I_T nexus but the one that loaded it.
pub const UA_MEDIUM_MAY_HAVE_CHANGED: (u8, u8) = (0x28, 0x00);

/// Commands that need the medium: NOT READY, MEDIUM NOT PRESENT while it is unloaded.
pub fn needs_medium(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::TestUnitReady
            | Command::ReadCapacity10
            | Command::ReadCapacity16 { .. }
            | Command::GetLbaStatus { .. }
            | Command::Read(_)
            | Command::Write(_)
            | Command::OrWrite(_)
            | Command::WriteAtomic(_)
            | Command::WriteAndVerify { .. }
            | Command::Verify { .. }
            | Command::SynchronizeCache { .. }
            | Command::WriteSame(_)
            | Command::Unmap { .. }
            | Command::CompareAndWrite { .. }
            | Command::PreFetch { .. }
            | Command::ReadDefectData { .. }
            | Command::ExtendedCopy { .. }
            | Command::Sanitize(_)
    )
}

/// What a START STOP UNIT asks of a removable medium (SBC-3 5.25).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    /// LOEJ clear, or a POWER CONDITION other than 0 (START and LOEJ are then ignored).
    Stay,
    /// LOEJ set, START clear.
    Unload,
    /// LOEJ set, START set.
    Load,
}

impl Movement {
    pub fn of(ssu: &StartStopUnit) -> Self {
        match (ssu.power_condition, ssu.loej, ssu.start) {
            (0, true, false) => Movement::Unload,
            (0, true, true) => Movement::Load,
            _ => Movement::Stay,
        }
    }
}

/// The medium of a logical unit: loaded or not, and the preventions of its removal. Only a
/// removable unit's medium ever moves, so a fixed unit's is always present.
#[derive(Debug, Default)]
pub struct MediumState {
    /// Read without the lock by every command that needs the medium; changed under it.
    unloaded: AtomicBool,
    /// The I_T nexuses that prevent medium removal.
    preventing: Mutex<HashSet<NexusId>>,
}

impl MediumState {
    fn preventing(&self) -> std::sync::MutexGuard<'_, HashSet<NexusId>> {
        self.preventing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the medium is loaded.
    pub fn present(&self) -> bool {
        !self.unloaded.load(Ordering::Acquire)
    }

    /// Whether `cmd` may run now: NOT READY, MEDIUM NOT PRESENT for a command that needs the
    /// medium while it is unloaded.
    pub fn admit(&self, cmd: &Command) -> Result<(), Sense> {
        if needs_medium(cmd) && !self.present() {
            return Err(Sense::medium_not_present());
        }
        Ok(())
    }

    /// What REQUEST SENSE reports when nothing else is pending: MEDIUM NOT PRESENT while
    /// unloaded (SPC-4 6.39: the condition TEST UNIT READY would report).
    pub fn request_sense(&self) -> Option<Sense> {
        (!self.present()).then(Sense::medium_not_present)
    }

    /// PREVENT ALLOW MEDIUM REMOVAL from `nexus` (SBC-3 5.12): PREVENT 01b establishes its
    /// prevention, 00b ends it.
    pub fn prevent(&self, nexus: NexusId, prevent: bool) {
        let mut preventing = self.preventing();
        if prevent {
            preventing.insert(nexus);
        } else {
            preventing.remove(&nexus);
        }
    }

    /// Whether any I_T nexus prevents medium removal.
    pub fn prevented(&self) -> bool {
        !self.preventing().is_empty()
    }

    /// Moves the medium as `movement` says; MEDIUM REMOVAL PREVENTED while a prevention
    /// holds. Returns whether the medium changed state (a load of an unloaded medium is what
    /// raises the unit attention).
    pub fn apply(&self, movement: Movement) -> Result<bool, Sense> {
        let unload = match movement {
            Movement::Stay => return Ok(false),
            Movement::Unload => true,
            Movement::Load => false,
        };
        // Held while the medium moves, so no prevention slips in between.
        let preventing = self.preventing();
        if !preventing.is_empty() {
            return Err(Sense::medium_removal_prevented());
        }
        Ok(self.unloaded.swap(unload, Ordering::AcqRel) != unload)
    }

    /// The I_T nexus is lost: its prevention ends (SBC-3 5.12).
    pub fn nexus_lost(&self, nexus: NexusId) {
        self.preventing().remove(&nexus);
    }

    /// A logical unit reset or hard reset: every prevention ends (SBC-3 5.12, SAM-5 6.3).
    /// The medium stays as it is.
    pub fn reset(&self) {
        self.preventing().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{opcode, parse};
    use crate::scsi::SenseKey;

    fn ssu(pc: u8, loej: bool, start: bool) -> StartStopUnit {
        StartStopUnit {
            immed: false,
            power_condition: pc,
            no_flush: false,
            loej,
            start,
        }
    }

    #[test]
    fn movement_follows_loej_start_and_power_condition() {
        assert_eq!(Movement::of(&ssu(0, true, false)), Movement::Unload);
        assert_eq!(Movement::of(&ssu(0, true, true)), Movement::Load);
        assert_eq!(Movement::of(&ssu(0, false, false)), Movement::Stay);
        assert_eq!(Movement::of(&ssu(0, false, true)), Movement::Stay);
        for pc in 1..16 {
            assert_eq!(Movement::of(&ssu(pc, true, false)), Movement::Stay);
        }
    }

    #[test]
    fn a_prevention_from_any_nexus_keeps_the_medium() {
        let m = MediumState::default();
        m.prevent(1, true);
        m.prevent(2, true);
        let prevented = Err(Sense::medium_removal_prevented());
        assert_eq!(m.apply(Movement::Unload), prevented);
        assert!(m.present());
        m.prevent(1, false);
        assert_eq!(
            m.apply(Movement::Unload),
            prevented,
            "nexus 2 still prevents"
        );
        // PREVENT 00b from a nexus that holds none changes nothing.
        m.prevent(3, false);
        assert!(m.prevented());
        m.prevent(2, false);
        assert_eq!(m.apply(Movement::Unload), Ok(true));
        assert!(!m.present());
        // Unloading an unloaded medium is no change; loading while prevented is refused.
        assert_eq!(m.apply(Movement::Unload), Ok(false));
        m.prevent(4, true);
        assert_eq!(m.apply(Movement::Load), prevented);
        assert!(!m.present());
        m.prevent(4, false);
        assert_eq!(m.apply(Movement::Load), Ok(true));
        assert_eq!(m.apply(Movement::Load), Ok(false));
        assert_eq!(m.apply(Movement::Stay), Ok(false));
    }

    #[test]
    fn nexus_loss_and_resets_end_preventions() {
        let m = MediumState::default();
        m.prevent(1, true);
        m.prevent(2, true);
        m.nexus_lost(1);
        assert!(m.prevented());
        m.nexus_lost(2);
        assert!(!m.prevented());
        m.prevent(1, true);
        m.prevent(2, true);
        m.reset();
        assert!(!m.prevented());
        assert_eq!(m.apply(Movement::Unload), Ok(true));
        m.reset();
        assert!(!m.present(), "a reset does not load the medium");
    }

    #[test]
    fn unloaded_medium_refuses_medium_access_only() {
        let m = MediumState::default();
        let tur = parse(&[opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]).unwrap();
        let read = parse(&[opcode::READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap();
        let inquiry = parse(&[opcode::INQUIRY, 0, 0, 0, 96, 0]).unwrap();
        let ssu = parse(&[opcode::START_STOP_UNIT, 0, 0, 0, 0x03, 0]).unwrap();
        let pa = parse(&[opcode::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0]).unwrap();
        for c in [&tur, &read, &inquiry, &ssu, &pa] {
            assert_eq!(m.admit(c), Ok(()));
        }
        assert_eq!(m.request_sense(), None);
        m.apply(Movement::Unload).unwrap();
        let s = m.admit(&tur).unwrap_err();
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::NotReady, 0x3A, 0x00));
        assert_eq!(m.admit(&read), Err(Sense::medium_not_present()));
        for c in [&inquiry, &ssu, &pa] {
            assert_eq!(m.admit(c), Ok(()));
        }
        assert_eq!(m.request_sense(), Some(Sense::medium_not_present()));
    }
}
