//! Full-feature-phase PDU builders and the Data-Out gathering state machine (RFC 7143 §11.3-§11.8).
//!
//! Pure code: turns SCSI results into Data-In / SCSI Response PDUs and tracks which Data-Out
//! a write still needs. StatSN, ExpCmdSN and MaxCmdSN are stamped by the connection's writer
//! when a PDU is sent, so nothing here knows about sequence numbers but DataSN and R2TSN.

pub use super::pdu::Residual;
use super::pdu::{
    DataInBuilder, DataOut, Pdu, R2tBuilder, RejectBuilder, ScsiCommand, ScsiResponseBuilder,
    RESERVED_TAG,
};
use crate::scsi::{ScsiResponse, Status};
use crate::store::AlignedBuf;
use bytes::{Bytes, BytesMut};

/// Fields of a SCSI Command PDU (§11.3).
#[derive(Debug, Clone)]
pub struct ScsiCommandHeader {
    pub itt: u32,
    pub lun: u64,
    pub read: bool,
    pub write: bool,
    pub final_bit: bool,
    pub attr: u8,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub cdb: Bytes,
}

impl ScsiCommandHeader {
    /// Reads the header; the CDB is the 16 bytes at 32 plus any extended-CDB AHS (§11.2.2.3).
    pub fn parse(pdu: &Pdu) -> Result<ScsiCommandHeader, &'static str> {
        let cmd = ScsiCommand(pdu);
        let mut cdb = BytesMut::from(&cmd.cdb()[..]);
        let mut ahs = cmd.ahs();
        while ahs.len() >= 3 {
            let len = u16::from_be_bytes([ahs[0], ahs[1]]) as usize;
            let kind = ahs[2];
            let total = (3 + len + 3) & !3;
            if ahs.len() < 3 + len {
                return Err("AHS length exceeds the AHS segment");
            }
            if kind == 1 && len > 1 {
                cdb.extend_from_slice(&ahs[4..3 + len]);
            }
            ahs = &ahs[total.min(ahs.len())..];
        }
        Ok(ScsiCommandHeader {
            itt: cmd.itt(),
            lun: cmd.lun(),
            read: cmd.read(),
            write: cmd.write(),
            final_bit: cmd.final_bit(),
            attr: cmd.attr(),
            expected_len: cmd.expected_data_transfer_length(),
            cmd_sn: cmd.cmd_sn(),
            cdb: cdb.freeze(),
        })
    }
}

/// Limits that shape Data-In sequences.
#[derive(Debug, Clone, Copy)]
pub struct DataInLimits {
    /// The initiator's MaxRecvDataSegmentLength: largest data segment we may send.
    pub max_xmit_segment: u32,
    /// MaxBurstLength: the F bit closes each sequence of at most this many bytes.
    pub max_burst: u32,
}

/// Builds the PDUs answering one command: Data-In PDUs (status phase-collapsed into the last
/// one when the command succeeded, §11.7.4), or a SCSI Response.
///
/// `data_out_len` is the number of bytes the command consumed from the initiator (writes),
/// used for the residual of write commands; reads compute it from the Data-In produced.
pub fn build_response(
    cmd: &ScsiCommandHeader,
    resp: ScsiResponse,
    limits: DataInLimits,
    write_residual: Option<Residual>,
) -> Vec<Pdu> {
    let mut out = Vec::new();
    let produced = resp.data_in.len() as u64;
    let read_residual = Residual::of(cmd.expected_len, produced);
    let to_send = if cmd.read {
        resp.data_in
            .slice(..(produced.min(cmd.expected_len as u64) as usize))
    } else {
        Bytes::new()
    };
    let residual = if cmd.read {
        read_residual
    } else if cmd.write {
        write_residual.unwrap_or(Residual::None)
    } else {
        Residual::of(cmd.expected_len, 0)
    };
    let collapse = resp.status == Status::Good && resp.sense.is_none() && !to_send.is_empty();
    let seg = limits.max_xmit_segment.max(512) as usize;
    let burst = limits.max_burst.max(512) as usize;
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    while offset < to_send.len() {
        let burst_end = ((offset / burst) + 1) * burst;
        let end = (offset + seg).min(to_send.len()).min(burst_end);
        let last = end == to_send.len();
        let final_bit = last || end == burst_end;
        let mut b = DataInBuilder::new(cmd.itt)
            .final_bit(final_bit)
            .data_sn(data_sn)
            .buffer_offset(offset as u32);
        if last && collapse {
            b = b.status(resp.status as u8).residual(residual);
        }
        out.push(b.data(to_send.slice(offset..end)).build());
        data_sn += 1;
        offset = end;
    }
    if !collapse {
        let mut b = ScsiResponseBuilder::new(cmd.itt)
            .status(resp.status as u8)
            .exp_data_sn(data_sn) // Data-In PDUs sent
            .residual(residual);
        if let Some(sense) = resp.sense {
            b = b.sense(&sense);
        }
        out.push(b.build());
    }
    out
}

/// A Reject PDU carrying the offending header (§11.17).
pub fn reject(reason: super::pdu::RejectReason, bhs: &[u8; 48]) -> Pdu {
    RejectBuilder::new(reason, bhs).build()
}

/// Why a Data-Out PDU is not acceptable (the connection answers with Reject and drops).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("Data-Out DataSN {got} where {expected} was expected")]
    DataSn { expected: u32, got: u32 },
    #[error("Data-Out for offset {offset} length {len} is outside its sequence [{start}, {end})")]
    OutsideSequence {
        offset: u32,
        len: u32,
        start: u32,
        end: u32,
    },
    #[error("Data-Out carries target transfer tag {0:#x} that no open R2T has")]
    UnknownTtt(u32),
    #[error("unsolicited Data-Out not allowed here")]
    UnsolicitedNotAllowed,
    #[error("sequence ended (F bit) after {got} of {expected} bytes")]
    ShortSequence { expected: u32, got: u32 },
}

/// One open R2T (§11.8).
#[derive(Debug, Clone)]
struct OpenR2t {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: u32,
}

/// Tracks the Data-Out of one write command: immediate data, the unsolicited burst and the
/// solicited (R2T) sequences, and produces the R2Ts to send (§4.2.2.2 / §11.7-§11.8).
#[derive(Debug)]
pub struct WriteGather {
    pub itt: u32,
    pub lun: u64,
    /// Bytes the command will consume (min of the CDB's need and ExpectedDataTransferLength).
    pub transfer_len: u32,
    /// Page-aligned (and pooled), so an O_DIRECT store writes it without another copy. It is
    /// recycled memory: bytes no Data-Out covered are zeroed by `take_data`.
    buf: AlignedBuf,
    /// Byte ranges of `buf` written so far: sorted, disjoint, not adjacent.
    covered: Vec<(u32, u32)>,
    received: u32,
    /// Unsolicited data is accepted in [0, unsolicited_end).
    unsolicited_end: u32,
    unsolicited_open: bool,
    unsolicited_next_sn: u32,
    next_r2t_offset: u32,
    r2t_sn: u32,
    open: Vec<OpenR2t>,
    max_burst: u32,
    max_outstanding: u32,
}

impl WriteGather {
    /// `expected_len` is the initiator's ExpectedDataTransferLength, `need` what the CDB uses.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cmd: &ScsiCommandHeader,
        need: u32,
        immediate: Bytes,
        first_burst: u32,
        initial_r2t: bool,
        max_burst: u32,
        max_outstanding: u32,
    ) -> WriteGather {
        let transfer_len = need.min(cmd.expected_len);
        let imm_len = immediate.len() as u32;
        let unsolicited_end = if cmd.final_bit || initial_r2t {
            imm_len
        } else {
            first_burst.min(cmd.expected_len).max(imm_len)
        };
        let mut buf = AlignedBuf::recycled(transfer_len as usize);
        let take = imm_len.min(transfer_len) as usize;
        buf.as_mut_slice()[..take].copy_from_slice(&immediate[..take]);
        let mut covered = Vec::new();
        cover(&mut covered, 0, take as u32);
        WriteGather {
            itt: cmd.itt,
            lun: cmd.lun,
            transfer_len,
            buf,
            covered,
            received: take as u32,
            unsolicited_end,
            unsolicited_open: !cmd.final_bit && !initial_r2t && unsolicited_end > imm_len,
            unsolicited_next_sn: 0,
            next_r2t_offset: unsolicited_end.min(transfer_len),
            r2t_sn: 0,
            open: Vec::new(),
            max_burst: max_burst.max(512),
            max_outstanding: max_outstanding.max(1),
        }
    }

    pub fn complete(&self) -> bool {
        self.received >= self.transfer_len && !self.unsolicited_open
    }

    /// R2Ts to send now; `ttt` allocates target transfer tags.
    pub fn next_r2ts(&mut self, mut ttt: impl FnMut() -> u32) -> Vec<Pdu> {
        let mut out = Vec::new();
        while self.open.len() < self.max_outstanding as usize
            && self.next_r2t_offset < self.transfer_len
        {
            let len = (self.transfer_len - self.next_r2t_offset).min(self.max_burst);
            let tag = ttt();
            let p = R2tBuilder::new(self.lun, self.itt, tag)
                .r2t_sn(self.r2t_sn)
                .buffer_offset(self.next_r2t_offset)
                .desired_data_transfer_length(len)
                .build();
            self.open.push(OpenR2t {
                ttt: tag,
                offset: self.next_r2t_offset,
                len,
                received: 0,
                next_data_sn: 0,
            });
            self.r2t_sn += 1;
            self.next_r2t_offset += len;
            out.push(p);
        }
        out
    }

    /// Accepts one Data-Out PDU (§11.7).
    pub fn data_out(&mut self, pdu: &Pdu) -> Result<(), DataOutError> {
        let d = DataOut(pdu);
        let ttt = d.target_transfer_tag();
        let data_sn = d.data_sn();
        let offset = d.buffer_offset();
        let len = d.data().len() as u32;
        let fin = d.final_bit();
        let (start, end, expected_sn) = if ttt == RESERVED_TAG {
            if !self.unsolicited_open {
                return Err(DataOutError::UnsolicitedNotAllowed);
            }
            (0, self.unsolicited_end, self.unsolicited_next_sn)
        } else {
            let r = self
                .open
                .iter()
                .find(|r| r.ttt == ttt)
                .ok_or(DataOutError::UnknownTtt(ttt))?;
            (r.offset, r.offset + r.len, r.next_data_sn)
        };
        if data_sn != expected_sn {
            return Err(DataOutError::DataSn {
                expected: expected_sn,
                got: data_sn,
            });
        }
        let data_end = offset.saturating_add(len);
        if offset < start || data_end > end {
            return Err(DataOutError::OutsideSequence {
                offset,
                len,
                start,
                end,
            });
        }
        // Data past what the command uses (residual underflow) is accepted and dropped.
        if offset < self.transfer_len {
            let copy_end = data_end.min(self.transfer_len);
            self.buf.as_mut_slice()[offset as usize..copy_end as usize]
                .copy_from_slice(&pdu.data[..(copy_end - offset) as usize]);
            cover(&mut self.covered, offset, copy_end);
            self.received += copy_end - offset;
        }
        if ttt == RESERVED_TAG {
            self.unsolicited_next_sn += 1;
            if fin {
                self.unsolicited_open = false;
            }
        } else {
            let idx = self
                .open
                .iter()
                .position(|r| r.ttt == ttt)
                .expect("found above");
            let r = &mut self.open[idx];
            r.next_data_sn += 1;
            r.received += len;
            if fin || r.received >= r.len {
                if r.received < r.len {
                    return Err(DataOutError::ShortSequence {
                        expected: r.len,
                        got: r.received,
                    });
                }
                self.open.remove(idx);
            }
        }
        Ok(())
    }

    /// The gathered data (call when `complete()`). Ranges no Data-Out wrote (possible only
    /// when an initiator sent overlapping Data-Out) read as zeroes, never as stale memory.
    pub fn take_data(self) -> Bytes {
        let mut buf = self.buf;
        let bytes = buf.as_mut_slice();
        let mut at = 0usize;
        for &(start, end) in &self.covered {
            bytes[at..start as usize].fill(0);
            at = end as usize;
        }
        bytes[at..].fill(0);
        buf.into_bytes()
    }
}

/// Adds `[start, end)` to `ranges` (sorted, disjoint, not adjacent), merging neighbours.
fn cover(ranges: &mut Vec<(u32, u32)>, start: u32, end: u32) {
    if start >= end {
        return;
    }
    // Data-Out usually arrives in offset order: extending the last range is the fast path.
    if let Some(last) = ranges.last_mut() {
        if last.0 <= start && start <= last.1 {
            last.1 = last.1.max(end);
            return;
        }
    }
    let first = ranges.partition_point(|r| r.1 < start);
    let mut merged = (start, end);
    let mut last = first;
    while last < ranges.len() && ranges[last].0 <= end {
        merged.0 = merged.0.min(ranges[last].0);
        merged.1 = merged.1.max(ranges[last].1);
        last += 1;
    }
    ranges.splice(first..last, [merged]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{DataIn, DataOutBuilder, Opcode, R2t, ScsiResponse as ScsiResponsePdu};

    fn cmd(read: bool, write: bool, edtl: u32, fin: bool) -> ScsiCommandHeader {
        ScsiCommandHeader {
            itt: 9,
            lun: 0,
            read,
            write,
            final_bit: fin,
            attr: 1,
            expected_len: edtl,
            cmd_sn: 1,
            cdb: Bytes::from_static(&[0u8; 16]),
        }
    }

    const LIMITS: DataInLimits = DataInLimits {
        max_xmit_segment: 8192,
        max_burst: 16384,
    };

    #[test]
    fn read_splits_and_collapses_status() {
        let resp = ScsiResponse::good(Bytes::from(vec![1u8; 20000]));
        let pdus = build_response(&cmd(true, false, 20000, true), resp, LIMITS, None);
        assert_eq!(pdus.len(), 3);
        let sizes: Vec<_> = pdus.iter().map(|p| p.data.len()).collect();
        assert_eq!(sizes, vec![8192, 8192, 3616]);
        // F at the burst boundary (16384) and at the end; S only on the last.
        assert_eq!(pdus[0].flags() & 0x81, 0x00);
        assert_eq!(pdus[1].flags() & 0x81, 0x80);
        assert_eq!(pdus[2].flags() & 0x81, 0x81);
        assert_eq!(DataIn(&pdus[2]).data_sn(), 2);
        assert_eq!(DataIn(&pdus[2]).buffer_offset(), 16384);
    }

    #[test]
    fn read_residuals() {
        let short = build_response(
            &cmd(true, false, 4096, true),
            ScsiResponse::good(Bytes::from(vec![0u8; 512])),
            LIMITS,
            None,
        );
        assert_eq!(short[0].flags() & 0x06, 0x02);
        assert_eq!(DataIn(&short[0]).residual_count(), 3584);
        let over = build_response(
            &cmd(true, false, 512, true),
            ScsiResponse::good(Bytes::from(vec![0u8; 1024])),
            LIMITS,
            None,
        );
        assert_eq!(over[0].data.len(), 512);
        assert_eq!(over[0].flags() & 0x06, 0x04);
        assert_eq!(DataIn(&over[0]).residual_count(), 512);
    }

    #[test]
    fn check_condition_is_a_response_with_sense() {
        let resp = ScsiResponse {
            status: Status::CheckCondition,
            sense: Some(Bytes::from_static(&[0x70, 0, 5])),
            data_in: Bytes::new(),
        };
        let pdus = build_response(&cmd(false, false, 0, true), resp, LIMITS, None);
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].opcode(), Some(Opcode::ScsiResponse));
        assert_eq!(ScsiResponsePdu(&pdus[0]).status(), 0x02);
        assert_eq!(&pdus[0].data[..], &[0, 3, 0x70, 0, 5]);
    }

    fn data_out(ttt: u32, sn: u32, off: u32, len: usize, fin: bool) -> Pdu {
        DataOutBuilder::new(9, ttt)
            .final_bit(fin)
            .data_sn(sn)
            .buffer_offset(off)
            .data(Bytes::from(vec![(off / 512) as u8; len]))
            .build()
    }

    #[test]
    fn gathers_immediate_unsolicited_and_solicited() {
        let c = cmd(false, true, 8192, false);
        let mut g = WriteGather::new(&c, 8192, Bytes::from(vec![0u8; 1024]), 2048, false, 4096, 1);
        let mut tag = 100;
        let r2ts = g.next_r2ts(|| {
            tag += 1;
            tag
        });
        assert_eq!(r2ts.len(), 1);
        let r = R2t(&r2ts[0]);
        assert_eq!(
            (r.buffer_offset(), r.desired_data_transfer_length()),
            (2048, 4096)
        );
        g.data_out(&data_out(RESERVED_TAG, 0, 1024, 1024, true))
            .unwrap();
        assert!(!g.complete());
        g.data_out(&data_out(101, 0, 2048, 2048, false)).unwrap();
        assert_eq!(
            g.data_out(&data_out(101, 0, 4096, 2048, true)),
            Err(DataOutError::DataSn {
                expected: 1,
                got: 0
            })
        );
        g.data_out(&data_out(101, 1, 4096, 2048, true)).unwrap();
        let more = g.next_r2ts(|| 200);
        assert_eq!(
            (
                R2t(&more[0]).r2t_sn(),
                R2t(&more[0]).buffer_offset(),
                R2t(&more[0]).desired_data_transfer_length()
            ),
            (1, 6144, 2048)
        );
        assert!(g.data_out(&data_out(200, 0, 6000, 2048, true)).is_err());
        g.data_out(&data_out(200, 0, 6144, 2048, true)).unwrap();
        assert!(g.complete());
        let d = g.take_data();
        assert_eq!(d[2048], 4);
        assert_eq!(d[6144], 12);
    }

    #[test]
    fn gather_rejects_garbage() {
        let c = cmd(false, true, 4096, true);
        let mut g = WriteGather::new(&c, 4096, Bytes::new(), 65536, false, 65536, 1);
        assert_eq!(
            g.data_out(&data_out(RESERVED_TAG, 0, 0, 512, true)),
            Err(DataOutError::UnsolicitedNotAllowed)
        );
        g.next_r2ts(|| 5);
        assert_eq!(
            g.data_out(&data_out(6, 0, 0, 512, true)),
            Err(DataOutError::UnknownTtt(6))
        );
        let mut p = data_out(5, 0, u32::MAX - 10, 512, true);
        p.set_u32_at(40, u32::MAX - 10);
        assert!(matches!(
            g.data_out(&p),
            Err(DataOutError::OutsideSequence { .. })
        ));
        assert!(matches!(
            g.data_out(&data_out(5, 0, 0, 512, true)),
            Err(DataOutError::ShortSequence { .. })
        ));
    }

    #[test]
    fn coverage_merges_ranges() {
        let mut r = Vec::new();
        cover(&mut r, 0, 10);
        cover(&mut r, 10, 20);
        assert_eq!(r, vec![(0, 20)]);
        cover(&mut r, 30, 40);
        cover(&mut r, 25, 26);
        assert_eq!(r, vec![(0, 20), (25, 26), (30, 40)]);
        cover(&mut r, 5, 31);
        assert_eq!(r, vec![(0, 40)]);
        cover(&mut r, 50, 50);
        assert_eq!(r, vec![(0, 40)]);
    }

    #[test]
    fn overlapping_data_out_leaves_no_stale_bytes() {
        // Fill a pooled buffer of the size class with garbage so a recycled one is dirty.
        let mut dirty = AlignedBuf::recycled(3 * 4096);
        dirty.as_mut_slice().fill(0xee);
        drop(dirty);
        let c = cmd(false, true, 3 * 4096, false);
        let mut g = WriteGather::new(&c, 3 * 4096, Bytes::new(), 3 * 4096, false, 65536, 1);
        // The same first 4 KiB twice, then the last 4 KiB: "received" counts 12 KiB.
        g.data_out(&data_out(RESERVED_TAG, 0, 0, 4096, false))
            .unwrap();
        g.data_out(&data_out(RESERVED_TAG, 1, 0, 4096, false))
            .unwrap();
        g.data_out(&data_out(RESERVED_TAG, 2, 8192, 4096, true))
            .unwrap();
        assert!(g.complete());
        let d = g.take_data();
        assert!(d[4096..8192].iter().all(|&b| b == 0), "gap reads as zeroes");
        assert!(d[8192..].iter().all(|&b| b == 16));
    }

    #[test]
    fn shorter_need_than_expected_length() {
        // CDB needs 512 bytes, initiator expects to send 1024: only 512 is solicited.
        let c = cmd(false, true, 1024, true);
        let mut g = WriteGather::new(&c, 512, Bytes::new(), 65536, true, 65536, 4);
        let r = g.next_r2ts(|| 1);
        assert_eq!(R2t(&r[0]).desired_data_transfer_length(), 512);
    }
}
