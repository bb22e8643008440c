//! Disk identities byte-compatible with the targets twinsan replaces: tgt (stgt, 1.0.x) and
//! IET (iSCSI Enterprise Target). An initiator that saw a LUN through tgt or IET must see the
//! same standard INQUIRY data and VPD pages 0x00, 0x80 and 0x83 after the switch, because
//! XenServer derives an SR's SCSIid from them (and Linux multipath its WWID).
//!
//! The layouts here are what those targets put on the wire, checked byte for byte against
//! tgtd 1.0.85 by `tests/migration_import.rs`:
//!
//! * tgt: standard INQUIRY of 66 bytes (SPC-3, HISUP, CMDQUE, version descriptors SBC-3,
//!   iSCSI, SPC-3, 0); VPD 0x80 a 36-byte field with the serial right-aligned in spaces;
//!   VPD 0x83 a T10 vendor-id designator holding `scsi_id` (36 bytes, NUL padded), an NAA 3
//!   designator carrying `tid << 32 | lun` and an NAA 6 designator whose 124 low bits are the
//!   hex digits of `scsi_id` (non-hex characters count as 0). tgt's defaults when scsi_id /
//!   scsi_sn are not configured: `"IET     %04x%04x"` (tid, lun) and `"beaf%d%d"`.
//! * IET: standard INQUIRY of 64 bytes (SPC-2, version descriptors SAM-2, iSCSI, SPC-2 ...);
//!   VPD 0x00 lists 0x00, 0x80, 0x83 only; VPD 0x80 a 16-byte field (or 32 when the serial is
//!   longer) right-aligned; VPD 0x83 one T10 vendor-id designator, "IET" NUL padded to 8 bytes
//!   then the 16-byte binary ScsiId. IET's default ScsiId is MD5(target name || LUN as 32-bit
//!   little-endian), its default ScsiSN the 32 lowercase hex digits of the ScsiId. (IET could
//!   not run here: its kernel module is gone from current kernels, so this layout is taken
//!   from iscsitarget 1.4.x's kernel/target_disk.c and volume.c, not captured on the wire.)

use md5::{Digest, Md5};

/// tgt's SCSI_ID_LEN and SCSI_SN_LEN (usr/tgtd.h, 1.0.x).
pub const TGT_ID_LEN: usize = 36;
pub const TGT_SN_LEN: usize = 36;
/// IET's SCSI_ID_LEN and SCSI_SN_LEN (include/iet_u.h, iscsitarget 1.4.x).
pub const IET_ID_LEN: usize = 16;
pub const IET_SN_LEN: usize = 32;

/// The identity of a LUN as tgt or IET presented it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompatIdentity {
    Tgt {
        /// tgt's `scsi_id` (at most 36 bytes).
        scsi_id: String,
        /// tgt's `scsi_sn` (at most 36 bytes).
        scsi_sn: String,
        /// `tid << 32 | lun`, the NAA 3 designator's value.
        numeric_id: u64,
    },
    Iet {
        /// The 16-byte binary ScsiId.
        scsi_id: [u8; IET_ID_LEN],
        /// ScsiSN (at most 32 bytes).
        scsi_sn: String,
    },
}

/// tgt's default scsi_id for target `tid`, LUN `lun` (usr/target.c `tgt_device_create`).
pub fn tgt_default_scsi_id(tid: u32, lun: u64) -> String {
    format!("IET     {tid:04x}{lun:04x}")
}

/// tgt's default scsi_sn for target `tid`, LUN `lun`.
pub fn tgt_default_scsi_sn(tid: u32, lun: u64) -> String {
    format!("beaf{tid}{lun}")
}

/// IET's default ScsiId: MD5 of the target name followed by the LUN as a 32-bit
/// little-endian number (kernel/volume.c `gen_scsiid` on x86).
pub fn iet_default_scsi_id(target_name: &str, lun: u32) -> [u8; IET_ID_LEN] {
    let mut h = Md5::new();
    h.update(target_name.as_bytes());
    h.update(lun.to_le_bytes());
    let mut id = [0u8; IET_ID_LEN];
    id.copy_from_slice(&h.finalize());
    id
}

/// An IET ScsiId given in ietd.conf (`ScsiId=...`): its bytes, zero padded to 16.
pub fn iet_scsi_id_from_text(text: &str) -> [u8; IET_ID_LEN] {
    let mut id = [0u8; IET_ID_LEN];
    let b = text.as_bytes();
    let n = b.len().min(IET_ID_LEN);
    id[..n].copy_from_slice(&b[..n]);
    id
}

/// IET's default ScsiSN: the ScsiId's 16 bytes as 32 lowercase hex digits.
pub fn iet_default_scsi_sn(scsi_id: &[u8; IET_ID_LEN]) -> String {
    hex::encode(scsi_id)
}

/// `s` left-aligned in `len` bytes padded with spaces (truncated when longer).
fn space_padded(s: &str, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(len).collect();
    v.resize(len, b' ');
    v
}

/// `s` right-aligned in `len` bytes of spaces (the tgt and IET unit serial number layout).
fn right_aligned(s: &str, len: usize) -> Vec<u8> {
    let b = s.as_bytes();
    let b = &b[b.len().saturating_sub(len)..];
    let mut v = vec![b' '; len - b.len()];
    v.extend_from_slice(b);
    v
}

fn vpd_page(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

impl CompatIdentity {
    /// Standard INQUIRY data (SPC-3 6.4.2 as tgt / SPC-2 as IET filled it).
    pub fn standard_inquiry(&self, vendor: &str, product: &str, revision: &str) -> Vec<u8> {
        let (len, version, flags, descriptors): (usize, u8, u8, &[u16]) = match self {
            // tgt: version 5 (SPC-3), HISUP + response data format 2; SBC-3, iSCSI, SPC-3.
            CompatIdentity::Tgt { .. } => (66, 0x05, 0x12, &[0x04C0, 0x0960, 0x0300, 0x0000]),
            // IET: version 4 (SPC-2), NormACA 0, HISUP + format 2 plus TrmTsk (0x52);
            // SAM-2, iSCSI, SPC-2.
            CompatIdentity::Iet { .. } => (64, 0x04, 0x52, &[0x0320, 0x0960, 0x0300]),
        };
        let mut d = vec![0u8; len];
        d[2] = version;
        d[3] = flags;
        d[4] = (len - 5) as u8;
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(&space_padded(vendor, 8));
        d[16..32].copy_from_slice(&space_padded(product, 16));
        d[32..36].copy_from_slice(&space_padded(revision, 4));
        for (i, v) in descriptors.iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        d
    }

    /// VPD page 0x00 (SPC-4 7.8.13): tgt lists the same pages twinsan serves; IET only
    /// 0x00, 0x80 and 0x83.
    pub fn supported_vpd_pages(&self) -> Vec<u8> {
        match self {
            CompatIdentity::Tgt { .. } => vpd_page(0x00, &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]),
            CompatIdentity::Iet { .. } => vpd_page(0x00, &[0x00, 0x80, 0x83]),
        }
    }

    /// VPD page 0x80, unit serial number (SPC-4 7.8.15), right-aligned as tgt/IET do.
    pub fn unit_serial_number(&self) -> Vec<u8> {
        match self {
            CompatIdentity::Tgt { scsi_sn, .. } => {
                vpd_page(0x80, &right_aligned(scsi_sn, TGT_SN_LEN))
            }
            CompatIdentity::Iet { scsi_sn, .. } => {
                let len = if scsi_sn.len() <= 16 { 16 } else { IET_SN_LEN };
                vpd_page(0x80, &right_aligned(scsi_sn, len))
            }
        }
    }

    /// VPD page 0x83, device identification (SPC-4 7.8.6).
    pub fn device_identification(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            CompatIdentity::Tgt {
                scsi_id,
                numeric_id,
                ..
            } => {
                // T10 vendor ID designator (ASCII, LU): scsi_id, NUL padded to 36 bytes.
                body.extend_from_slice(&[0x02, 0x01, 0x00, TGT_ID_LEN as u8]);
                let mut id: Vec<u8> = scsi_id.bytes().take(TGT_ID_LEN).collect();
                id.resize(TGT_ID_LEN, 0);
                body.extend_from_slice(&id);
                // NAA 3 (locally assigned) from tid and LUN.
                body.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
                let mut naa3 = numeric_id.to_be_bytes();
                naa3[0] |= 0x30;
                body.extend_from_slice(&naa3);
                // NAA 6: the hex digits of scsi_id, right-adjusted in 128 bits.
                body.extend_from_slice(&[0x01, 0x03, 0x00, 0x10]);
                let mut value: u128 = 0;
                for c in scsi_id.chars() {
                    value = (value << 4) | u128::from(c.to_digit(16).unwrap_or(0));
                }
                let mut naa6 = value.to_be_bytes();
                naa6[0] = (naa6[0] & 0x0F) | 0x60;
                body.extend_from_slice(&naa6);
            }
            CompatIdentity::Iet { scsi_id, .. } => {
                // One binary T10 vendor ID designator: "IET" NUL padded, then the ScsiId.
                body.extend_from_slice(&[0x01, 0x01, 0x00, (8 + IET_ID_LEN) as u8]);
                body.extend_from_slice(b"IET\0\0\0\0\0");
                body.extend_from_slice(scsi_id);
            }
        }
        vpd_page(0x83, &body)
    }

    /// The serial number shown in logs and `twinsan status`.
    pub fn serial(&self) -> &str {
        match self {
            CompatIdentity::Tgt { scsi_sn, .. } | CompatIdentity::Iet { scsi_sn, .. } => scsi_sn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tgt(tid: u32, lun: u64) -> CompatIdentity {
        CompatIdentity::Tgt {
            scsi_id: tgt_default_scsi_id(tid, lun),
            scsi_sn: tgt_default_scsi_sn(tid, lun),
            numeric_id: (u64::from(tid) << 32) | lun,
        }
    }

    // Bytes captured from tgtd 1.0.85 (Debian 12), target tid 2, LUN 7, no scsi_id/scsi_sn.
    const TGT_2_7_INQ: &str = "000005123d00000249455420202020205649525455414c2d4449534b20202020303030310000000000000000000000000000000000000000000004c0096003000000";
    const TGT_2_7_VPD80: &str =
        "00800024202020202020202020202020202020202020202020202020202020202020626561663237";
    const TGT_2_7_VPD83: &str = "00830048020100244945542020202020303030323030303700000000000000000000000000000000000000000103000830000002000000070103001060000000000000000e00000000020007";

    #[test]
    fn tgt_defaults_match_captured_tgtd_bytes() {
        let id = tgt(2, 7);
        assert_eq!(
            hex::encode(id.standard_inquiry("IET", "VIRTUAL-DISK", "0001")),
            TGT_2_7_INQ
        );
        assert_eq!(
            hex::encode(id.supported_vpd_pages()),
            "00000006008083b0b1b2"
        );
        assert_eq!(hex::encode(id.unit_serial_number()), TGT_2_7_VPD80);
        assert_eq!(hex::encode(id.device_identification()), TGT_2_7_VPD83);
    }

    #[test]
    fn tgt_naa6_takes_hex_digits_of_scsi_id() {
        let id = CompatIdentity::Tgt {
            scsi_id: "MYSCSIID01".into(),
            scsi_sn: "x".into(),
            numeric_id: 1 << 32 | 1,
        };
        let p = id.device_identification();
        // M Y S C S I I D 0 1 -> 0 0 0 c 0 0 0 d 0 1
        assert_eq!(
            &p[p.len() - 16..p.len() - 5],
            &[0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&p[p.len() - 5..], &[0x00, 0x0c, 0x00, 0x0d, 0x01]);
    }

    #[test]
    fn iet_layout() {
        let scsi_id = iet_default_scsi_id("iqn.2001-04.com.example:disk", 0);
        let id = CompatIdentity::Iet {
            scsi_sn: iet_default_scsi_sn(&scsi_id),
            scsi_id,
        };
        let inq = id.standard_inquiry("IET", "VIRTUAL-DISK", "0");
        assert_eq!(inq.len(), 64);
        assert_eq!((inq[2], inq[3], inq[4]), (4, 0x52, 59));
        assert_eq!(&inq[8..36], b"IET     VIRTUAL-DISK    0   ");
        assert_eq!(hex::encode(id.supported_vpd_pages()), "00000003008083");
        let sn = id.unit_serial_number();
        assert_eq!(sn.len(), 4 + 32);
        assert_eq!(&sn[4..], id.serial().as_bytes());
        let d = id.device_identification();
        assert_eq!(&d[..8], &[0, 0x83, 0, 28, 1, 1, 0, 24]);
        assert_eq!(&d[8..16], b"IET\0\0\0\0\0");
        assert_eq!(&d[16..], &scsi_id);
        let short = CompatIdentity::Iet {
            scsi_id: iet_scsi_id_from_text("abc"),
            scsi_sn: "SN1".into(),
        };
        assert_eq!(
            &short.unit_serial_number()[..],
            b"\x00\x80\x00\x10             SN1"
        );
    }
}
