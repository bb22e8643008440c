//! Block commands (SBC-3): capacity, reads, writes, verification, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, ORWRITE, WRITE ATOMIC (SBC-4), SYNCHRONIZE CACHE, PRE-FETCH, GET LBA
//! STATUS, READ DEFECT DATA, and the SBC VPD pages.
//!
//! Atomicity: reads and writes hold the logical unit's `write_gate` shared; COMPARE AND
//! WRITE, ORWRITE and WRITE ATOMIC hold it exclusively, so no other command of the LU sees
//! or changes their blocks half done.
//!
//! [`check`] runs before any Data-Out is solicited (so an out-of-range or write-protected
//! command never moves data); [`execute`] does the I/O.

use super::cdb::{ByteCheck, Command, Transfer, WriteSame};
use super::limits::BlockLimits;
use super::sense::{Sense, SenseKey};
use super::unit::LogicalUnit;
use super::LunSettings;
use crate::store::{StoreError, WriteMode};
use bytes::{Bytes, BytesMut};
use tracing::warn;

/// Chunk used when WRITE SAME writes and when medium verification reads.
const CHUNK_BYTES: u64 = 1 << 20;

/// Byte of the CDB holding the transfer length / number of blocks, for field pointers.
fn length_byte(cdb: &[u8]) -> u16 {
    match cdb.first().copied().unwrap_or(0) >> 5 {
        0 => 4,
        1 | 2 => 7,
        5 => 6,
        _ => 10,
    }
}

/// SBC-3 4.5: a command touching `[lba, lba + blocks)` beyond the capacity fails with
/// LOGICAL BLOCK ADDRESS OUT OF RANGE (also for zero blocks past the end).
pub fn check_range(lba: u64, blocks: u64, num_blocks: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= num_blocks => Ok(()),
        _ => Err(Sense::lba_out_of_range()),
    }
}

fn check_transfer(
    limits: &BlockLimits,
    lba: u64,
    blocks: u32,
    num_blocks: u64,
    cdb: &[u8],
) -> Result<(), Sense> {
    check_range(lba, u64::from(blocks), num_blocks)?;
    if blocks > limits.max_transfer_blocks {
        return Err(Sense::invalid_field_in_cdb(length_byte(cdb), None));
    }
    Ok(())
}

/// Checks that need the logical unit but no data: provisioning support, write protection
/// (SBC-3 4.11), LBA ranges (SBC-3 4.5) and Block Limits. Runs before Data-Out is solicited.
pub(crate) fn check(
    settings: &LunSettings,
    limits: &BlockLimits,
    num_blocks: u64,
    cmd: &Command,
    cdb: &[u8],
) -> Result<(), Sense> {
    if matches!(cmd, Command::Unmap { .. }) && !settings.thin_provisioning {
        return Err(Sense::invalid_opcode());
    }
    if settings.read_only && cmd.writes_medium() {
        return Err(Sense::write_protected());
    }
    match *cmd {
        Command::Read(x)
        | Command::Write(x)
        | Command::OrWrite(x)
        | Command::WriteAndVerify { xfer: x, .. } => {
            check_transfer(limits, x.lba, x.blocks, num_blocks, cdb)
        }
        Command::WriteAtomic(x) => check_atomic(limits, x, num_blocks),
        Command::Verify { lba, blocks, .. } => check_transfer(limits, lba, blocks, num_blocks, cdb),
        Command::SynchronizeCache { lba, blocks, .. } | Command::PreFetch { lba, blocks, .. } => {
            check_range(lba, u64::from(blocks), num_blocks)
        }
        Command::GetLbaStatus { lba, .. } if lba >= num_blocks => Err(Sense::lba_out_of_range()),
        Command::WriteSame(ws) => {
            if ws.unmap && !settings.thin_provisioning {
                return Err(Sense::invalid_field_in_cdb(1, Some(3)));
            }
            check_range(ws.lba, u64::from(ws.blocks), num_blocks)?;
            // Zero blocks means through the last LBA (WSNZ=0, SBC-3 5.41, 5.42); the range,
            // given or implied, must not exceed MAXIMUM WRITE SAME LENGTH (SBC-3 6.6.3).
            if write_same_blocks(ws, num_blocks) > limits.max_write_same_blocks {
                return Err(Sense::invalid_field_in_cdb(length_byte(cdb), None));
            }
            Ok(())
        }
        Command::CompareAndWrite { lba, blocks, .. } => {
            check_range(lba, u64::from(blocks), num_blocks)?;
            if blocks > limits.max_compare_and_write_blocks {
                return Err(Sense::invalid_field_in_cdb(13, None));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// WRITE ATOMIC(16) (SBC-4 5.48, 4.29): the range, then the Block Limits atomic fields:
/// TRANSFER LENGTH at most MAXIMUM ATOMIC TRANSFER LENGTH and a multiple of ATOMIC TRANSFER
/// LENGTH GRANULARITY, the LBA a multiple of ATOMIC ALIGNMENT; otherwise INVALID FIELD IN
/// CDB.
fn check_atomic(limits: &BlockLimits, x: Transfer, num_blocks: u64) -> Result<(), Sense> {
    check_range(x.lba, u64::from(x.blocks), num_blocks)?;
    let unit = limits.atomic_granularity.max(1);
    if x.blocks > limits.max_atomic_transfer_blocks || x.blocks % unit != 0 {
        return Err(Sense::invalid_field_in_cdb(12, None));
    }
    if x.lba % u64::from(unit) != 0 {
        return Err(Sense::invalid_field_in_cdb(2, None));
    }
    Ok(())
}

/// Blocks a WRITE SAME covers: NUMBER OF LOGICAL BLOCKS, or with 0 every block from the LBA
/// through the last one (SBC-3 5.41).
pub fn write_same_blocks(ws: WriteSame, num_blocks: u64) -> u64 {
    match ws.blocks {
        0 => num_blocks.saturating_sub(ws.lba),
        n => u64::from(n),
    }
}

/// READ CAPACITY(10) parameter data (SBC-3 5.15.2): last LBA (FFFFFFFFh when it does not fit)
/// and block length.
pub fn read_capacity_10(num_blocks: u64, block_size: u32) -> Vec<u8> {
    let last = u32::try_from(num_blocks.saturating_sub(1)).unwrap_or(u32::MAX);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&last.to_be_bytes());
    d.extend_from_slice(&block_size.to_be_bytes());
    d
}

/// READ CAPACITY(16) parameter data (SBC-3 5.16.2): no protection, LOGICAL BLOCKS PER
/// PHYSICAL BLOCK EXPONENT from the physical block size (3 for 512-byte blocks on 4 KiB),
/// lowest aligned LBA 0, LBPME and LBPRZ when thin provisioned (unmapped blocks read as
/// zeroes).
pub fn read_capacity_16(
    num_blocks: u64,
    block_size: u32,
    physical_block_size: u32,
    thin: bool,
) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&num_blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&block_size.to_be_bytes());
    let ratio = physical_block_size / block_size.max(1);
    if ratio.is_power_of_two() {
        d[13] = (ratio.trailing_zeros() as u8).min(0x0F);
    }
    if thin {
        d[14] = 0x80 | 0x40;
    }
    d
}

/// GET LBA STATUS parameter data (SBC-3 5.8.2) with one descriptor from `lba` to the end
/// (capped at 2^32-1 blocks), provisioning status 0 ("mapped or unknown": the stores do not
/// track allocation), or 1 (deallocated) when the whole unit is known to be (`deallocated`:
/// block erased and not written since).
pub fn lba_status(lba: u64, num_blocks: u64, deallocated: bool) -> Vec<u8> {
    let blocks = u32::try_from(num_blocks.saturating_sub(lba)).unwrap_or(u32::MAX);
    let mut d = vec![0u8; 24];
    d[0..4].copy_from_slice(&20u32.to_be_bytes());
    d[8..16].copy_from_slice(&lba.to_be_bytes());
    d[16..20].copy_from_slice(&blocks.to_be_bytes());
    d[20] = u8::from(deallocated);
    d
}

/// Block Limits VPD page B0h (SBC-3 6.6.3), page length 3Ch.
pub fn vpd_block_limits(limits: &BlockLimits, thin: bool) -> Vec<u8> {
    let mut d = vec![0u8; 64];
    d[1] = 0xB0;
    d[3] = 0x3C;
    // WSNZ=0: WRITE SAME with zero blocks writes through the last LBA.
    d[5] = limits.max_compare_and_write_blocks;
    d[6..8].copy_from_slice(&limits.optimal_granularity.to_be_bytes());
    d[8..12].copy_from_slice(&limits.max_transfer_blocks.to_be_bytes());
    if thin {
        d[20..24].copy_from_slice(&limits.max_unmap_blocks.to_be_bytes());
        d[24..28].copy_from_slice(&limits.max_unmap_descriptors.to_be_bytes());
        d[28..32].copy_from_slice(&u32::from(limits.optimal_granularity).to_be_bytes());
    }
    d[36..44].copy_from_slice(&limits.max_write_same_blocks.to_be_bytes());
    // SBC-4: MAXIMUM ATOMIC TRANSFER LENGTH, ATOMIC ALIGNMENT, ATOMIC TRANSFER LENGTH
    // GRANULARITY; no atomic boundaries (the two fields after them stay 0).
    d[44..48].copy_from_slice(&limits.max_atomic_transfer_blocks.to_be_bytes());
    d[48..52].copy_from_slice(&limits.atomic_granularity.to_be_bytes());
    d[52..56].copy_from_slice(&limits.atomic_granularity.to_be_bytes());
    d
}

/// READ DEFECT DATA parameter data (SBC-3 5.19, 5.20): a logical unit on a file or block
/// device has no defect list of its own, so the lists asked for are valid (PLISTV / GLISTV)
/// and empty, in the format asked for. (10): 4-byte header; (12): 8-byte header, GENERATION
/// CODE 0 (not supported).
pub fn read_defect_data(twelve: bool, req_plist: bool, req_glist: bool, format: u8) -> Vec<u8> {
    let mut d = vec![0u8; if twelve { 8 } else { 4 }];
    d[1] = (u8::from(req_plist) << 4) | (u8::from(req_glist) << 3) | (format & 0x07);
    d
}

/// Block Device Characteristics VPD page B1h (SBC-3 6.6.2): non-rotating medium; with
/// SANITIZE BLOCK ERASE (`block_erase`, thin LUNs) WABEREQ 01b: a read of a block erased and
/// not written since succeeds (it returns zeroes, LBPRZ) (SBC-4 6.6.2). WACEREQ 00b: no
/// CRYPTO ERASE.
pub fn vpd_block_device_characteristics(block_erase: bool) -> Vec<u8> {
    let mut d = vec![0u8; 64];
    d[1] = 0xB1;
    d[3] = 0x3C;
    d[5] = 0x01;
    if block_erase {
        d[7] = 0x40;
    }
    d
}

/// Logical Block Provisioning VPD page B2h (SBC-3 6.6.4): when thin, UNMAP and WRITE SAME
/// (10/16) with UNMAP are supported, unmapped blocks read as zeroes, provisioning type thin.
/// THRESHOLD EXPONENT is non-zero only for a LUN with a soft threshold
/// ([`super::thin::threshold_exponent`]); 0 says "no thresholds".
pub fn vpd_logical_block_provisioning(thin: bool, threshold_exponent: u8) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[1] = 0xB2;
    d[3] = 0x04;
    if thin {
        d[4] = threshold_exponent;
        d[5] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU LBPWS LBPWS10 LBPRZ
        d[6] = 0x02;
    }
    d
}

/// Maps a store failure on the range starting at `lba` to sense data (never a panic).
pub(crate) fn store_error(e: StoreError, lba: u64, writing: bool) -> Sense {
    match e {
        // SBC-3 4.7.3.6: a thin LUN that cannot allocate space for a write answers DATA
        // PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT, not a medium error: the disk is
        // healthy, the pool needs space (or the write goes to blocks already allocated).
        StoreError::NoSpace(err) if writing => {
            warn!(lba, error = %err, "backing store is full: write refused");
            Sense::space_allocation_failed(lba)
        }
        StoreError::Io(err) | StoreError::NoSpace(err) => {
            warn!(lba, writing, error = %err, "medium error");
            if writing {
                Sense::write_error(lba)
            } else {
                Sense::unrecovered_read_error(lba)
            }
        }
        StoreError::OutOfRange { .. } => Sense::lba_out_of_range(),
        StoreError::ReadOnly => Sense::write_protected(),
        StoreError::Closed => Sense::aborted_command(),
    }
}

/// The leading whole blocks of `data`, at most `max_bytes`. Data-Out shorter than the CDB
/// asks for (iSCSI overflow: EDTL < transfer length) transfers only what arrived; the
/// transport refuses a shorter EDTL that is not whole blocks (`Command::data_out_unit`), so
/// nothing is dropped here but defensively.
fn whole_blocks(data: &Bytes, max_bytes: u64, block_size: u32) -> Bytes {
    let bs = u64::from(block_size);
    let len = (data.len() as u64).min(max_bytes) / bs * bs;
    data.slice(..len as usize)
}

/// Offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn write_mode(lu: &LogicalUnit, fua: bool) -> WriteMode {
    // WCE=0 means every write is stable before status (SBC-3 6.4.5, caching page).
    if fua || !lu.settings.write_cache {
        WriteMode::Durable
    } else {
        WriteMode::Cached
    }
}

/// Runs an SBC command whose [`check`] passed. `data_out` is the Data-Out received,
/// `expected_len` the iSCSI ExpectedDataTransferLength.
pub(crate) async fn execute(
    lu: &LogicalUnit,
    cmd: &Command,
    data_out: Bytes,
    expected_len: u32,
) -> Result<Bytes, Sense> {
    let bs = lu.settings.block_size;
    let num_blocks = lu.num_blocks();
    match *cmd {
        Command::ReadCapacity10 => Ok(read_capacity_10(num_blocks, bs).into()),
        Command::ReadCapacity16 { .. } => Ok(read_capacity_16(
            num_blocks,
            bs,
            lu.settings.physical_block_size,
            lu.settings.thin_provisioning,
        )
        .into()),
        Command::GetLbaStatus { lba, .. } => {
            Ok(lba_status(lba, num_blocks, lu.all_deallocated()).into())
        }
        Command::Read(x) => {
            let _shared = lu.write_gate.read().await;
            read(lu, x.lba, x.blocks).await
        }
        Command::ReadDefectData {
            twelve,
            req_plist,
            req_glist,
            format,
            ..
        } => Ok(read_defect_data(twelve, req_plist, req_glist, format).into()),
        Command::Write(x) => {
            write(lu, x, &data_out).await?;
            Ok(Bytes::new())
        }
        Command::OrWrite(x) => {
            or_write(lu, x, &data_out).await?;
            Ok(Bytes::new())
        }
        Command::WriteAtomic(x) => {
            write_atomic(lu, x, &data_out).await?;
            Ok(Bytes::new())
        }
        Command::WriteAndVerify { xfer, byte_check } => {
            let data = write(lu, Transfer { fua: true, ..xfer }, &data_out).await?;
            let blocks = (data.len() / bs as usize) as u32;
            let medium = read(lu, xfer.lba, blocks).await?;
            if let Some(at) = byte_check
                .then(|| first_difference(&data, &medium))
                .flatten()
            {
                return Err(Sense::miscompare(at as u64));
            }
            Ok(Bytes::new())
        }
        Command::Verify {
            lba,
            blocks,
            byte_check,
            ..
        } => {
            let _shared = lu.write_gate.read().await;
            verify(lu, lba, blocks, byte_check, &data_out).await?;
            Ok(Bytes::new())
        }
        Command::SynchronizeCache { lba, .. } => {
            lu.store
                .flush()
                .await
                .map_err(|e| store_error(e, lba, true))?;
            Ok(Bytes::new())
        }
        // Nothing to stage: the stores have no cache this command could fill; GOOD status
        // says the blocks were not all made resident (SBC-3 5.9).
        Command::PreFetch { .. } => Ok(Bytes::new()),
        Command::WriteSame(ws) => {
            write_same(lu, ws, &data_out, expected_len).await?;
            Ok(Bytes::new())
        }
        Command::Unmap { param_len } => {
            unmap(lu, &data_out, param_len).await?;
            Ok(Bytes::new())
        }
        Command::CompareAndWrite {
            lba, blocks, fua, ..
        } => {
            compare_and_write(lu, lba, blocks, fua, &data_out, expected_len).await?;
            Ok(Bytes::new())
        }
        _ => Err(Sense::invalid_opcode()),
    }
}

pub(crate) async fn read(lu: &LogicalUnit, lba: u64, blocks: u32) -> Result<Bytes, Sense> {
    let bs = u64::from(lu.settings.block_size);
    if blocks == 0 {
        return Ok(Bytes::new());
    }
    lu.store
        .read(lba * bs, (u64::from(blocks) * bs) as usize)
        .await
        .map_err(|e| store_error(e, lba, false))
}

/// Writes the whole blocks received; returns them.
pub(crate) async fn write(lu: &LogicalUnit, x: Transfer, data_out: &Bytes) -> Result<Bytes, Sense> {
    let bs = lu.settings.block_size;
    let data = whole_blocks(data_out, u64::from(x.blocks) * u64::from(bs), bs);
    if data.is_empty() {
        return Ok(data);
    }
    let _shared = lu.write_gate.read().await;
    lu.store
        .write(x.lba * u64::from(bs), data.clone(), write_mode(lu, x.fua))
        .await
        .map_err(|e| store_error(e, x.lba, true))?;
    Ok(data)
}

/// ORWRITE(16) (SBC-3 5.11): reads the blocks, ORs the Data-Out received into them and writes
/// the result, atomically with respect to every other write to the logical unit (the write
/// gate held exclusively, as COMPARE AND WRITE does).
async fn or_write(lu: &LogicalUnit, x: Transfer, data_out: &Bytes) -> Result<(), Sense> {
    let bs = lu.settings.block_size;
    let data = whole_blocks(data_out, u64::from(x.blocks) * u64::from(bs), bs);
    if data.is_empty() {
        return Ok(());
    }
    let blocks = (data.len() / bs as usize) as u32;
    let _exclusive = lu.write_gate.write().await;
    let medium = read(lu, x.lba, blocks).await?;
    let mut merged = BytesMut::from(&medium[..]);
    for (m, d) in merged.iter_mut().zip(data.iter()) {
        *m |= d;
    }
    lu.store
        .write(
            x.lba * u64::from(bs),
            merged.freeze(),
            write_mode(lu, x.fua),
        )
        .await
        .map_err(|e| store_error(e, x.lba, true))
}

/// WRITE ATOMIC(16) (SBC-4 5.48): the whole transfer or nothing. A Data-Out shorter than
/// the transfer (iSCSI EDTL below it) is refused before anything is written; the blocks go
/// to the store in one write (one replication message: MAXIMUM ATOMIC TRANSFER LENGTH is
/// 1 MiB) with the write gate held exclusively, so no read, write or other atomic command of
/// the logical unit runs while they change (SBC-4 4.29).
async fn write_atomic(lu: &LogicalUnit, x: Transfer, data_out: &Bytes) -> Result<(), Sense> {
    let len = u64::from(x.blocks) * u64::from(lu.settings.block_size);
    if len == 0 {
        return Ok(());
    }
    let Some(data) = data_out.get(..len as usize) else {
        return Err(Sense::invalid_field_in_command_iu());
    };
    let data = data_out.slice_ref(data);
    let _exclusive = lu.write_gate.write().await;
    lu.store
        .write(
            x.lba * u64::from(lu.settings.block_size),
            data,
            write_mode(lu, x.fua),
        )
        .await
        .map_err(|e| store_error(e, x.lba, true))
}

/// VERIFY (SBC-3 5.30): reads the range (medium verification) and, with BYTCHK, compares it
/// with the Data-Out received; a difference is MISCOMPARE with the offset in INFORMATION.
async fn verify(
    lu: &LogicalUnit,
    lba: u64,
    blocks: u32,
    byte_check: ByteCheck,
    data_out: &Bytes,
) -> Result<(), Sense> {
    let bs = lu.settings.block_size;
    let bs64 = u64::from(bs);
    match byte_check {
        ByteCheck::MediumOnly => {
            let chunk_blocks = (CHUNK_BYTES / bs64).max(1);
            let mut done = 0u64;
            while done < u64::from(blocks) {
                let n = chunk_blocks.min(u64::from(blocks) - done);
                read(lu, lba + done, n as u32).await?;
                done += n;
            }
            Ok(())
        }
        ByteCheck::Full => {
            let data = whole_blocks(data_out, u64::from(blocks) * bs64, bs);
            let medium = read(lu, lba, (data.len() as u64 / bs64) as u32).await?;
            match first_difference(&data, &medium) {
                Some(at) => Err(Sense::miscompare(at as u64)),
                None => Ok(()),
            }
        }
        ByteCheck::SingleBlock => {
            let Some(pattern) = data_out.get(..bs as usize) else {
                return Ok(());
            };
            let medium = read(lu, lba, blocks).await?;
            for (i, block) in medium.chunks(bs as usize).enumerate() {
                if let Some(at) = first_difference(pattern, block) {
                    return Err(Sense::miscompare((i * bs as usize + at) as u64));
                }
            }
            Ok(())
        }
    }
}

/// WRITE SAME (SBC-3 5.41, 5.42): one block of Data-Out (zeroes with NDOB) written to every
/// block of the range; with UNMAP set the range is unmapped instead, whatever the block
/// holds: the device server "should" unmap (SBC-4 table 237 [e]; it may also write), and
/// unmapped blocks then read as zeroes (LBPRZ=1), as the initiator asked.
async fn write_same(
    lu: &LogicalUnit,
    ws: WriteSame,
    data_out: &Bytes,
    expected_len: u32,
) -> Result<(), Sense> {
    let bs = lu.settings.block_size;
    let bs64 = u64::from(bs);
    let pattern = if ws.ndob {
        Bytes::from(vec![0u8; bs as usize])
    } else {
        // The Data-Out buffer must be exactly one logical block (libiscsi
        // WriteSame*.InvalidDataOutSize); the CDB and the iSCSI EDTL disagree otherwise.
        if expected_len != bs || data_out.len() < bs as usize {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x24, 0x00));
        }
        data_out.slice(..bs as usize)
    };
    let blocks = write_same_blocks(ws, lu.num_blocks());
    if blocks == 0 {
        return Ok(());
    }
    let offset = ws.lba * bs64;
    let len = blocks * bs64;
    let _shared = lu.write_gate.read().await;
    if ws.unmap {
        return lu
            .store
            .discard(offset, len)
            .await
            .map_err(|e| store_error(e, ws.lba, true));
    }
    let chunk_blocks = (CHUNK_BYTES / bs64).clamp(1, blocks);
    let mut chunk = BytesMut::with_capacity((chunk_blocks * bs64) as usize);
    for _ in 0..chunk_blocks {
        chunk.extend_from_slice(&pattern);
    }
    let chunk = chunk.freeze();
    let mode = write_mode(lu, false);
    let mut done = 0u64;
    while done < blocks {
        let n = chunk_blocks.min(blocks - done);
        lu.store
            .write(
                offset + done * bs64,
                chunk.slice(..(n * bs64) as usize),
                mode,
            )
            .await
            .map_err(|e| store_error(e, ws.lba + done, true))?;
        done += n;
    }
    Ok(())
}

/// One UNMAP block descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapRange {
    pub lba: u64,
    pub blocks: u32,
}

/// Parses and validates UNMAP parameter data (SBC-3 5.28): length errors, descriptor count,
/// total blocks and ranges, all before anything is unmapped.
pub fn parse_unmap(
    params: &[u8],
    num_blocks: u64,
    limits: &BlockLimits,
) -> Result<Vec<UnmapRange>, Sense> {
    if params.is_empty() {
        return Ok(Vec::new());
    }
    if params.len() < 8 {
        return Err(Sense::parameter_list_length_error());
    }
    // A partial trailing descriptor is ignored.
    let bd_len = usize::from(u16::from_be_bytes([params[2], params[3]]));
    let count = bd_len.min(params.len() - 8) / 16;
    if count > limits.max_unmap_descriptors as usize {
        return Err(Sense::invalid_field_in_parameter_list(2, None));
    }
    let mut total = 0u64;
    let mut ranges = Vec::with_capacity(count);
    for (i, d) in params[8..8 + count * 16].chunks_exact(16).enumerate() {
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&d[..8]);
        let range = UnmapRange {
            lba: u64::from_be_bytes(lba),
            blocks: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        };
        check_range(range.lba, u64::from(range.blocks), num_blocks)?;
        total += u64::from(range.blocks);
        if total > u64::from(limits.max_unmap_blocks) {
            return Err(Sense::invalid_field_in_parameter_list(
                (8 + i * 16 + 8) as u16,
                None,
            ));
        }
        ranges.push(range);
    }
    Ok(ranges)
}

async fn unmap(lu: &LogicalUnit, data_out: &Bytes, param_len: u32) -> Result<(), Sense> {
    let params = &data_out[..data_out.len().min(param_len as usize)];
    let ranges = parse_unmap(params, lu.num_blocks(), &lu.limits)?;
    let bs = u64::from(lu.settings.block_size);
    let _shared = lu.write_gate.read().await;
    for r in ranges.iter().filter(|r| r.blocks > 0) {
        lu.store
            .discard(r.lba * bs, u64::from(r.blocks) * bs)
            .await
            .map_err(|e| store_error(e, r.lba, true))?;
    }
    Ok(())
}

/// COMPARE AND WRITE (SBC-3 5.2): compares the first half of the Data-Out with the medium
/// and, if equal, writes the second half; atomic against every other write to the LU.
async fn compare_and_write(
    lu: &LogicalUnit,
    lba: u64,
    blocks: u8,
    fua: bool,
    data_out: &Bytes,
    expected_len: u32,
) -> Result<(), Sense> {
    let bs = lu.settings.block_size as usize;
    let half = usize::from(blocks) * bs;
    let length_field = Sense::invalid_field_in_cdb(13, None);
    if blocks == 0 {
        // Nothing to compare; Data-Out beyond the largest valid buffer is refused.
        let max = 2 * usize::from(lu.limits.max_compare_and_write_blocks) * bs;
        return if expected_len as usize > max {
            Err(length_field)
        } else {
            Ok(())
        };
    }
    if expected_len as usize != 2 * half || data_out.len() < 2 * half {
        return Err(length_field);
    }
    let _exclusive = lu.write_gate.write().await;
    let medium = read(lu, lba, u32::from(blocks)).await?;
    if let Some(at) = first_difference(&data_out[..half], &medium) {
        return Err(Sense::miscompare(at as u64));
    }
    lu.store
        .write(
            lba * bs as u64,
            data_out.slice(half..2 * half),
            write_mode(lu, fua),
        )
        .await
        .map_err(|e| store_error(e, lba, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{opcode, parse};
    use crate::scsi::LunIdentity;

    #[test]
    fn full_backing_store_is_data_protect_not_a_medium_error() {
        let io = StoreError::from_errno;
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let s = store_error(io(errno), 77, true);
            assert_eq!((s.key, s.asc, s.ascq), (SenseKey::DataProtect, 0x27, 0x07));
            assert_eq!(s.info, Some(77));
            let b = s.to_fixed_array();
            assert_eq!((b[0], b[2], b[12], b[13]), (0xF0, 0x07, 0x27, 0x07));
            assert_eq!(&b[3..7], &[0, 0, 0, 77]);
        }
        // A NoSpace built from the io::Error directly (`?`) maps the same way.
        let e: StoreError = std::io::Error::from_raw_os_error(libc::ENOSPC).into();
        let s = store_error(e, 1, true);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::DataProtect, 0x27, 0x07));
        // Reads never allocate: a NoSpace there (cannot happen) stays a read error.
        let s = store_error(io(libc::ENOSPC), 5, false);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::MediumError, 0x11, 0x00));
        // Other errors of a write stay medium errors; read-only stays 27/00.
        let s = store_error(io(libc::EFBIG), 5, true);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::MediumError, 0x0C, 0x00));
        let s = store_error(StoreError::ReadOnly, 5, true);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::DataProtect, 0x27, 0x00));
        let s = store_error(io(libc::EIO), 5, true);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::MediumError, 0x0C, 0x00));
        let s = store_error(io(libc::EIO), 5, false);
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::MediumError, 0x11, 0x00));
    }

    fn settings(read_only: bool, thin: bool) -> LunSettings {
        LunSettings {
            block_size: 512,
            physical_block_size: 4096,
            read_only,
            identity: LunIdentity {
                vendor: "TWINSAN".into(),
                product: "disk".into(),
                revision: "0001".into(),
                serial: "s".into(),
                naa: vec![0x60; 16],
                t10_vendor_specific: "x".into(),
                target_port_name: "iqn.x,t,0x0001".into(),
                relative_port: 1,
                port_group: None,
                compat: None,
            },
            write_cache: true,
            thin_provisioning: thin,
            thin_threshold: None,
            sanitize_rate: 0,
            removable: false,
        }
    }

    fn cdb16(op: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn run_check(s: &LunSettings, nb: u64, cdb: &[u8]) -> Result<(), Sense> {
        let cmd = parse(cdb)?;
        check(s, &BlockLimits::for_block_size(512), nb, &cmd, cdb)
    }

    #[test]
    fn range_rule() {
        assert!(check_range(0, 0, 0).is_ok());
        assert!(check_range(99, 1, 100).is_ok());
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(100, 1, 100).is_err());
        assert!(check_range(101, 0, 100).is_err());
        assert!(check_range(u64::MAX, 2, 100).is_err());
    }

    #[test]
    fn read_beyond_end_is_lba_out_of_range() {
        let s = settings(false, false);
        for (lba, n) in [(100u64, 1u32), (99, 2), (u64::MAX, 1), (0x8000_0000, 0)] {
            let e = run_check(&s, 100, &cdb16(opcode::READ_16, 0, lba, n)).unwrap_err();
            assert_eq!((e.key, e.asc, e.ascq), (SenseKey::IllegalRequest, 0x21, 0));
        }
        assert!(run_check(&s, 100, &cdb16(opcode::READ_16, 0, 99, 1)).is_ok());
    }

    #[test]
    fn write_on_read_only_is_write_protected() {
        let s = settings(true, true);
        for op in [
            opcode::WRITE_16,
            opcode::WRITE_AND_VERIFY_16,
            opcode::WRITE_SAME_16,
            opcode::COMPARE_AND_WRITE,
        ] {
            let e = run_check(&s, 100, &cdb16(op, 0, 0, 1)).unwrap_err();
            assert_eq!((e.key, e.asc), (SenseKey::DataProtect, 0x27), "op {op:#x}");
        }
        // WRITE SAME with UNMAP on a read-only LU: write protected, not "unsupported".
        let e = run_check(
            &settings(true, false),
            100,
            &cdb16(opcode::WRITE_SAME_16, 8, 0, 1),
        )
        .unwrap_err();
        assert_eq!(e.key, SenseKey::DataProtect);
        assert!(run_check(&s, 100, &cdb16(opcode::READ_16, 0, 0, 1)).is_ok());
    }

    #[test]
    fn unmap_needs_thin_provisioning() {
        let mut c = [0u8; 10];
        c[0] = opcode::UNMAP;
        let e = run_check(&settings(false, false), 100, &c).unwrap_err();
        assert_eq!(e, Sense::invalid_opcode());
        assert!(run_check(&settings(false, true), 100, &c).is_ok());
        let e = run_check(
            &settings(false, false),
            100,
            &cdb16(opcode::WRITE_SAME_16, 8, 0, 1),
        )
        .unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 1));
    }

    #[test]
    fn write_same_zero_blocks_and_limits() {
        let s = settings(false, true);
        let max = BlockLimits::for_block_size(512).max_write_same_blocks;
        // Zero blocks: through the last LBA, within MAXIMUM WRITE SAME LENGTH (WSNZ=0).
        assert!(run_check(&s, 100, &cdb16(opcode::WRITE_SAME_16, 0, 0, 0)).is_ok());
        assert!(run_check(&s, 100, &cdb16(opcode::WRITE_SAME_16, 0, 100, 0)).is_ok());
        assert!(run_check(&s, max, &cdb16(opcode::WRITE_SAME_16, 0, 0, 0)).is_ok());
        let e = run_check(&s, max + 1, &cdb16(opcode::WRITE_SAME_16, 0, 0, 0)).unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 10));
        assert!(run_check(&s, max + 1, &cdb16(opcode::WRITE_SAME_16, 0, 1, 0)).is_ok());
        let e = run_check(&s, 100, &cdb16(opcode::WRITE_SAME_16, 0, 101, 0)).unwrap_err();
        assert_eq!(e.asc, 0x21);
        let big = BlockLimits::for_block_size(512).max_write_same_blocks as u32 + 1;
        let e = run_check(&s, u64::MAX, &cdb16(opcode::WRITE_SAME_16, 0, 0, big)).unwrap_err();
        assert_eq!(e.asc, 0x24);
    }

    #[test]
    fn transfer_longer_than_block_limits_is_invalid_field() {
        let s = settings(false, false);
        let max = BlockLimits::for_block_size(512).max_transfer_blocks;
        let e =
            run_check(&s, u64::MAX / 1024, &cdb16(opcode::WRITE_16, 0, 0, max + 1)).unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x24, 10));
        assert!(run_check(&s, u64::MAX / 1024, &cdb16(opcode::WRITE_16, 0, 0, max)).is_ok());
    }

    #[test]
    fn capacity_pages() {
        let d = read_capacity_10(0x1_0000_0001, 512);
        assert_eq!(d, [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]);
        let d = read_capacity_10(2048, 4096);
        assert_eq!(d, [0, 0, 0x07, 0xFF, 0, 0, 0x10, 0]);
        let d = read_capacity_16(2048, 512, 4096, true);
        assert_eq!(d.len(), 32);
        assert_eq!(&d[..8], &2047u64.to_be_bytes());
        assert_eq!(d[13], 3, "512e: 8 logical blocks per physical block");
        assert_eq!(d[14], 0xC0);
        assert_eq!(read_capacity_16(2048, 512, 4096, false)[14], 0);
        assert_eq!(read_capacity_16(2048, 512, 512, false)[13], 0);
        assert_eq!(read_capacity_16(2048, 4096, 4096, false)[13], 0);
        assert_eq!(read_capacity_16(2048, 512, 65536, false)[13], 7);
    }

    #[test]
    fn block_limits_page() {
        let l = BlockLimits::for_block_size(512);
        let d = vpd_block_limits(&l, true);
        assert_eq!((d.len(), d[1], d[3]), (64, 0xB0, 0x3C));
        let max_unmap = u32::from_be_bytes([d[20], d[21], d[22], d[23]]);
        assert!(max_unmap > 0 && max_unmap <= 1 << 20);
        assert_eq!(u32::from_be_bytes([d[24], d[25], d[26], d[27]]), 256);
        let d = vpd_block_limits(&l, false);
        assert!(d[20..28].iter().all(|&b| b == 0));
        assert_eq!(vpd_logical_block_provisioning(true, 0)[5], 0xE4);
        assert_eq!(vpd_logical_block_provisioning(true, 0)[4], 0);
        assert_eq!(vpd_logical_block_provisioning(true, 3)[4], 3);
        assert_eq!(
            vpd_logical_block_provisioning(false, 3),
            [0, 0xB2, 0, 4, 0, 0, 0, 0]
        );
        assert_eq!(vpd_block_device_characteristics(false)[5], 1);
        assert_eq!(vpd_block_device_characteristics(false)[7], 0);
        assert_eq!(
            vpd_block_device_characteristics(true)[7],
            0x40,
            "WABEREQ 01b"
        );
    }

    fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
        let mut p = vec![0u8; 8];
        let bd = (ranges.len() * 16) as u16;
        p[0..2].copy_from_slice(&(bd + 6).to_be_bytes());
        p[2..4].copy_from_slice(&bd.to_be_bytes());
        for &(lba, n) in ranges {
            p.extend_from_slice(&lba.to_be_bytes());
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&[0; 4]);
        }
        p
    }

    #[test]
    fn unmap_parameter_list() {
        let l = BlockLimits::for_block_size(512);
        assert!(parse_unmap(&[], 100, &l).unwrap().is_empty());
        assert_eq!(
            parse_unmap(&[0; 7], 100, &l).unwrap_err(),
            Sense::parameter_list_length_error()
        );
        assert!(parse_unmap(&unmap_params(&[]), 100, &l).unwrap().is_empty());
        let r = parse_unmap(&unmap_params(&[(0, 1), (100, 0), (5, 95)]), 100, &l).unwrap();
        assert_eq!(r.len(), 3);
        let e = parse_unmap(&unmap_params(&[(0, 1), (100, 1)]), 100, &l).unwrap_err();
        assert_eq!(e.asc, 0x21);
        let many: Vec<_> = (0..257).map(|i| (i, 0)).collect();
        let e = parse_unmap(&unmap_params(&many), 1000, &l).unwrap_err();
        assert_eq!(e.asc, 0x26);
        let huge = l.max_unmap_blocks;
        let e =
            parse_unmap(&unmap_params(&[(0, huge), (huge as u64, 1)]), u64::MAX, &l).unwrap_err();
        assert_eq!((e.asc, e.sks.unwrap().byte), (0x26, 32));
        // A partial trailing descriptor is ignored.
        let mut p = unmap_params(&[(1, 1)]);
        p[3] += 8;
        p.extend_from_slice(&[0xFF; 8]);
        assert_eq!(parse_unmap(&p, 100, &l).unwrap().len(), 1);
    }

    #[test]
    fn whole_blocks_truncates() {
        let d = Bytes::from(vec![1u8; 1300]);
        assert_eq!(whole_blocks(&d, 4096, 512).len(), 1024);
        assert_eq!(whole_blocks(&d, 512, 512).len(), 512);
        assert_eq!(whole_blocks(&d.slice(..200), 512, 512).len(), 0);
    }
}
