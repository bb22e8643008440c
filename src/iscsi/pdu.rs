//! iSCSI PDU layout and codec (RFC 7143 §11).
//!
//! A PDU is kept as its raw 48-byte Basic Header Segment plus AHS and data segment; typed
//! accessors read fields in place. The codec frames PDUs on a byte stream, checks header and
//! data digests (CRC32C, §11.1 / §13.1) and enforces MaxRecvDataSegmentLength.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

pub const BHS_LEN: usize = 48;
const DIGEST_LEN: usize = 4;
/// Hard ceiling for any data segment we accept, whatever was negotiated (2^24-1 per §13.12).
pub const MAX_DATA_SEGMENT: usize = (1 << 24) - 1;

/// Opcodes (§11.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    Snack = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        use Opcode::*;
        Some(match v & 0x3f {
            0x00 => NopOut,
            0x01 => ScsiCommand,
            0x02 => TaskMgmtRequest,
            0x03 => LoginRequest,
            0x04 => TextRequest,
            0x05 => DataOut,
            0x06 => LogoutRequest,
            0x10 => Snack,
            0x20 => NopIn,
            0x21 => ScsiResponse,
            0x22 => TaskMgmtResponse,
            0x23 => LoginResponse,
            0x24 => TextResponse,
            0x25 => DataIn,
            0x26 => LogoutResponse,
            0x31 => R2t,
            0x32 => AsyncMessage,
            0x3f => Reject,
            _ => return None,
        })
    }
}

/// Reject reasons (§11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    OutOfResources = 0x0a,
    WaitingForLogout = 0x0c,
}

/// The reserved value 0xffffffff for ITT/TTT (§11.2.1.x).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &self.raw_opcode())
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("data_len", &self.data.len())
            .finish()
    }
}

impl Pdu {
    /// A PDU with a zeroed header carrying `opcode`.
    pub fn new(opcode: Opcode) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode as u8;
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    pub fn raw_opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.bhs[0])
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    pub fn set_immediate(&mut self, v: bool) {
        self.set_bit(0, 0x40, v)
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.bhs[1] = f;
    }
    /// The F (final) bit, bit 7 of byte 1.
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn set_bit(&mut self, byte: usize, mask: u8, v: bool) {
        if v {
            self.bhs[byte] |= mask
        } else {
            self.bhs[byte] &= !mask
        }
    }
    pub fn total_ahs_len(&self) -> usize {
        self.bhs[4] as usize * 4
    }
    pub fn data_segment_len(&self) -> usize {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]]) as usize
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.bhs[off..off + 4].try_into().unwrap())
    }
    pub fn set_u32_at(&mut self, off: usize, v: u32) {
        self.bhs[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.bhs[off..off + 8].try_into().unwrap())
    }
    pub fn set_u64_at(&mut self, off: usize, v: u64) {
        self.bhs[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    /// LUN field (bytes 8..16) as the raw 8-byte SAM LUN.
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn set_lun(&mut self, v: u64) {
        self.set_u64_at(8, v)
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32_at(16, v)
    }
    /// TTT for Data-Out / NOP / R2T / Text (bytes 20..24); ExpectedDataTransferLength for a SCSI Command.
    /// The `fieldNN` accessors are thin raw-offset wrappers; new code uses the typed views
    /// ([`ScsiCommand`], [`DataOut`], ...) which name the field the opcode puts there.
    pub fn field20(&self) -> u32 {
        self.u32_at(20)
    }
    /// CmdSN (requests) / StatSN (responses), bytes 24..28.
    pub fn field24(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpStatSN (requests) / ExpCmdSN (responses), bytes 28..32.
    pub fn field28(&self) -> u32 {
        self.u32_at(28)
    }
    /// MaxCmdSN in responses, bytes 32..36.
    pub fn field32(&self) -> u32 {
        self.u32_at(32)
    }

    /// CmdSN of an initiator request that carries one (SCSI Command, Task Management, Text,
    /// Logout, NOP-Out: bytes 24..28, §11.2.1 and the sections of each request).
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(offset::WORD24)
    }

    /// StatSN of a target-to-initiator PDU (§11.2.1, bytes 24..28).
    pub fn set_stat_sn(&mut self, v: u32) {
        self.set_u32_at(offset::WORD24, v)
    }
    /// ExpCmdSN of a target-to-initiator PDU (bytes 28..32).
    pub fn set_exp_cmd_sn(&mut self, v: u32) {
        self.set_u32_at(offset::WORD28, v)
    }
    /// MaxCmdSN of a target-to-initiator PDU (bytes 32..36).
    pub fn set_max_cmd_sn(&mut self, v: u32) {
        self.set_u32_at(offset::WORD32, v)
    }

    /// Sets the data segment and its length field.
    pub fn set_data(&mut self, data: Bytes) {
        let len = data.len() as u32;
        debug_assert!(len as usize <= MAX_DATA_SEGMENT);
        self.bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        self.data = data;
    }

    /// Encoded size on the wire, without digests.
    pub fn wire_len(&self) -> usize {
        BHS_LEN + self.ahs.len() + pad4(self.data.len())
    }
}

/// BHS byte offsets of the fields RFC 7143 §11 places at the same spot in many opcodes. The
/// typed views and builders below are the only code that should need them.
pub mod offset {
    /// Opcode-specific flags (§11.2.1.3).
    pub const FLAGS: usize = 1;
    /// LUN or opcode-specific (§11.2.1.5).
    pub const LUN: usize = 8;
    /// Initiator Task Tag (§11.2.1.6).
    pub const ITT: usize = 16;
    /// TTT / ExpectedDataTransferLength / ReferencedTaskTag / CID, by opcode.
    pub const WORD20: usize = 20;
    /// CmdSN (initiator to target) / StatSN (target to initiator).
    pub const WORD24: usize = 24;
    /// ExpStatSN (initiator to target) / ExpCmdSN (target to initiator).
    pub const WORD28: usize = 28;
    /// MaxCmdSN (target to initiator), RefCmdSN (TMF), CDB start (SCSI Command).
    pub const WORD32: usize = 32;
    /// ExpDataSN / DataSN / R2TSN / StatusClass+Detail, by opcode.
    pub const WORD36: usize = 36;
    /// Buffer Offset (Data-In, Data-Out, R2T).
    pub const WORD40: usize = 40;
    /// Residual Count / Desired Data Transfer Length, by opcode.
    pub const WORD44: usize = 44;
}

/// The F (final) bit of byte 1, used by almost every PDU (§11.2.1.3).
pub const FLAG_FINAL: u8 = 0x80;

/// Read-only views of request PDUs, named after the fields of RFC 7143 §11. A view borrows the
/// PDU and reads the BHS in place: no copy, no allocation. It does not check the opcode; the
/// caller has dispatched on it already.
macro_rules! view_u32 {
    ($(#[$m:meta])* $name:ident = $off:expr) => {
        $(#[$m])*
        #[inline]
        pub fn $name(&self) -> u32 {
            self.0.u32_at($off)
        }
    };
}

/// Setters of the by-value builders below; each writes one §11 field into the BHS.
macro_rules! build_u32 {
    ($(#[$m:meta])* $name:ident = $off:expr) => {
        $(#[$m])*
        #[inline]
        #[must_use]
        pub fn $name(mut self, v: u32) -> Self {
            self.0.set_u32_at($off, v);
            self
        }
    };
}

/// SCSI Command (§11.3).
#[derive(Debug, Clone, Copy)]
pub struct ScsiCommand<'a>(pub &'a Pdu);

impl<'a> ScsiCommand<'a> {
    /// F: no unsolicited Data-Out follows (§11.3.1).
    pub fn final_bit(&self) -> bool {
        self.0.bhs[offset::FLAGS] & FLAG_FINAL != 0
    }
    /// R: data is expected from the target.
    pub fn read(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x40 != 0
    }
    /// W: data is expected from the initiator.
    pub fn write(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x20 != 0
    }
    /// ATTR: task attribute (§11.3.1, SAM-5 8.9).
    pub fn attr(&self) -> u8 {
        self.0.bhs[offset::FLAGS] & 0x07
    }
    pub fn lun(&self) -> u64 {
        self.0.lun()
    }
    view_u32!(itt = offset::ITT);
    view_u32!(
        /// Expected Data Transfer Length (§11.3.4).
        expected_data_transfer_length = offset::WORD20
    );
    view_u32!(cmd_sn = offset::WORD24);
    view_u32!(exp_stat_sn = offset::WORD28);
    /// The 16 CDB bytes of the BHS (§11.3.5); longer CDBs continue in an extended-CDB AHS.
    pub fn cdb(&self) -> &'a [u8; 16] {
        self.0.bhs[offset::WORD32..BHS_LEN].try_into().unwrap()
    }
    pub fn ahs(&self) -> &'a [u8] {
        &self.0.ahs
    }
}

/// SCSI Data-Out (§11.7).
#[derive(Debug, Clone, Copy)]
pub struct DataOut<'a>(pub &'a Pdu);

impl<'a> DataOut<'a> {
    pub fn final_bit(&self) -> bool {
        self.0.final_bit()
    }
    pub fn lun(&self) -> u64 {
        self.0.lun()
    }
    view_u32!(itt = offset::ITT);
    view_u32!(
        /// RESERVED_TAG for unsolicited data, else the TTT of the R2T answered (§11.7.4).
        target_transfer_tag = offset::WORD20
    );
    view_u32!(exp_stat_sn = offset::WORD28);
    view_u32!(data_sn = offset::WORD36);
    view_u32!(buffer_offset = offset::WORD40);
    pub fn data(&self) -> &'a [u8] {
        &self.0.data
    }
}

/// Text Request (§11.10).
#[derive(Debug, Clone, Copy)]
pub struct TextRequest<'a>(pub &'a Pdu);

impl<'a> TextRequest<'a> {
    pub fn final_bit(&self) -> bool {
        self.0.final_bit()
    }
    /// C: the text continues in the next PDU (§11.10.2).
    pub fn continue_bit(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x40 != 0
    }
    view_u32!(itt = offset::ITT);
    view_u32!(target_transfer_tag = offset::WORD20);
    view_u32!(cmd_sn = offset::WORD24);
    view_u32!(exp_stat_sn = offset::WORD28);
}

/// Login Request (§11.12).
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a>(pub &'a Pdu);

impl<'a> LoginRequest<'a> {
    /// T: the initiator wants to move to NSG (§11.12.1).
    pub fn transit(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x80 != 0
    }
    /// C: the text continues in the next PDU (§11.12.2).
    pub fn continue_bit(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x40 != 0
    }
    /// CSG, current stage (§11.12.3).
    pub fn csg(&self) -> u8 {
        (self.0.bhs[offset::FLAGS] >> 2) & 3
    }
    /// NSG, next stage (§11.12.3).
    pub fn nsg(&self) -> u8 {
        self.0.bhs[offset::FLAGS] & 3
    }
    pub fn version_max(&self) -> u8 {
        self.0.bhs[2]
    }
    pub fn version_min(&self) -> u8 {
        self.0.bhs[3]
    }
    /// ISID (§11.12.5).
    pub fn isid(&self) -> [u8; 6] {
        self.0.bhs[8..14].try_into().unwrap()
    }
    /// TSIH (§11.12.6).
    pub fn tsih(&self) -> u16 {
        u16::from_be_bytes([self.0.bhs[14], self.0.bhs[15]])
    }
    view_u32!(itt = offset::ITT);
    /// CID (§11.12.7).
    pub fn cid(&self) -> u16 {
        u16::from_be_bytes([self.0.bhs[20], self.0.bhs[21]])
    }
    view_u32!(cmd_sn = offset::WORD24);
    view_u32!(exp_stat_sn = offset::WORD28);
}

/// Login Response as received (§11.13); what an initiator (and our tests) read back.
#[derive(Debug, Clone, Copy)]
pub struct LoginResponse<'a>(pub &'a Pdu);

impl<'a> LoginResponse<'a> {
    pub fn tsih(&self) -> u16 {
        u16::from_be_bytes([self.0.bhs[14], self.0.bhs[15]])
    }
    pub fn isid(&self) -> [u8; 6] {
        self.0.bhs[8..14].try_into().unwrap()
    }
    pub fn version_max(&self) -> u8 {
        self.0.bhs[2]
    }
    pub fn version_active(&self) -> u8 {
        self.0.bhs[3]
    }
    view_u32!(stat_sn = offset::WORD24);
    view_u32!(exp_cmd_sn = offset::WORD28);
    view_u32!(max_cmd_sn = offset::WORD32);
    /// Status-Class and Status-Detail as one big-endian u16 (§11.13.5).
    pub fn status(&self) -> u16 {
        u16::from_be_bytes([self.0.bhs[36], self.0.bhs[37]])
    }
}

/// Logout Request (§11.14).
#[derive(Debug, Clone, Copy)]
pub struct LogoutRequest<'a>(pub &'a Pdu);

impl<'a> LogoutRequest<'a> {
    /// Reason Code (§11.14.1).
    pub fn reason_code(&self) -> u8 {
        self.0.bhs[offset::FLAGS] & 0x7f
    }
    view_u32!(itt = offset::ITT);
    /// CID to close (§11.14.3).
    pub fn cid(&self) -> u16 {
        u16::from_be_bytes([self.0.bhs[20], self.0.bhs[21]])
    }
    view_u32!(cmd_sn = offset::WORD24);
    view_u32!(exp_stat_sn = offset::WORD28);
}

/// Task Management Function Request (§11.5).
#[derive(Debug, Clone, Copy)]
pub struct TaskMgmtRequest<'a>(pub &'a Pdu);

impl<'a> TaskMgmtRequest<'a> {
    /// Function (§11.5.1).
    pub fn function(&self) -> u8 {
        self.0.bhs[offset::FLAGS] & 0x7f
    }
    pub fn lun(&self) -> u64 {
        self.0.lun()
    }
    view_u32!(itt = offset::ITT);
    view_u32!(referenced_task_tag = offset::WORD20);
    view_u32!(cmd_sn = offset::WORD24);
    view_u32!(exp_stat_sn = offset::WORD28);
    view_u32!(ref_cmd_sn = offset::WORD32);
    view_u32!(exp_data_sn = offset::WORD36);
}

/// NOP-Out (§11.18).
#[derive(Debug, Clone, Copy)]
pub struct NopOut<'a>(pub &'a Pdu);

impl<'a> NopOut<'a> {
    pub fn lun(&self) -> u64 {
        self.0.lun()
    }
    view_u32!(itt = offset::ITT);
    view_u32!(
        /// RESERVED_TAG unless this answers one of our NOP-Ins (§11.18.2).
        target_transfer_tag = offset::WORD20
    );
    view_u32!(cmd_sn = offset::WORD24);
    view_u32!(exp_stat_sn = offset::WORD28);
}

/// SCSI Response as received (§11.4): what an initiator (and our tests) read back.
#[derive(Debug, Clone, Copy)]
pub struct ScsiResponse<'a>(pub &'a Pdu);

impl<'a> ScsiResponse<'a> {
    /// Response (§11.4.3): 0 = command completed at target.
    pub fn response(&self) -> u8 {
        self.0.bhs[2]
    }
    pub fn status(&self) -> u8 {
        self.0.bhs[3]
    }
    /// U bit: Residual Count is an underflow (§11.4.5.1).
    pub fn underflow(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x02 != 0
    }
    /// O bit: Residual Count is an overflow (§11.4.5.1).
    pub fn overflow(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x04 != 0
    }
    view_u32!(itt = offset::ITT);
    view_u32!(stat_sn = offset::WORD24);
    view_u32!(exp_data_sn = offset::WORD36);
    view_u32!(residual_count = offset::WORD44);
}

/// SCSI Data-In as received (§11.7).
#[derive(Debug, Clone, Copy)]
pub struct DataIn<'a>(pub &'a Pdu);

impl<'a> DataIn<'a> {
    pub fn final_bit(&self) -> bool {
        self.0.final_bit()
    }
    /// S bit: status is carried in this PDU (§11.7.4).
    pub fn status_bit(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x01 != 0
    }
    pub fn underflow(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x02 != 0
    }
    pub fn overflow(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x04 != 0
    }
    pub fn status(&self) -> u8 {
        self.0.bhs[3]
    }
    view_u32!(itt = offset::ITT);
    view_u32!(target_transfer_tag = offset::WORD20);
    view_u32!(data_sn = offset::WORD36);
    view_u32!(buffer_offset = offset::WORD40);
    view_u32!(residual_count = offset::WORD44);
}

/// R2T as received (§11.8).
#[derive(Debug, Clone, Copy)]
pub struct R2t<'a>(pub &'a Pdu);

impl<'a> R2t<'a> {
    pub fn lun(&self) -> u64 {
        self.0.lun()
    }
    view_u32!(itt = offset::ITT);
    view_u32!(target_transfer_tag = offset::WORD20);
    view_u32!(r2t_sn = offset::WORD36);
    view_u32!(buffer_offset = offset::WORD40);
    view_u32!(desired_data_transfer_length = offset::WORD44);
}

/// Text Response as received (§11.11).
#[derive(Debug, Clone, Copy)]
pub struct TextResponse<'a>(pub &'a Pdu);

impl<'a> TextResponse<'a> {
    pub fn final_bit(&self) -> bool {
        self.0.final_bit()
    }
    pub fn continue_bit(&self) -> bool {
        self.0.bhs[offset::FLAGS] & 0x40 != 0
    }
    view_u32!(itt = offset::ITT);
    view_u32!(target_transfer_tag = offset::WORD20);
    view_u32!(stat_sn = offset::WORD24);
    view_u32!(exp_cmd_sn = offset::WORD28);
    view_u32!(max_cmd_sn = offset::WORD32);
}

/// Builds a Login Request (§11.12): the initiator's side, for tests and raw-PDU clients.
/// Login requests are always immediate (§11.12).
#[derive(Debug)]
pub struct LoginRequestBuilder(Pdu);

impl LoginRequestBuilder {
    /// `flags` holds T, C, CSG and NSG as in byte 1 (§11.12.1–3).
    pub fn new(flags: u8, itt: u32) -> Self {
        let mut p = Pdu::new(Opcode::LoginRequest);
        p.set_immediate(true);
        p.set_flags(flags);
        p.set_itt(itt);
        LoginRequestBuilder(p)
    }
    #[must_use]
    pub fn isid(mut self, isid: [u8; 6]) -> Self {
        self.0.bhs[8..14].copy_from_slice(&isid);
        self
    }
    #[must_use]
    pub fn tsih(mut self, tsih: u16) -> Self {
        self.0.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        self
    }
    #[must_use]
    pub fn cid(mut self, cid: u16) -> Self {
        self.0.bhs[20..22].copy_from_slice(&cid.to_be_bytes());
        self
    }
    build_u32!(cmd_sn = offset::WORD24);
    build_u32!(exp_stat_sn = offset::WORD28);
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a Text Request (§11.10), initiator side; sent immediate.
#[derive(Debug)]
pub struct TextRequestBuilder(Pdu);

impl TextRequestBuilder {
    /// `flags` holds F (0x80) and C (0x40) (§11.10.1–2).
    pub fn new(itt: u32, target_transfer_tag: u32, flags: u8) -> Self {
        let mut p = Pdu::new(Opcode::TextRequest);
        p.set_immediate(true);
        p.set_flags(flags);
        p.set_itt(itt);
        p.set_u32_at(offset::WORD20, target_transfer_tag);
        TextRequestBuilder(p)
    }
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a SCSI Data-Out (§11.7), initiator side.
#[derive(Debug)]
pub struct DataOutBuilder(Pdu);

impl DataOutBuilder {
    pub fn new(itt: u32, target_transfer_tag: u32) -> Self {
        let mut p = Pdu::new(Opcode::DataOut);
        p.set_itt(itt);
        p.set_u32_at(offset::WORD20, target_transfer_tag);
        DataOutBuilder(p)
    }
    #[must_use]
    pub fn final_bit(mut self, v: bool) -> Self {
        self.0.set_bit(offset::FLAGS, FLAG_FINAL, v);
        self
    }
    build_u32!(exp_stat_sn = offset::WORD28);
    build_u32!(data_sn = offset::WORD36);
    build_u32!(buffer_offset = offset::WORD40);
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Residual of a transfer (§11.4.5): what the initiator expected against what the command used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    None,
    Underflow(u32),
    Overflow(u32),
}

impl Residual {
    pub fn of(expected: u32, actual: u64) -> Residual {
        let e = expected as u64;
        if actual < e {
            Residual::Underflow((e - actual) as u32)
        } else if actual > e {
            Residual::Overflow((actual - e).min(u32::MAX as u64) as u32)
        } else {
            Residual::None
        }
    }

    /// Sets the U / O flag and the Residual Count (bytes 44..48) of a SCSI Response or a
    /// Data-In with the S bit (§11.4.5, §11.7.5).
    fn apply(self, pdu: &mut Pdu) {
        let (bit, n) = match self {
            Residual::None => return,
            Residual::Underflow(n) => (0x02, n),
            Residual::Overflow(n) => (0x04, n),
        };
        pdu.bhs[offset::FLAGS] |= bit;
        pdu.set_u32_at(offset::WORD44, n);
    }
}

/// Builds a SCSI Response (§11.4): F set, Response = "command completed at target".
/// StatSN, ExpCmdSN and MaxCmdSN are stamped when the PDU is sent.
#[derive(Debug)]
pub struct ScsiResponseBuilder(Pdu);

impl ScsiResponseBuilder {
    pub fn new(itt: u32) -> Self {
        let mut p = Pdu::new(Opcode::ScsiResponse);
        p.set_flags(FLAG_FINAL);
        p.bhs[2] = 0x00; // Response: command completed at target (§11.4.3)
        p.set_itt(itt);
        ScsiResponseBuilder(p)
    }
    /// Status (§11.4.2, SAM-5 5.3).
    #[must_use]
    pub fn status(mut self, status: u8) -> Self {
        self.0.bhs[3] = status;
        self
    }
    build_u32!(
        /// ExpDataSN: the number of Data-In PDUs sent for the command (§11.4.6).
        exp_data_sn = offset::WORD36
    );
    #[must_use]
    pub fn residual(mut self, r: Residual) -> Self {
        r.apply(&mut self.0);
        self
    }
    /// Sense data, sent as SenseLength + sense bytes (§11.4.7.2).
    #[must_use]
    pub fn sense(mut self, sense: &[u8]) -> Self {
        let mut d = BytesMut::with_capacity(2 + sense.len());
        d.put_u16(sense.len() as u16);
        d.put_slice(sense);
        self.0.set_data(d.freeze());
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a SCSI Data-In (§11.7). The TTT is reserved: we never ask for DataACK (ERL 0).
#[derive(Debug)]
pub struct DataInBuilder(Pdu);

impl DataInBuilder {
    pub fn new(itt: u32) -> Self {
        let mut p = Pdu::new(Opcode::DataIn);
        p.set_itt(itt);
        p.set_u32_at(offset::WORD20, RESERVED_TAG);
        DataInBuilder(p)
    }
    /// F: the last PDU of a sequence (§11.7.1).
    #[must_use]
    pub fn final_bit(mut self, v: bool) -> Self {
        self.0.set_bit(offset::FLAGS, FLAG_FINAL, v);
        self
    }
    /// S bit and Status: status phase collapsed into this PDU (§11.7.4). Needs F.
    #[must_use]
    pub fn status(mut self, status: u8) -> Self {
        self.0.bhs[offset::FLAGS] |= 0x01;
        self.0.bhs[3] = status;
        self
    }
    build_u32!(data_sn = offset::WORD36);
    build_u32!(buffer_offset = offset::WORD40);
    /// Residual, only meaningful with the S bit (§11.7.5).
    #[must_use]
    pub fn residual(mut self, r: Residual) -> Self {
        r.apply(&mut self.0);
        self
    }
    /// The data segment, by reference: a slice of the read's buffer, not a copy.
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds an R2T (§11.8).
#[derive(Debug)]
pub struct R2tBuilder(Pdu);

impl R2tBuilder {
    pub fn new(lun: u64, itt: u32, target_transfer_tag: u32) -> Self {
        let mut p = Pdu::new(Opcode::R2t);
        p.set_flags(FLAG_FINAL);
        p.set_lun(lun);
        p.set_itt(itt);
        p.set_u32_at(offset::WORD20, target_transfer_tag);
        R2tBuilder(p)
    }
    build_u32!(r2t_sn = offset::WORD36);
    build_u32!(buffer_offset = offset::WORD40);
    build_u32!(desired_data_transfer_length = offset::WORD44);
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a NOP-In (§11.19): an answer to a NOP-Out (ITT echoed, TTT reserved) or a ping of
/// our own (ITT reserved, TTT ours).
#[derive(Debug)]
pub struct NopInBuilder(Pdu);

impl NopInBuilder {
    pub fn new(itt: u32, target_transfer_tag: u32) -> Self {
        let mut p = Pdu::new(Opcode::NopIn);
        p.set_flags(FLAG_FINAL);
        p.set_itt(itt);
        p.set_u32_at(offset::WORD20, target_transfer_tag);
        NopInBuilder(p)
    }
    #[must_use]
    pub fn lun(mut self, lun: u64) -> Self {
        self.0.set_lun(lun);
        self
    }
    /// Ping data, echoed from the NOP-Out (§11.19.3).
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a Text Response (§11.11).
#[derive(Debug)]
pub struct TextResponseBuilder(Pdu);

impl TextResponseBuilder {
    /// `flags` holds F (0x80) and C (0x40) (§11.11.1–2).
    pub fn new(itt: u32, target_transfer_tag: u32, flags: u8) -> Self {
        let mut p = Pdu::new(Opcode::TextResponse);
        p.set_flags(flags);
        p.set_itt(itt);
        p.set_u32_at(offset::WORD20, target_transfer_tag);
        TextResponseBuilder(p)
    }
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a Login Response (§11.13).
#[derive(Debug)]
pub struct LoginResponseBuilder(Pdu);

impl LoginResponseBuilder {
    /// `flags` holds T, C, CSG and NSG as in byte 1 (§11.13.1–3).
    pub fn new(flags: u8, itt: u32) -> Self {
        let mut p = Pdu::new(Opcode::LoginResponse);
        p.set_flags(flags);
        p.set_itt(itt);
        LoginResponseBuilder(p)
    }
    /// Version-max and Version-active (§11.13.4).
    #[must_use]
    pub fn versions(mut self, max: u8, active: u8) -> Self {
        self.0.bhs[2] = max;
        self.0.bhs[3] = active;
        self
    }
    #[must_use]
    pub fn isid(mut self, isid: [u8; 6]) -> Self {
        self.0.bhs[8..14].copy_from_slice(&isid);
        self
    }
    #[must_use]
    pub fn tsih(mut self, tsih: u16) -> Self {
        self.0.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        self
    }
    build_u32!(stat_sn = offset::WORD24);
    build_u32!(exp_cmd_sn = offset::WORD28);
    build_u32!(max_cmd_sn = offset::WORD32);
    /// Status-Class and Status-Detail (§11.13.5).
    #[must_use]
    pub fn status(mut self, class: u8, detail: u8) -> Self {
        self.0.bhs[36] = class;
        self.0.bhs[37] = detail;
        self
    }
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a Logout Response (§11.15).
#[derive(Debug)]
pub struct LogoutResponseBuilder(Pdu);

impl LogoutResponseBuilder {
    /// `response` per §11.15.1 (0 closed, 1 CID not found, 2 recovery not supported, 3 failed).
    pub fn new(itt: u32, response: u8) -> Self {
        let mut p = Pdu::new(Opcode::LogoutResponse);
        p.set_flags(FLAG_FINAL);
        p.bhs[2] = response;
        p.set_itt(itt);
        LogoutResponseBuilder(p)
    }
    /// Time2Wait and Time2Retain (§11.15.2–3), bytes 40..42 and 42..44.
    #[must_use]
    pub fn times(mut self, time2wait: u16, time2retain: u16) -> Self {
        self.0.bhs[40..42].copy_from_slice(&time2wait.to_be_bytes());
        self.0.bhs[42..44].copy_from_slice(&time2retain.to_be_bytes());
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a Task Management Function Response (§11.6).
#[derive(Debug)]
pub struct TaskMgmtResponseBuilder(Pdu);

impl TaskMgmtResponseBuilder {
    /// `response` per §11.6.1.
    pub fn new(itt: u32, response: u8) -> Self {
        let mut p = Pdu::new(Opcode::TaskMgmtResponse);
        p.set_flags(FLAG_FINAL);
        p.bhs[2] = response;
        p.set_itt(itt);
        TaskMgmtResponseBuilder(p)
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds a Reject (§11.17): the rejected PDU's header goes in the data segment.
#[derive(Debug)]
pub struct RejectBuilder(Pdu);

impl RejectBuilder {
    pub fn new(reason: RejectReason, rejected_bhs: &[u8; BHS_LEN]) -> Self {
        let mut p = Pdu::new(Opcode::Reject);
        p.set_flags(FLAG_FINAL);
        p.bhs[2] = reason as u8;
        p.set_itt(RESERVED_TAG);
        // A copy is needed: the Reject outlives the rejected PDU, and it is not the hot path.
        p.set_data(Bytes::copy_from_slice(rejected_bhs));
        RejectBuilder(p)
    }
    build_u32!(
        /// DataSN/R2TSN of a rejected SNACK, else reserved (§11.17.3).
        data_sn = offset::WORD36
    );
    pub fn build(self) -> Pdu {
        self.0
    }
}

/// Builds an Asynchronous Message (§11.9).
#[derive(Debug)]
pub struct AsyncMessageBuilder(Pdu);

impl AsyncMessageBuilder {
    /// `async_event` per §11.9.1; the ITT is reserved.
    pub fn new(async_event: u8) -> Self {
        let mut p = Pdu::new(Opcode::AsyncMessage);
        p.set_flags(FLAG_FINAL);
        p.set_itt(RESERVED_TAG);
        p.bhs[36] = async_event;
        AsyncMessageBuilder(p)
    }
    #[must_use]
    pub fn lun(mut self, lun: u64) -> Self {
        self.0.set_lun(lun);
        self
    }
    #[must_use]
    pub fn async_vcode(mut self, v: u8) -> Self {
        self.0.bhs[37] = v;
        self
    }
    /// Parameter1..3 (§11.9.2), bytes 38..44.
    #[must_use]
    pub fn parameters(mut self, p1: u16, p2: u16, p3: u16) -> Self {
        self.0.bhs[38..40].copy_from_slice(&p1.to_be_bytes());
        self.0.bhs[40..42].copy_from_slice(&p2.to_be_bytes());
        self.0.bhs[42..44].copy_from_slice(&p3.to_be_bytes());
        self
    }
    /// SenseData (or vendor data) of the event (§11.9.4).
    #[must_use]
    pub fn data(mut self, data: Bytes) -> Self {
        self.0.set_data(data);
        self
    }
    pub fn build(self) -> Pdu {
        self.0
    }
}

pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Serial number arithmetic (RFC 1982, 32 bits) as §4.2.2.1 requires for CmdSN/StatSN.
pub mod serial {
    pub fn lt(a: u32, b: u32) -> bool {
        a != b && (b.wrapping_sub(a) as i32) > 0
    }
    pub fn le(a: u32, b: u32) -> bool {
        a == b || lt(a, b)
    }
    pub fn gt(a: u32, b: u32) -> bool {
        lt(b, a)
    }
}

/// Errors that end the connection (framing cannot be trusted any more).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("header digest mismatch (expected {expected:#010x}, got {got:#010x})")]
    HeaderDigest { expected: u32, got: u32 },
    #[error("data segment length {0} exceeds the protocol maximum")]
    DataSegmentTooLarge(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A PDU that was framed correctly but must be rejected (§7.9 / §11.17); the connection survives.
#[derive(Debug)]
pub enum BadPdu {
    /// Data digest mismatch: the header is usable, the payload is not (§7.8).
    DataDigest { bhs: [u8; BHS_LEN] },
    /// Data segment above our MaxRecvDataSegmentLength; the payload was skipped.
    DataSegmentOverLimit {
        bhs: [u8; BHS_LEN],
        len: usize,
        limit: usize,
    },
}

/// Frames PDUs on a connection. Digests are switched on after login completes.
#[derive(Debug, Clone)]
pub struct PduCodec {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength: the largest data segment the initiator may send us.
    pub max_recv_data_segment: usize,
}

impl Default for PduCodec {
    fn default() -> Self {
        // Before negotiation, §13.12 default is 8192; login PDUs may carry up to that.
        PduCodec {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 8192,
        }
    }
}

impl Decoder for PduCodec {
    type Item = Result<Pdu, BadPdu>;
    type Error = FramingError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FramingError> {
        if src.len() < BHS_LEN {
            src.reserve(BHS_LEN);
            return Ok(None);
        }
        let ahs_len = src[4] as usize * 4;
        let data_len = u32::from_be_bytes([0, src[5], src[6], src[7]]) as usize;
        let hd = if self.header_digest { DIGEST_LEN } else { 0 };
        let dd = if self.data_digest && data_len > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let header_total = BHS_LEN + ahs_len + hd;
        if src.len() < header_total {
            src.reserve(header_total - src.len());
            return Ok(None);
        }
        if self.header_digest {
            let expected = crc32c::crc32c(&src[..BHS_LEN + ahs_len]);
            let got = u32::from_le_bytes(src[BHS_LEN + ahs_len..header_total].try_into().unwrap());
            if expected != got {
                return Err(FramingError::HeaderDigest { expected, got });
            }
        }
        if data_len > MAX_DATA_SEGMENT {
            return Err(FramingError::DataSegmentTooLarge(data_len));
        }
        let total = header_total + pad4(data_len) + dd;
        if src.len() < total {
            // Do not reserve huge amounts for an over-limit segment we will skip anyway.
            src.reserve((total - src.len()).min(1 << 20));
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&frame[..BHS_LEN]);
        if data_len > self.max_recv_data_segment {
            return Ok(Some(Err(BadPdu::DataSegmentOverLimit {
                bhs,
                len: data_len,
                limit: self.max_recv_data_segment,
            })));
        }
        frame.advance(BHS_LEN);
        let ahs = frame.split_to(ahs_len).freeze();
        frame.advance(hd);
        let data = frame.split_to(data_len);
        if dd > 0 {
            let padded = pad4(data_len);
            let expected =
                crc32c::crc32c_append(crc32c::crc32c(&data), &frame[..padded - data_len]);
            let got = u32::from_le_bytes(
                frame[padded - data_len..padded - data_len + 4]
                    .try_into()
                    .unwrap(),
            );
            if expected != got {
                return Ok(Some(Err(BadPdu::DataDigest { bhs })));
            }
        }
        Ok(Some(Ok(Pdu {
            bhs,
            ahs,
            data: data.freeze(),
        })))
    }
}

impl Encoder<Pdu> for PduCodec {
    type Error = std::io::Error;

    fn encode(&mut self, pdu: Pdu, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        encode_pdu(&pdu, self.header_digest, self.data_digest, dst);
        Ok(())
    }
}

/// Appends `pdu` in wire format to `dst`, with digests as requested.
pub fn encode_pdu(pdu: &Pdu, header_digest: bool, data_digest: bool, dst: &mut BytesMut) {
    dst.reserve(pdu.wire_len() + 8);
    encode_header(pdu, header_digest, dst);
    dst.put_slice(&pdu.data);
    encode_tail(pdu, data_digest, dst);
}

/// BHS (with AHS and data segment lengths filled in), AHS and header digest.
fn encode_header(pdu: &Pdu, header_digest: bool, dst: &mut BytesMut) {
    let mut bhs = pdu.bhs;
    bhs[4] = (pdu.ahs.len() / 4) as u8;
    bhs[5..8].copy_from_slice(&(pdu.data.len() as u32).to_be_bytes()[1..]);
    let hstart = dst.len();
    dst.put_slice(&bhs);
    dst.put_slice(&pdu.ahs);
    if header_digest {
        let crc = crc32c::crc32c(&dst[hstart..]);
        dst.put_u32_le(crc);
    }
}

/// Padding and data digest that follow the data segment.
fn encode_tail(pdu: &Pdu, data_digest: bool, dst: &mut BytesMut) {
    let data_len = pdu.data.len();
    if data_len > 0 {
        let pad = pad4(data_len) - data_len;
        dst.put_bytes(0, pad);
        if data_digest {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&pdu.data), &[0u8; 3][..pad]);
            dst.put_u32_le(crc);
        }
    }
}

/// Data segments at least this long are sent by reference instead of being copied.
const ZERO_COPY_MIN: usize = 16 * 1024;

/// PDUs in wire format as a list of segments for a vectored write: headers and small
/// payloads are copied together, large payloads (Data-In of big reads) are referenced, so a
/// read's data goes from the store's buffer to the socket without a copy.
#[derive(Default)]
pub struct WireBatch {
    segments: Vec<Bytes>,
    small: BytesMut,
    len: usize,
}

impl WireBatch {
    pub fn push(&mut self, pdu: &Pdu, header_digest: bool, data_digest: bool) {
        let before = self.small.len();
        if pdu.data.len() < ZERO_COPY_MIN {
            encode_pdu(pdu, header_digest, data_digest, &mut self.small);
            self.len += self.small.len() - before;
            return;
        }
        encode_header(pdu, header_digest, &mut self.small);
        self.len += self.small.len() - before;
        self.flush_small();
        self.len += pdu.data.len();
        self.segments.push(pdu.data.clone());
        let before = self.small.len();
        encode_tail(pdu, data_digest, &mut self.small);
        self.len += self.small.len() - before;
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.segments.push(self.small.split().freeze());
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queued segments, in order; the batch is empty afterwards.
    pub fn take(&mut self) -> Vec<Bytes> {
        self.flush_small();
        self.len = 0;
        std::mem::take(&mut self.segments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(data: &[u8]) -> Pdu {
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.set_itt(0x1234);
        p.set_u32_at(24, 7);
        p.set_data(Bytes::copy_from_slice(data));
        p
    }

    fn roundtrip(hd: bool, dd: bool, data: &[u8]) {
        let mut codec = PduCodec {
            header_digest: hd,
            data_digest: dd,
            max_recv_data_segment: 65536,
        };
        let pdu = sample(data);
        let mut buf = BytesMut::new();
        codec.encode(pdu.clone(), &mut buf).unwrap();
        // Feed one byte at a time: the decoder must wait for whole frames.
        let mut input = BytesMut::new();
        let mut out = None;
        for b in buf.iter() {
            assert!(out.is_none(), "decoded before the frame was complete");
            input.put_u8(*b);
            out = codec.decode(&mut input).unwrap();
        }
        let got = out.unwrap().unwrap();
        assert_eq!(got.bhs, pdu.bhs);
        assert_eq!(got.data, pdu.data);
        assert!(input.is_empty());
    }

    #[test]
    fn roundtrips_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            for data in [&b""[..], b"a", b"abcd", b"abcdefg"] {
                roundtrip(hd, dd, data);
            }
        }
    }

    #[test]
    fn wire_batch_matches_contiguous_encoding() {
        for (hd, dd) in [(false, false), (true, true)] {
            let mut batch = WireBatch::default();
            let mut flat = BytesMut::new();
            for len in [0usize, 5, 16 * 1024, 100_001, 7] {
                let p = sample(&vec![0xa5; len]);
                batch.push(&p, hd, dd);
                encode_pdu(&p, hd, dd, &mut flat);
            }
            assert_eq!(batch.len(), flat.len());
            let segs = batch.take();
            assert!(segs.len() > 1, "large payloads are separate segments");
            assert_eq!(segs.concat(), flat.to_vec());
            assert!(batch.is_empty() && batch.take().is_empty());
        }
    }

    #[test]
    fn crc32c_known_vector() {
        // RFC 3720 B.4: 32 bytes of zeroes -> 0x8a9136aa.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn bad_header_digest_is_fatal() {
        let mut codec = PduCodec {
            header_digest: true,
            data_digest: false,
            max_recv_data_segment: 8192,
        };
        let mut buf = BytesMut::new();
        codec.encode(sample(b"xy"), &mut buf).unwrap();
        buf[48] ^= 1;
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FramingError::HeaderDigest { .. })
        ));
    }

    #[test]
    fn bad_data_digest_is_rejectable_and_stream_continues() {
        let mut codec = PduCodec {
            header_digest: false,
            data_digest: true,
            max_recv_data_segment: 8192,
        };
        let mut buf = BytesMut::new();
        codec.encode(sample(b"hello"), &mut buf).unwrap();
        let n = buf.len();
        buf[n - 1] ^= 0xff;
        codec.encode(sample(b"next"), &mut buf).unwrap();
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(Err(BadPdu::DataDigest { .. }))
        ));
        let next = codec.decode(&mut buf).unwrap().unwrap().unwrap();
        assert_eq!(&next.data[..], b"next");
    }

    #[test]
    fn oversized_segment_is_skipped_not_buffered_forever() {
        let mut codec = PduCodec::default();
        let mut enc = PduCodec {
            max_recv_data_segment: 1 << 20,
            ..PduCodec::default()
        };
        let mut buf = BytesMut::new();
        enc.encode(sample(&vec![7u8; 9000]), &mut buf).unwrap();
        enc.encode(sample(b"ok"), &mut buf).unwrap();
        match codec.decode(&mut buf).unwrap() {
            Some(Err(BadPdu::DataSegmentOverLimit { len, limit, .. })) => {
                assert_eq!((len, limit), (9000, 8192))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            &codec.decode(&mut buf).unwrap().unwrap().unwrap().data[..],
            b"ok"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut codec = PduCodec {
            header_digest: true,
            data_digest: true,
            max_recv_data_segment: 8192,
        };
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut buf = BytesMut::new();
            let n = (seed % 200) as usize;
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                buf.put_u8(seed as u8);
            }
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }

    #[test]
    fn request_views_read_the_rfc_offsets() {
        // SCSI Command (§11.3): flags F|R|ATTR=1, LUN, ITT, EDTL, CmdSN, ExpStatSN, CDB.
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.bhs[1] = 0x80 | 0x40 | 0x01;
        p.bhs[8..16].copy_from_slice(&0x0001_0000_0000_0000u64.to_be_bytes());
        p.bhs[16..20].copy_from_slice(&0x11u32.to_be_bytes());
        p.bhs[20..24].copy_from_slice(&4096u32.to_be_bytes());
        p.bhs[24..28].copy_from_slice(&7u32.to_be_bytes());
        p.bhs[28..32].copy_from_slice(&9u32.to_be_bytes());
        p.bhs[32] = 0x28;
        p.bhs[47] = 0xee;
        let c = ScsiCommand(&p);
        assert!(c.final_bit() && c.read() && !c.write());
        assert_eq!(c.attr(), 1);
        assert_eq!(c.lun(), 0x0001_0000_0000_0000);
        assert_eq!(
            (c.itt(), c.expected_data_transfer_length(), c.cmd_sn()),
            (0x11, 4096, 7)
        );
        assert_eq!(c.exp_stat_sn(), 9);
        assert_eq!((c.cdb()[0], c.cdb()[15]), (0x28, 0xee));

        // Data-Out (§11.7): TTT 20, DataSN 36, Buffer Offset 40.
        let mut p = Pdu::new(Opcode::DataOut);
        p.bhs[20..24].copy_from_slice(&5u32.to_be_bytes());
        p.bhs[36..40].copy_from_slice(&2u32.to_be_bytes());
        p.bhs[40..44].copy_from_slice(&8192u32.to_be_bytes());
        p.set_data(Bytes::from_static(b"abc"));
        let d = DataOut(&p);
        assert!(!d.final_bit());
        assert_eq!(
            (d.target_transfer_tag(), d.data_sn(), d.buffer_offset()),
            (5, 2, 8192)
        );
        assert_eq!(d.data(), b"abc");

        // Login Request (§11.12): T, C, CSG=1, NSG=3, versions, ISID, TSIH, CID.
        let mut p = Pdu::new(Opcode::LoginRequest);
        p.bhs[1] = 0x80 | 0x40 | (1 << 2) | 3;
        p.bhs[2] = 0;
        p.bhs[3] = 0;
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 1, 2, 3, 4]);
        p.bhs[14..16].copy_from_slice(&0x1234u16.to_be_bytes());
        p.bhs[20..22].copy_from_slice(&0x0102u16.to_be_bytes());
        p.bhs[24..28].copy_from_slice(&55u32.to_be_bytes());
        let l = LoginRequest(&p);
        assert!(l.transit() && l.continue_bit());
        assert_eq!((l.csg(), l.nsg()), (1, 3));
        assert_eq!(l.isid(), [0x80, 0, 1, 2, 3, 4]);
        assert_eq!((l.tsih(), l.cid(), l.cmd_sn()), (0x1234, 0x0102, 55));

        // Logout (§11.14) and TMF (§11.5): function / reason in the low 7 bits of byte 1.
        let mut p = Pdu::new(Opcode::LogoutRequest);
        p.bhs[1] = 0x80 | 1;
        p.bhs[20..22].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            (LogoutRequest(&p).reason_code(), LogoutRequest(&p).cid()),
            (1, 3)
        );
        let mut p = Pdu::new(Opcode::TaskMgmtRequest);
        p.bhs[1] = 0x80 | 1;
        p.bhs[20..24].copy_from_slice(&0x77u32.to_be_bytes());
        p.bhs[32..36].copy_from_slice(&12u32.to_be_bytes());
        let t = TaskMgmtRequest(&p);
        assert_eq!(
            (t.function(), t.referenced_task_tag(), t.ref_cmd_sn()),
            (1, 0x77, 12)
        );
    }

    #[test]
    fn builders_write_the_rfc_offsets() {
        let p = DataInBuilder::new(0x42)
            .final_bit(true)
            .status(0x02)
            .data_sn(3)
            .buffer_offset(1024)
            .residual(Residual::Underflow(512))
            .data(Bytes::from_static(b"xyz"))
            .build();
        assert_eq!(p.opcode(), Some(Opcode::DataIn));
        assert_eq!(p.bhs[1], 0x80 | 0x02 | 0x01, "F, U, S");
        assert_eq!(p.bhs[3], 0x02);
        assert_eq!((p.itt(), p.u32_at(20)), (0x42, RESERVED_TAG));
        assert_eq!((p.u32_at(36), p.u32_at(40), p.u32_at(44)), (3, 1024, 512));
        assert_eq!(p.data_segment_len(), 3);

        let p = ScsiResponseBuilder::new(7)
            .status(0x02)
            .exp_data_sn(4)
            .residual(Residual::Overflow(9))
            .sense(&[0x70, 0, 5])
            .build();
        assert_eq!((p.bhs[1], p.bhs[2], p.bhs[3]), (0x80 | 0x04, 0, 0x02));
        assert_eq!((p.u32_at(36), p.u32_at(44)), (4, 9));
        assert_eq!(&p.data[..], &[0, 3, 0x70, 0, 5], "SenseLength then sense");
        let p = ScsiResponseBuilder::new(7).residual(Residual::None).build();
        assert_eq!((p.bhs[1], p.u32_at(44)), (0x80, 0));

        let p = R2tBuilder::new(0x0002_0000_0000_0000, 1, 0x99)
            .r2t_sn(2)
            .buffer_offset(4096)
            .desired_data_transfer_length(8192)
            .build();
        assert_eq!(p.bhs[1], 0x80);
        assert_eq!(
            (p.lun(), p.itt(), p.u32_at(20)),
            (0x0002_0000_0000_0000, 1, 0x99)
        );
        assert_eq!((p.u32_at(36), p.u32_at(40), p.u32_at(44)), (2, 4096, 8192));

        let p = LoginResponseBuilder::new(0x87, 5)
            .versions(0, 0)
            .isid([1, 2, 3, 4, 5, 6])
            .tsih(0x0a0b)
            .stat_sn(100)
            .exp_cmd_sn(200)
            .max_cmd_sn(300)
            .status(2, 1)
            .build();
        let r = LoginResponse(&p);
        assert_eq!(p.bhs[1], 0x87);
        assert_eq!(&p.bhs[8..16], &[1, 2, 3, 4, 5, 6, 0x0a, 0x0b]);
        assert_eq!(
            (r.stat_sn(), r.exp_cmd_sn(), r.max_cmd_sn()),
            (100, 200, 300)
        );
        assert_eq!((p.bhs[36], p.bhs[37], r.status()), (2, 1, 0x0201));

        let p = TextResponseBuilder::new(1, 2, 0x40).build();
        assert_eq!(
            (p.opcode(), p.bhs[1], p.u32_at(20)),
            (Some(Opcode::TextResponse), 0x40, 2)
        );
        let p = NopInBuilder::new(RESERVED_TAG, 0x10).lun(3).build();
        assert_eq!(
            (p.bhs[1], p.itt(), p.u32_at(20), p.lun()),
            (0x80, RESERVED_TAG, 0x10, 3)
        );
        let p = LogoutResponseBuilder::new(9, 1).times(2, 20).build();
        assert_eq!((p.bhs[1], p.bhs[2], p.itt()), (0x80, 1, 9));
        assert_eq!(&p.bhs[40..44], &[0, 2, 0, 20]);
        let p = TaskMgmtResponseBuilder::new(9, 5).build();
        assert_eq!((p.opcode(), p.bhs[2]), (Some(Opcode::TaskMgmtResponse), 5));
        let mut rejected = [0u8; BHS_LEN];
        rejected[0] = 0x01;
        let p = RejectBuilder::new(RejectReason::ProtocolError, &rejected).build();
        assert_eq!((p.bhs[1], p.bhs[2], p.itt()), (0x80, 0x04, RESERVED_TAG));
        assert_eq!(&p.data[..], &rejected[..]);
        let p = AsyncMessageBuilder::new(1)
            .lun(4)
            .async_vcode(0)
            .parameters(1, 2, 3)
            .build();
        assert_eq!((p.itt(), p.lun(), p.bhs[36]), (RESERVED_TAG, 4, 1));
        assert_eq!(&p.bhs[38..44], &[0, 1, 0, 2, 0, 3]);
        let mut p = Pdu::new(Opcode::NopIn);
        p.set_stat_sn(1);
        p.set_exp_cmd_sn(2);
        p.set_max_cmd_sn(3);
        assert_eq!((p.field24(), p.field28(), p.field32()), (1, 2, 3));
    }

    #[test]
    fn residual_of_compares_expected_and_actual() {
        assert_eq!(Residual::of(100, 60), Residual::Underflow(40));
        assert_eq!(Residual::of(100, 160), Residual::Overflow(60));
        assert_eq!(Residual::of(100, 100), Residual::None);
        assert_eq!(Residual::of(0, u64::MAX), Residual::Overflow(u32::MAX));
    }

    #[test]
    fn initiator_builders_round_trip_through_the_views() {
        let p = LoginRequestBuilder::new(0x80 | 0x40 | (1 << 2) | 3, 0xabcd)
            .isid([0x80, 0, 0x12, 0x34, 0, 1])
            .tsih(7)
            .cid(2)
            .cmd_sn(55)
            .exp_stat_sn(9)
            .build();
        assert!(p.immediate());
        let l = LoginRequest(&p);
        assert!(l.transit() && l.continue_bit());
        assert_eq!((l.csg(), l.nsg(), l.tsih(), l.cid()), (1, 3, 7, 2));
        assert_eq!((l.itt(), l.cmd_sn(), l.exp_stat_sn()), (0xabcd, 55, 9));
        assert_eq!(l.isid(), [0x80, 0, 0x12, 0x34, 0, 1]);

        let p = TextRequestBuilder::new(3, 4, 0x40).build();
        let t = TextRequest(&p);
        assert!(p.immediate() && t.continue_bit() && !t.final_bit());
        assert_eq!((t.itt(), t.target_transfer_tag()), (3, 4));

        let p = DataOutBuilder::new(9, 10)
            .final_bit(true)
            .data_sn(1)
            .buffer_offset(512)
            .data(Bytes::from_static(b"d"))
            .build();
        let d = DataOut(&p);
        assert!(d.final_bit());
        assert_eq!(
            (
                d.itt(),
                d.target_transfer_tag(),
                d.data_sn(),
                d.buffer_offset()
            ),
            (9, 10, 1, 512)
        );

        let p = DataInBuilder::new(1)
            .final_bit(true)
            .status(0)
            .residual(Residual::Overflow(4))
            .build();
        let d = DataIn(&p);
        assert!(d.final_bit() && d.status_bit() && d.overflow() && !d.underflow());
        assert_eq!(
            (d.residual_count(), d.target_transfer_tag()),
            (4, RESERVED_TAG)
        );
        let p = ScsiResponseBuilder::new(1)
            .status(2)
            .exp_data_sn(3)
            .residual(Residual::Underflow(5))
            .build();
        let r = ScsiResponse(&p);
        assert!(r.underflow() && !r.overflow());
        assert_eq!(
            (
                r.response(),
                r.status(),
                r.exp_data_sn(),
                r.residual_count()
            ),
            (0, 2, 3, 5)
        );
        let p = R2tBuilder::new(0, 1, 2)
            .r2t_sn(3)
            .buffer_offset(4)
            .desired_data_transfer_length(5)
            .build();
        let r = R2t(&p);
        assert_eq!(
            (
                r.target_transfer_tag(),
                r.r2t_sn(),
                r.buffer_offset(),
                r.desired_data_transfer_length()
            ),
            (2, 3, 4, 5)
        );
        let p = TextResponseBuilder::new(1, 2, 0x80).build();
        assert!(TextResponse(&p).final_bit() && !TextResponse(&p).continue_bit());
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(serial::lt(0xffff_fff0, 5));
        assert!(serial::gt(5, 0xffff_fff0));
        assert!(serial::le(3, 3));
        assert!(!serial::lt(3, 3));
    }
}
