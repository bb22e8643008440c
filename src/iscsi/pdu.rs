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
    fn serial_arithmetic_wraps() {
        assert!(serial::lt(0xffff_fff0, 5));
        assert!(serial::gt(5, 0xffff_fff0));
        assert!(serial::le(3, 3));
        assert!(!serial::lt(3, 3));
    }
}
