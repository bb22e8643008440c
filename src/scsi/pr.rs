//! Reservations: SCSI-3 persistent reservations (SPC-4 5.13, PERSISTENT RESERVE IN 6.15 and
//! OUT 6.16) and SPC-2 reservations (RESERVE / RELEASE (6) and (10)).
//!
//! A pure state machine, one [`PrState`] per logical unit: requests in (the parsed CDB, the
//! parameter list and the requesting initiator port), response bytes or an error out, with
//! the [`Effects`] the target must carry out on other I_T nexuses (unit attentions, tasks to
//! abort). No sockets, no locks, no files: the logical unit keeps it behind a mutex, and
//! persists it when APTPL is set. The state is a plain serde struct so that it can be
//! persisted and sent to a peer.
//!
//! An I_T nexus is identified by its initiator port (iSCSI name + ISID, RFC 7143 4.4.2): a
//! target has one SCSI target port per logical unit here (one relative target port), so the
//! initiator port names the nexus, and the identity survives reconnects and restarts.

use super::cdb::Command;
pub use super::cdb::PrOut;
use super::cdb::{be16, be32, be64};
use super::sense::{Sense, SenseKey};
use serde::{Deserialize, Serialize};

/// PERSISTENT RESERVE IN service actions (SPC-4 6.15.1, table 166).
pub mod pr_in {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 6.16.1, table 177).
pub mod pr_out {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// Unit attentions established for other I_T nexuses (SPC-4 5.13.11, D.2).
pub const UA_RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
pub const UA_RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
pub const UA_REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);

/// iSCSI protocol identifier of a TransportID (SPC-4 7.6.1, table 444).
const PROTOCOL_ISCSI: u8 = 0x05;

/// An initiator port: iSCSI initiator name (lower case) and ISID. `isid: None` only in a
/// registration made through a TransportID of format 00b (SPC-4 7.6.4.6): it covers every
/// ISID of that initiator name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InitiatorPort {
    pub name: String,
    pub isid: Option<[u8; 6]>,
}

impl InitiatorPort {
    pub fn new(name: &str, isid: [u8; 6]) -> Self {
        InitiatorPort {
            name: name.to_ascii_lowercase(),
            isid: Some(isid),
        }
    }

    /// Whether this (registered) port covers the initiator port `other` of an I_T nexus.
    pub fn covers(&self, other: &InitiatorPort) -> bool {
        self.name == other.name && (self.isid.is_none() || self.isid == other.isid)
    }

    /// The iSCSI initiator port name: "<name>,i,0x<ISID in hex>" (RFC 7143 4.4.2).
    pub fn port_name(&self) -> String {
        match self.isid {
            Some(isid) => format!("{},i,0x{}", self.name, hex::encode(isid)),
            None => self.name.clone(),
        }
    }

    /// The iSCSI TransportID (SPC-4 7.6.4.6): format 01b with the ISID, 00b without; the
    /// NUL-terminated name padded to a multiple of four bytes, at least 20.
    pub fn transport_id(&self) -> Vec<u8> {
        let mut body = self.port_name().into_bytes();
        body.push(0);
        while body.len() % 4 != 0 || body.len() < 20 {
            body.push(0);
        }
        let format = if self.isid.is_some() { 0x40 } else { 0x00 };
        let mut v = vec![format | PROTOCOL_ISCSI, 0];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(&body);
        v
    }
}

/// Persistent reservation types (SPC-4 6.16.2, table 179).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Every registered I_T nexus is a reservation holder (SPC-4 5.13.10).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants only or all registrants: registered I_T nexuses have full access.
    pub fn registrants_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Exclusive Access types: non-holders may not even read.
    pub fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// One registered I_T nexus (SPC-4 5.13.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub port: InitiatorPort,
    pub key: u64,
    /// Registered through ALL_TG_PT=1 (every target port; there is one here).
    pub all_tg_pt: bool,
    /// Relative target port identifier of the registered nexus.
    pub relative_port: u16,
}

/// The persistent reservation (logical unit scope, the only scope SPC-4 keeps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The nexus that reserved; with an all-registrants type every registrant holds it.
    pub holder: InitiatorPort,
    pub kind: PrType,
}

/// Reservation state of one logical unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    /// PRgeneration (SPC-4 6.15.2): incremented by every REGISTER, REGISTER AND IGNORE
    /// EXISTING KEY, CLEAR, PREEMPT, PREEMPT AND ABORT and REGISTER AND MOVE that succeeds.
    pub generation: u32,
    /// Registrations in the order they were made.
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// Activate persist through power loss (SPC-4 5.13.5): the state survives a restart.
    pub aptpl: bool,
    /// The SPC-2 reservation (RESERVE(6)/(10)): lost with its I_T nexus, never persisted.
    #[serde(skip)]
    pub spc2_holder: Option<InitiatorPort>,
}

/// What a PERSISTENT RESERVE OUT / RESERVE / RELEASE asks of other I_T nexuses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Unit attentions to establish, by initiator port.
    pub unit_attentions: Vec<(InitiatorPort, (u8, u8))>,
    /// PREEMPT AND ABORT: abort the tasks of these initiator ports (SPC-4 5.13.11.5).
    pub abort: Vec<InitiatorPort>,
}

impl Effects {
    fn ua(&mut self, port: &InitiatorPort, code: (u8, u8)) {
        self.unit_attentions.push((port.clone(), code));
    }
}

/// Why a reservation command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    /// Status RESERVATION CONFLICT, no sense data.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

impl From<Sense> for PrError {
    fn from(s: Sense) -> Self {
        PrError::Check(s)
    }
}

/// The PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3, 6.16.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutParams {
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
    /// REGISTER AND MOVE: unregister the source nexus.
    pub unreg: bool,
    /// REGISTER AND MOVE: relative target port of the destination.
    pub relative_port: u16,
    pub transport_ids: Vec<InitiatorPort>,
}

/// How a command relates to reservations (SPC-4 5.13.1 table 51 / SBC-3 4.17 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed whatever the reservation.
    Allowed,
    /// Allowed under Write Exclusive types, conflict under Exclusive Access types.
    Read,
    /// Conflict for non-holders under every type.
    Write,
    /// RESERVE / RELEASE (6)/(10).
    Spc2(bool),
}

fn access(cmd: &Command) -> Access {
    match cmd {
        Command::TestUnitReady
        | Command::Inquiry { .. }
        | Command::RequestSense { .. }
        | Command::ReportLuns { .. }
        | Command::ReportSupportedOpcodes(_)
        | Command::ReportTargetPortGroups { .. }
        | Command::ReadCapacity10
        | Command::ReadCapacity16 { .. }
        | Command::PersistentReserveIn { .. }
        | Command::PersistentReserveOut(_)
        | Command::ReceiveCopyResults { .. } => Access::Allowed,
        // SBC-3 table 13: START STOP UNIT with START=1 and POWER CONDITION 0 is allowed, as
        // is PREVENT ALLOW MEDIUM REMOVAL with PREVENT 00b.
        Command::StartStopUnit(s) if s.start && s.power_condition == 0 => Access::Allowed,
        Command::PreventAllowMediumRemoval { prevent: false } => Access::Allowed,
        Command::Read(_)
        | Command::Verify { .. }
        | Command::ModeSense(_)
        | Command::GetLbaStatus { .. }
        | Command::ReadDefectData { .. }
        | Command::PreFetch { .. } => Access::Read,
        Command::Reserve => Access::Spc2(true),
        Command::Release => Access::Spc2(false),
        Command::Write(_)
        | Command::OrWrite(_)
        | Command::WriteAtomic(_)
        | Command::WriteAndVerify { .. }
        | Command::WriteSame(_)
        | Command::Unmap { .. }
        | Command::CompareAndWrite { .. }
        | Command::ModeSelect(_)
        | Command::SynchronizeCache { .. }
        | Command::StartStopUnit(_)
        | Command::PreventAllowMediumRemoval { .. }
        | Command::ExtendedCopy { .. }
        | Command::Sanitize(_) => Access::Write,
    }
}

const fn bad_param(byte: u16, bit: Option<u8>) -> Sense {
    Sense::invalid_field_in_parameter_list(byte, bit)
}

/// ILLEGAL REQUEST 26/04 INVALID RELEASE OF PERSISTENT RESERVATION.
const fn invalid_release() -> Sense {
    Sense::new(SenseKey::IllegalRequest, 0x26, 0x04)
}

/// Parses one iSCSI TransportID at the start of `d` (`at`: its offset in the parameter
/// list, for the field pointer). Returns the port and the TransportID's length.
pub fn parse_transport_id(d: &[u8], at: usize) -> Result<(InitiatorPort, usize), Sense> {
    let at16 = at as u16;
    if d.len() < 4 {
        return Err(Sense::parameter_list_length_error());
    }
    if d[0] & 0x0F != PROTOCOL_ISCSI {
        return Err(bad_param(at16, Some(3)));
    }
    let format = d[0] >> 6;
    if format > 1 || d[0] & 0x30 != 0 {
        return Err(bad_param(at16, Some(7)));
    }
    let len = 4 + usize::from(be16(&d[2..]));
    let body = d.get(4..len).ok_or(Sense::parameter_list_length_error())?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let text = std::str::from_utf8(&body[..end]).map_err(|_| bad_param(at16 + 4, None))?;
    let lower = text.to_ascii_lowercase();
    let port = if format == 0 {
        InitiatorPort {
            name: lower,
            isid: None,
        }
    } else {
        let (name, isid) = lower.split_once(",i,0x").ok_or(bad_param(at16 + 4, None))?;
        let bytes = hex::decode(isid).map_err(|_| bad_param(at16 + 4, None))?;
        let isid: [u8; 6] = bytes.try_into().map_err(|_| bad_param(at16 + 4, None))?;
        InitiatorPort {
            name: name.to_string(),
            isid: Some(isid),
        }
    };
    if port.name.is_empty() {
        return Err(bad_param(at16 + 4, None));
    }
    Ok((port, len))
}

/// Parses the PERSISTENT RESERVE OUT parameter list of `req` from the Data-Out `data`
/// (SPC-4 6.16.3 basic layout, 6.16.4 REGISTER AND MOVE layout).
pub fn parse_out_params(req: &PrOut, data: &[u8]) -> Result<OutParams, Sense> {
    let len = req.param_len as usize;
    if data.len() < len || len < 24 {
        return Err(Sense::parameter_list_length_error());
    }
    let d = &data[..len];
    let mut p = OutParams {
        key: be64(&d[0..]),
        sa_key: be64(&d[8..]),
        ..OutParams::default()
    };
    if req.service_action == pr_out::REGISTER_AND_MOVE {
        p.unreg = d[17] & 0x02 != 0;
        p.aptpl = d[17] & 0x01 != 0;
        p.relative_port = be16(&d[18..]);
        let tid_len = be32(&d[20..]) as usize;
        if 24 + tid_len > len || tid_len < 24 {
            return Err(Sense::parameter_list_length_error());
        }
        let (port, _) = parse_transport_id(&d[24..24 + tid_len], 24)?;
        p.transport_ids.push(port);
        return Ok(p);
    }
    p.spec_i_pt = d[20] & 0x08 != 0;
    p.all_tg_pt = d[20] & 0x04 != 0;
    p.aptpl = d[20] & 0x01 != 0;
    if p.spec_i_pt && req.service_action != pr_out::REGISTER {
        return Err(bad_param(20, Some(3)));
    }
    if !p.spec_i_pt {
        if len != 24 {
            return Err(Sense::parameter_list_length_error());
        }
        return Ok(p);
    }
    if len < 28 {
        return Err(Sense::parameter_list_length_error());
    }
    let tid_len = be32(&d[24..]) as usize;
    if 28 + tid_len != len {
        return Err(Sense::parameter_list_length_error());
    }
    let mut at = 28;
    while at < len {
        let (port, n) = parse_transport_id(&d[at..], at)?;
        p.transport_ids.push(port);
        at += n;
    }
    Ok(p)
}

impl PrState {
    fn registration_index(&self, me: &InitiatorPort) -> Option<usize> {
        self.registrations.iter().position(|r| r.port.covers(me))
    }

    /// The reservation key `me` is registered with.
    pub fn key_of(&self, me: &InitiatorPort) -> Option<u64> {
        self.registration_index(me)
            .map(|i| self.registrations[i].key)
    }

    /// Whether `me` holds the persistent reservation (SPC-4 5.13.10).
    pub fn is_holder(&self, me: &InitiatorPort) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.kind.all_registrants() => self.registration_index(me).is_some(),
            Some(r) => r.holder.covers(me),
        }
    }

    /// Whether `cmd` from `me` gets RESERVATION CONFLICT (SPC-4 5.13.1 table 51, SBC-3 4.17
    /// table 13 for persistent reservations; SPC-2 5.5.1 for RESERVE; SPC-4 5.13.3 for
    /// RESERVE / RELEASE while persistent registrations exist).
    pub fn conflicts(&self, me: &InitiatorPort, cmd: &Command) -> bool {
        let access = access(cmd);
        if let Some(holder) = &self.spc2_holder {
            if holder != me {
                let allowed = matches!(
                    cmd,
                    Command::Inquiry { .. }
                        | Command::ReportLuns { .. }
                        | Command::RequestSense { .. }
                        | Command::ReportSupportedOpcodes(_)
                        | Command::Release
                );
                return !allowed;
            }
        }
        let Some(r) = &self.reservation else {
            return matches!(access, Access::Spc2(_)) && !self.registrations.is_empty();
        };
        match access {
            Access::Allowed => false,
            Access::Spc2(_) => true,
            _ if self.is_holder(me) => false,
            _ if r.kind.registrants_access() && self.registration_index(me).is_some() => false,
            Access::Read => r.kind.exclusive_access(),
            Access::Write => true,
        }
    }

    /// RESERVE(6) / RESERVE(10) (SPC-2 7.21): an exclusive reservation by one nexus.
    /// Conflict when another nexus holds one or persistent registrations exist (checked by
    /// [`PrState::conflicts`] before this runs; checked again here).
    pub fn reserve_spc2(&mut self, me: &InitiatorPort) -> Result<(), PrError> {
        if !self.registrations.is_empty() {
            return Err(PrError::Conflict);
        }
        match &self.spc2_holder {
            Some(h) if h != me => Err(PrError::Conflict),
            _ => {
                self.spc2_holder = Some(me.clone());
                Ok(())
            }
        }
    }

    /// RELEASE(6) / RELEASE(10) (SPC-2 7.17): releases the holder's reservation; from
    /// another nexus it does nothing and succeeds.
    pub fn release_spc2(&mut self, me: &InitiatorPort) -> Result<(), PrError> {
        if !self.registrations.is_empty() {
            return Err(PrError::Conflict);
        }
        if self.spc2_holder.as_ref() == Some(me) {
            self.spc2_holder = None;
        }
        Ok(())
    }

    /// The I_T nexus of `me` is gone (logout, reinstatement, connection loss) or was reset:
    /// its SPC-2 reservation goes with it. Persistent reservations stay.
    pub fn nexus_lost(&mut self, me: &InitiatorPort) {
        if self.spc2_holder.as_ref() == Some(me) {
            self.spc2_holder = None;
        }
    }

    /// PERSISTENT RESERVE IN (SPC-4 6.15): the parameter data, at its natural length.
    pub fn reserve_in(&self, service_action: u8, relative_port: u16) -> Result<Vec<u8>, Sense> {
        let mut v = self.generation.to_be_bytes().to_vec();
        match service_action {
            pr_in::READ_KEYS => {
                let n = 8 * self.registrations.len() as u32;
                v.extend_from_slice(&n.to_be_bytes());
                for r in &self.registrations {
                    v.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            pr_in::READ_RESERVATION => match &self.reservation {
                None => v.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    v.extend_from_slice(&16u32.to_be_bytes());
                    // All registrants: the key is zero (SPC-4 6.15.3.3).
                    let key = if r.kind.all_registrants() {
                        0
                    } else {
                        self.key_of(&r.holder).unwrap_or(0)
                    };
                    v.extend_from_slice(&key.to_be_bytes());
                    v.extend_from_slice(&[0; 4]);
                    v.push(0);
                    v.push(r.kind.code());
                    v.extend_from_slice(&[0; 2]);
                }
            },
            pr_in::REPORT_CAPABILITIES => {
                // SPC-4 6.15.4 table 172: CRH, SIP_C, ATP_C, PTPL_C; TMV with ALLOW
                // COMMANDS 001b; PTPL_A; every type.
                let ptpl_a = u8::from(self.aptpl);
                v = vec![0, 8, 0x1D, 0x80 | 0x10 | ptpl_a, 0xEA, 0x01, 0, 0];
            }
            pr_in::READ_FULL_STATUS => {
                let mut body = Vec::new();
                for r in &self.registrations {
                    let holder = self.reservation.as_ref().is_some_and(|res| {
                        res.kind.all_registrants() || res.holder.covers(&r.port)
                    });
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    body.push(u8::from(r.all_tg_pt) << 1 | u8::from(holder));
                    body.push(match (&self.reservation, holder) {
                        (Some(res), true) => res.kind.code(),
                        _ => 0,
                    });
                    body.extend_from_slice(&[0; 4]);
                    let rel = if r.relative_port == 0 {
                        relative_port
                    } else {
                        r.relative_port
                    };
                    body.extend_from_slice(&rel.to_be_bytes());
                    let tid = r.port.transport_id();
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                v.extend_from_slice(&(body.len() as u32).to_be_bytes());
                v.extend_from_slice(&body);
            }
            _ => return Err(Sense::invalid_field_in_cdb(1, Some(4))),
        }
        Ok(v)
    }

    /// PERSISTENT RESERVE OUT (SPC-4 5.13.11, 6.16) from `me` on relative target port
    /// `relative_port`, with the Data-Out `data`.
    pub fn reserve_out(
        &mut self,
        me: &InitiatorPort,
        relative_port: u16,
        req: &PrOut,
        data: &[u8],
    ) -> Result<Effects, PrError> {
        use pr_out::*;
        let p = parse_out_params(req, data)?;
        // SCOPE and TYPE, where the service action uses them (SPC-4 6.16.2).
        let kind = || -> Result<PrType, Sense> {
            if req.scope != 0 {
                return Err(Sense::invalid_field_in_cdb(2, Some(7)));
            }
            PrType::from_code(req.pr_type).ok_or(Sense::invalid_field_in_cdb(2, Some(3)))
        };
        let mine = self.registration_index(me);
        let mut fx = Effects::default();
        match req.service_action {
            REGISTER | REGISTER_AND_IGNORE_EXISTING_KEY => {
                let ignore = req.service_action == REGISTER_AND_IGNORE_EXISTING_KEY;
                match mine {
                    None => {
                        if !ignore && p.key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if p.sa_key == 0 {
                            return Ok(fx);
                        }
                        let mut new = vec![Registration {
                            port: me.clone(),
                            key: p.sa_key,
                            all_tg_pt: p.all_tg_pt,
                            relative_port,
                        }];
                        // SPEC_I_PT (SPC-4 5.13.7.2): every TransportID registered too, or
                        // none; one already registered fails the command.
                        for t in &p.transport_ids {
                            if self.registrations.iter().any(|r| t.covers(&r.port))
                                || self.registration_index(t).is_some()
                            {
                                return Err(bad_param(28, None).into());
                            }
                            if new.iter().any(|r| r.port.covers(t)) {
                                continue;
                            }
                            new.push(Registration {
                                port: t.clone(),
                                key: p.sa_key,
                                all_tg_pt: p.all_tg_pt,
                                relative_port,
                            });
                        }
                        self.registrations.extend(new);
                    }
                    Some(i) => {
                        if !ignore && p.key != self.registrations[i].key {
                            return Err(PrError::Conflict);
                        }
                        if p.spec_i_pt {
                            return Err(bad_param(20, Some(3)).into());
                        }
                        if p.sa_key == 0 {
                            self.unregister(i, &mut fx);
                        } else {
                            self.registrations[i].key = p.sa_key;
                        }
                    }
                }
                self.aptpl = p.aptpl;
                self.generation = self.generation.wrapping_add(1);
            }
            RESERVE => {
                let kind = kind()?;
                let i = self.check_key(mine, p.key)?;
                match &self.reservation {
                    Some(r) if self.is_holder(me) => {
                        if r.kind != kind {
                            return Err(PrError::Conflict);
                        }
                    }
                    Some(_) => return Err(PrError::Conflict),
                    None => {
                        self.reservation = Some(Reservation {
                            holder: self.registrations[i].port.clone(),
                            kind,
                        })
                    }
                }
            }
            RELEASE => {
                let kind = kind()?;
                self.check_key(mine, p.key)?;
                let Some(r) = self.reservation.clone() else {
                    return Ok(fx);
                };
                if !self.is_holder(me) {
                    return Ok(fx);
                }
                if r.kind != kind {
                    return Err(invalid_release().into());
                }
                self.reservation = None;
                if r.kind.registrants_access() {
                    for reg in self.registrations.iter().filter(|x| !x.port.covers(me)) {
                        fx.ua(&reg.port, UA_RESERVATIONS_RELEASED);
                    }
                }
            }
            CLEAR => {
                self.check_key(mine, p.key)?;
                for reg in self.registrations.iter().filter(|x| !x.port.covers(me)) {
                    fx.ua(&reg.port, UA_RESERVATIONS_PREEMPTED);
                }
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            PREEMPT | PREEMPT_AND_ABORT => {
                let i = self.check_key(mine, p.key)?;
                let me_reg = self.registrations[i].port.clone();
                let removed = match self.reservation.clone() {
                    Some(r) if r.kind.all_registrants() && p.sa_key == 0 => {
                        // SPC-4 5.13.11.4.4: every other registration goes, and the
                        // preempting nexus reserves with the new type.
                        let kind = kind()?;
                        let removed = self.remove_where(me, |_| true);
                        self.reservation = Some(Reservation {
                            holder: me_reg,
                            kind,
                        });
                        removed
                    }
                    Some(r)
                        if !r.kind.all_registrants()
                            && self.key_of(&r.holder) == Some(p.sa_key) =>
                    {
                        // SPC-4 5.13.11.4.3: preempting the holder.
                        let kind = kind()?;
                        let removed = self.remove_where(me, |k| k == p.sa_key);
                        self.reservation = Some(Reservation {
                            holder: me_reg,
                            kind,
                        });
                        if kind != r.kind {
                            for reg in self.registrations.iter().filter(|x| !x.port.covers(me)) {
                                fx.ua(&reg.port, UA_RESERVATIONS_RELEASED);
                            }
                        }
                        removed
                    }
                    _ => {
                        // SPC-4 5.13.11.4.2 / .3: only registrations are removed.
                        if p.sa_key == 0 {
                            return Err(bad_param(8, None).into());
                        }
                        if self.registrations.iter().all(|r| r.key != p.sa_key) {
                            return Err(PrError::Conflict);
                        }
                        self.remove_where(me, |k| k == p.sa_key)
                    }
                };
                for port in &removed {
                    fx.ua(port, UA_REGISTRATIONS_PREEMPTED);
                }
                if req.service_action == PREEMPT_AND_ABORT {
                    fx.abort = removed;
                }
                self.generation = self.generation.wrapping_add(1);
            }
            REGISTER_AND_MOVE => {
                kind()?;
                self.check_key(mine, p.key)?;
                if p.sa_key == 0 {
                    return Err(bad_param(8, None).into());
                }
                let r = match &self.reservation {
                    Some(r) if self.is_holder(me) && !r.kind.all_registrants() => r.clone(),
                    _ => return Err(PrError::Conflict),
                };
                let dest = p.transport_ids[0].clone();
                if dest.covers(me) || me.covers(&dest) {
                    return Err(bad_param(24, None).into());
                }
                if p.relative_port != relative_port {
                    return Err(bad_param(18, None).into());
                }
                match self.registrations.iter().position(|x| x.port == dest) {
                    Some(j) => self.registrations[j].key = p.sa_key,
                    None => self.registrations.push(Registration {
                        port: dest.clone(),
                        key: p.sa_key,
                        all_tg_pt: false,
                        relative_port: p.relative_port,
                    }),
                }
                self.reservation = Some(Reservation {
                    holder: dest,
                    kind: r.kind,
                });
                if p.unreg {
                    if let Some(i) = self.registration_index(me) {
                        self.registrations.remove(i);
                    }
                }
                self.aptpl = p.aptpl;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
        }
        Ok(fx)
    }

    /// The requester must be registered with `key` (SPC-4 5.13.11.1): else RESERVATION
    /// CONFLICT. Returns its registration's index.
    fn check_key(&self, mine: Option<usize>, key: u64) -> Result<usize, PrError> {
        match mine {
            Some(i) if self.registrations[i].key == key => Ok(i),
            _ => Err(PrError::Conflict),
        }
    }

    /// Removes the registrations (other than `me`'s) whose key satisfies `pred`, releasing
    /// the reservation of a removed holder. Returns the ports removed.
    fn remove_where(
        &mut self,
        me: &InitiatorPort,
        pred: impl Fn(u64) -> bool,
    ) -> Vec<InitiatorPort> {
        let mut removed = Vec::new();
        self.registrations.retain(|r| {
            if !r.port.covers(me) && pred(r.key) {
                removed.push(r.port.clone());
                false
            } else {
                true
            }
        });
        removed
    }

    /// Unregisters registration `i` (SPC-4 5.13.11.2.3): a holder's reservation is released
    /// (all registrants: when the last registrant goes); releasing a registrants-only
    /// reservation tells the other registrants RESERVATIONS RELEASED.
    fn unregister(&mut self, i: usize, fx: &mut Effects) {
        let reg = self.registrations.remove(i);
        let Some(r) = self.reservation.clone() else {
            return;
        };
        if r.kind.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if r.holder.covers(&reg.port) {
            self.reservation = None;
            if r.kind.registrants_access() {
                for other in &self.registrations {
                    fx.ua(&other.port, UA_RESERVATIONS_RELEASED);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb;

    fn port(n: u8) -> InitiatorPort {
        InitiatorPort::new(
            &format!("iqn.2024-01.org.example:init{n}"),
            [0x80, 0, 0, 0, 0, n],
        )
    }

    fn params(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut d = vec![0u8; 24];
        d[0..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        d[20] = flags;
        d
    }

    fn out(
        s: &mut PrState,
        me: &InitiatorPort,
        sa: u8,
        pr_type: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<Effects, PrError> {
        let d = params(key, sa_key, 0);
        let req = PrOut {
            service_action: sa,
            scope: 0,
            pr_type,
            param_len: 24,
        };
        s.reserve_out(me, 1, &req, &d)
    }

    fn register(s: &mut PrState, me: &InitiatorPort, key: u64) {
        out(s, me, pr_out::REGISTER, 0, 0, key).unwrap();
    }

    fn read_keys(s: &PrState) -> Vec<u64> {
        let d = s.reserve_in(pr_in::READ_KEYS, 1).unwrap();
        let n = be32(&d[4..]) as usize;
        d[8..8 + n].chunks(8).map(be64).collect()
    }

    fn cmd(bytes: &[u8]) -> Command {
        cdb::parse(bytes).unwrap()
    }

    const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const WRITE10: [u8; 10] = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const TUR: [u8; 6] = [0; 6];
    const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 36, 0];
    const MODE_SENSE6: [u8; 6] = [0x1A, 0, 0x3F, 0, 255, 0];

    #[test]
    fn register_unregister_and_generation() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        assert_eq!(read_keys(&s), vec![0xA, 0xB]);
        assert_eq!(s.generation, 2);
        // Wrong key for REGISTER: RESERVATION CONFLICT, nothing changes.
        assert_eq!(
            out(&mut s, &a, pr_out::REGISTER, 0, 0x99, 0xC),
            Err(PrError::Conflict)
        );
        // Unregistered nexus with a non-zero key: conflict.
        assert_eq!(
            out(&mut s, &port(3), pr_out::REGISTER, 0, 0x5, 0xC),
            Err(PrError::Conflict)
        );
        assert_eq!(s.generation, 2);
        // Change key, then ignore-existing.
        out(&mut s, &a, pr_out::REGISTER, 0, 0xA, 0xAA).unwrap();
        out(
            &mut s,
            &a,
            pr_out::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            0x1234,
            0xA,
        )
        .unwrap();
        assert_eq!(read_keys(&s), vec![0xA, 0xB]);
        assert_eq!(s.generation, 4);
        // Unregister.
        out(&mut s, &b, pr_out::REGISTER, 0, 0xB, 0).unwrap();
        assert_eq!(read_keys(&s), vec![0xA]);
        assert_eq!(s.generation, 5);
        // Unregistered with zero service action key: nothing, no new generation.
        out(&mut s, &b, pr_out::REGISTER, 0, 0, 0).unwrap();
        assert_eq!(s.generation, 5);
        let d = s.reserve_in(pr_in::READ_KEYS, 1).unwrap();
        assert_eq!(&d[..8], &[0, 0, 0, 5, 0, 0, 0, 8]);
    }

    #[test]
    fn parameter_list_errors() {
        let mut s = PrState::default();
        let a = port(1);
        let req = |len| PrOut {
            service_action: pr_out::REGISTER,
            scope: 0,
            pr_type: 0,
            param_len: len,
        };
        let mut d = params(0, 1, 0);
        d.extend_from_slice(&[0; 4]);
        // 28 bytes without SPEC_I_PT, or fewer than 24: PARAMETER LIST LENGTH ERROR.
        for len in [28, 20, 0] {
            assert_eq!(
                s.reserve_out(&a, 1, &req(len), &d),
                Err(PrError::Check(Sense::parameter_list_length_error()))
            );
        }
        // Data-Out shorter than the parameter list length.
        assert_eq!(
            s.reserve_out(&a, 1, &req(24), &d[..20]),
            Err(PrError::Check(Sense::parameter_list_length_error()))
        );
        // SPEC_I_PT with RESERVE: INVALID FIELD IN PARAMETER LIST.
        let mut r = req(24);
        r.service_action = pr_out::RESERVE;
        r.pr_type = 1;
        let e = s.reserve_out(&a, 1, &r, &params(0, 0, 0x08)).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x26));
        // Bad TYPE and SCOPE: INVALID FIELD IN CDB.
        register(&mut s, &a, 1);
        r.pr_type = 2;
        let e = s.reserve_out(&a, 1, &r, &params(1, 0, 0)).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x24));
        r.pr_type = 1;
        r.scope = 1;
        let e = s.reserve_out(&a, 1, &r, &params(1, 0, 0)).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x24));
        // Registered nexus with SPEC_I_PT: INVALID FIELD IN PARAMETER LIST.
        let mut d = params(1, 2, 0x08);
        d.extend_from_slice(&0u32.to_be_bytes());
        let e = s.reserve_out(&a, 1, &req(28), &d).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x26));
        // PREEMPT without a reservation and a zero service action key.
        let e = out(&mut s, &a, pr_out::PREEMPT, 1, 1, 0).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x26));
    }

    #[test]
    fn reserve_release_and_read_reservation() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        // Not registered: conflict.
        assert_eq!(
            out(&mut s, &a, pr_out::RESERVE, 1, 0xA, 0),
            Err(PrError::Conflict)
        );
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        out(&mut s, &a, pr_out::RESERVE, 3, 0xA, 0).unwrap();
        let gen = s.generation;
        // Same again: fine; another type from the holder, or anyone else: conflict.
        out(&mut s, &a, pr_out::RESERVE, 3, 0xA, 0).unwrap();
        assert_eq!(
            out(&mut s, &a, pr_out::RESERVE, 1, 0xA, 0),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&mut s, &b, pr_out::RESERVE, 3, 0xB, 0),
            Err(PrError::Conflict)
        );
        let d = s.reserve_in(pr_in::READ_RESERVATION, 1).unwrap();
        assert_eq!(be32(&d[4..]), 16);
        assert_eq!(be64(&d[8..]), 0xA);
        assert_eq!(d[21], 3);
        // Release by a non-holder: nothing. Wrong type from the holder: 26/04.
        out(&mut s, &b, pr_out::RELEASE, 3, 0xB, 0).unwrap();
        assert!(s.reservation.is_some());
        assert_eq!(
            out(&mut s, &a, pr_out::RELEASE, 1, 0xA, 0),
            Err(PrError::Check(invalid_release()))
        );
        let fx = out(&mut s, &a, pr_out::RELEASE, 3, 0xA, 0).unwrap();
        assert!(fx.unit_attentions.is_empty(), "EA release: no UA");
        assert!(s.reservation.is_none());
        assert_eq!(s.generation, gen, "RESERVE / RELEASE keep the generation");
        let d = s.reserve_in(pr_in::READ_RESERVATION, 1).unwrap();
        assert_eq!(d.len(), 8);
        // Registrants only: release tells the other registrants.
        out(&mut s, &a, pr_out::RESERVE, 5, 0xA, 0).unwrap();
        let fx = out(&mut s, &a, pr_out::RELEASE, 5, 0xA, 0).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![(b.clone(), UA_RESERVATIONS_RELEASED)]
        );
    }

    #[test]
    fn all_registrants_key_zero_and_holders() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        out(&mut s, &a, pr_out::RESERVE, 8, 0xA, 0).unwrap();
        assert!(s.is_holder(&b));
        let d = s.reserve_in(pr_in::READ_RESERVATION, 1).unwrap();
        assert_eq!(be64(&d[8..]), 0);
        assert_eq!(d[21], 8);
        // The reserving nexus unregisters: the reservation stays with the other registrant.
        out(&mut s, &a, pr_out::REGISTER, 0, 0xA, 0).unwrap();
        assert!(s.reservation.is_some());
        assert!(s.is_holder(&b));
        // Any registrant may release it.
        out(&mut s, &b, pr_out::RELEASE, 8, 0xB, 0).unwrap();
        assert!(s.reservation.is_none());
        // Last registrant gone: reservation gone.
        out(&mut s, &b, pr_out::RESERVE, 7, 0xB, 0).unwrap();
        out(&mut s, &b, pr_out::REGISTER, 0, 0xB, 0).unwrap();
        assert!(s.reservation.is_none());
    }

    /// The access table of libiscsi's ProutReserveAccess* (SPC-4 table 51 / SBC-3 table 13):
    /// (type, registered non-holder reads, writes, unregistered reads, writes).
    #[test]
    fn conflict_table_per_type() {
        let table = [
            (1, true, false, true, false),
            (3, false, false, false, false),
            (5, true, true, true, false),
            (6, true, true, false, false),
            (7, true, true, true, false),
            (8, true, true, false, false),
        ];
        let (a, b, c) = (port(1), port(2), port(3));
        for (t, reg_r, reg_w, un_r, un_w) in table {
            let mut s = PrState::default();
            register(&mut s, &a, 0xA);
            register(&mut s, &b, 0xB);
            out(&mut s, &a, pr_out::RESERVE, t, 0xA, 0).unwrap();
            let (rd, wr) = (cmd(&READ10), cmd(&WRITE10));
            assert!(!s.conflicts(&a, &rd) && !s.conflicts(&a, &wr), "type {t}");
            assert_eq!(!s.conflicts(&b, &rd), reg_r, "type {t} registered read");
            assert_eq!(!s.conflicts(&b, &wr), reg_w, "type {t} registered write");
            assert_eq!(!s.conflicts(&c, &rd), un_r, "type {t} unregistered read");
            assert_eq!(!s.conflicts(&c, &wr), un_w, "type {t} unregistered write");
            assert_eq!(
                s.conflicts(&c, &cmd(&MODE_SENSE6)),
                !un_r,
                "MODE SENSE reads"
            );
            for always in [&TUR[..], &INQUIRY[..]] {
                assert!(!s.conflicts(&c, &cmd(always)), "type {t}");
            }
            let prin = [0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0];
            assert!(!s.conflicts(&c, &cmd(&prin)));
            // SPC-4 5.13.3: RESERVE(6) while registrations exist.
            assert!(s.conflicts(&a, &cmd(&[0x16, 0, 0, 0, 0, 0])));
        }
    }

    #[test]
    fn preempt_holder_and_registrations() {
        let mut s = PrState::default();
        let (a, b, c) = (port(1), port(2), port(3));
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        register(&mut s, &c, 0xC);
        out(&mut s, &b, pr_out::RESERVE, 1, 0xB, 0).unwrap();
        // No registration with that key: conflict.
        assert_eq!(
            out(&mut s, &a, pr_out::PREEMPT, 1, 0xA, 0x77),
            Err(PrError::Conflict)
        );
        // Preempt a non-holder: registration removed, reservation kept.
        let fx = out(&mut s, &a, pr_out::PREEMPT, 1, 0xA, 0xC).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![(c.clone(), UA_REGISTRATIONS_PREEMPTED)]
        );
        assert!(fx.abort.is_empty());
        assert_eq!(read_keys(&s), vec![0xA, 0xB]);
        assert!(s.reservation.as_ref().unwrap().holder == b);
        // PREEMPT AND ABORT the holder with a new type.
        let gen = s.generation;
        let fx = out(&mut s, &a, pr_out::PREEMPT_AND_ABORT, 3, 0xA, 0xB).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![(b.clone(), UA_REGISTRATIONS_PREEMPTED)]
        );
        assert_eq!(fx.abort, vec![b.clone()]);
        assert_eq!(s.generation, gen + 1);
        let r = s.reservation.clone().unwrap();
        assert_eq!((r.holder, r.kind), (a.clone(), PrType::ExclusiveAccess));
        assert_eq!(read_keys(&s), vec![0xA]);
        // A preempted nexus is not registered any more.
        assert_eq!(
            out(&mut s, &b, pr_out::RESERVE, 1, 0xB, 0),
            Err(PrError::Conflict)
        );
    }

    #[test]
    fn preempt_all_registrants_with_zero_key() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        out(&mut s, &b, pr_out::RESERVE, 7, 0xB, 0).unwrap();
        let fx = out(&mut s, &a, pr_out::PREEMPT, 1, 0xA, 0).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![(b.clone(), UA_REGISTRATIONS_PREEMPTED)]
        );
        let r = s.reservation.clone().unwrap();
        assert_eq!((r.holder, r.kind), (a, PrType::WriteExclusive));
    }

    #[test]
    fn clear_preempts_everyone() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        out(&mut s, &a, pr_out::RESERVE, 1, 0xA, 0).unwrap();
        assert_eq!(
            out(&mut s, &b, pr_out::CLEAR, 0, 0xA, 0),
            Err(PrError::Conflict)
        );
        let fx = out(&mut s, &b, pr_out::CLEAR, 0, 0xB, 0).unwrap();
        assert_eq!(fx.unit_attentions, vec![(a, UA_RESERVATIONS_PREEMPTED)]);
        assert!(s.registrations.is_empty() && s.reservation.is_none());
        assert_eq!(s.generation, 3);
    }

    #[test]
    fn unregistering_a_registrants_only_holder_releases() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        register(&mut s, &b, 0xB);
        out(&mut s, &a, pr_out::RESERVE, 6, 0xA, 0).unwrap();
        let fx = out(&mut s, &a, pr_out::REGISTER, 0, 0xA, 0).unwrap();
        assert!(s.reservation.is_none());
        assert_eq!(fx.unit_attentions, vec![(b, UA_RESERVATIONS_RELEASED)]);
    }

    #[test]
    fn transport_ids_round_trip_and_spec_i_pt() {
        let a = port(1);
        let tid = a.transport_id();
        assert_eq!(tid[0], 0x45);
        assert_eq!(tid.len() % 4, 0);
        assert_eq!(parse_transport_id(&tid, 0).unwrap(), (a.clone(), tid.len()));
        let name_only = InitiatorPort {
            name: "iqn.2024-01.org.example:init2".into(),
            isid: None,
        };
        let t2 = name_only.transport_id();
        assert_eq!(t2[0], 0x05);
        assert_eq!(parse_transport_id(&t2, 0).unwrap().0, name_only);
        assert!(name_only.covers(&port(2)) && !name_only.covers(&a));
        // REGISTER with SPEC_I_PT registers the listed ports with the same key.
        let mut s = PrState::default();
        let mut d = params(0, 0x42, 0x08);
        let mut tids = port(3).transport_id();
        tids.extend_from_slice(&t2);
        d.extend_from_slice(&(tids.len() as u32).to_be_bytes());
        d.extend_from_slice(&tids);
        let req = PrOut {
            service_action: pr_out::REGISTER,
            scope: 0,
            pr_type: 0,
            param_len: d.len() as u32,
        };
        s.reserve_out(&a, 1, &req, &d).unwrap();
        assert_eq!(read_keys(&s), vec![0x42, 0x42, 0x42]);
        assert_eq!(s.key_of(&port(2)), Some(0x42));
        // Wrong protocol identifier.
        let mut bad = d.clone();
        bad[28] = 0x41;
        let mut s2 = PrState::default();
        let e = s2.reserve_out(&a, 1, &req, &bad).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x26));
        assert!(s2.registrations.is_empty());
    }

    #[test]
    fn read_full_status_encoding() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        out(
            &mut s,
            &b,
            pr_out::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            0,
            0xB,
        )
        .unwrap();
        out(&mut s, &b, pr_out::RESERVE, 5, 0xB, 0).unwrap();
        let d = s.reserve_in(pr_in::READ_FULL_STATUS, 7).unwrap();
        assert_eq!(be32(&d[0..]), 2);
        assert_eq!(be32(&d[4..]) as usize, d.len() - 8);
        let first = &d[8..];
        assert_eq!(be64(first), 0xA);
        assert_eq!(first[12], 0, "not the holder");
        assert_eq!(be16(&first[18..]), 1);
        let tid_len = be32(&first[20..]) as usize;
        assert_eq!(&first[24..24 + tid_len], &a.transport_id()[..]);
        let second = &first[24 + tid_len..];
        assert_eq!(be64(second), 0xB);
        assert_eq!(second[12], 1, "R_HOLDER");
        assert_eq!(second[13], 5);
        let tid = &second[24..];
        let text = std::str::from_utf8(&tid[4..]).unwrap();
        assert!(
            text.starts_with("iqn.2024-01.org.example:init2,i,0x800000000002\0"),
            "{text}"
        );
        assert_eq!(
            s.reserve_in(4, 1),
            Err(Sense::invalid_field_in_cdb(1, Some(4)))
        );
        let caps = s.reserve_in(pr_in::REPORT_CAPABILITIES, 1).unwrap();
        assert_eq!(caps.len(), 8);
        assert_eq!(be16(&caps), 8);
        assert_eq!(&caps[4..6], &[0xEA, 0x01]);
    }

    #[test]
    fn register_and_move() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        register(&mut s, &a, 0xA);
        out(&mut s, &a, pr_out::RESERVE, 1, 0xA, 0).unwrap();
        let mut d = vec![0u8; 24];
        d[0..8].copy_from_slice(&0xAu64.to_be_bytes());
        d[8..16].copy_from_slice(&0xBu64.to_be_bytes());
        d[17] = 0x02; // UNREG
        d[18..20].copy_from_slice(&1u16.to_be_bytes());
        let tid = b.transport_id();
        d[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        d.extend_from_slice(&tid);
        let req = PrOut {
            service_action: pr_out::REGISTER_AND_MOVE,
            scope: 0,
            pr_type: 1,
            param_len: d.len() as u32,
        };
        // Not the holder: conflict.
        assert_eq!(
            s.clone().reserve_out(&b, 1, &req, &d),
            Err(PrError::Conflict)
        );
        s.reserve_out(&a, 1, &req, &d).unwrap();
        assert_eq!(read_keys(&s), vec![0xB]);
        assert!(s.is_holder(&b) && !s.is_holder(&a));
        assert_eq!(s.generation, 2);
    }

    #[test]
    fn spc2_reservations() {
        let mut s = PrState::default();
        let (a, b) = (port(1), port(2));
        let reserve6 = cmd(&[0x16, 0, 0, 0, 0, 0]);
        let release6 = cmd(&[0x17, 0, 0, 0, 0, 0]);
        s.reserve_spc2(&a).unwrap();
        s.reserve_spc2(&a).unwrap();
        assert!(s.conflicts(&b, &reserve6));
        assert!(!s.conflicts(&b, &release6));
        assert!(s.conflicts(&b, &cmd(&MODE_SENSE6)));
        assert!(s.conflicts(&b, &cmd(&TUR)));
        assert!(!s.conflicts(&b, &cmd(&INQUIRY)));
        assert!(!s.conflicts(&a, &cmd(&WRITE10)));
        // Release from the other nexus: nothing.
        s.release_spc2(&b).unwrap();
        assert!(s.spc2_holder.is_some());
        s.nexus_lost(&a);
        assert!(s.spc2_holder.is_none());
        s.reserve_spc2(&b).unwrap();
        s.release_spc2(&b).unwrap();
        // Registrations present: RESERVE and RELEASE conflict.
        register(&mut s, &a, 1);
        assert!(s.conflicts(&b, &reserve6) && s.conflicts(&a, &release6));
        assert_eq!(s.reserve_spc2(&a), Err(PrError::Conflict));
    }

    #[test]
    fn state_serializes_without_spc2_holder() {
        let mut s = PrState::default();
        let a = port(1);
        out(&mut s, &a, pr_out::REGISTER, 0, 0, u64::MAX).unwrap();
        out(&mut s, &a, pr_out::RESERVE, 6, u64::MAX, 0).unwrap();
        s.spc2_holder = Some(a);
        let text = serde_json::to_string(&s).unwrap();
        let back: PrState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.spc2_holder, None);
        assert_eq!(back.registrations, s.registrations);
        assert_eq!(back.reservation, s.reservation);
    }
}
