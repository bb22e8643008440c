//! Sense data (SPC-4 4.5): what a CHECK CONDITION carries, built in fixed format.

use bytes::Bytes;

/// SPC-4 4.5.6, table 27.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    VolumeOverflow = 0xD,
    Miscompare = 0xE,
}

/// Sense-key specific field pointer (SPC-4 4.5.2.4.2): which CDB or parameter-list byte (and
/// optionally which bit) made the command fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// C/D: the bad field is in the CDB (true) or in the parameter list (false).
    pub in_cdb: bool,
    pub byte: u16,
    /// Bit pointer (most significant bit of the bad field), when known.
    pub bit: Option<u8>,
}

/// One sense condition: key, additional sense code and qualifier, and the optional fields the
/// fixed format can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sense key {key:?}, ASC/ASCQ {asc:02x}/{ascq:02x}")]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (LBA of a medium error, miscompare offset...).
    pub info: Option<u64>,
    pub sks: Option<FieldPointer>,
    /// COMMAND-SPECIFIC INFORMATION (fixed format bytes 8..12), e.g. the number of the
    /// segment descriptor an EXTENDED COPY failed in (SPC-4 5.17.4.3).
    pub csi: Option<u32>,
    /// Sense-key specific PROGRESS INDICATION (SPC-4 4.5.2.4.4): the fraction of an operation
    /// done, in 65536ths (NOT READY while a SANITIZE runs). Exclusive with `sks`.
    pub progress: Option<u16>,
}

/// Length of fixed-format sense data with the additional length this crate uses (10).
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            sks: None,
            csi: None,
            progress: None,
        }
    }

    pub const fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    pub const fn with_command_specific(mut self, csi: u32) -> Self {
        self.csi = Some(csi);
        self
    }

    pub const fn with_field(mut self, in_cdb: bool, byte: u16, bit: Option<u8>) -> Self {
        self.sks = Some(FieldPointer { in_cdb, byte, bit });
        self
    }

    /// 00/00 NO ADDITIONAL SENSE INFORMATION (REQUEST SENSE with nothing pending).
    pub const fn no_sense() -> Self {
        Self::new(SenseKey::NoSense, 0x00, 0x00)
    }
    /// 20/00 INVALID COMMAND OPERATION CODE.
    pub const fn invalid_opcode() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x20, 0x00)
    }
    /// 24/00 INVALID FIELD IN CDB, pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Self {
        Self::new(SenseKey::IllegalRequest, 0x24, 0x00).with_field(true, byte, bit)
    }
    /// 26/00 INVALID FIELD IN PARAMETER LIST, pointing at `byte` of the Data-Out parameters.
    pub const fn invalid_field_in_parameter_list(byte: u16, bit: Option<u8>) -> Self {
        Self::new(SenseKey::IllegalRequest, 0x26, 0x00).with_field(false, byte, bit)
    }
    /// 1A/00 PARAMETER LIST LENGTH ERROR.
    pub const fn parameter_list_length_error() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x1A, 0x00)
    }
    /// 0E/03 INVALID FIELD IN COMMAND INFORMATION UNIT (Data-Out does not fit the CDB).
    pub const fn invalid_field_in_command_iu() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x0E, 0x03)
    }
    /// 21/00 LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const fn lba_out_of_range() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x21, 0x00)
    }
    /// 25/00 LOGICAL UNIT NOT SUPPORTED.
    pub const fn logical_unit_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x25, 0x00)
    }
    /// 39/00 SAVING PARAMETERS NOT SUPPORTED.
    pub const fn saving_parameters_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x39, 0x00)
    }
    /// NOT READY 04/1B LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS with the progress
    /// indication (SBC-4 4.11.1: `done` of 65536).
    pub const fn sanitize_in_progress(done: u16) -> Self {
        let mut s = Self::new(SenseKey::NotReady, 0x04, 0x1B);
        s.progress = Some(done);
        s
    }
    /// MEDIUM ERROR 31/03 SANITIZE COMMAND FAILED (SBC-4 4.11.4: a failed sanitize, until
    /// EXIT FAILURE MODE or a SANITIZE that succeeds).
    pub const fn sanitize_failed() -> Self {
        Self::new(SenseKey::MediumError, 0x31, 0x03)
    }
    /// NOT READY 3A/00 MEDIUM NOT PRESENT: a removable medium is unloaded (SBC-3 4.2.1).
    pub const fn medium_not_present() -> Self {
        Self::new(SenseKey::NotReady, 0x3A, 0x00)
    }
    /// ILLEGAL REQUEST 53/02 MEDIUM REMOVAL PREVENTED (SBC-3 5.12, 5.25).
    pub const fn medium_removal_prevented() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x53, 0x02)
    }
    /// DATA PROTECT 27/02 LOGICAL UNIT SOFTWARE WRITE PROTECTED (SWP of the Control mode
    /// page, SPC-4 7.5.8).
    pub const fn software_write_protected() -> Self {
        Self::new(SenseKey::DataProtect, 0x27, 0x02)
    }
    /// DATA PROTECT 27/00 WRITE PROTECTED.
    pub const fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, 0x27, 0x00)
    }
    /// DATA PROTECT 27/07 SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3 4.7.3.7): a thin LUN
    /// whose backing store is full. Not a medium error: the disk is healthy, it needs space.
    pub const fn space_allocation_failed(lba: u64) -> Self {
        Self::new(SenseKey::DataProtect, 0x27, 0x07).with_info(lba)
    }
    /// MEDIUM ERROR 11/00 UNRECOVERED READ ERROR at `lba`.
    pub const fn unrecovered_read_error(lba: u64) -> Self {
        Self::new(SenseKey::MediumError, 0x11, 0x00).with_info(lba)
    }
    /// MEDIUM ERROR 0C/00 WRITE ERROR at `lba`.
    pub const fn write_error(lba: u64) -> Self {
        Self::new(SenseKey::MediumError, 0x0C, 0x00).with_info(lba)
    }
    /// MISCOMPARE 1D/00 MISCOMPARE DURING VERIFY OPERATION; INFORMATION is the byte offset of
    /// the first difference in the Data-Out buffer (SBC-3 5.2, 5.30).
    pub const fn miscompare(offset: u64) -> Self {
        Self::new(SenseKey::Miscompare, 0x1D, 0x00).with_info(offset)
    }
    /// ABORTED COMMAND 00/00: the command could not run now (store shut down during a
    /// failover); the initiator may retry it.
    pub const fn aborted_command() -> Self {
        Self::new(SenseKey::AbortedCommand, 0x00, 0x00)
    }
    /// ABORTED COMMAND 4B/00 DATA PHASE ERROR: the Data-Out for the command was malformed
    /// (bad offset, overrun); the initiator may retry the command.
    pub const fn data_phase_error() -> Self {
        Self::new(SenseKey::AbortedCommand, 0x4B, 0x00)
    }
    /// UNIT ATTENTION with the given reason (29/xx resets, 2A/xx parameters changed, ...).
    pub const fn unit_attention(asc: u8, ascq: u8) -> Self {
        Self::new(SenseKey::UnitAttention, asc, ascq)
    }

    /// Fixed-format sense data (SPC-4 4.5.3): response code 70h, 18 bytes, additional sense
    /// length 10. VALID and INFORMATION are set when `info` fits in 32 bits; SKSV, C/D, BPV and
    /// the field pointer when `sks` is set.
    pub fn to_fixed_array(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key as u8;
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        if let Some(csi) = self.csi {
            b[8..12].copy_from_slice(&csi.to_be_bytes());
        }
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(fp) = self.sks {
            b[15] = 0x80;
            if fp.in_cdb {
                b[15] |= 0x40;
            }
            if let Some(bit) = fp.bit {
                b[15] |= 0x08 | (bit & 0x07);
            }
            b[16..18].copy_from_slice(&fp.byte.to_be_bytes());
        } else if let Some(p) = self.progress {
            b[15] = 0x80;
            b[16..18].copy_from_slice(&p.to_be_bytes());
        }
        b
    }

    pub fn to_fixed_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.to_fixed_array())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_field_in_cdb_layout() {
        let b = Sense::invalid_field_in_cdb(1, Some(7)).to_fixed_array();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 7);
        assert_eq!(&b[16..18], &[0, 1]);
    }

    #[test]
    fn parameter_list_pointer_has_cd_clear_and_no_bpv() {
        let b = Sense::invalid_field_in_parameter_list(0x1234, None).to_fixed_array();
        assert_eq!(b[15], 0x80);
        assert_eq!(&b[16..18], &[0x12, 0x34]);
        assert_eq!((b[12], b[13]), (0x26, 0x00));
    }

    #[test]
    fn information_sets_valid() {
        let b = Sense::miscompare(0x0102_0304).to_fixed_array();
        assert_eq!(b[0], 0xF0);
        assert_eq!(b[2], 0x0E);
        assert_eq!(&b[3..7], &[1, 2, 3, 4]);
        assert_eq!((b[12], b[13]), (0x1D, 0x00));
        assert_eq!(b[15], 0);
    }

    #[test]
    fn information_too_large_for_fixed_format_clears_valid() {
        let b = Sense::unrecovered_read_error(1 << 40).to_fixed_array();
        assert_eq!(b[0], 0x70);
        assert_eq!(&b[3..7], &[0, 0, 0, 0]);
        assert_eq!((b[2], b[12]), (0x03, 0x11));
    }

    #[test]
    fn progress_indication_layout() {
        let b = Sense::sanitize_in_progress(0x8000).to_fixed_array();
        assert_eq!((b[2], b[12], b[13]), (0x02, 0x04, 0x1B));
        assert_eq!(b[15], 0x80, "SKSV, no C/D or BPV");
        assert_eq!(&b[16..18], &[0x80, 0x00]);
    }

    #[test]
    fn bytes_match_array() {
        let s = Sense::unit_attention(0x29, 0x03);
        assert_eq!(&s.to_fixed_bytes()[..], &s.to_fixed_array()[..]);
        assert_eq!(s.to_fixed_bytes().len(), FIXED_SENSE_LEN);
    }
}
