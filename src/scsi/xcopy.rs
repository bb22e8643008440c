//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): the parameter list
//! decoding, the copy manager's operating parameters, the copy status kept per I_T nexus and
//! the Third-party Copy VPD page (SPC-4 7.8.17).
//!
//! Supported: CSCD descriptors of type E4h (identification descriptor) naming a logical unit of
//! this target by an NAA designator, and segment descriptors of type 02h (block device to
//! block device). The copy itself runs in [`crate::scsi::ScsiTarget`], which knows every
//! logical unit; this module is pure.

use super::cdb::{be16, be32, be64};
pub use super::cdb::{
    SA_COPY_STATUS, SA_EXTENDED_COPY_LID1, SA_OPERATING_PARAMETERS,
    XCOPY_MAX_PARAM_LEN as MAX_PARAM_LEN,
};
use super::sense::{Sense, SenseKey};

/// MAXIMUM CSCD DESCRIPTOR COUNT.
pub const MAX_CSCD_DESCRIPTORS: u16 = 16;
/// MAXIMUM SEGMENT DESCRIPTOR COUNT.
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
/// MAXIMUM DESCRIPTOR LIST LENGTH (CSCD + segment descriptor lists, bytes).
pub const MAX_DESCRIPTOR_LIST_LEN: u32 = 1024;
/// Copies one EXTENDED COPY command processes at a time (TOTAL CONCURRENT COPIES).
pub const CONCURRENT_COPIES: u16 = 1;

/// Parameter list header length (SPC-4 6.4.3.1, table 108).
const HEADER_LEN: usize = 16;
/// Identification CSCD descriptor (SPC-4 6.4.5.3).
pub const CSCD_IDENTIFICATION: u8 = 0xE4;
/// Block device to block device segment descriptor (SPC-4 6.4.6.5).
pub const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
/// DESCRIPTOR LENGTH of a block to block segment descriptor.
const B2B_DESCRIPTOR_LEN: usize = 0x18;

/// COPY ABORTED additional sense codes (SPC-4 D.2).
const COPY_TARGET_NOT_REACHABLE: (u8, u8) = (0x0D, 0x02);
const INCORRECT_COPY_TARGET_TYPE: (u8, u8) = (0x0D, 0x03);
const COPY_TARGET_DATA_UNDERRUN: (u8, u8) = (0x0D, 0x04);

/// An identification CSCD descriptor (SPC-4 6.4.5.3): a designator as VPD page 83h reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cscd {
    /// NUL: the descriptor names no device.
    pub null: bool,
    pub peripheral_type: u8,
    pub code_set: u8,
    /// Byte 5 of the designation descriptor: PIV, ASSOCIATION and DESIGNATOR TYPE.
    pub association_type: u8,
    pub designator: Vec<u8>,
    /// DISK BLOCK LENGTH of the block device type specific parameters (SPC-4 6.4.5.4).
    pub block_len: u32,
}

impl Cscd {
    /// Whether the descriptor names a logical unit by an NAA designator (type 3,
    /// association 0: the logical unit).
    pub fn is_lu_naa(&self) -> bool {
        self.association_type & 0x3F == 0x03
    }
}

/// A block device to block device segment descriptor (SPC-4 6.4.6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// DC: NUMBER OF BLOCKS counts destination blocks (else source blocks).
    pub dc: bool,
    pub src: u16,
    pub dst: u16,
    pub blocks: u16,
    pub src_lba: u64,
    pub dst_lba: u64,
}

/// A decoded EXTENDED COPY (LID1) parameter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyList {
    pub list_id: u8,
    /// LIST ID USAGE 00b / 10b: the copy status is kept for RECEIVE COPY RESULTS.
    pub keep_status: bool,
    pub cscds: Vec<Cscd>,
    pub segments: Vec<Segment>,
}

fn field(byte: usize, bit: Option<u8>) -> Sense {
    Sense::invalid_field_in_parameter_list(u16::try_from(byte).unwrap_or(u16::MAX), bit)
}

/// Length of a CSCD descriptor by its type code (SPC-4 6.4.5.1, table 111), `None` for the
/// codes this copy manager cannot even step over.
fn cscd_len(code: u8) -> Option<usize> {
    match code {
        0xE0..=0xE9 => Some(32),
        0xEA | 0xEB => Some(64),
        _ => None,
    }
}

/// Decodes an EXTENDED COPY (LID1) parameter list (SPC-4 6.4.3). Errors are the ILLEGAL
/// REQUEST conditions detected before any segment is processed (SPC-4 5.17.4.2); `Ok(None)`
/// for an empty list (PARAMETER LIST LENGTH 0: nothing to do, not an error).
pub fn parse(params: &[u8]) -> Result<Option<CopyList>, Sense> {
    if params.is_empty() {
        return Ok(None);
    }
    if params.len() < HEADER_LEN {
        return Err(Sense::parameter_list_length_error());
    }
    let list_id = params[0];
    let usage = (params[1] >> 3) & 0x03;
    match usage {
        0b01 => return Err(field(1, Some(4))),
        // NO LIST ID: the LIST IDENTIFIER must be zero (SPC-4 table 109).
        0b11 if list_id != 0 => return Err(field(0, None)),
        _ => {}
    }
    let cscd_len_total = usize::from(be16(&params[2..]));
    let seg_len_total = be32(&params[8..]) as usize;
    let inline_len = be32(&params[12..]) as usize;
    let needed = HEADER_LEN
        .checked_add(cscd_len_total)
        .and_then(|n| n.checked_add(seg_len_total))
        .and_then(|n| n.checked_add(inline_len));
    match needed {
        Some(n) if n <= params.len() => {}
        _ => return Err(Sense::parameter_list_length_error()),
    }
    if cscd_len_total as u64 + seg_len_total as u64 > u64::from(MAX_DESCRIPTOR_LIST_LEN) {
        return Err(Sense::parameter_list_length_error());
    }
    // MAXIMUM INLINE DATA LENGTH is 0: no segment type using inline data is supported.
    if inline_len != 0 {
        return Err(field(12, None));
    }

    let mut cscds = Vec::new();
    let mut off = HEADER_LEN;
    let cscd_end = HEADER_LEN + cscd_len_total;
    while off < cscd_end {
        if cscds.len() >= usize::from(MAX_CSCD_DESCRIPTORS) {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x06));
        }
        let code = params[off];
        let Some(len) = cscd_len(code) else {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x07)
                .with_field(false, off as u16, None));
        };
        let Some(d) = params.get(off..off + len).filter(|_| off + len <= cscd_end) else {
            return Err(Sense::parameter_list_length_error());
        };
        if code != CSCD_IDENTIFICATION {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x07)
                .with_field(false, off as u16, None));
        }
        // LU ID TYPE (byte 1 bits 7:6) is not looked at: it says how to read a LU
        // IDENTIFIER field (SPC-4 6.4.5.1), and the identification descriptor CSCD names its
        // logical unit by a designation descriptor instead (6.4.5.3).
        let desig_len = usize::from(d[7]);
        if desig_len > 20 {
            return Err(field(off + 7, None));
        }
        cscds.push(Cscd {
            null: d[1] & 0x20 != 0,
            peripheral_type: d[1] & 0x1F,
            code_set: d[4] & 0x0F,
            association_type: d[5],
            designator: d[8..8 + desig_len].to_vec(),
            block_len: u32::from_be_bytes([0, d[29], d[30], d[31]]),
        });
        off += len;
    }

    let mut segments = Vec::new();
    let seg_end = cscd_end + seg_len_total;
    while off < seg_end {
        if segments.len() >= usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x08));
        }
        let Some(h) = params.get(off..off + 4).filter(|_| off + 4 <= seg_end) else {
            return Err(Sense::parameter_list_length_error());
        };
        if h[0] != SEGMENT_BLOCK_TO_BLOCK {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x09)
                .with_field(false, off as u16, None));
        }
        if usize::from(be16(&h[2..])) != B2B_DESCRIPTOR_LEN {
            return Err(field(off + 2, None));
        }
        let len = 4 + B2B_DESCRIPTOR_LEN;
        let Some(d) = params.get(off..off + len).filter(|_| off + len <= seg_end) else {
            return Err(Sense::parameter_list_length_error());
        };
        segments.push(Segment {
            dc: d[1] & 0x02 != 0,
            src: be16(&d[4..]),
            dst: be16(&d[6..]),
            blocks: be16(&d[10..]),
            src_lba: be64(&d[12..]),
            dst_lba: be64(&d[20..]),
        });
        off += len;
    }
    Ok(Some(CopyList {
        list_id,
        keep_status: usage == 0b00 || usage == 0b10,
        cscds,
        segments,
    }))
}

/// COPY ABORTED for segment descriptor `segment` (SPC-4 5.17.4.3): the segment's number in
/// COMMAND-SPECIFIC INFORMATION.
pub fn copy_aborted(segment: usize, (asc, ascq): (u8, u8)) -> Sense {
    Sense::new(SenseKey::CopyAborted, asc, ascq)
        .with_command_specific(u32::try_from(segment).unwrap_or(u32::MAX))
}

/// The CSCD names nothing this copy manager can reach (NUL, another designator, a device
/// not on this target, an index past the list).
pub fn not_reachable(segment: usize) -> Sense {
    copy_aborted(segment, COPY_TARGET_NOT_REACHABLE)
}

/// The CSCD names a device of another type than its PERIPHERAL DEVICE TYPE / DISK BLOCK
/// LENGTH say.
pub fn incorrect_type(segment: usize) -> Sense {
    copy_aborted(segment, INCORRECT_COPY_TARGET_TYPE)
}

/// The segment's bytes are not whole blocks of the other copy target device.
pub fn data_underrun(segment: usize) -> Sense {
    copy_aborted(segment, COPY_TARGET_DATA_UNDERRUN)
}

/// An error a copy target device reported while the copy manager read or wrote it (LBA out of
/// range, write protected, medium error...): COPY ABORTED, NO ADDITIONAL SENSE INFORMATION, the
/// failing segment in COMMAND-SPECIFIC INFORMATION (SPC-4 5.17.4.3).
pub fn target_failed(segment: usize) -> Sense {
    copy_aborted(segment, (0x00, 0x00))
}

/// What RECEIVE COPY RESULTS / COPY STATUS reports of a finished EXTENDED COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStatus {
    pub failed: bool,
    pub segments_processed: u16,
    pub bytes: u64,
}

/// COPY STATUS parameter data (SPC-4 6.18.3): COPY MANAGER STATUS 01h (completed without
/// errors) or 02h (completed with errors), HDD 0 (no held data); the transfer count in the
/// smallest binary unit it fits in.
pub fn copy_status_data(s: &CopyStatus) -> Vec<u8> {
    let mut d = vec![0u8; 12];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d[4] = if s.failed { 0x02 } else { 0x01 };
    d[5..7].copy_from_slice(&s.segments_processed.to_be_bytes());
    let mut units = 0u8;
    let mut count = s.bytes;
    while count > u64::from(u32::MAX) {
        count >>= 10;
        units += 1;
    }
    d[7] = units;
    d[8..12].copy_from_slice(&(count as u32).to_be_bytes());
    d
}

/// COPY STATUS of a copy still running: COPY MANAGER STATUS 00h (operation in progress).
pub fn copy_in_progress_data() -> Vec<u8> {
    let mut d = vec![0u8; 12];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d
}

/// Largest number of bytes one segment may copy (a block to block segment's NUMBER OF
/// BLOCKS is 16 bits).
pub fn max_segment_bytes(block_size: u32) -> u32 {
    0xFFFFu32.saturating_mul(block_size)
}

/// OPERATING PARAMETERS parameter data (SPC-4 6.18.5, table 306).
pub fn operating_parameters(block_size: u32) -> Vec<u8> {
    let implemented = [SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION];
    let mut d = vec![0u8; 44];
    d[4] = 0x01; // SNLID: RECEIVE COPY RESULTS with a list identifier is supported
    d[8..10].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LEN.to_be_bytes());
    d[16..20].copy_from_slice(&max_segment_bytes(block_size).to_be_bytes());
    // MAXIMUM INLINE DATA LENGTH, HELD DATA LIMIT, MAXIMUM STREAM DEVICE TRANSFER SIZE: 0.
    d[34..36].copy_from_slice(&CONCURRENT_COPIES.to_be_bytes());
    d[36] = CONCURRENT_COPIES as u8;
    d[37] = block_size.max(1).trailing_zeros() as u8; // DATA SEGMENT GRANULARITY (log2)
    d[43] = implemented.len() as u8;
    d.extend_from_slice(&implemented);
    let available = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&available.to_be_bytes());
    d
}

/// One third-party copy descriptor (SPC-4 7.8.17.1): type, length, body padded to 4 bytes.
fn tpc_descriptor(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    let padded = body.len().div_ceil(4) * 4;
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(padded as u16).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + padded - body.len(), 0);
}

/// Third-party Copy VPD page 8Fh (SPC-4 7.8.17): Supported Commands (EXTENDED COPY LID1,
/// RECEIVE COPY RESULTS COPY STATUS and OPERATING PARAMETERS), Parameter Data, Supported
/// Descriptors and General Copy Operations descriptors.
pub fn vpd_third_party_copy(block_size: u32) -> Vec<u8> {
    let mut descs = Vec::new();
    // Supported Commands (0001h, 7.8.17.3).
    let commands = [
        0x83,
        1,
        SA_EXTENDED_COPY_LID1,
        0x84,
        2,
        SA_COPY_STATUS,
        SA_OPERATING_PARAMETERS,
    ];
    let mut body = vec![commands.len() as u8];
    body.extend_from_slice(&commands);
    tpc_descriptor(&mut descs, 0x0001, &body);
    // Parameter Data (0004h, 7.8.17.4).
    let mut body = vec![0u8; 28];
    body[4..6].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    body[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    body[8..12].copy_from_slice(&MAX_DESCRIPTOR_LIST_LEN.to_be_bytes());
    tpc_descriptor(&mut descs, 0x0004, &body);
    // Supported Descriptors (0008h, 7.8.17.5).
    tpc_descriptor(
        &mut descs,
        0x0008,
        &[2, SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION],
    );
    // General Copy Operations (8001h, 7.8.17.10).
    let mut body = vec![0u8; 28];
    body[0..4].copy_from_slice(&u32::from(CONCURRENT_COPIES).to_be_bytes());
    body[4..8].copy_from_slice(&u32::from(CONCURRENT_COPIES).to_be_bytes());
    body[8..12].copy_from_slice(&max_segment_bytes(block_size).to_be_bytes());
    body[12] = block_size.max(1).trailing_zeros() as u8;
    tpc_descriptor(&mut descs, 0x8001, &body);
    let mut d = vec![0, 0x8F];
    d.extend_from_slice(&(descs.len() as u16).to_be_bytes());
    d.extend_from_slice(&descs);
    d
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    pub(crate) fn cscd(naa: &[u8], block_size: u32) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[0] = CSCD_IDENTIFICATION;
        d[4] = 0x01;
        d[5] = 0x03;
        d[7] = naa.len() as u8;
        d[8..8 + naa.len()].copy_from_slice(naa);
        d[29..32].copy_from_slice(&block_size.to_be_bytes()[1..]);
        d
    }

    pub(crate) fn b2b(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
        let mut d = vec![0u8; 28];
        d[0] = SEGMENT_BLOCK_TO_BLOCK;
        d[3] = 0x18;
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&blocks.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        d
    }

    pub(crate) fn list(list_id: u8, cscds: &[Vec<u8>], segs: &[Vec<u8>]) -> Vec<u8> {
        let c: Vec<u8> = cscds.concat();
        let s: Vec<u8> = segs.concat();
        let mut d = vec![0u8; 16];
        d[0] = list_id;
        d[2..4].copy_from_slice(&(c.len() as u16).to_be_bytes());
        d[8..12].copy_from_slice(&(s.len() as u32).to_be_bytes());
        d.extend_from_slice(&c);
        d.extend_from_slice(&s);
        d
    }

    fn code(s: Sense) -> (u8, u8) {
        (s.asc, s.ascq)
    }

    #[test]
    fn decodes_a_copy_list() {
        let naa = [0x60u8; 16];
        let p = list(7, &[cscd(&naa, 512)], &[b2b(0, 0, 2048, 1, 2)]);
        let l = parse(&p).unwrap().unwrap();
        assert_eq!(l.list_id, 7);
        assert!(l.keep_status);
        assert_eq!(l.cscds[0].designator, naa);
        assert!(l.cscds[0].is_lu_naa());
        assert_eq!(l.cscds[0].block_len, 512);
        assert_eq!(
            l.segments[0],
            Segment {
                dc: false,
                src: 0,
                dst: 0,
                blocks: 2048,
                src_lba: 1,
                dst_lba: 2
            }
        );
        assert_eq!(parse(&[]).unwrap(), None);
    }

    #[test]
    fn length_errors() {
        let p = list(1, &[cscd(&[1; 16], 512)], &[b2b(0, 0, 1, 0, 0)]);
        assert_eq!(code(parse(&p[..47]).unwrap_err()), (0x1A, 0));
        assert_eq!(code(parse(&p[..p.len() - 1]).unwrap_err()), (0x1A, 0));
        assert_eq!(code(parse(&p[..10]).unwrap_err()), (0x1A, 0));
    }

    #[test]
    fn descriptor_limits() {
        let c = cscd(&[1; 16], 512);
        let s = b2b(0, 0, 1, 0, 0);
        let too_many_cscds = vec![c.clone(); usize::from(MAX_CSCD_DESCRIPTORS) + 1];
        let p = list(1, &too_many_cscds, std::slice::from_ref(&s));
        assert_eq!(code(parse(&p).unwrap_err()), (0x26, 0x06));
        let too_many_segs = vec![s.clone(); usize::from(MAX_SEGMENT_DESCRIPTORS) + 1];
        let p = list(1, std::slice::from_ref(&c), &too_many_segs);
        assert_eq!(code(parse(&p).unwrap_err()), (0x26, 0x08));
        let p = list(1, &too_many_cscds, &vec![s; 18]);
        assert_eq!(code(parse(&p).unwrap_err()), (0x1A, 0x00));
    }

    #[test]
    fn unsupported_descriptor_types() {
        let mut fc = cscd(&[1; 16], 512);
        fc[0] = 0xE0;
        let p = list(1, &[fc], &[b2b(0, 0, 1, 0, 0)]);
        assert_eq!(code(parse(&p).unwrap_err()), (0x26, 0x07));
        let mut s2s = b2b(0, 0, 1, 0, 0);
        s2s[0] = 0x03;
        let p = list(1, &[cscd(&[1; 16], 512)], &[s2s]);
        assert_eq!(code(parse(&p).unwrap_err()), (0x26, 0x09));
    }

    /// libiscsi 1.19 ExtendedCopy.ValidTgtDescr: an identification descriptor CSCD with any
    /// LU ID TYPE (01b proxy token, 10b and 11b reserved) names the same logical unit.
    #[test]
    fn identification_cscd_ignores_lu_id_type() {
        let naa = [0x60u8; 16];
        for lu_id_type in 1..=3u8 {
            let mut c = cscd(&naa, 512);
            c[1] = lu_id_type << 6;
            let p = list(1, &[c], &[b2b(0, 0, 1, 0, 0)]);
            let l = parse(&p).unwrap().unwrap();
            assert!(l.cscds[0].is_lu_naa() && !l.cscds[0].null);
            assert_eq!(l.cscds[0].designator, naa);
        }
    }

    #[test]
    fn list_id_usage() {
        let mut p = list(1, &[cscd(&[1; 16], 512)], &[b2b(0, 0, 1, 0, 0)]);
        p[1] = 0x18;
        assert_eq!(code(parse(&p).unwrap_err()), (0x26, 0x00));
        p[0] = 0;
        assert!(!parse(&p).unwrap().unwrap().keep_status);
        p[1] = 0x08;
        assert_eq!(code(parse(&p).unwrap_err()), (0x26, 0x00));
    }

    #[test]
    fn status_and_parameter_pages() {
        let d = copy_status_data(&CopyStatus {
            failed: false,
            segments_processed: 1,
            bytes: 1 << 20,
        });
        assert_eq!(d.len(), 12);
        assert_eq!((d[4], d[7]), (1, 0));
        assert_eq!(&d[8..12], &(1u32 << 20).to_be_bytes());
        let d = copy_status_data(&CopyStatus {
            failed: true,
            segments_processed: 2,
            bytes: 1 << 40,
        });
        assert_eq!((d[4], d[7]), (2, 1));
        assert_eq!(&d[8..12], &(1u32 << 30).to_be_bytes());
        let op = operating_parameters(512);
        assert_eq!(be32(&op) as usize, op.len() - 4);
        assert_eq!(be16(&op[8..]), MAX_CSCD_DESCRIPTORS);
        assert_eq!(op[37], 9);
        let v = vpd_third_party_copy(512);
        assert_eq!(usize::from(be16(&v[2..])), v.len() - 4);
        // Every descriptor's length is a multiple of 4 and they tile the page.
        let mut off = 4;
        while off < v.len() {
            let len = usize::from(be16(&v[off + 2..]));
            assert_eq!(len % 4, 0);
            off += 4 + len;
        }
        assert_eq!(off, v.len());
    }

    #[test]
    fn random_lists_do_not_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let base = list(1, &[cscd(&[1; 16], 512)], &[b2b(0, 0, 1, 0, 0)]);
        for _ in 0..50_000 {
            let mut p = base.clone();
            let n = rng.gen_range(0..p.len() + 8);
            p.resize(n, 0);
            for _ in 0..rng.gen_range(0..4) {
                if !p.is_empty() {
                    let i = rng.gen_range(0..p.len());
                    p[i] = rng.gen();
                }
            }
            let _ = parse(&p);
        }
    }
}
