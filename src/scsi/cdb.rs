//! CDB decoding: every supported operation code becomes a typed [`Command`]; anything that
//! does not fit becomes the [`Sense`] the device server must return (SPC-4 4.2, SBC-3 5).
//!
//! Decoding is pure: it looks only at the CDB bytes. Checks that need the logical unit (write
//! protection, capacity, provisioning) happen in [`crate::scsi::sbc::check`].

use super::sense::Sense;

/// Operation codes this device server implements (SPC-4 / SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN(16) service actions (SBC-3 5.16, 5.8).
    pub const SA_READ_CAPACITY_16: u16 = 0x10;
    pub const SA_GET_LBA_STATUS: u16 = 0x12;
    /// MAINTENANCE IN service action (SPC-4 6.35).
    pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0C;
    /// MAINTENANCE IN service action (SPC-4 6.36).
    pub const SA_REPORT_TARGET_PORT_GROUPS: u16 = 0x0A;
}

/// SANITIZE service actions (SBC-4 5.30, table 98).
pub const SA_SANITIZE_OVERWRITE: u8 = 0x01;
pub const SA_SANITIZE_BLOCK_ERASE: u8 = 0x02;
pub const SA_SANITIZE_CRYPTO_ERASE: u8 = 0x03;
pub const SA_SANITIZE_EXIT_FAILURE_MODE: u8 = 0x1F;

/// Largest PERSISTENT RESERVE OUT parameter list accepted (SPC-4 6.16.3).
pub const MAX_PR_OUT_PARAM_LEN: u32 = 65536;

/// CDB length from the group code in the top three bits of the operation code
/// (SPC-4 4.2.5.1). Reserved and vendor-specific groups have no defined length.
pub fn cdb_len(op: u8) -> Option<usize> {
    match op >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A block range transferred by READ / WRITE / WRITE AND VERIFY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub lba: u64,
    pub blocks: u32,
    /// Disable page out: a cache hint, accepted and ignored.
    pub dpo: bool,
    /// Force unit access: writes must be stable before status.
    pub fua: bool,
}

/// VERIFY BYTCHK (SBC-3 5.30, table 76).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteCheck {
    /// 00b: medium verification only, no Data-Out.
    MediumOnly,
    /// 01b: compare Data-Out with every block.
    Full,
    /// 11b: one block of Data-Out compared with every block in the range.
    SingleBlock,
}

/// MODE SENSE page control (SPC-4 6.11, table 99).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSense {
    /// MODE SENSE(10) (true) or MODE SENSE(6).
    pub ten: bool,
    /// Disable block descriptors.
    pub dbd: bool,
    /// Long LBA block descriptor accepted (MODE SENSE(10) only).
    pub llbaa: bool,
    pub pc: PageControl,
    pub page: u8,
    pub subpage: u8,
    pub alloc_len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSelect {
    pub ten: bool,
    /// Page format: the parameter list uses the standard page format.
    pub pf: bool,
    /// Save pages.
    pub sp: bool,
    pub param_len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartStopUnit {
    pub immed: bool,
    pub power_condition: u8,
    pub no_flush: bool,
    /// Load or eject the medium.
    pub loej: bool,
    pub start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSame {
    pub lba: u64,
    /// Zero means "through the last LBA" (WSNZ=0; within MAXIMUM WRITE SAME LENGTH).
    pub blocks: u32,
    pub unmap: bool,
    /// No Data-Out buffer: the block is all zeroes (WRITE SAME(16) only).
    pub ndob: bool,
}

/// SANITIZE (SBC-4 5.30) as the CDB gives it; the service action is one this device server
/// knows (OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE), the rest is checked against the logical
/// unit in [`crate::scsi::sanitize::check_cdb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sanitize {
    /// Return status once the CDB and parameter list are checked; the sanitize goes on.
    pub immed: bool,
    /// Allow unrestricted sanitize exit: EXIT FAILURE MODE may end a failure of this one.
    pub ause: bool,
    pub service_action: u8,
    pub param_len: u16,
}

/// REPORT SUPPORTED OPERATION CODES request (SPC-4 6.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportOpcodes {
    /// Return command timeouts descriptors.
    pub rctd: bool,
    /// REPORTING OPTIONS: 0 all commands, 1 one opcode, 2 one opcode + service action,
    /// 3 one opcode with or without service action.
    pub options: u8,
    pub opcode: u8,
    pub service_action: u16,
    pub alloc_len: u32,
}

/// PERSISTENT RESERVE OUT as the CDB gives it (SPC-4 6.16.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrOut {
    pub service_action: u8,
    pub scope: u8,
    pub pr_type: u8,
    pub param_len: u32,
}

/// EXTENDED COPY service action LID1 (SPC-4 6.4.1); LID4 (01h) is not supported.
pub const SA_EXTENDED_COPY_LID1: u8 = 0x00;
/// RECEIVE COPY RESULTS service actions (SPC-4 6.18.1, table 302).
pub const SA_COPY_STATUS: u8 = 0x00;
pub const SA_OPERATING_PARAMETERS: u8 = 0x03;
/// Largest EXTENDED COPY parameter list accepted in the CDB (refused before data).
pub const XCOPY_MAX_PARAM_LEN: u32 = 65536;

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        alloc_len: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u32,
    },
    ModeSense(ModeSense),
    ModeSelect(ModeSelect),
    StartStopUnit(StartStopUnit),
    /// PREVENT ALLOW MEDIUM REMOVAL (SBC-3 5.12): PREVENT 01b (true) or 00b (false).
    PreventAllowMediumRemoval {
        prevent: bool,
    },
    ReportLuns {
        select_report: u8,
        alloc_len: u32,
    },
    ReportSupportedOpcodes(ReportOpcodes),
    /// REPORT TARGET PORT GROUPS (SPC-4 6.36). `format`: PARAMETER DATA FORMAT as sent
    /// (000b length only, 001b extended; others are refused where ALUA is checked, so that
    /// without ALUA the command fails exactly as an unknown service action did).
    ReportTargetPortGroups {
        format: u8,
        alloc_len: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    Read(Transfer),
    Write(Transfer),
    /// ORWRITE(16) (SBC-3 5.11): each block becomes the OR of the medium and the Data-Out.
    OrWrite(Transfer),
    /// WRITE ATOMIC(16) (SBC-4 5.48): one atomic write operation (ATOMIC BOUNDARY 0).
    WriteAtomic(Transfer),
    WriteAndVerify {
        xfer: Transfer,
        /// BYTCHK=1: compare the written data with what the medium returns.
        byte_check: bool,
    },
    Verify {
        lba: u64,
        blocks: u32,
        dpo: bool,
        byte_check: ByteCheck,
    },
    SynchronizeCache {
        lba: u64,
        /// Zero means "to the last LBA".
        blocks: u32,
        immed: bool,
    },
    WriteSame(WriteSame),
    Unmap {
        param_len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        dpo: bool,
        fua: bool,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
        immed: bool,
    },
    /// READ DEFECT DATA(10) / (12) (SBC-3 5.19, 5.20).
    ReadDefectData {
        /// READ DEFECT DATA(12): 8-byte header with a 4-byte DEFECT LIST LENGTH.
        twelve: bool,
        req_plist: bool,
        req_glist: bool,
        format: u8,
        alloc_len: u32,
    },
    /// PERSISTENT RESERVE IN (SPC-4 6.15).
    PersistentReserveIn {
        service_action: u8,
        alloc_len: u32,
    },
    /// PERSISTENT RESERVE OUT (SPC-4 6.16).
    PersistentReserveOut(PrOut),
    /// EXTENDED COPY(LID1) (SPC-4 6.4): the parameter list is Data-Out.
    ExtendedCopy {
        param_len: u32,
    },
    /// RECEIVE COPY RESULTS (SPC-4 6.18): COPY STATUS or OPERATING PARAMETERS.
    ReceiveCopyResults {
        service_action: u8,
        list_id: u8,
        alloc_len: u32,
    },
    /// SANITIZE (SBC-4 5.30): the parameter list (OVERWRITE) is Data-Out.
    Sanitize(Sanitize),
    /// RESERVE(6) / RESERVE(10) (SPC-2 7.21, 7.22), logical unit reservation only.
    Reserve,
    /// RELEASE(6) / RELEASE(10) (SPC-2 7.17, 7.18).
    Release,
}

impl Command {
    /// Bytes of Data-Out the CDB asks the initiator for (the SCSI transfer length in bytes).
    pub fn data_out_len(&self, block_size: u32) -> u64 {
        let bs = u64::from(block_size);
        match *self {
            Command::Write(x)
            | Command::OrWrite(x)
            | Command::WriteAtomic(x)
            | Command::WriteAndVerify { xfer: x, .. } => u64::from(x.blocks) * bs,
            Command::Verify {
                blocks, byte_check, ..
            } => match byte_check {
                ByteCheck::MediumOnly => 0,
                ByteCheck::Full => u64::from(blocks) * bs,
                ByteCheck::SingleBlock if blocks == 0 => 0,
                ByteCheck::SingleBlock => bs,
            },
            Command::WriteSame(ws) if ws.ndob => 0,
            Command::WriteSame(_) => bs,
            Command::CompareAndWrite { blocks, .. } => 2 * u64::from(blocks) * bs,
            Command::Unmap { param_len } => u64::from(param_len),
            Command::ModeSelect(ms) => u64::from(ms.param_len),
            Command::PersistentReserveOut(p) => u64::from(p.param_len),
            Command::ExtendedCopy { param_len } => u64::from(param_len),
            Command::Sanitize(s) => u64::from(s.param_len),
            _ => 0,
        }
    }

    /// The unit a Data-Out shorter than [`Command::data_out_len`] must come in to be used:
    /// WRITE and WRITE AND VERIFY write whole logical blocks, so an iSCSI Expected Data
    /// Transfer Length below the CDB's that is not a whole number of blocks cannot be honoured
    /// (FCP-4 FCP_DL overflow rule b: the command is refused, nothing written); VERIFY with
    /// BYTCHK compares blocks the same way. 1 for every other command
    /// (WRITE SAME and COMPARE AND WRITE check their buffer length themselves).
    pub fn data_out_unit(&self, block_size: u32) -> u32 {
        match *self {
            Command::Write(_)
            | Command::OrWrite(_)
            | Command::WriteAndVerify { .. }
            | Command::Verify { .. } => block_size.max(1),
            // An atomic write is all or nothing: only its whole transfer can be used.
            Command::WriteAtomic(x) => (x.blocks.saturating_mul(block_size)).max(1),
            _ => 1,
        }
    }

    /// Bytes of bulk Data-In: a READ's transfer length. Parameter data (INQUIRY, MODE
    /// SENSE...) is a few KiB at most whatever its allocation length, so it counts as none.
    pub fn data_in_len(&self, block_size: u32) -> u64 {
        match *self {
            Command::Read(x) => u64::from(x.blocks) * u64::from(block_size),
            _ => 0,
        }
    }

    /// ALLOCATION LENGTH of commands returning parameter data: the device server returns at
    /// most this many bytes (SPC-4 4.2.5.6).
    pub fn alloc_len(&self) -> Option<u32> {
        match *self {
            Command::RequestSense { alloc_len }
            | Command::Inquiry { alloc_len, .. }
            | Command::ReportLuns { alloc_len, .. }
            | Command::ReadCapacity16 { alloc_len }
            | Command::GetLbaStatus { alloc_len, .. }
            | Command::PersistentReserveIn { alloc_len, .. }
            | Command::ReadDefectData { alloc_len, .. }
            | Command::ReceiveCopyResults { alloc_len, .. }
            | Command::ReportTargetPortGroups { alloc_len, .. } => Some(alloc_len),
            Command::ModeSense(ms) => Some(ms.alloc_len),
            Command::ReportSupportedOpcodes(r) => Some(r.alloc_len),
            _ => None,
        }
    }

    /// Whether the command changes the medium (refused on a write-protected LU, SBC-3 4.11).
    /// SANITIZE EXIT FAILURE MODE does not: it only ends a failure mode.
    pub fn writes_medium(&self) -> bool {
        match self {
            Command::Sanitize(s) => s.service_action != SA_SANITIZE_EXIT_FAILURE_MODE,
            _ => matches!(
                self,
                Command::Write(_)
                    | Command::OrWrite(_)
                    | Command::WriteAtomic(_)
                    | Command::WriteAndVerify { .. }
                    | Command::WriteSame(_)
                    | Command::Unmap { .. }
                    | Command::CompareAndWrite { .. }
            ),
        }
    }
}

/// Big-endian fields of CDBs and parameter lists (callers check the length first).
pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

const fn bad(byte: u16, bit: u8) -> Sense {
    Sense::invalid_field_in_cdb(byte, Some(bit))
}

/// RDPROTECT / WRPROTECT / VRPROTECT (byte 1 bits 7:5) must be zero: no protection
/// information is supported (SBC-3 5.8 table 31, 5.40 table 90).
fn no_protection(c: &[u8]) -> Result<(), Sense> {
    if c[1] & 0xE0 != 0 {
        return Err(bad(1, 7));
    }
    Ok(())
}

/// NACA (ACA is not supported, SAM-5 5.9) and the obsolete LINK bit of the CONTROL byte.
fn check_control(c: &[u8]) -> Result<(), Sense> {
    let last = c.len() - 1;
    let control = c[last];
    if control & 0x04 != 0 {
        return Err(bad(last as u16, 2));
    }
    if control & 0x01 != 0 {
        return Err(bad(last as u16, 0));
    }
    Ok(())
}

fn transfer(c: &[u8], lba: u64, blocks: u32) -> Result<Transfer, Sense> {
    no_protection(c)?;
    Ok(Transfer {
        lba,
        blocks,
        dpo: c[1] & 0x10 != 0,
        fua: c[1] & 0x08 != 0,
    })
}

/// LBA and transfer length of the 10/12/16-byte READ, WRITE, VERIFY, WRITE AND VERIFY,
/// PRE-FETCH and SYNCHRONIZE CACHE layouts.
fn lba_len(c: &[u8]) -> (u64, u32) {
    match c.len() {
        10 => (u64::from(be32(&c[2..])), u32::from(be16(&c[7..]))),
        12 => (u64::from(be32(&c[2..])), be32(&c[6..])),
        _ => (be64(&c[2..]), be32(&c[10..])),
    }
}

/// WRITE AND VERIFY BYTCHK (byte 1 bits 2:1; SBC-3 has bit 1 only, SBC-4 reserves 1xb).
fn write_verify_bytchk(c: &[u8]) -> Result<bool, Sense> {
    match (c[1] >> 1) & 0x03 {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad(1, 2)),
    }
}

/// VERIFY BYTCHK (byte 1 bits 2:1; SBC-3 5.30 table 76, 10b reserved).
fn verify_bytchk(c: &[u8]) -> Result<ByteCheck, Sense> {
    match (c[1] >> 1) & 0x03 {
        0 => Ok(ByteCheck::MediumOnly),
        1 => Ok(ByteCheck::Full),
        3 => Ok(ByteCheck::SingleBlock),
        _ => Err(bad(1, 2)),
    }
}

fn mode_sense(c: &[u8], ten: bool) -> Result<ModeSense, Sense> {
    let pc = match c[2] >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => PageControl::Saved,
    };
    Ok(ModeSense {
        ten,
        dbd: c[1] & 0x08 != 0,
        llbaa: ten && c[1] & 0x10 != 0,
        pc,
        page: c[2] & 0x3F,
        subpage: c[3],
        alloc_len: if ten {
            u32::from(be16(&c[7..]))
        } else {
            u32::from(c[4])
        },
    })
}

fn mode_select(c: &[u8], ten: bool) -> ModeSelect {
    ModeSelect {
        ten,
        pf: c[1] & 0x10 != 0,
        sp: c[1] & 0x01 != 0,
        param_len: if ten {
            u32::from(be16(&c[7..]))
        } else {
            u32::from(c[4])
        },
    }
}

fn write_same(c: &[u8]) -> Result<WriteSame, Sense> {
    no_protection(c)?;
    // ANCHOR: anchored LBAs are not supported (ANC_SUP=0, SBC-3 5.42).
    if c[1] & 0x10 != 0 {
        return Err(bad(1, 4));
    }
    let sixteen = c.len() == 16;
    // PBDATA / LBDATA (obsolete in WRITE SAME(16)) are not supported.
    if c[1] & 0x06 != 0 {
        return Err(bad(1, 2));
    }
    if !sixteen && c[1] & 0x01 != 0 {
        return Err(bad(1, 0));
    }
    let (lba, blocks) = lba_len(c);
    Ok(WriteSame {
        lba,
        blocks,
        unmap: c[1] & 0x08 != 0,
        ndob: sixteen && c[1] & 0x01 != 0,
    })
}

/// Decodes a CDB. Extra bytes past the length implied by the group code are ignored (the
/// iSCSI CDB field is always 16 bytes).
pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
    use opcode::*;

    let op = *cdb.first().ok_or(Sense::invalid_opcode())?;
    let len = cdb_len(op).ok_or(Sense::invalid_opcode())?;
    let c = cdb.get(..len).ok_or(Sense::invalid_field_in_cdb(0, None))?;

    let cmd = match op {
        TEST_UNIT_READY => Command::TestUnitReady,
        REQUEST_SENSE => {
            // DESC: only fixed-format sense data is supported (SPC-4 6.39).
            if c[1] & 0x01 != 0 {
                return Err(bad(1, 0));
            }
            Command::RequestSense {
                alloc_len: u32::from(c[4]),
            }
        }
        INQUIRY => {
            // CmdDt is obsolete (SPC-4 6.6); EVPD=0 requires PAGE CODE 0.
            if c[1] & 0x02 != 0 {
                return Err(bad(1, 1));
            }
            let evpd = c[1] & 0x01 != 0;
            if !evpd && c[2] != 0 {
                return Err(Sense::invalid_field_in_cdb(2, None));
            }
            Command::Inquiry {
                evpd,
                page: c[2],
                alloc_len: u32::from(be16(&c[3..])),
            }
        }
        MODE_SENSE_6 => Command::ModeSense(mode_sense(c, false)?),
        MODE_SENSE_10 => Command::ModeSense(mode_sense(c, true)?),
        MODE_SELECT_6 => Command::ModeSelect(mode_select(c, false)),
        MODE_SELECT_10 => Command::ModeSelect(mode_select(c, true)),
        START_STOP_UNIT => Command::StartStopUnit(StartStopUnit {
            immed: c[1] & 0x01 != 0,
            power_condition: c[4] >> 4,
            no_flush: c[4] & 0x04 != 0,
            loej: c[4] & 0x02 != 0,
            start: c[4] & 0x01 != 0,
        }),
        PREVENT_ALLOW_MEDIUM_REMOVAL => match c[4] & 0x03 {
            0 => Command::PreventAllowMediumRemoval { prevent: false },
            1 => Command::PreventAllowMediumRemoval { prevent: true },
            // 10b and 11b are obsolete (SBC-3 5.12, table 43).
            _ => return Err(bad(4, 1)),
        },
        REPORT_LUNS => Command::ReportLuns {
            select_report: c[2],
            alloc_len: be32(&c[6..]),
        },
        READ_CAPACITY_10 => {
            // SBC-3 5.15: LBA must be zero unless PMI is set.
            if c[8] & 0x01 == 0 && be32(&c[2..]) != 0 {
                return Err(Sense::invalid_field_in_cdb(2, None));
            }
            Command::ReadCapacity10
        }
        SERVICE_ACTION_IN_16 => match u16::from(c[1] & 0x1F) {
            SA_READ_CAPACITY_16 => {
                if c[14] & 0x01 == 0 && be64(&c[2..]) != 0 {
                    return Err(Sense::invalid_field_in_cdb(2, None));
                }
                Command::ReadCapacity16 {
                    alloc_len: be32(&c[10..]),
                }
            }
            SA_GET_LBA_STATUS => Command::GetLbaStatus {
                lba: be64(&c[2..]),
                alloc_len: be32(&c[10..]),
            },
            _ => return Err(bad(1, 4)),
        },
        MAINTENANCE_IN => match u16::from(c[1] & 0x1F) {
            SA_REPORT_SUPPORTED_OPCODES => {
                let options = c[2] & 0x07;
                if options > 3 {
                    return Err(bad(2, 2));
                }
                Command::ReportSupportedOpcodes(ReportOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options,
                    opcode: c[3],
                    service_action: be16(&c[4..]),
                    alloc_len: be32(&c[6..]),
                })
            }
            SA_REPORT_TARGET_PORT_GROUPS => Command::ReportTargetPortGroups {
                format: c[1] >> 5,
                alloc_len: be32(&c[6..]),
            },
            _ => return Err(bad(1, 4)),
        },
        READ_6 | WRITE_6 => {
            // SBC-3 5.10 / 5.33: 21-bit LBA; a TRANSFER LENGTH of 0 means 256 blocks.
            let lba = (u64::from(c[1] & 0x1F) << 16) | u64::from(be16(&c[2..]));
            let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
            let x = Transfer {
                lba,
                blocks,
                dpo: false,
                fua: false,
            };
            if op == READ_6 {
                Command::Read(x)
            } else {
                Command::Write(x)
            }
        }
        READ_10 | READ_12 | READ_16 => {
            let (lba, blocks) = lba_len(c);
            Command::Read(transfer(c, lba, blocks)?)
        }
        WRITE_10 | WRITE_12 | WRITE_16 => {
            let (lba, blocks) = lba_len(c);
            Command::Write(transfer(c, lba, blocks)?)
        }
        ORWRITE_16 => {
            // ORPROTECT must be zero (no protection information); FUA_NV is a hint.
            let (lba, blocks) = lba_len(c);
            Command::OrWrite(transfer(c, lba, blocks)?)
        }
        WRITE_ATOMIC_16 => {
            // ATOMIC BOUNDARY: a non-zero value asks for several atomic write operations,
            // which are not supported (MAXIMUM ATOMIC BOUNDARY SIZE 0, SBC-4 5.48).
            if be16(&c[10..]) != 0 {
                return Err(Sense::invalid_field_in_cdb(10, None));
            }
            let x = transfer(c, be64(&c[2..]), u32::from(be16(&c[12..])))?;
            Command::WriteAtomic(x)
        }
        READ_DEFECT_DATA_10 | READ_DEFECT_DATA_12 => {
            let twelve = op == READ_DEFECT_DATA_12;
            let flags = if twelve { c[1] } else { c[2] };
            let format = flags & 0x07;
            // DEFECT LIST FORMAT 111b is reserved (SBC-3 6.2, address descriptor formats).
            if format == 0b111 {
                return Err(bad(if twelve { 1 } else { 2 }, 2));
            }
            Command::ReadDefectData {
                twelve,
                req_plist: flags & 0x10 != 0,
                req_glist: flags & 0x08 != 0,
                format,
                alloc_len: if twelve {
                    be32(&c[6..])
                } else {
                    u32::from(be16(&c[7..]))
                },
            }
        }
        WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12 | WRITE_AND_VERIFY_16 => {
            let (lba, blocks) = lba_len(c);
            let byte_check = write_verify_bytchk(c)?;
            let mut xfer = transfer(c, lba, blocks)?;
            // WRITE AND VERIFY has no FUA bit; the write is verified on the medium anyway.
            xfer.fua = false;
            Command::WriteAndVerify { xfer, byte_check }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            no_protection(c)?;
            let (lba, blocks) = lba_len(c);
            Command::Verify {
                lba,
                blocks,
                dpo: c[1] & 0x10 != 0,
                byte_check: verify_bytchk(c)?,
            }
        }
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = lba_len(c);
            Command::SynchronizeCache {
                lba,
                blocks,
                immed: c[1] & 0x02 != 0,
            }
        }
        PRE_FETCH_10 | PRE_FETCH_16 => {
            let (lba, blocks) = lba_len(c);
            Command::PreFetch {
                lba,
                blocks,
                immed: c[1] & 0x02 != 0,
            }
        }
        WRITE_SAME_10 | WRITE_SAME_16 => Command::WriteSame(write_same(c)?),
        UNMAP => {
            // ANCHOR is not supported (ANC_SUP=0, SBC-3 5.28).
            if c[1] & 0x01 != 0 {
                return Err(bad(1, 0));
            }
            Command::Unmap {
                param_len: u32::from(be16(&c[7..])),
            }
        }
        COMPARE_AND_WRITE => {
            no_protection(c)?;
            Command::CompareAndWrite {
                lba: be64(&c[2..]),
                blocks: c[13],
                dpo: c[1] & 0x10 != 0,
                fua: c[1] & 0x08 != 0,
            }
        }
        PERSISTENT_RESERVE_IN => {
            let service_action = c[1] & 0x1F;
            if service_action > 3 {
                return Err(bad(1, 4));
            }
            Command::PersistentReserveIn {
                service_action,
                alloc_len: u32::from(be16(&c[7..])),
            }
        }
        PERSISTENT_RESERVE_OUT => {
            let service_action = c[1] & 0x1F;
            if service_action > 7 {
                return Err(bad(1, 4));
            }
            // A parameter list is 24 bytes plus TransportIDs: more than 64 KiB is refused
            // before any data is solicited.
            let param_len = be32(&c[5..]);
            if param_len > MAX_PR_OUT_PARAM_LEN {
                return Err(Sense::invalid_field_in_cdb(5, None));
            }
            Command::PersistentReserveOut(PrOut {
                service_action,
                scope: c[2] >> 4,
                pr_type: c[2] & 0x0F,
                param_len,
            })
        }
        EXTENDED_COPY => {
            if c[1] & 0x1F != SA_EXTENDED_COPY_LID1 {
                return Err(bad(1, 4));
            }
            let param_len = be32(&c[10..]);
            if param_len > XCOPY_MAX_PARAM_LEN {
                return Err(Sense::invalid_field_in_cdb(10, None));
            }
            Command::ExtendedCopy { param_len }
        }
        RECEIVE_COPY_RESULTS => {
            let service_action = c[1] & 0x1F;
            if !matches!(service_action, SA_COPY_STATUS | SA_OPERATING_PARAMETERS) {
                return Err(bad(1, 4));
            }
            Command::ReceiveCopyResults {
                service_action,
                list_id: c[2],
                alloc_len: be32(&c[10..]),
            }
        }
        SANITIZE => {
            // Byte 1: IMMED (7), ZNR (6, zoned devices only: reserved here), AUSE (5),
            // SERVICE ACTION (4:0); bytes 2..=6 reserved.
            if c[1] & 0x40 != 0 {
                return Err(bad(1, 6));
            }
            if let Some(i) = (2..=6).find(|&i| c[i] != 0) {
                return Err(Sense::invalid_field_in_cdb(i as u16, None));
            }
            let service_action = c[1] & 0x1F;
            if !matches!(
                service_action,
                SA_SANITIZE_OVERWRITE | SA_SANITIZE_BLOCK_ERASE | SA_SANITIZE_EXIT_FAILURE_MODE
            ) {
                // CRYPTO ERASE (03h) included: the stores keep no encryption key to change.
                return Err(bad(1, 4));
            }
            Command::Sanitize(Sanitize {
                immed: c[1] & 0x80 != 0,
                ause: c[1] & 0x20 != 0,
                service_action,
                param_len: be16(&c[7..]),
            })
        }
        RESERVE_6 | RELEASE_6 => {
            // Extent reservations (obsolete) and third-party reservations are not supported.
            if c[1] & 0x01 != 0 {
                return Err(bad(1, 0));
            }
            if c[1] & 0x10 != 0 {
                return Err(bad(1, 4));
            }
            if op == RESERVE_6 {
                Command::Reserve
            } else {
                Command::Release
            }
        }
        RESERVE_10 | RELEASE_10 => {
            // 3RDPTY and LONGID: third-party reservations are not supported (SPC-2 7.22).
            if c[1] & 0x10 != 0 {
                return Err(bad(1, 4));
            }
            if c[1] & 0x02 != 0 {
                return Err(bad(1, 1));
            }
            if op == RESERVE_10 {
                Command::Reserve
            } else {
                Command::Release
            }
        }
        _ => return Err(Sense::invalid_opcode()),
    };
    check_control(c)?;
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::SenseKey;
    use rand::{Rng, SeedableRng};

    fn read10(lba: u32, blocks: u16, flags: u8) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = opcode::READ_10;
        c[1] = flags;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[test]
    fn group_code_lengths() {
        assert_eq!(cdb_len(0x00), Some(6));
        assert_eq!(cdb_len(0x28), Some(10));
        assert_eq!(cdb_len(0x5A), Some(10));
        assert_eq!(cdb_len(0x7F), None);
        assert_eq!(cdb_len(0x88), Some(16));
        assert_eq!(cdb_len(0xA8), Some(12));
        assert_eq!(cdb_len(0xC0), None);
    }

    #[test]
    fn read10_fields() {
        let cmd = parse(&read10(0x0102_0304, 7, 0x18)).unwrap();
        assert_eq!(
            cmd,
            Command::Read(Transfer {
                lba: 0x0102_0304,
                blocks: 7,
                dpo: true,
                fua: true
            })
        );
    }

    #[test]
    fn rdprotect_is_invalid_field() {
        for p in 1..8u8 {
            let e = parse(&read10(0, 1, p << 5)).unwrap_err();
            assert_eq!((e.key, e.asc, e.ascq), (SenseKey::IllegalRequest, 0x24, 0));
            assert_eq!(e.sks.unwrap().byte, 1);
        }
    }

    #[test]
    fn read6_zero_length_means_256() {
        let cmd = parse(&[opcode::READ_6, 0x1F, 0xFF, 0xFF, 0, 0]).unwrap();
        assert_eq!(
            cmd,
            Command::Read(Transfer {
                lba: 0x1F_FFFF,
                blocks: 256,
                dpo: false,
                fua: false
            })
        );
    }

    #[test]
    fn unknown_opcode() {
        for op in [0x02u8, 0x7F, 0xC0, 0xFF, 0x3B, 0x3C, 0xA2] {
            let mut c = [0u8; 16];
            c[0] = op;
            assert_eq!(parse(&c).unwrap_err(), Sense::invalid_opcode());
        }
        assert_eq!(parse(&[]).unwrap_err(), Sense::invalid_opcode());
    }

    #[test]
    fn reservation_cdbs() {
        let mut c = [0u8; 10];
        c[0] = opcode::PERSISTENT_RESERVE_OUT;
        c[1] = 0x06;
        c[2] = 0x03;
        c[5..9].copy_from_slice(&24u32.to_be_bytes());
        let cmd = parse(&c).unwrap();
        assert_eq!(cmd.data_out_len(512), 24);
        c[5..9].copy_from_slice(&(MAX_PR_OUT_PARAM_LEN + 1).to_be_bytes());
        assert_eq!(parse(&c).unwrap_err().asc, 0x24);
        c[1] = 0x08;
        assert_eq!(parse(&c).unwrap_err(), bad(1, 4));
        let mut i = [0u8; 10];
        i[0] = opcode::PERSISTENT_RESERVE_IN;
        i[1] = 0x04;
        assert_eq!(parse(&i).unwrap_err(), bad(1, 4));
        i[1] = 0x03;
        i[7..9].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&i).unwrap().alloc_len(), Some(100));
        assert_eq!(
            parse(&[opcode::RESERVE_6, 0, 0, 0, 0, 0]).unwrap(),
            Command::Reserve
        );
        assert_eq!(
            parse(&[opcode::RESERVE_6, 1, 0, 0, 0, 0]).unwrap_err(),
            bad(1, 0)
        );
        let mut r10 = [0u8; 10];
        r10[0] = opcode::RELEASE_10;
        assert_eq!(parse(&r10).unwrap(), Command::Release);
        r10[1] = 0x10;
        assert_eq!(parse(&r10).unwrap_err(), bad(1, 4));
    }

    #[test]
    fn copy_cdbs() {
        let mut c = [0u8; 16];
        c[0] = opcode::EXTENDED_COPY;
        c[10..14].copy_from_slice(&76u32.to_be_bytes());
        assert_eq!(parse(&c).unwrap().data_out_len(512), 76);
        c[1] = 0x01; // LID4
        assert_eq!(parse(&c).unwrap_err(), bad(1, 4));
        c[1] = 0;
        c[10..14].copy_from_slice(&(super::XCOPY_MAX_PARAM_LEN + 1).to_be_bytes());
        assert_eq!(parse(&c).unwrap_err().asc, 0x24);
        let mut r = [0u8; 16];
        r[0] = opcode::RECEIVE_COPY_RESULTS;
        r[1] = 0x03;
        r[10..14].copy_from_slice(&1024u32.to_be_bytes());
        assert_eq!(parse(&r).unwrap().alloc_len(), Some(1024));
        r[1] = 0x01;
        assert_eq!(parse(&r).unwrap_err(), bad(1, 4));
    }

    #[test]
    fn bad_service_action_points_at_byte_1() {
        let mut c = [0u8; 16];
        c[0] = opcode::SERVICE_ACTION_IN_16;
        c[1] = 0x11;
        let e = parse(&c).unwrap_err();
        assert_eq!(e.asc, 0x24);
        assert_eq!(e.sks.unwrap().byte, 1);
    }

    #[test]
    fn inquiry_page_without_evpd_is_invalid() {
        let e = parse(&[opcode::INQUIRY, 0, 1, 0, 255, 0]).unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 2));
        let cmd = parse(&[opcode::INQUIRY, 1, 0x83, 1, 0, 0]).unwrap();
        assert_eq!(
            cmd,
            Command::Inquiry {
                evpd: true,
                page: 0x83,
                alloc_len: 256
            }
        );
    }

    #[test]
    fn naca_rejected() {
        let mut c = read10(0, 1, 0);
        c[9] = 0x04;
        let e = parse(&c).unwrap_err();
        assert_eq!(e.sks.unwrap().byte, 9);
    }

    #[test]
    fn write_same_anchor_rejected_and_ndob_decoded() {
        let mut c = [0u8; 16];
        c[0] = opcode::WRITE_SAME_16;
        c[1] = 0x10;
        assert_eq!(parse(&c).unwrap_err().asc, 0x24);
        c[1] = 0x09;
        c[13] = 4;
        let Command::WriteSame(ws) = parse(&c).unwrap() else {
            panic!("not write same")
        };
        assert!(ws.unmap && ws.ndob);
        assert_eq!(ws.blocks, 4);
        assert_eq!(Command::WriteSame(ws).data_out_len(512), 0);
    }

    #[test]
    fn verify_bytchk_values() {
        let mut c = [0u8; 10];
        c[0] = opcode::VERIFY_10;
        c[8] = 2;
        c[1] = 0x02;
        assert_eq!(parse(&c).unwrap().data_out_len(512), 1024);
        c[1] = 0x06;
        assert_eq!(parse(&c).unwrap().data_out_len(512), 512);
        c[1] = 0x04;
        assert_eq!(parse(&c).unwrap_err().asc, 0x24);
        c[1] = 0x00;
        assert_eq!(parse(&c).unwrap().data_out_len(512), 0);
    }

    #[test]
    fn compare_and_write_transfers_twice_the_blocks() {
        let mut c = [0u8; 16];
        c[0] = opcode::COMPARE_AND_WRITE;
        c[13] = 3;
        assert_eq!(parse(&c).unwrap().data_out_len(4096), 6 * 4096);
    }

    #[test]
    fn short_cdb_does_not_panic() {
        for op in 0..=255u8 {
            for len in 0..16 {
                let mut c = vec![0u8; len];
                if let Some(b) = c.first_mut() {
                    *b = op;
                }
                let _ = parse(&c);
            }
        }
    }

    #[test]
    fn random_cdbs_do_not_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200_000 {
            let mut c = [0u8; 16];
            rng.fill(&mut c[..]);
            if let Ok(cmd) = parse(&c) {
                let _ = cmd.data_out_len(512);
            }
        }
    }
}
