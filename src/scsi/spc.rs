//! Primary commands (SPC-4): INQUIRY and its VPD pages, MODE SENSE / MODE SELECT, REPORT
//! LUNS, START STOP UNIT, REPORT SUPPORTED OPERATION CODES, and LUN addressing (SAM-5 4.7).
//!
//! Everything here is pure: page builders take settings and return bytes or sense.

use super::cdb::{self, opcode, ModeSelect, ModeSense, PageControl, ReportOpcodes, StartStopUnit};
use super::limits::BlockLimits;
use super::sbc;
use super::sense::Sense;
use super::{LunIdentity, LunSettings};

/// Version descriptors claimed in standard INQUIRY data (SPC-4 6.4.2, table 148): SAM-5,
/// iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];
/// iSCSI protocol identifier (SPC-4 7.6.1, table 362).
const PROTOCOL_ISCSI: u8 = 0x5;
/// RMB: the medium is removable (SPC-4 6.4.2, byte 1 bit 7).
const RMB: u8 = 0x80;
/// Peripheral qualifier 011b, device type 1Fh: no logical unit at this LUN (SPC-4 6.4.2).
const NO_LOGICAL_UNIT: u8 = 0x7F;

/// Largest LUN number the single-level flat space address method can carry.
pub const MAX_LUN: u64 = 0x3FFF;

/// Encodes a LUN number as an 8-byte single-level LUN (SAM-5 4.7.7): peripheral device
/// addressing below 256, flat space addressing up to 16383.
pub fn encode_lun(lun: u64) -> Option<[u8; 8]> {
    let mut b = [0u8; 8];
    match lun {
        0..=0xFF => b[1] = lun as u8,
        0x100..=MAX_LUN => {
            b[0] = 0x40 | (lun >> 8) as u8;
            b[1] = lun as u8;
        }
        _ => return None,
    }
    Some(b)
}

/// Decodes the 8-byte LUN field (big-endian u64 as carried in bytes 8..16 of an iSCSI
/// header) into a LUN number: single level, peripheral (bus 0) or flat space addressing.
pub fn decode_lun(raw: u64) -> Option<u64> {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0b00 if b[0] == 0 => Some(u64::from(b[1])),
        0b01 => Some((u64::from(b[0] & 0x3F) << 8) | u64::from(b[1])),
        _ => None,
    }
}

/// `s` as an ASCII field of exactly `len` bytes: printable characters only (SPC-4 4.4.1),
/// space padded.
fn ascii_field(s: &str, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..=0x7E).contains(&b) { b } else { b' ' })
        .take(len)
        .collect();
    v.resize(len, b' ');
    v
}

fn standard_inquiry_with(byte0: u8, identity: &LunIdentity) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = byte0;
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&ascii_field(&identity.vendor, 8));
    d[16..32].copy_from_slice(&ascii_field(&identity.product, 16));
    d[32..36].copy_from_slice(&ascii_field(&identity.revision, 4));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data (SPC-4 6.4.2), 96 bytes: direct-access block device, SPC-4,
/// HISUP, command queuing, no protection information; implicit ALUA (TPGS=01b) with a port
/// group, else none (TPGS=0). RMB (byte 1 bit 7) set for a removable medium, in the tgt and
/// IET layouts too (tgt sets it for `removable 1`).
pub fn standard_inquiry(identity: &LunIdentity, removable: bool) -> Vec<u8> {
    let mut d = match &identity.compat {
        Some(compat) => {
            compat.standard_inquiry(&identity.vendor, &identity.product, &identity.revision)
        }
        None => {
            let mut d = standard_inquiry_with(0x00, identity);
            if identity.port_group.is_some() {
                d[5] = super::alua::TPGS_IMPLICIT;
            }
            d
        }
    };
    if removable {
        if let Some(b) = d.get_mut(1) {
            *b |= RMB;
        }
    }
    d
}

/// Standard INQUIRY data for a LUN with no logical unit behind it (SPC-4 6.4.2:
/// peripheral qualifier 011b, device type 1Fh).
pub fn missing_lun_inquiry(identity: Option<&LunIdentity>) -> Vec<u8> {
    let blank = LunIdentity {
        vendor: String::new(),
        product: String::new(),
        revision: String::new(),
        serial: String::new(),
        naa: Vec::new(),
        t10_vendor_specific: String::new(),
        target_port_name: String::new(),
        relative_port: 0,
        port_group: None,
        compat: None,
    };
    standard_inquiry_with(NO_LOGICAL_UNIT, identity.unwrap_or(&blank))
}

/// VPD pages offered, in ascending order (SPC-4 7.8.13).
const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

fn vpd_page(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + body.len());
    d.extend_from_slice(&[0x00, page]);
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// One designation descriptor (SPC-4 7.8.6.1).
fn designator(out: &mut Vec<u8>, protocol_code_set: u8, piv_assoc_type: u8, value: &[u8]) {
    let value = &value[..value.len().min(255)];
    out.extend_from_slice(&[protocol_code_set, piv_assoc_type, 0, value.len() as u8]);
    out.extend_from_slice(value);
}

/// Device Identification VPD page 83h (SPC-4 7.8.6): NAA and T10 vendor ID designators of
/// the logical unit, then the target port's SCSI name string, relative target port
/// identifier and (when configured) target port group. Depends only on the identity, so two
/// hosts configured alike return identical bytes.
pub fn device_identification(identity: &LunIdentity) -> Vec<u8> {
    let mut body = Vec::new();
    if !identity.naa.is_empty() {
        // Binary, association LU, designator type NAA.
        designator(&mut body, 0x01, 0x03, &identity.naa);
    }
    // ASCII, association LU, T10 vendor ID: 8-byte vendor then the vendor-specific part.
    let mut t10 = ascii_field(&identity.vendor, 8);
    t10.extend(identity.t10_vendor_specific.bytes().map(|b| {
        if (0x20..=0x7E).contains(&b) {
            b
        } else {
            b' '
        }
    }));
    designator(&mut body, 0x02, 0x01, &t10);
    if !identity.target_port_name.is_empty() {
        // UTF-8 SCSI name string, null terminated and zero padded to a multiple of four
        // (SPC-4 7.8.6.11); PIV, association target port, type 8.
        let name = identity.target_port_name.as_bytes();
        let mut v = name[..name.len().min(251)].to_vec();
        v.push(0);
        v.resize(v.len().next_multiple_of(4), 0);
        designator(&mut body, (PROTOCOL_ISCSI << 4) | 0x03, 0x98, &v);
    }
    let port = identity.relative_port.to_be_bytes();
    designator(
        &mut body,
        (PROTOCOL_ISCSI << 4) | 0x01,
        0x94,
        &[0, 0, port[0], port[1]],
    );
    if let Some(group) = identity.port_group {
        let g = group.to_be_bytes();
        designator(
            &mut body,
            (PROTOCOL_ISCSI << 4) | 0x01,
            0x95,
            &[0, 0, g[0], g[1]],
        );
    }
    vpd_page(0x83, &body)
}

/// INQUIRY with EVPD=1 (SPC-4 6.4.3): the page, or INVALID FIELD IN CDB for pages not
/// offered.
pub fn inquiry_vpd(
    page: u8,
    settings: &LunSettings,
    limits: &BlockLimits,
    num_blocks: u64,
) -> Result<Vec<u8>, Sense> {
    let thin = settings.thin_provisioning;
    if let Some(compat) = &settings.identity.compat {
        // Pages tgt/IET presented come out byte for byte as they did; the block pages
        // (B0h-B2h) stay twinsan's, and are answered even where IET did not list them.
        match page {
            0x00 => return Ok(compat.supported_vpd_pages()),
            0x80 => return Ok(compat.unit_serial_number()),
            0x83 => return Ok(compat.device_identification()),
            _ => {}
        }
    }
    Ok(match page {
        0x00 => vpd_page(0x00, &VPD_PAGES),
        0x80 => vpd_page(
            0x80,
            &ascii_field(
                &settings.identity.serial,
                settings.identity.serial.len().min(252),
            ),
        ),
        0x83 => device_identification(&settings.identity),
        0x8F => super::xcopy::vpd_third_party_copy(settings.block_size),
        0xB0 => sbc::vpd_block_limits(limits, thin),
        0xB1 => sbc::vpd_block_device_characteristics(thin),
        0xB2 => sbc::vpd_logical_block_provisioning(
            thin,
            super::thin::threshold_exponent(num_blocks, thin && settings.thin_threshold.is_some()),
        ),
        _ => return Err(Sense::invalid_field_in_cdb(2, None)),
    })
}

const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0A;
const PAGE_ALL: u8 = 0x3F;
const MODE_PAGES: [u8; 3] = [PAGE_RW_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL];

/// SWP (software write protect) in byte 4 of the Control mode page (SPC-4 7.5.8).
const CONTROL_SWP: u8 = 0x08;

/// One mode page's current values (the defaults but for SWP, `swp`), or its changeable
/// mask: only SWP can be changed.
fn mode_page(page: u8, changeable: bool, settings: &LunSettings, swp: bool) -> Option<Vec<u8>> {
    let mut p = match page {
        // Read-Write Error Recovery (SBC-3 6.4.7).
        PAGE_RW_ERROR_RECOVERY => vec![0u8; 12],
        // Caching (SBC-3 6.4.5): WCE reflects the store's volatile cache.
        PAGE_CACHING => vec![0u8; 20],
        // Control (SPC-4 7.5.8): TST 0, fixed-format sense (D_SENSE 0), SWP as set by MODE
        // SELECT, never BUSY.
        PAGE_CONTROL => vec![0u8; 12],
        _ => return None,
    };
    p[0] = page;
    p[1] = (p.len() - 2) as u8;
    if changeable {
        if page == PAGE_CONTROL {
            p[4] = CONTROL_SWP;
        }
    } else {
        match page {
            PAGE_CACHING if settings.write_cache => p[2] = 0x04,
            PAGE_CONTROL => {
                p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
                if swp {
                    p[4] = CONTROL_SWP;
                }
                p[8..10].copy_from_slice(&[0xFF, 0xFF]); // BUSY TIMEOUT PERIOD: unlimited
            }
            _ => {}
        }
    }
    Some(p)
}

/// MODE SENSE(6)/(10) parameter data (SPC-4 6.11, 6.12, 7.5): header, optional block
/// descriptor (SBC-3 6.4.2; long LBA with LLBAA), then the requested page(s).
pub fn mode_sense(
    ms: &ModeSense,
    settings: &LunSettings,
    num_blocks: u64,
    swp: bool,
) -> Result<Vec<u8>, Sense> {
    if ms.pc == PageControl::Saved {
        return Err(Sense::saving_parameters_not_supported());
    }
    // No subpages exist: only subpage 0, or FFh ("and all subpages").
    if ms.subpage != 0x00 && ms.subpage != 0xFF {
        return Err(Sense::invalid_field_in_cdb(3, None));
    }
    let changeable = ms.pc == PageControl::Changeable;
    let pages: Vec<u8> = if ms.page == PAGE_ALL {
        MODE_PAGES
            .iter()
            .filter_map(|&p| mode_page(p, changeable, settings, swp))
            .flatten()
            .collect()
    } else {
        mode_page(ms.page, changeable, settings, swp)
            .ok_or(Sense::invalid_field_in_cdb(2, Some(5)))?
    };

    let mut block_descriptor = Vec::new();
    if !ms.dbd {
        let bs = settings.block_size;
        let (blocks, length) = if changeable { (0, 0) } else { (num_blocks, bs) };
        if ms.llbaa {
            block_descriptor.extend_from_slice(&blocks.to_be_bytes());
            block_descriptor.extend_from_slice(&[0; 4]);
            block_descriptor.extend_from_slice(&length.to_be_bytes());
        } else {
            let short = u32::try_from(blocks).unwrap_or(u32::MAX);
            block_descriptor.extend_from_slice(&short.to_be_bytes());
            block_descriptor.extend_from_slice(&length.to_be_bytes());
            block_descriptor[4] = 0; // density code
        }
    }
    // Device-specific parameter (SBC-3 6.4.1): WP (read-only LUN or SWP), DPOFUA. The
    // changeable values report no changeable bit there (SWP is changed in the Control page).
    let device_specific = if (settings.read_only || swp) && !changeable {
        0x90
    } else {
        0x10
    };
    let mut d = Vec::with_capacity(8 + block_descriptor.len() + pages.len());
    if ms.ten {
        let len = 6 + block_descriptor.len() + pages.len();
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.extend_from_slice(&[0, device_specific, u8::from(ms.llbaa && !ms.dbd), 0]);
        d.extend_from_slice(&(block_descriptor.len() as u16).to_be_bytes());
    } else {
        let len = 3 + block_descriptor.len() + pages.len();
        d.extend_from_slice(&[len as u8, 0, device_specific, block_descriptor.len() as u8]);
    }
    d.extend_from_slice(&block_descriptor);
    d.extend_from_slice(&pages);
    Ok(d)
}

/// MODE SELECT(6)/(10) (SPC-4 6.9, 6.10): the parameter list is accepted only when every
/// block descriptor and page repeats the current values but in changeable bits (SWP of the
/// Control page, current value `swp`). Returns the SWP the list sets, when it holds a Control
/// page; nothing is changed when any part is refused.
pub fn mode_select(
    sel: &ModeSelect,
    params: &[u8],
    settings: &LunSettings,
    num_blocks: u64,
    swp: bool,
) -> Result<Option<bool>, Sense> {
    if sel.sp {
        return Err(Sense::invalid_field_in_cdb(1, Some(0)));
    }
    if params.is_empty() {
        return Ok(None);
    }
    if !sel.pf {
        return Err(Sense::invalid_field_in_cdb(1, Some(4)));
    }
    let header_len = if sel.ten { 8 } else { 4 };
    if params.len() < header_len {
        return Err(Sense::parameter_list_length_error());
    }
    let (bd_len, long_lba) = if sel.ten {
        (
            usize::from(u16::from_be_bytes([params[6], params[7]])),
            params[4] & 0x01 != 0,
        )
    } else {
        (usize::from(params[3]), false)
    };
    let bd_size = if long_lba { 16 } else { 8 };
    if bd_len % bd_size != 0 {
        let at = if sel.ten { 6 } else { 3 };
        return Err(Sense::invalid_field_in_parameter_list(at, None));
    }
    let pages_at = header_len + bd_len;
    let descriptors = params
        .get(header_len..pages_at)
        .ok_or(Sense::parameter_list_length_error())?;
    for (i, bd) in descriptors.chunks_exact(bd_size).enumerate() {
        let at = header_len + i * bd_size;
        let (blocks, length, length_at) = if long_lba {
            let mut n = [0u8; 8];
            n.copy_from_slice(&bd[..8]);
            (
                u64::from_be_bytes(n),
                u32::from_be_bytes([bd[12], bd[13], bd[14], bd[15]]),
                12,
            )
        } else {
            let n = u64::from(u32::from_be_bytes([bd[0], bd[1], bd[2], bd[3]]));
            (n, u32::from_be_bytes([0, bd[5], bd[6], bd[7]]), 5)
        };
        let current_blocks = if long_lba {
            num_blocks
        } else {
            num_blocks.min(u64::from(u32::MAX))
        };
        if blocks != 0 && blocks != current_blocks {
            return Err(Sense::invalid_field_in_parameter_list(at as u16, None));
        }
        if length != settings.block_size {
            return Err(Sense::invalid_field_in_parameter_list(
                (at + length_at) as u16,
                None,
            ));
        }
    }
    let mut new_swp = None;
    let mut at = pages_at;
    while at < params.len() {
        let rest = &params[at..];
        if rest.len() < 2 {
            return Err(Sense::parameter_list_length_error());
        }
        // SPF (subpage format) pages do not exist here.
        if rest[0] & 0x40 != 0 {
            return Err(Sense::invalid_field_in_parameter_list(at as u16, Some(6)));
        }
        let code = rest[0] & 0x3F;
        let current = mode_page(code, false, settings, swp)
            .ok_or(Sense::invalid_field_in_parameter_list(at as u16, Some(5)))?;
        let mask = mode_page(code, true, settings, swp).unwrap_or_default();
        if usize::from(rest[1]) != current.len() - 2 {
            return Err(Sense::invalid_field_in_parameter_list(
                (at + 1) as u16,
                None,
            ));
        }
        let page = rest
            .get(..current.len())
            .ok_or(Sense::parameter_list_length_error())?;
        let fixed = |i: usize| !mask.get(i).copied().unwrap_or(0);
        if let Some(i) = (2..current.len()).find(|&i| (page[i] ^ current[i]) & fixed(i) != 0) {
            return Err(Sense::invalid_field_in_parameter_list(
                (at + i) as u16,
                None,
            ));
        }
        if code == PAGE_CONTROL {
            new_swp = Some(page[4] & CONTROL_SWP != 0);
        }
        at += current.len();
    }
    Ok(new_swp)
}

/// REPORT LUNS parameter data (SPC-4 6.33): the LUN list (sorted) in single-level format.
pub fn report_luns(
    luns: impl Iterator<Item = u64>,
    select_report: u8,
    alloc_len: u32,
) -> Result<Vec<u8>, Sense> {
    if alloc_len < 16 {
        return Err(Sense::invalid_field_in_cdb(6, None));
    }
    let mut list: Vec<[u8; 8]> = match select_report {
        // All logical units (no well-known LUs exist).
        0x00 | 0x02 => luns.filter_map(encode_lun).collect(),
        // Well-known logical units only: none.
        0x01 => Vec::new(),
        _ => return Err(Sense::invalid_field_in_cdb(2, None)),
    };
    list.sort_unstable();
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in &list {
        d.extend_from_slice(l);
    }
    Ok(d)
}

/// START STOP UNIT (SBC-3 5.25), the checks. Not removable: LOEJ with POWER CONDITION 0 is
/// refused; START and power conditions are accepted and have nothing to do (a virtual
/// logical unit is always ready). Removable: LOEJ with POWER CONDITION 0 moves the medium
/// (the target's part); any other POWER CONDITION makes the device server ignore START and
/// LOEJ (5.25), reserved values included, as tgt does and libiscsi's StartStopUnit.PwrCnd
/// expects of a removable unit. IMMED changes nothing since the command completes at once.
pub fn start_stop_unit(ssu: &StartStopUnit, removable: bool) -> Result<(), Sense> {
    match ssu.power_condition {
        _ if removable => Ok(()),
        0x0 if ssu.loej => Err(Sense::invalid_field_in_cdb(4, Some(1))),
        // START_VALID, ACTIVE, IDLE, STANDBY, LU_CONTROL, FORCE_IDLE_0, FORCE_STANDBY_0.
        0x0 | 0x1 | 0x2 | 0x3 | 0x7 | 0xA | 0xB => Ok(()),
        _ => Err(Sense::invalid_field_in_cdb(4, Some(7))),
    }
}

/// One supported command for REPORT SUPPORTED OPERATION CODES: its service action (if the
/// opcode has service actions) and CDB usage data (SPC-4 6.35.3).
struct CommandUsage {
    opcode: u8,
    service_action: Option<u16>,
    usage: Vec<u8>,
}

fn usage(opcode: u8, service_action: Option<u16>, usage: &[u8]) -> CommandUsage {
    let mut u = usage.to_vec();
    u[0] = opcode;
    CommandUsage {
        opcode,
        service_action,
        usage: u,
    }
}

/// Commands implemented, with the CDB bits each one looks at; PREVENT ALLOW MEDIUM REMOVAL
/// on a removable unit only.
fn supported_commands(thin: bool, alua: bool, removable: bool) -> Vec<CommandUsage> {
    use opcode::*;
    const FF: u8 = 0xFF;
    let rw10 = |op, b1| usage(op, None, &[0, b1, FF, FF, FF, FF, 0x1F, FF, FF, 0]);
    let rw12 = |op, b1| usage(op, None, &[0, b1, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0]);
    let rw16 = |op, b1| {
        usage(
            op,
            None,
            &[
                0, b1, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0,
            ],
        )
    };
    let unmap_bit = if thin { 0x08 } else { 0x00 };
    let mut v = vec![
        usage(TEST_UNIT_READY, None, &[0; 6]),
        usage(REQUEST_SENSE, None, &[0, 0, 0, 0, FF, 0]),
        usage(READ_6, None, &[0, 0x1F, FF, FF, FF, 0]),
        usage(WRITE_6, None, &[0, 0x1F, FF, FF, FF, 0]),
        usage(INQUIRY, None, &[0, 0x01, FF, FF, FF, 0]),
        usage(MODE_SELECT_6, None, &[0, 0x11, 0, 0, FF, 0]),
        usage(MODE_SENSE_6, None, &[0, 0x08, FF, FF, FF, 0]),
        usage(START_STOP_UNIT, None, &[0, 0x01, 0, 0x0F, 0xF7, 0]),
        usage(
            READ_CAPACITY_10,
            None,
            &[0, 0, FF, FF, FF, FF, 0, 0, 0x01, 0],
        ),
        rw10(READ_10, 0x1E),
        rw10(WRITE_10, 0x1A),
        rw10(WRITE_AND_VERIFY_10, 0x12),
        rw10(VERIFY_10, 0x16),
        rw10(PRE_FETCH_10, 0x02),
        usage(
            READ_DEFECT_DATA_10,
            None,
            &[0, 0, 0x1F, 0, 0, 0, 0, FF, FF, 0],
        ),
        rw10(SYNCHRONIZE_CACHE_10, 0x06),
        rw10(WRITE_SAME_10, unmap_bit),
        usage(MODE_SELECT_10, None, &[0, 0x11, 0, 0, 0, 0, 0, FF, FF, 0]),
        usage(MODE_SENSE_10, None, &[0, 0x18, FF, FF, 0, 0, 0, FF, FF, 0]),
        rw16(READ_16, 0x1E),
        usage(
            COMPARE_AND_WRITE,
            None,
            &[
                0, 0x1A, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0x1F, 0,
            ],
        ),
        rw16(WRITE_16, 0x1A),
        rw16(ORWRITE_16, 0x1A),
        usage(
            WRITE_ATOMIC_16,
            None,
            &[
                0, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, FF, FF, 0x1F, 0,
            ],
        ),
        rw16(WRITE_AND_VERIFY_16, 0x12),
        rw16(VERIFY_16, 0x16),
        rw16(PRE_FETCH_16, 0x02),
        rw16(SYNCHRONIZE_CACHE_16, 0x06),
        rw16(WRITE_SAME_16, unmap_bit | 0x01),
        usage(
            SERVICE_ACTION_IN_16,
            Some(SA_READ_CAPACITY_16),
            &[
                0, 0x10, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x01, 0,
            ],
        ),
        usage(
            SERVICE_ACTION_IN_16,
            Some(SA_GET_LBA_STATUS),
            &[
                0, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0,
            ],
        ),
        usage(
            REPORT_LUNS,
            None,
            &[0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        ),
        usage(
            MAINTENANCE_IN,
            Some(SA_REPORT_SUPPORTED_OPCODES),
            &[0, 0x0C, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        ),
        usage(RESERVE_6, None, &[0; 6]),
        usage(RELEASE_6, None, &[0; 6]),
        usage(RESERVE_10, None, &[0; 10]),
        usage(RELEASE_10, None, &[0; 10]),
        rw12(READ_12, 0x1E),
        rw12(WRITE_12, 0x1A),
        rw12(WRITE_AND_VERIFY_12, 0x12),
        rw12(VERIFY_12, 0x16),
        usage(
            READ_DEFECT_DATA_12,
            None,
            &[0, 0x1F, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        ),
    ];
    // PERSISTENT RESERVE IN / OUT, one entry per service action (SPC-4 6.15, 6.16).
    for sa in 0..=3u8 {
        v.push(usage(
            PERSISTENT_RESERVE_IN,
            Some(u16::from(sa)),
            &[0, sa, 0, 0, 0, 0, 0, FF, FF, 0],
        ));
    }
    for sa in 0..=7u8 {
        v.push(usage(
            PERSISTENT_RESERVE_OUT,
            Some(u16::from(sa)),
            &[0, sa, FF, 0, 0, FF, FF, FF, FF, 0],
        ));
    }
    // EXTENDED COPY(LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18).
    v.push(usage(
        EXTENDED_COPY,
        Some(0),
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
    ));
    for sa in [0u8, 3] {
        v.push(usage(
            RECEIVE_COPY_RESULTS,
            Some(u16::from(sa)),
            &[0, sa, FF, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        ));
    }
    if thin {
        v.push(usage(UNMAP, None, &[0, 0, 0, 0, 0, 0, 0x1F, FF, FF, 0]));
    }
    // SANITIZE (SBC-4 5.30): IMMED, AUSE, the service action; BLOCK ERASE where blocks can
    // be deallocated.
    for sa in [
        cdb::SA_SANITIZE_OVERWRITE,
        cdb::SA_SANITIZE_BLOCK_ERASE,
        cdb::SA_SANITIZE_EXIT_FAILURE_MODE,
    ] {
        if sa != cdb::SA_SANITIZE_BLOCK_ERASE || thin {
            v.push(usage(
                SANITIZE,
                Some(u16::from(sa)),
                &[0, 0xA0 | sa, 0, 0, 0, 0, 0, FF, FF, 0],
            ));
        }
    }
    if removable {
        v.push(usage(
            PREVENT_ALLOW_MEDIUM_REMOVAL,
            None,
            &[0, 0, 0, 0, 0x03, 0],
        ));
    }
    if alua {
        v.push(usage(
            MAINTENANCE_IN,
            Some(SA_REPORT_TARGET_PORT_GROUPS),
            &[0, 0x2A, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        ));
    }
    v.sort_by_key(|c| (c.opcode, c.service_action));
    v
}

/// Command timeouts descriptor (SPC-4 6.35.4): length 0Ah, no timeouts reported.
const TIMEOUTS_DESCRIPTOR: [u8; 12] = [0, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES parameter data (SPC-4 6.35); `alua`: REPORT TARGET
/// PORT GROUPS is listed; `removable`: PREVENT ALLOW MEDIUM REMOVAL is.
pub fn report_supported_opcodes(
    req: &ReportOpcodes,
    thin: bool,
    alua: bool,
    removable: bool,
) -> Result<Vec<u8>, Sense> {
    let commands = supported_commands(thin, alua, removable);
    let mut d = Vec::new();
    if req.options == 0 {
        for c in &commands {
            let mut flags = u8::from(c.service_action.is_some());
            if req.rctd {
                flags |= 0x02;
            }
            d.push(c.opcode);
            d.push(0);
            d.extend_from_slice(&c.service_action.unwrap_or(0).to_be_bytes());
            d.extend_from_slice(&[0, flags]);
            d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            if req.rctd {
                d.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
            }
        }
        let mut all = (d.len() as u32).to_be_bytes().to_vec();
        all.extend_from_slice(&d);
        return Ok(all);
    }
    let with_opcode: Vec<&CommandUsage> =
        commands.iter().filter(|c| c.opcode == req.opcode).collect();
    let has_service_actions = with_opcode.iter().any(|c| c.service_action.is_some());
    // One opcode without service action (001b) vs. with one (010b) must match the opcode;
    // 011b takes either (SPC-4 6.35.2, table 239).
    if !with_opcode.is_empty() && req.options != 3 && has_service_actions != (req.options == 2) {
        return Err(Sense::invalid_field_in_cdb(2, Some(2)));
    }
    let found = with_opcode
        .iter()
        .find(|c| !has_service_actions || c.service_action == Some(req.service_action));
    let ctdp = if req.rctd { 0x80 } else { 0 };
    match found {
        Some(c) => {
            d.extend_from_slice(&[0, ctdp | 0x03]);
            d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            d.extend_from_slice(&c.usage);
            if req.rctd {
                d.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
            }
        }
        // SUPPORT 001b: not supported.
        None => d.extend_from_slice(&[0, 0x01, 0, 0]),
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{parse, Command};
    use crate::scsi::SenseKey;

    pub(crate) fn identity() -> LunIdentity {
        LunIdentity {
            vendor: "TWINSAN".into(),
            product: "Virtual disk".into(),
            revision: "0.1".into(),
            serial: "SN0001".into(),
            naa: vec![
                0x60, 0x01, 0x40, 0x5f, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ],
            t10_vendor_specific: "lun0-uuid".into(),
            target_port_name: "iqn.2024-01.org.example:store,t,0x0001".into(),
            relative_port: 1,
            port_group: Some(7),
            compat: None,
        }
    }

    fn settings() -> LunSettings {
        LunSettings {
            block_size: 512,
            physical_block_size: 4096,
            read_only: false,
            identity: identity(),
            write_cache: true,
            thin_provisioning: true,
            thin_threshold: None,
            sanitize_rate: 0,
            removable: false,
        }
    }

    #[test]
    fn lun_addressing_round_trips() {
        for lun in [0u64, 1, 255, 256, 1000, MAX_LUN] {
            let raw = u64::from_be_bytes(encode_lun(lun).unwrap());
            assert_eq!(decode_lun(raw), Some(lun));
        }
        assert_eq!(encode_lun(5).unwrap(), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(0x123).unwrap(), [0x41, 0x23, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(MAX_LUN + 1), None);
        // Bus number != 0, second level, other address methods.
        assert_eq!(decode_lun(0x0100_0000_0000_0000), None);
        assert_eq!(decode_lun(0x0001_0001_0000_0000), None);
        assert_eq!(decode_lun(0x8000_0000_0000_0000), None);
        assert_eq!(decode_lun(0xC000_0000_0000_0000), None);
    }

    #[test]
    fn standard_inquiry_layout() {
        let d = standard_inquiry(&identity(), false);
        assert_eq!(d.len(), 96);
        assert_eq!(d[0], 0);
        assert_eq!(d[2], 6);
        assert_eq!(d[3], 0x12);
        assert_eq!(usize::from(d[4]), d.len() - 5);
        assert_eq!(d[7] & 0x02, 0x02);
        assert_eq!(&d[8..16], b"TWINSAN ");
        assert_eq!(&d[16..32], b"Virtual disk    ");
        assert_eq!(&d[32..36], b"0.1 ");
        assert_eq!(
            &d[58..66],
            &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
        );
        assert_eq!(missing_lun_inquiry(None)[0], 0x7F);
    }

    #[test]
    fn inquiry_text_fields_are_printable_ascii() {
        let mut id = identity();
        id.vendor = "ä\u{1}".into();
        let d = standard_inquiry(&id, false);
        assert!(d[8..36].iter().all(|&b| (0x20..=0x7E).contains(&b)));
    }

    #[test]
    fn vpd_83_is_deterministic_and_well_formed() {
        let a = device_identification(&identity());
        let b = device_identification(&identity());
        assert_eq!(a, b);
        assert_eq!(&a[..2], &[0x00, 0x83]);
        assert_eq!(usize::from(u16::from_be_bytes([a[2], a[3]])), a.len() - 4);
        // Walk the descriptors.
        let mut kinds = Vec::new();
        let mut at = 4;
        while at < a.len() {
            let (pc, t, len) = (a[at], a[at + 1], usize::from(a[at + 3]));
            kinds.push((pc, t));
            let v = &a[at + 4..at + 4 + len];
            match t & 0x0F {
                3 => assert_eq!(v, identity().naa.as_slice()),
                1 => assert_eq!(&v[..8], b"TWINSAN "),
                8 => {
                    assert_eq!(len % 4, 0);
                    assert!(v.starts_with(b"iqn.2024-01.org.example:store,t,0x0001\0"));
                }
                4 => assert_eq!(v, &[0, 0, 0, 1]),
                5 => assert_eq!(v, &[0, 0, 0, 7]),
                _ => panic!("unexpected designator {t:#x}"),
            }
            at += 4 + len;
        }
        assert_eq!(at, a.len());
        assert_eq!(
            kinds,
            vec![
                (0x01, 0x03),
                (0x02, 0x01),
                (0x53, 0x98),
                (0x51, 0x94),
                (0x51, 0x95)
            ]
        );
        let mut other = identity();
        other.naa[15] ^= 1;
        assert_ne!(device_identification(&other), a);
    }

    #[test]
    fn supported_vpd_pages_are_all_readable() {
        let s = settings();
        let l = BlockLimits::for_block_size(512);
        let list = inquiry_vpd(0, &s, &l, 1 << 20).unwrap();
        assert_eq!(usize::from(list[3]), list.len() - 4);
        for &p in &list[4..] {
            let page = inquiry_vpd(p, &s, &l, 1 << 20).unwrap();
            assert_eq!(page[1], p);
            assert_eq!(
                usize::from(u16::from_be_bytes([page[2], page[3]])),
                page.len() - 4
            );
        }
        assert_eq!(inquiry_vpd(0x86, &s, &l, 1 << 20).unwrap_err().asc, 0x24);
        let serial = inquiry_vpd(0x80, &s, &l, 1 << 20).unwrap();
        assert_eq!(&serial[4..], b"SN0001");
    }

    fn ms(page: u8, pc: PageControl, ten: bool, dbd: bool, llbaa: bool) -> ModeSense {
        ModeSense {
            ten,
            dbd,
            llbaa,
            pc,
            page,
            subpage: 0,
            alloc_len: 255,
        }
    }

    #[test]
    fn mode_sense_all_pages_lengths() {
        let s = settings();
        let d = mode_sense(
            &ms(0x3F, PageControl::Current, false, false, false),
            &s,
            1000,
            false,
        )
        .unwrap();
        assert_eq!(usize::from(d[0]), d.len() - 1);
        assert_eq!(d[3], 8);
        assert_eq!(d.len(), 4 + 8 + 12 + 20 + 12);
        assert_eq!(d[2], 0x10);
        assert_eq!(&d[4..8], &1000u32.to_be_bytes());
        assert_eq!(&d[9..12], &[0, 2, 0]);
        // Pages in ascending order, each with its length.
        let mut at = 12;
        let mut codes = Vec::new();
        while at < d.len() {
            codes.push(d[at]);
            at += 2 + usize::from(d[at + 1]);
        }
        assert_eq!(at, d.len());
        assert_eq!(codes, vec![0x01, 0x08, 0x0A]);
        assert_eq!(d[12 + 12 + 2] & 0x04, 0x04, "WCE");

        let d10 = mode_sense(
            &ms(0x3F, PageControl::Current, true, false, true),
            &s,
            1000,
            false,
        )
        .unwrap();
        assert_eq!(
            usize::from(u16::from_be_bytes([d10[0], d10[1]])),
            d10.len() - 2
        );
        assert_eq!(d10[4] & 1, 1);
        assert_eq!(u16::from_be_bytes([d10[6], d10[7]]), 16);
        assert_eq!(d10.len(), 8 + 16 + 44);

        let dbd = mode_sense(
            &ms(0x3F, PageControl::Current, false, true, false),
            &s,
            1000,
            false,
        )
        .unwrap();
        assert_eq!((dbd[3], dbd.len()), (0, 4 + 44));
        let all_sub = ModeSense {
            subpage: 0xFF,
            ..ms(0x3F, PageControl::Default, false, true, false)
        };
        assert_eq!(mode_sense(&all_sub, &s, 1000, false,).unwrap(), dbd);
    }

    #[test]
    fn mode_sense_control_page_and_errors() {
        let s = settings();
        let d = mode_sense(
            &ms(0x0A, PageControl::Current, false, true, false),
            &s,
            10,
            false,
        )
        .unwrap();
        assert_eq!(&d[4..6], &[0x0A, 0x0A]);
        let ch = mode_sense(
            &ms(0x0A, PageControl::Changeable, false, true, false),
            &s,
            10,
            false,
        )
        .unwrap();
        assert_eq!(&ch[4..6], &[0x0A, 0x0A]);
        assert_eq!(ch[8], 0x08, "SWP is changeable");
        assert!(ch[6..].iter().enumerate().all(|(i, &b)| i == 2 || b == 0));
        assert_eq!(ch[2], 0x10, "no WP in the changeable values");
        let e = mode_sense(
            &ms(0x0A, PageControl::Saved, false, true, false),
            &s,
            10,
            false,
        )
        .unwrap_err();
        assert_eq!((e.key, e.asc), (SenseKey::IllegalRequest, 0x39));
        let e = mode_sense(
            &ms(0x1C, PageControl::Current, false, true, false),
            &s,
            10,
            false,
        )
        .unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 2));
        let bad_sub = ModeSense {
            subpage: 1,
            ..ms(0x0A, PageControl::Current, false, true, false)
        };
        assert_eq!(
            mode_sense(&bad_sub, &s, 10, false,)
                .unwrap_err()
                .sks
                .unwrap()
                .byte,
            3
        );
        let mut ro = settings();
        ro.read_only = true;
        ro.write_cache = false;
        let d = mode_sense(
            &ms(0x08, PageControl::Current, false, true, false),
            &ro,
            10,
            false,
        )
        .unwrap();
        assert_eq!(d[2], 0x90);
        assert_eq!(d[6] & 0x04, 0);
        // SWP: WP in the header, SWP in the Control page.
        let d = mode_sense(
            &ms(0x0A, PageControl::Current, false, true, false),
            &s,
            10,
            true,
        )
        .unwrap();
        assert_eq!((d[2], d[8] & 0x08), (0x90, 0x08));
    }

    #[test]
    fn mode_select_changes_swp_only() {
        let s = settings();
        let sel = ModeSelect {
            ten: false,
            pf: true,
            sp: false,
            param_len: 0,
        };
        let mut control = vec![0u8, 0, 0, 0];
        control.extend(mode_page(PAGE_CONTROL, false, &s, false).unwrap());
        control[4 + 4] |= 0x08;
        assert_eq!(mode_select(&sel, &control, &s, 10, false), Ok(Some(true)));
        control[4 + 4] &= !0x08;
        assert_eq!(mode_select(&sel, &control, &s, 10, true), Ok(Some(false)));
        // Another bit of the same byte (RAC) is not changeable.
        control[4 + 4] |= 0x40;
        let e = mode_select(&sel, &control, &s, 10, false).unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x26, 8));
    }

    #[test]
    fn mode_select_accepts_only_current_values() {
        let s = settings();
        let sel = ModeSelect {
            ten: false,
            pf: true,
            sp: false,
            param_len: 0,
        };
        let current = mode_sense(
            &ms(0x3F, PageControl::Current, false, false, false),
            &s,
            1000,
            false,
        )
        .unwrap();
        let mut params = current.clone();
        params[0] = 0;
        params[2] = 0;
        assert_eq!(mode_select(&sel, &params, &s, 1000, false), Ok(Some(false)));
        assert_eq!(mode_select(&sel, &[], &s, 1000, false), Ok(None));
        // Turning the write cache off is not possible.
        let mut wce = params.clone();
        wce[12 + 12 + 2] &= !0x04;
        let e = mode_select(&sel, &wce, &s, 1000, false).unwrap_err();
        assert_eq!(
            (e.asc, e.sks.unwrap().byte, e.sks.unwrap().in_cdb),
            (0x26, 26, false)
        );
        // Different block length.
        let mut bl = params.clone();
        bl[10] = 0x10;
        assert_eq!(
            mode_select(&sel, &bl, &s, 1000, false).unwrap_err().asc,
            0x26
        );
        // Truncated page.
        assert_eq!(
            mode_select(&sel, &params[..params.len() - 1], &s, 1000, false).unwrap_err(),
            Sense::parameter_list_length_error()
        );
        let save = ModeSelect { sp: true, ..sel };
        assert_eq!(
            mode_select(&save, &params, &s, 1000, false)
                .unwrap_err()
                .asc,
            0x24
        );
    }

    #[test]
    fn report_luns_formats() {
        let d = report_luns([300u64, 0, 2].into_iter(), 0, 16).unwrap();
        assert_eq!(&d[..4], &24u32.to_be_bytes());
        assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&d[16..24], &[0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&d[24..32], &[0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
        assert_eq!(report_luns([1u64].into_iter(), 1, 100).unwrap(), vec![0; 8]);
        assert_eq!(
            report_luns([1u64].into_iter(), 0, 15).unwrap_err().asc,
            0x24
        );
        assert_eq!(
            report_luns([1u64].into_iter(), 3, 100).unwrap_err().asc,
            0x24
        );
    }

    #[test]
    fn start_stop_unit_rules() {
        let ssu = |pc, loej, start| StartStopUnit {
            immed: true,
            power_condition: pc,
            no_flush: false,
            loej,
            start,
        };
        assert!(start_stop_unit(&ssu(0, false, false), false).is_ok());
        assert!(start_stop_unit(&ssu(0, false, true), false).is_ok());
        assert_eq!(
            start_stop_unit(&ssu(0, true, false), false)
                .unwrap_err()
                .asc,
            0x24
        );
        assert!(start_stop_unit(&ssu(3, true, false), false).is_ok());
        assert!(start_stop_unit(&ssu(4, false, false), false).is_err());
    }

    #[test]
    fn rmb_only_when_removable() {
        assert_eq!(standard_inquiry(&identity(), false)[1], 0x00);
        assert_eq!(standard_inquiry(&identity(), true)[1], 0x80);
        let mut id = identity();
        id.compat = Some(crate::scsi::compat::CompatIdentity::Tgt {
            scsi_id: crate::scsi::compat::tgt_default_scsi_id(1, 1),
            scsi_sn: crate::scsi::compat::tgt_default_scsi_sn(1, 1),
            numeric_id: (1 << 32) | 1,
        });
        assert_eq!(standard_inquiry(&id, false)[1] & 0x80, 0x00);
        assert_eq!(standard_inquiry(&id, true)[1] & 0x80, 0x80);
    }

    #[test]
    fn supported_opcodes_match_the_decoder() {
        for thin in [false, true] {
            for c in supported_commands(thin, thin, thin) {
                // A CDB made of the opcode (and service action) alone must decode, or fail
                // only on a field, never as an unsupported opcode.
                let mut cdb = vec![0u8; 16];
                cdb[0] = c.opcode;
                if let Some(sa) = c.service_action {
                    cdb[1] = sa as u8;
                }
                if let Err(e) = parse(&cdb) {
                    assert_ne!(e, Sense::invalid_opcode(), "opcode {:#x}", c.opcode);
                }
                assert_eq!(c.usage.len(), super::super::cdb::cdb_len(c.opcode).unwrap());
            }
        }
    }

    #[test]
    fn report_supported_opcodes_formats() {
        let all = ReportOpcodes {
            rctd: false,
            options: 0,
            opcode: 0,
            service_action: 0,
            alloc_len: 65535,
        };
        let d = report_supported_opcodes(&all, true, false, false).unwrap();
        let n = supported_commands(true, false, false).len();
        assert_eq!(d.len(), 4 + 8 * n);
        assert_eq!(&d[..4], &((8 * n) as u32).to_be_bytes());
        let d = report_supported_opcodes(&ReportOpcodes { rctd: true, ..all }, true, false, false)
            .unwrap();
        assert_eq!(d.len(), 4 + 20 * n);
        assert_eq!(d[4 + 5] & 0x02, 0x02);

        let one = ReportOpcodes {
            options: 1,
            opcode: opcode::READ_10,
            ..all
        };
        let d = report_supported_opcodes(&one, true, false, false).unwrap();
        assert_eq!(&d[..4], &[0, 3, 0, 10]);
        assert_eq!(d[4], opcode::READ_10);
        assert_eq!(d[5] & 0x18, 0x18);
        let e = report_supported_opcodes(&ReportOpcodes { options: 2, ..one }, true, false, false)
            .unwrap_err();
        assert_eq!(e.asc, 0x24);
        let rc16 = ReportOpcodes {
            options: 2,
            opcode: opcode::SERVICE_ACTION_IN_16,
            service_action: 0x10,
            ..all
        };
        let d = report_supported_opcodes(&rc16, true, false, false).unwrap();
        assert_eq!((d[1], d[4], d[5]), (3, 0x9E, 0x10));
        assert!(report_supported_opcodes(
            &ReportOpcodes { options: 1, ..rc16 },
            true,
            false,
            false
        )
        .is_err());
        let either = ReportOpcodes { options: 3, ..rc16 };
        assert_eq!(
            report_supported_opcodes(&either, true, false, false).unwrap()[5],
            0x10
        );
        let either = ReportOpcodes {
            options: 3,
            opcode: opcode::WRITE_SAME_16,
            ..all
        };
        assert_eq!(
            report_supported_opcodes(&either, true, false, false).unwrap()[4],
            0x93
        );
        let unknown = ReportOpcodes {
            options: 1,
            opcode: 0x3B,
            ..all
        };
        assert_eq!(
            report_supported_opcodes(&unknown, true, false, false).unwrap(),
            vec![0, 1, 0, 0]
        );
        let unmap = ReportOpcodes {
            options: 1,
            opcode: opcode::UNMAP,
            ..all
        };
        assert_eq!(
            report_supported_opcodes(&unmap, false, false, false).unwrap()[1],
            1
        );
        assert!(matches!(
            parse(&[opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]),
            Ok(Command::TestUnitReady)
        ));
    }
}
