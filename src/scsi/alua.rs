//! Asymmetric logical unit access across the pair (SPC-4 5.16), implicit only (TPGS = 01b).
//!
//! Each host of a replicated pair is one target port group with one target port; the group
//! number and the relative target port identifier are the same number, 1 or 2, and both hosts
//! agree on it: the host whose replication `listen` address sorts below its `peer` address is
//! group 1. A logical unit's groups take their access state from the roles of its replicated
//! volume: the primary's group is active/optimized, the secondary's standby; with no primary
//! on either side (a switchover in progress) both are transitioning. Everything here is pure:
//! the [`Alua`] of a logical unit only remembers the states it last reported, to raise the
//! unit attention ASYMMETRIC ACCESS STATE CHANGED when they change (SPC-4 5.16.2.7).

use super::cdb::Command;
use super::sense::{Sense, SenseKey};
use std::net::SocketAddr;
use std::sync::Mutex;

/// Unit attention 2A/06 ASYMMETRIC ACCESS STATE CHANGED (SPC-4 5.16.2.7).
pub const UA_ACCESS_STATE_CHANGED: (u8, u8) = (0x2A, 0x06);
/// TPGS field of standard INQUIRY data for implicit ALUA only (SPC-4 6.4.2, table 145).
pub const TPGS_IMPLICIT: u8 = 0x10;

/// Asymmetric access states (SPC-4 6.36, table 262) this target reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AccessState {
    ActiveOptimized = 0x0,
    Standby = 0x2,
    Unavailable = 0x3,
    Transitioning = 0xF,
}

/// The states a port group may report: T_SUP, U_SUP, S_SUP, AO_SUP (SPC-4 6.36, byte 1 of a
/// target port group descriptor).
const SUPPORTED_STATES: u8 = 0x80 | 0x08 | 0x04 | 0x01;
/// STATUS CODE: target port asymmetric access state altered by implicit ALUA behavior.
const STATUS_ALTERED_IMPLICITLY: u8 = 0x02;

/// The pair's roles for one logical unit as this host sees them (its replicated volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairRoles {
    pub local_primary: bool,
    /// `None`: the peer is not connected, its role is unknown.
    pub peer_primary: Option<bool>,
}

/// The two target port groups' numbers as seen from this host. Each group has one target
/// port whose relative target port identifier is the group number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortGroups {
    pub own: u16,
    pub peer: u16,
}

impl PortGroups {
    /// From the replication link's addresses, so both hosts agree without configuring it:
    /// the host listening on the lower address is group 1. `None` when the two are equal.
    pub fn from_link(listen: SocketAddr, peer: SocketAddr) -> Option<PortGroups> {
        match listen.cmp(&peer) {
            std::cmp::Ordering::Less => Some(PortGroups { own: 1, peer: 2 }),
            std::cmp::Ordering::Greater => Some(PortGroups { own: 2, peer: 1 }),
            std::cmp::Ordering::Equal => None,
        }
    }
}

/// The access state of each group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStates {
    pub own: AccessState,
    pub peer: AccessState,
}

/// The groups' states from the roles: the primary's group is active/optimized and the other
/// standby; with the peer connected and neither primary, both are transitioning (a switchover:
/// initiators retry, SPC-4 5.16.2.6); the peer's group is unavailable while it is unreachable.
pub fn group_states(roles: PairRoles) -> GroupStates {
    use AccessState::*;
    match (roles.local_primary, roles.peer_primary) {
        (true, _) => GroupStates {
            own: ActiveOptimized,
            peer: Standby,
        },
        (false, Some(true)) => GroupStates {
            own: Standby,
            peer: ActiveOptimized,
        },
        (false, Some(false)) => GroupStates {
            own: Transitioning,
            peer: Transitioning,
        },
        (false, None) => GroupStates {
            own: Standby,
            peer: Unavailable,
        },
    }
}

/// Whether `cmd` may run through a target port in `state`; the sense data otherwise.
/// Standby (SPC-4 5.16.2.4.4): INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE,
/// MODE SENSE / SELECT, PERSISTENT RESERVE IN / OUT and (commands the standard lets a device
/// server add) REPORT SUPPORTED OPERATION CODES and READ CAPACITY (10) / (16); anything else,
/// TEST UNIT READY and every media access included, is NOT READY, LOGICAL UNIT NOT
/// ACCESSIBLE, TARGET PORT IN STANDBY STATE (04/0B). READ CAPACITY reads no medium, and Linux
/// needs it: sd reads a path's capacity when the path appears and keeps it, so a path that was
/// standby then would stay 0 blocks long after it turns active/optimized, and dm-multipath's
/// I/O through it would fail ("access beyond end of device") after every switchover (LIO
/// allows it in standby too). Transitioning (5.16.2.6) and unavailable (5.16.2.4.5):
/// INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS and REQUEST SENSE; else 04/0A ASYMMETRIC
/// ACCESS STATE TRANSITION, or 04/0C TARGET PORT IN UNAVAILABLE STATE.
pub fn check_access(state: AccessState, cmd: &Command) -> Result<(), Sense> {
    let always = matches!(
        cmd,
        Command::Inquiry { .. }
            | Command::ReportLuns { .. }
            | Command::ReportTargetPortGroups { .. }
            | Command::RequestSense { .. }
    );
    let ascq = match state {
        AccessState::ActiveOptimized => return Ok(()),
        _ if always => return Ok(()),
        AccessState::Standby
            if matches!(
                cmd,
                Command::ModeSense(_)
                    | Command::ModeSelect(_)
                    | Command::PersistentReserveIn { .. }
                    | Command::PersistentReserveOut(_)
                    | Command::ReportSupportedOpcodes(_)
                    | Command::ReadCapacity10
                    | Command::ReadCapacity16 { .. }
            ) =>
        {
            return Ok(())
        }
        AccessState::Standby => 0x0B,
        AccessState::Transitioning => 0x0A,
        AccessState::Unavailable => 0x0C,
    };
    Err(Sense::new(SenseKey::NotReady, 0x04, ascq))
}

/// REPORT TARGET PORT GROUPS parameter data (SPC-4 6.36): one descriptor per group, own group
/// first, each with its one target port; `extended`: the extended header (PARAMETER DATA
/// FORMAT 001b, implicit transition time 0 = not specified) instead of the length-only one.
pub fn report_target_port_groups(
    groups: PortGroups,
    states: GroupStates,
    extended: bool,
    altered: bool,
) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    if extended {
        d.extend_from_slice(&[0x10, 0, 0, 0]);
    }
    let status = if altered {
        STATUS_ALTERED_IMPLICITLY
    } else {
        0
    };
    for (group, state) in [(groups.own, states.own), (groups.peer, states.peer)] {
        let g = group.to_be_bytes();
        // PREF 0; one target port, its relative identifier = the group number.
        d.extend_from_slice(&[state as u8, SUPPORTED_STATES, g[0], g[1], 0, status, 0, 1]);
        d.extend_from_slice(&[0, 0, g[0], g[1]]);
    }
    let len = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&len.to_be_bytes());
    d
}

/// Without ALUA, REPORT TARGET PORT GROUPS fails as any unknown MAINTENANCE IN service action.
const fn no_alua() -> Sense {
    Sense::invalid_field_in_cdb(1, Some(4))
}

/// PARAMETER DATA FORMAT other than 000b and 001b (SPC-4 6.36.1).
const fn bad_format() -> Sense {
    Sense::invalid_field_in_cdb(1, Some(7))
}

/// The ALUA checks of a command before it runs, `own` being the state of this host's group
/// (`None`: the logical unit has no ALUA). SET TARGET PORT GROUPS needs nothing here: with
/// implicit ALUA only it is not supported (SPC-4 6.37), and MAINTENANCE OUT is no command of
/// this target (INVALID COMMAND OPERATION CODE).
pub fn admit(own: Option<AccessState>, cmd: &Command) -> Result<(), Sense> {
    match (own, cmd) {
        (None, Command::ReportTargetPortGroups { .. }) => Err(no_alua()),
        (None, _) => Ok(()),
        (Some(_), Command::ReportTargetPortGroups { format, .. }) if *format > 1 => {
            Err(bad_format())
        }
        (Some(state), _) => check_access(state, cmd),
    }
}

/// REPORT TARGET PORT GROUPS data of a logical unit with `alua` (the errors of [`admit`]
/// without it or for a bad format).
pub fn rtpg_data(alua: Option<&Alua>, cmd: &Command) -> Result<Vec<u8>, Sense> {
    let (Some(alua), Command::ReportTargetPortGroups { format, .. }) = (alua, cmd) else {
        return Err(no_alua());
    };
    match format {
        0 | 1 => Ok(alua.report(*format == 1)),
        _ => Err(bad_format()),
    }
}

/// What reads a logical unit's pair roles (its replicated volume).
pub type RolesSource = Box<dyn Fn() -> PairRoles + Send + Sync>;

/// ALUA of one logical unit: its port groups, where its roles come from, and the states it
/// last reported.
pub struct Alua {
    groups: PortGroups,
    roles: RolesSource,
    /// The states last observed, and whether they ever changed (RTPG STATUS CODE).
    last: Mutex<(Option<GroupStates>, bool)>,
}

impl Alua {
    pub fn new(groups: PortGroups, roles: RolesSource) -> Self {
        Alua {
            groups,
            roles,
            last: Mutex::new((None, false)),
        }
    }

    pub fn groups(&self) -> PortGroups {
        self.groups
    }

    /// The current states, and whether they differ from the ones last observed (the first
    /// observation is no change: a unit starting up has no state to change from).
    pub fn observe(&self) -> (GroupStates, bool) {
        let now = group_states((self.roles)());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.0.is_some_and(|s| s != now);
        last.0 = Some(now);
        last.1 |= changed;
        (now, changed)
    }

    /// The current states, without taking note of them (a change stays to be observed).
    pub fn current(&self) -> GroupStates {
        group_states((self.roles)())
    }

    /// REPORT TARGET PORT GROUPS data for the current states.
    pub fn report(&self, extended: bool) -> Vec<u8> {
        let altered = self.last.lock().unwrap_or_else(|p| p.into_inner()).1;
        report_target_port_groups(self.groups, self.current(), extended, altered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{self, opcode};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;

    fn roles(local_primary: bool, peer_primary: Option<bool>) -> PairRoles {
        PairRoles {
            local_primary,
            peer_primary,
        }
    }

    #[test]
    fn both_hosts_number_the_groups_alike() {
        let a: SocketAddr = "10.0.0.1:7789".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7789".parse().unwrap();
        let on_a = PortGroups::from_link(a, b).unwrap();
        let on_b = PortGroups::from_link(b, a).unwrap();
        assert_eq!(on_a, PortGroups { own: 1, peer: 2 });
        assert_eq!(on_b, PortGroups { own: 2, peer: 1 });
        // Loopback pairs differ by port only.
        let p1: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let p2: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        assert_eq!(PortGroups::from_link(p2, p1).unwrap().own, 2);
        assert_eq!(PortGroups::from_link(a, a), None);
    }

    #[test]
    fn states_follow_the_roles() {
        use AccessState::*;
        let s = |l, p| {
            let g = group_states(roles(l, p));
            (g.own, g.peer)
        };
        assert_eq!(s(true, Some(false)), (ActiveOptimized, Standby));
        assert_eq!(s(true, None), (ActiveOptimized, Standby));
        assert_eq!(s(false, Some(true)), (Standby, ActiveOptimized));
        assert_eq!(s(false, Some(false)), (Transitioning, Transitioning));
        assert_eq!(s(false, None), (Standby, Unavailable));
    }

    fn parsed(c: &[u8]) -> Command {
        cdb::parse(c).unwrap()
    }

    fn rtpg(format: u8, alloc: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = opcode::MAINTENANCE_IN;
        c[1] = (format << 5) | opcode::SA_REPORT_TARGET_PORT_GROUPS as u8;
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    #[test]
    fn standby_serves_only_what_spc4_lists() {
        let standby = AccessState::Standby;
        let mut read_capacity_16 = [0u8; 16];
        read_capacity_16[0] = opcode::SERVICE_ACTION_IN_16;
        read_capacity_16[1] = opcode::SA_READ_CAPACITY_16 as u8;
        read_capacity_16[13] = 32;
        let allowed: Vec<Vec<u8>> = vec![
            vec![opcode::INQUIRY, 0, 0, 0, 96, 0],
            vec![opcode::INQUIRY, 1, 0x83, 0, 255, 0],
            vec![opcode::REQUEST_SENSE, 0, 0, 0, 18, 0],
            vec![opcode::MODE_SENSE_6, 0, 0x3F, 0, 255, 0],
            vec![opcode::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            rtpg(0, 256).to_vec(),
            rtpg(1, 256).to_vec(),
            vec![opcode::PERSISTENT_RESERVE_IN, 0, 0, 0, 0, 0, 0, 1, 0, 0],
            // Not a media access; Linux sizes a path with it when the path appears.
            vec![opcode::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            read_capacity_16.to_vec(),
        ];
        for c in &allowed {
            assert_eq!(check_access(standby, &parsed(c)), Ok(()), "{c:02x?}");
        }
        let mut read10 = [0u8; 10];
        read10[0] = opcode::READ_10;
        read10[8] = 1;
        let mut write10 = read10;
        write10[0] = opcode::WRITE_10;
        let refused: Vec<Vec<u8>> = vec![
            vec![opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0],
            read10.to_vec(),
            write10.to_vec(),
            vec![opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![opcode::RESERVE_6, 0, 0, 0, 0, 0],
        ];
        for c in &refused {
            let e = check_access(standby, &parsed(c)).unwrap_err();
            assert_eq!((e.key, e.asc, e.ascq), (SenseKey::NotReady, 0x04, 0x0B));
        }
        for c in allowed.iter().chain(&refused) {
            assert_eq!(
                check_access(AccessState::ActiveOptimized, &parsed(c)),
                Ok(())
            );
        }
    }

    #[test]
    fn transitioning_and_unavailable_refuse_even_mode_sense() {
        let ms = parsed(&[opcode::MODE_SENSE_6, 0, 0x3F, 0, 255, 0]);
        let e = check_access(AccessState::Transitioning, &ms).unwrap_err();
        assert_eq!((e.key, e.asc, e.ascq), (SenseKey::NotReady, 0x04, 0x0A));
        let e = check_access(AccessState::Unavailable, &ms).unwrap_err();
        assert_eq!((e.asc, e.ascq), (0x04, 0x0C));
        let inq = parsed(&[opcode::INQUIRY, 0, 0, 0, 96, 0]);
        assert_eq!(check_access(AccessState::Transitioning, &inq), Ok(()));
        assert_eq!(
            check_access(AccessState::Transitioning, &parsed(&rtpg(1, 64))),
            Ok(())
        );
    }

    #[test]
    fn rtpg_length_only_and_extended() {
        let g = PortGroups { own: 2, peer: 1 };
        let s = GroupStates {
            own: AccessState::Standby,
            peer: AccessState::ActiveOptimized,
        };
        let d = report_target_port_groups(g, s, false, false);
        assert_eq!(
            d,
            [
                0, 0, 0, 24, // return data length
                0x02, 0x8D, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, // group 2 standby, port 2
                0x00, 0x8D, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, // group 1 active/optimized, port 1
            ]
        );
        let e = report_target_port_groups(g, s, true, true);
        assert_eq!(&e[..8], &[0, 0, 0, 28, 0x10, 0, 0, 0]);
        assert_eq!(
            &e[8..],
            &{
                let mut v = d[4..].to_vec();
                v[5] = 0x02;
                v[17] = 0x02;
                v
            }[..]
        );
    }

    #[test]
    fn rtpg_cdb_formats() {
        let alua = Alua::new(
            PortGroups { own: 1, peer: 2 },
            Box::new(|| roles(true, Some(false))),
        );
        let short = rtpg_data(Some(&alua), &parsed(&rtpg(0, 40))).unwrap();
        assert_eq!(short.len(), 28);
        let long = rtpg_data(Some(&alua), &parsed(&rtpg(1, 40))).unwrap();
        assert_eq!(&long[4..6], &[0x10, 0]);
        assert_eq!(parsed(&rtpg(1, 40)).alloc_len(), Some(40));
        let e = rtpg_data(Some(&alua), &parsed(&rtpg(2, 40))).unwrap_err();
        assert_eq!(
            (e.asc, e.sks.unwrap().byte, e.sks.unwrap().bit),
            (0x24, 1, Some(7))
        );
        // Without ALUA: what an unknown MAINTENANCE IN service action always got.
        let e = rtpg_data(None, &parsed(&rtpg(0, 40))).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_cdb(1, Some(4)));
    }

    #[test]
    fn admit_without_alua_changes_nothing_but_rtpg() {
        let tur = parsed(&[opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]);
        assert_eq!(admit(None, &tur), Ok(()));
        assert_eq!(admit(None, &parsed(&rtpg(0, 64))), Err(no_alua()));
        assert_eq!(
            admit(Some(AccessState::Standby), &parsed(&rtpg(3, 64))),
            Err(bad_format())
        );
        assert_eq!(
            admit(Some(AccessState::Standby), &tur).unwrap_err().ascq,
            0x0B
        );
        // SET TARGET PORT GROUPS (MAINTENANCE OUT, 0xA4 / 0x0A): not a command here.
        let mut stpg = [0u8; 12];
        stpg[0] = 0xA4;
        stpg[1] = 0x0A;
        assert_eq!(cdb::parse(&stpg).unwrap_err(), Sense::invalid_opcode());
    }

    #[test]
    fn a_role_change_is_seen_once() {
        // 0: secondary, peer primary; 1: primary, peer secondary.
        let state = Arc::new(AtomicU8::new(0));
        let s = state.clone();
        let alua = Alua::new(
            PortGroups { own: 1, peer: 2 },
            Box::new(move || {
                let primary = s.load(Ordering::SeqCst) == 1;
                roles(primary, Some(!primary))
            }),
        );
        assert!(!alua.observe().1, "the first look is no change");
        assert!(!alua.observe().1);
        assert_eq!(alua.report(false)[4], AccessState::Standby as u8);
        assert_eq!(alua.report(false)[9], 0, "no status before a change");
        state.store(1, Ordering::SeqCst);
        assert_eq!(alua.report(false)[4], 0x00, "RTPG shows the new state");
        let (now, changed) = alua.observe();
        assert!(changed);
        assert_eq!(now.own, AccessState::ActiveOptimized);
        assert!(!alua.observe().1, "reported once");
        let r = alua.report(false);
        assert_eq!((r[4], r[9]), (0x00, STATUS_ALTERED_IMPLICITLY));
    }
}
