//! The peer protocol: messages and the frame codec.
//!
//! A frame on the wire is
//!
//! ```text
//! [u32 len][u8 type][payload ...][u32 crc32c(type || payload)]
//! ```
//!
//! all big-endian; `len` counts the bytes after itself (type + payload + crc), so it is at
//! least 5 and at most [`MAX_FRAME_LEN`]. A longer length, a bad CRC, an unknown type or a
//! payload that does not parse is a [`FrameError`]: the connection is dropped (and logged by
//! the caller), never a panic. The codec is pure (no I/O) and unit-tested on garbage.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::drbd::{GenerationUuids, Role};

/// Version of this protocol; peers must speak the same one (checked in `Hello`, so a peer
/// of another version is refused at connect, never dropped later on an unknown frame).
/// 2: `PrState` / `PrStateAck` (replicated persistent reservations).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest data payload of one `Write` / `ResyncData` message. Larger application writes
/// are sent as several messages.
pub const MAX_DATA: usize = 4 << 20;
/// Largest value of the frame length field.
pub const MAX_FRAME_LEN: usize = MAX_DATA + 64 * 1024;
/// Bitmap runs per `Bitmap` message.
pub const MAX_RUNS_PER_MSG: usize = 32 * 1024;
/// Longest string (volume name, reasons) on the wire.
pub const MAX_STRING: usize = 1024;
/// Verify granularity: one digest per 4 KiB block (DRBD verifies per `BM_BLOCK_SIZE`).
pub const VERIFY_BLOCK: u64 = 4096;

/// Flag bit in `Hello`/`StateChange` flags: the sender was told to discard its data
/// (`--discard-my-data`; DRBD's `UI_FLAGS` bit 0).
pub const WIRE_DISCARD_MY_DATA: u32 = 1;
/// Flag bit: the sender crashed while primary (DRBD's `UI_FLAGS` bit 1).
pub const WIRE_CRASHED_PRIMARY: u32 = 2;

/// Disk state of a replica (DRBD's `drbd_disk_state`, the subset twinsan uses), ordered
/// like DRBD's (`Diskless` < `Inconsistent` < `Outdated` < `Consistent` < `UpToDate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum DiskState {
    /// No local disk.
    Diskless,
    /// Being synced or never synced: must not serve.
    Inconsistent,
    /// Consistent but known to be older than the peer's.
    Outdated,
    /// Consistent, up-to-dateness unknown.
    Consistent,
    /// Known good.
    UpToDate,
}

impl DiskState {
    fn to_u8(self) -> u8 {
        match self {
            DiskState::Diskless => 0,
            DiskState::Inconsistent => 1,
            DiskState::Outdated => 2,
            DiskState::Consistent => 3,
            DiskState::UpToDate => 4,
        }
    }
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => DiskState::Diskless,
            1 => DiskState::Inconsistent,
            2 => DiskState::Outdated,
            3 => DiskState::Consistent,
            4 => DiskState::UpToDate,
            _ => return Err(FrameError::Malformed("disk state")),
        })
    }
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Digest algorithm of online verify (`verify-alg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum VerifyDigest {
    /// CRC32C, 4 bytes per block: fast, detects corruption, not tampering.
    #[default]
    Crc32c,
    /// SHA-256, 32 bytes per block.
    Sha256,
}

impl VerifyDigest {
    /// Digest length in bytes.
    pub fn len(self) -> usize {
        match self {
            VerifyDigest::Crc32c => 4,
            VerifyDigest::Sha256 => 32,
        }
    }
    /// Never empty; for clippy's `len_without_is_empty`.
    pub fn is_empty(self) -> bool {
        false
    }
    /// Digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            VerifyDigest::Crc32c => crc32c::crc32c(data).to_be_bytes().to_vec(),
            VerifyDigest::Sha256 => {
                use sha2::Digest;
                sha2::Sha256::digest(data).to_vec()
            }
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            VerifyDigest::Crc32c => 1,
            VerifyDigest::Sha256 => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        match v {
            1 => Ok(VerifyDigest::Crc32c),
            2 => Ok(VerifyDigest::Sha256),
            _ => Err(FrameError::Malformed("verify digest")),
        }
    }
}

/// One message of the peer protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message on a new connection, both directions.
    Hello {
        /// [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// Volume (resource) name; must match.
        volume_name: String,
        /// Usable data size in bytes; must match.
        size_bytes: u64,
        /// Role at connect time.
        role: Role,
        /// Generation UUIDs at connect time (informational; the handshake uses `StateChange`).
        uuids: GenerationUuids,
        /// `WIRE_*` flags.
        flags: u32,
        /// Random id of the sending process; decides which of two simultaneous connections
        /// survives.
        node_id: u64,
        /// Random challenge the peer must answer with the HMAC of the shared secret.
        challenge: [u8; 32],
    },
    /// `HMAC-SHA256(secret, peer_challenge || volume_name)`.
    AuthResponse {
        /// The MAC.
        mac: [u8; 32],
    },
    /// The peer's response was right.
    AuthOk,
    /// The peer refused us.
    AuthFailed {
        /// Why.
        reason: String,
    },
    /// Role / disk / UUID report: once after authentication (the sync handshake) and
    /// whenever the role changes.
    StateChange {
        /// Role.
        role: Role,
        /// Disk state.
        disk: DiskState,
        /// Generation UUIDs.
        uuids: GenerationUuids,
        /// `WIRE_*` flags.
        flags: u32,
        /// Set bits in the sender's bitmap (DRBD sends it as `UI_SIZE`).
        bm_weight: u64,
    },
    /// Part of the sender's out-of-sync bitmap, as runs of set bits `(first_bit, len)`.
    Bitmap {
        /// Runs.
        runs: Vec<(u64, u64)>,
        /// Last part.
        last: bool,
    },
    /// The sender's sync decision (DRBD's `hg`), for cross-checking: the peer's must mirror it.
    Decision {
        /// `hg`: 0 no sync, 1/2 sender is source (bitmap/full), -1/-2 target, -100 refuse.
        hg: i32,
    },
    /// Sync source to target: a resync starts, with this sync UUID (`P_SYNC_UUID`).
    SyncUuid {
        /// The source's new bitmap UUID.
        uuid: u64,
    },
    /// Replicated application write.
    Write {
        /// Request number.
        seq: u64,
        /// Byte offset in the data area.
        offset: u64,
        /// Data.
        data: Bytes,
        /// Force unit access: durable on the peer before the ack.
        fua: bool,
    },
    /// Answer to `Write`, sent after the local write completed.
    WriteAck {
        /// Request number.
        seq: u64,
        /// Success.
        ok: bool,
        /// Error text if not ok.
        err: String,
    },
    /// Make all completed writes durable.
    Flush {
        /// Request number.
        seq: u64,
    },
    /// Answer to `Flush`.
    FlushAck {
        /// Request number.
        seq: u64,
        /// Success.
        ok: bool,
    },
    /// Resync block(s) from the sync source.
    ResyncData {
        /// Request number.
        seq: u64,
        /// Byte offset.
        offset: u64,
        /// Data.
        data: Bytes,
    },
    /// Answer to `ResyncData` after the target wrote it.
    ResyncAck {
        /// Request number.
        seq: u64,
        /// Success.
        ok: bool,
    },
    /// The resync finished; the target adopts these UUIDs (`drbd_resync_finished`).
    ResyncDone {
        /// The source's UUIDs.
        uuids: GenerationUuids,
    },
    /// Online verify: digests of consecutive 4 KiB blocks starting at `offset`.
    VerifyRequest {
        /// Request number.
        seq: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes covered.
        len: u32,
        /// Algorithm.
        alg: VerifyDigest,
        /// Concatenated digests, one per 4 KiB block.
        digests: Bytes,
    },
    /// Answer to `VerifyRequest`: offsets of the blocks whose digest differs.
    VerifyReply {
        /// Request number.
        seq: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes covered.
        len: u32,
        /// True if every block matched.
        equal: bool,
        /// Offsets of mismatching 4 KiB blocks.
        mismatched: Vec<u64>,
    },
    /// The primary's (or sync source's) persistent reservation state of the volume's
    /// logical unit (SPC-4 5.13), an opaque blob the SCSI layer encodes: the peer stores it
    /// before the ack, so a PR OUT completes only once both hosts hold it (protocol C).
    PrState {
        /// Request number.
        seq: u64,
        /// The encoded state, at most [`MAX_DATA`] bytes.
        blob: Bytes,
    },
    /// Answer to `PrState` after the peer stored it.
    PrStateAck {
        /// Request number.
        seq: u64,
        /// Stored (in memory and, for APTPL, on disk).
        ok: bool,
    },
    /// Keepalive request.
    Ping,
    /// Keepalive answer.
    Pong,
    /// The sender closes the connection.
    Disconnect {
        /// Why.
        reason: String,
    },
}

/// Frame or message errors. Every one drops the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Frame length field out of bounds.
    #[error("frame length {0} is outside 5 ..= {MAX_FRAME_LEN}")]
    BadLength(usize),
    /// CRC mismatch.
    #[error("frame CRC32C mismatch: got {got:08x}, computed {want:08x}")]
    Crc {
        /// On the wire.
        got: u32,
        /// Computed.
        want: u32,
    },
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Payload too short or inconsistent.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// Outgoing message too large.
    #[error("message too large to send ({0} bytes)")]
    TooLarge(usize),
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

mod ty {
    pub const HELLO: u8 = 1;
    pub const AUTH_RESPONSE: u8 = 2;
    pub const AUTH_OK: u8 = 3;
    pub const AUTH_FAILED: u8 = 4;
    pub const STATE: u8 = 5;
    pub const BITMAP: u8 = 6;
    pub const DECISION: u8 = 7;
    pub const SYNC_UUID: u8 = 8;
    pub const WRITE: u8 = 9;
    pub const WRITE_ACK: u8 = 10;
    pub const FLUSH: u8 = 11;
    pub const FLUSH_ACK: u8 = 12;
    pub const RESYNC_DATA: u8 = 13;
    pub const RESYNC_ACK: u8 = 14;
    pub const RESYNC_DONE: u8 = 15;
    pub const VERIFY_REQ: u8 = 16;
    pub const VERIFY_REPLY: u8 = 17;
    pub const PING: u8 = 18;
    pub const PONG: u8 = 19;
    pub const DISCONNECT: u8 = 20;
    pub const PR_STATE: u8 = 21;
    pub const PR_STATE_ACK: u8 = 22;
}

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_STRING)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn put_uuids(b: &mut BytesMut, u: &GenerationUuids) {
    b.put_u64(u.current);
    b.put_u64(u.bitmap);
    let n = u.history.len().min(32);
    b.put_u8(n as u8);
    for h in &u.history[..n] {
        b.put_u64(*h);
    }
}

fn put_role(b: &mut BytesMut, r: Role) {
    b.put_u8(match r {
        Role::Secondary => 0,
        Role::Primary => 1,
    });
}

fn put_data(b: &mut BytesMut, d: &[u8]) {
    b.put_u32(d.len() as u32);
    b.put_slice(d);
}

/// A bounds-checked reader over a payload.
struct Rd(Bytes);

impl Rd {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.0.remaining() < n {
            Err(FrameError::Malformed("truncated payload"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn i32(&mut self) -> Result<i32, FrameError> {
        self.need(4)?;
        Ok(self.0.get_i32())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Malformed("bool")),
        }
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn arr32(&mut self) -> Result<[u8; 32], FrameError> {
        let b = self.bytes(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(&b);
        Ok(a)
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        if n > MAX_STRING {
            return Err(FrameError::Malformed("string too long"));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::Malformed("string not UTF-8"))
    }
    fn data(&mut self) -> Result<Bytes, FrameError> {
        let n = self.u32()? as usize;
        if n > MAX_DATA {
            return Err(FrameError::Malformed("data too long"));
        }
        self.bytes(n)
    }
    fn role(&mut self) -> Result<Role, FrameError> {
        match self.u8()? {
            0 => Ok(Role::Secondary),
            1 => Ok(Role::Primary),
            _ => Err(FrameError::Malformed("role")),
        }
    }
    fn uuids(&mut self) -> Result<GenerationUuids, FrameError> {
        let current = self.u64()?;
        let bitmap = self.u64()?;
        let n = self.u8()? as usize;
        if n > 32 {
            return Err(FrameError::Malformed("too many history UUIDs"));
        }
        let mut history = Vec::with_capacity(n.max(2));
        for _ in 0..n {
            history.push(self.u64()?);
        }
        while history.len() < 2 {
            history.push(0);
        }
        Ok(GenerationUuids {
            current,
            bitmap,
            history,
        })
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.0.has_remaining() {
            Err(FrameError::Malformed("trailing bytes"))
        } else {
            Ok(())
        }
    }
}

impl Message {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::AuthResponse { .. } => "AuthResponse",
            Message::AuthOk => "AuthOk",
            Message::AuthFailed { .. } => "AuthFailed",
            Message::StateChange { .. } => "StateChange",
            Message::Bitmap { .. } => "Bitmap",
            Message::Decision { .. } => "Decision",
            Message::SyncUuid { .. } => "SyncUuid",
            Message::Write { .. } => "Write",
            Message::WriteAck { .. } => "WriteAck",
            Message::Flush { .. } => "Flush",
            Message::FlushAck { .. } => "FlushAck",
            Message::ResyncData { .. } => "ResyncData",
            Message::ResyncAck { .. } => "ResyncAck",
            Message::ResyncDone { .. } => "ResyncDone",
            Message::VerifyRequest { .. } => "VerifyRequest",
            Message::VerifyReply { .. } => "VerifyReply",
            Message::PrState { .. } => "PrState",
            Message::PrStateAck { .. } => "PrStateAck",
            Message::Ping => "Ping",
            Message::Pong => "Pong",
            Message::Disconnect { .. } => "Disconnect",
        }
    }

    /// Writes type byte and payload.
    pub fn encode_body(&self, b: &mut BytesMut) {
        if let Some(bulk) = self.encode_head(b) {
            b.put_slice(&bulk);
        }
    }

    /// Writes type byte and payload up to the bulk data of a `Write` / `ResyncData` (its
    /// length field included) and returns that data, which is the end of the body: a frame
    /// writer sends it as it is instead of copying it ([`FrameQueue`]).
    fn encode_head(&self, b: &mut BytesMut) -> Option<Bytes> {
        match self {
            Message::Hello {
                protocol_version,
                volume_name,
                size_bytes,
                role,
                uuids,
                flags,
                node_id,
                challenge,
            } => {
                b.put_u8(ty::HELLO);
                b.put_u32(*protocol_version);
                put_str(b, volume_name);
                b.put_u64(*size_bytes);
                put_role(b, *role);
                put_uuids(b, uuids);
                b.put_u32(*flags);
                b.put_u64(*node_id);
                b.put_slice(challenge);
            }
            Message::AuthResponse { mac } => {
                b.put_u8(ty::AUTH_RESPONSE);
                b.put_slice(mac);
            }
            Message::AuthOk => b.put_u8(ty::AUTH_OK),
            Message::AuthFailed { reason } => {
                b.put_u8(ty::AUTH_FAILED);
                put_str(b, reason);
            }
            Message::StateChange {
                role,
                disk,
                uuids,
                flags,
                bm_weight,
            } => {
                b.put_u8(ty::STATE);
                put_role(b, *role);
                b.put_u8(disk.to_u8());
                put_uuids(b, uuids);
                b.put_u32(*flags);
                b.put_u64(*bm_weight);
            }
            Message::Bitmap { runs, last } => {
                b.put_u8(ty::BITMAP);
                b.put_u8(u8::from(*last));
                b.put_u32(runs.len() as u32);
                for (s, l) in runs {
                    b.put_u64(*s);
                    b.put_u64(*l);
                }
            }
            Message::Decision { hg } => {
                b.put_u8(ty::DECISION);
                b.put_i32(*hg);
            }
            Message::SyncUuid { uuid } => {
                b.put_u8(ty::SYNC_UUID);
                b.put_u64(*uuid);
            }
            Message::Write {
                seq,
                offset,
                data,
                fua,
            } => {
                b.put_u8(ty::WRITE);
                b.put_u64(*seq);
                b.put_u64(*offset);
                b.put_u8(u8::from(*fua));
                b.put_u32(data.len() as u32);
                return Some(data.clone());
            }
            Message::WriteAck { seq, ok, err } => {
                b.put_u8(ty::WRITE_ACK);
                b.put_u64(*seq);
                b.put_u8(u8::from(*ok));
                put_str(b, err);
            }
            Message::Flush { seq } => {
                b.put_u8(ty::FLUSH);
                b.put_u64(*seq);
            }
            Message::FlushAck { seq, ok } => {
                b.put_u8(ty::FLUSH_ACK);
                b.put_u64(*seq);
                b.put_u8(u8::from(*ok));
            }
            Message::ResyncData { seq, offset, data } => {
                b.put_u8(ty::RESYNC_DATA);
                b.put_u64(*seq);
                b.put_u64(*offset);
                b.put_u32(data.len() as u32);
                return Some(data.clone());
            }
            Message::ResyncAck { seq, ok } => {
                b.put_u8(ty::RESYNC_ACK);
                b.put_u64(*seq);
                b.put_u8(u8::from(*ok));
            }
            Message::ResyncDone { uuids } => {
                b.put_u8(ty::RESYNC_DONE);
                put_uuids(b, uuids);
            }
            Message::VerifyRequest {
                seq,
                offset,
                len,
                alg,
                digests,
            } => {
                b.put_u8(ty::VERIFY_REQ);
                b.put_u64(*seq);
                b.put_u64(*offset);
                b.put_u32(*len);
                b.put_u8(alg.to_u8());
                put_data(b, digests);
            }
            Message::VerifyReply {
                seq,
                offset,
                len,
                equal,
                mismatched,
            } => {
                b.put_u8(ty::VERIFY_REPLY);
                b.put_u64(*seq);
                b.put_u64(*offset);
                b.put_u32(*len);
                b.put_u8(u8::from(*equal));
                b.put_u32(mismatched.len() as u32);
                for m in mismatched {
                    b.put_u64(*m);
                }
            }
            Message::PrState { seq, blob } => {
                b.put_u8(ty::PR_STATE);
                b.put_u64(*seq);
                put_data(b, blob);
            }
            Message::PrStateAck { seq, ok } => {
                b.put_u8(ty::PR_STATE_ACK);
                b.put_u64(*seq);
                b.put_u8(u8::from(*ok));
            }
            Message::Ping => b.put_u8(ty::PING),
            Message::Pong => b.put_u8(ty::PONG),
            Message::Disconnect { reason } => {
                b.put_u8(ty::DISCONNECT);
                put_str(b, reason);
            }
        }
        None
    }

    /// Parses type byte + payload (without length and CRC).
    pub fn decode_body(body: Bytes) -> Result<Message, FrameError> {
        let mut r = Rd(body);
        let t = r.u8()?;
        let m = match t {
            ty::HELLO => Message::Hello {
                protocol_version: r.u32()?,
                volume_name: r.string()?,
                size_bytes: r.u64()?,
                role: r.role()?,
                uuids: r.uuids()?,
                flags: r.u32()?,
                node_id: r.u64()?,
                challenge: r.arr32()?,
            },
            ty::AUTH_RESPONSE => Message::AuthResponse { mac: r.arr32()? },
            ty::AUTH_OK => Message::AuthOk,
            ty::AUTH_FAILED => Message::AuthFailed {
                reason: r.string()?,
            },
            ty::STATE => Message::StateChange {
                role: r.role()?,
                disk: DiskState::from_u8(r.u8()?)?,
                uuids: r.uuids()?,
                flags: r.u32()?,
                bm_weight: r.u64()?,
            },
            ty::BITMAP => {
                let last = r.bool()?;
                let n = r.u32()? as usize;
                if n > MAX_RUNS_PER_MSG {
                    return Err(FrameError::Malformed("too many bitmap runs"));
                }
                r.need(n * 16)?;
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    runs.push((r.u64()?, r.u64()?));
                }
                Message::Bitmap { runs, last }
            }
            ty::DECISION => Message::Decision { hg: r.i32()? },
            ty::SYNC_UUID => Message::SyncUuid { uuid: r.u64()? },
            ty::WRITE => Message::Write {
                seq: r.u64()?,
                offset: r.u64()?,
                fua: r.bool()?,
                data: r.data()?,
            },
            ty::WRITE_ACK => Message::WriteAck {
                seq: r.u64()?,
                ok: r.bool()?,
                err: r.string()?,
            },
            ty::FLUSH => Message::Flush { seq: r.u64()? },
            ty::FLUSH_ACK => Message::FlushAck {
                seq: r.u64()?,
                ok: r.bool()?,
            },
            ty::RESYNC_DATA => Message::ResyncData {
                seq: r.u64()?,
                offset: r.u64()?,
                data: r.data()?,
            },
            ty::RESYNC_ACK => Message::ResyncAck {
                seq: r.u64()?,
                ok: r.bool()?,
            },
            ty::RESYNC_DONE => Message::ResyncDone { uuids: r.uuids()? },
            ty::VERIFY_REQ => Message::VerifyRequest {
                seq: r.u64()?,
                offset: r.u64()?,
                len: r.u32()?,
                alg: VerifyDigest::from_u8(r.u8()?)?,
                digests: r.data()?,
            },
            ty::VERIFY_REPLY => {
                let seq = r.u64()?;
                let offset = r.u64()?;
                let len = r.u32()?;
                let equal = r.bool()?;
                let n = r.u32()? as usize;
                r.need(n.saturating_mul(8))?;
                let mut mismatched = Vec::with_capacity(n);
                for _ in 0..n {
                    mismatched.push(r.u64()?);
                }
                Message::VerifyReply {
                    seq,
                    offset,
                    len,
                    equal,
                    mismatched,
                }
            }
            ty::PR_STATE => Message::PrState {
                seq: r.u64()?,
                blob: r.data()?,
            },
            ty::PR_STATE_ACK => Message::PrStateAck {
                seq: r.u64()?,
                ok: r.bool()?,
            },
            ty::PING => Message::Ping,
            ty::PONG => Message::Pong,
            ty::DISCONNECT => Message::Disconnect {
                reason: r.string()?,
            },
            other => return Err(FrameError::UnknownType(other)),
        };
        r.end()?;
        Ok(m)
    }
}

/// The tokio-util codec for [`Message`] frames.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if !(5..=MAX_FRAME_LEN).contains(&len) {
            return Err(FrameError::BadLength(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let mut frame = src.split_to(len);
        let crc_bytes = frame.split_off(len - 4);
        let got = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let want = crc32c::crc32c(&frame);
        if got != want {
            return Err(FrameError::Crc { got, want });
        }
        Message::decode_body(frame.freeze()).map(Some)
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let (bulk, crc) = put_frame_head(dst, &msg)?;
        if let Some(data) = bulk {
            dst.put_slice(&data);
        }
        dst.put_u32(crc);
        Ok(())
    }
}

/// Appends a frame's length field and its body up to the bulk payload to `dst`, and
/// returns that payload (if any, not empty) and the frame's CRC32C (over the body, payload
/// included): the frame is complete once the caller adds the payload, then the CRC. A frame
/// longer than [`MAX_FRAME_LEN`] leaves `dst` as it was.
fn put_frame_head(dst: &mut BytesMut, msg: &Message) -> Result<(Option<Bytes>, u32), FrameError> {
    let start = dst.len();
    dst.put_u32(0);
    let bulk = msg.encode_head(dst).filter(|d| !d.is_empty());
    let len = dst.len() - start - 4 + bulk.as_ref().map_or(0, Bytes::len) + 4;
    if len > MAX_FRAME_LEN {
        dst.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    let mut crc = crc32c::crc32c(&dst[start + 4..]);
    if let Some(data) = &bulk {
        crc = crc32c::crc32c_append(crc, data);
    }
    Ok((bulk, crc))
}

/// Encodes one message into a complete frame (tests, tools).
pub fn encode_frame(msg: &Message) -> Result<BytesMut, FrameError> {
    let mut b = BytesMut::new();
    FrameCodec.encode(msg.clone(), &mut b)?;
    Ok(b)
}

/// Frames queued for the socket, written with vectored writes: lengths, headers and CRCs
/// are encoded into one scratch buffer, and the bulk data of `Write` / `ResyncData` is queued
/// as the `Bytes` it arrived in, never copied. The bytes on the wire are [`FrameCodec`]'s.
#[derive(Debug, Default)]
pub struct FrameQueue {
    /// Encoded bytes before `scratch`, in wire order.
    chunks: VecDeque<Bytes>,
    /// The tail being encoded into.
    scratch: BytesMut,
    /// Bytes in `chunks` (not counting `scratch`).
    queued: usize,
}

/// One frame encoded for a [`FrameQueue`]: length, header and CRC, with the bulk payload
/// of a `Write` / `ResyncData` kept apart (not copied). Encoding (and the CRC over a large
/// payload) happens here, before a queue's lock is taken.
#[derive(Debug)]
pub struct EncodedFrame {
    /// Length field and header; the CRC too when there is no bulk payload.
    head: Bytes,
    /// The bulk payload and the CRC that follows it.
    bulk: Option<(Bytes, [u8; 4])>,
}

impl EncodedFrame {
    pub fn new(msg: &Message) -> Result<EncodedFrame, FrameError> {
        let mut b = BytesMut::with_capacity(64);
        let (bulk, crc) = put_frame_head(&mut b, msg)?;
        let bulk = match bulk {
            Some(data) => Some((data, crc.to_be_bytes())),
            None => {
                b.put_u32(crc);
                None
            }
        };
        Ok(EncodedFrame {
            head: b.freeze(),
            bulk,
        })
    }

    /// Length of the bulk payload (0 without one).
    pub fn payload_len(&self) -> usize {
        self.bulk.as_ref().map_or(0, |(d, _)| d.len())
    }
}

impl FrameQueue {
    /// Appends one frame.
    pub fn push(&mut self, msg: &Message) -> Result<(), FrameError> {
        self.push_encoded(EncodedFrame::new(msg)?);
        Ok(())
    }

    /// Appends one encoded frame.
    pub fn push_encoded(&mut self, f: EncodedFrame) {
        self.scratch.extend_from_slice(&f.head);
        if let Some((data, crc)) = f.bulk {
            let encoded = self.scratch.split().freeze();
            self.queued += encoded.len() + data.len();
            self.chunks.push_back(encoded);
            self.chunks.push_back(data);
            self.scratch.extend_from_slice(&crc);
        }
    }

    /// Appends everything `other` holds, after what this queue holds.
    pub fn append(&mut self, mut other: FrameQueue) {
        if !other.has_remaining() {
            return;
        }
        if !self.scratch.is_empty() {
            let tail = self.scratch.split().freeze();
            self.queued += tail.len();
            self.chunks.push_back(tail);
        }
        self.queued += other.queued;
        self.chunks.append(&mut other.chunks);
        self.scratch = other.scratch;
    }
}

impl Buf for FrameQueue {
    fn remaining(&self) -> usize {
        self.queued + self.scratch.len()
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => c,
            None => &self.scratch,
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for c in self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(std::iter::once(&self.scratch[..]))
        {
            if n == dst.len() {
                break;
            }
            if !c.is_empty() {
                dst[n] = std::io::IoSlice::new(c);
                n += 1;
            }
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.scratch.advance(cnt);
                return;
            };
            let n = cnt.min(front.len());
            front.advance(n);
            self.queued -= n;
            cnt -= n;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn samples() -> Vec<Message> {
        let u = GenerationUuids::new(0xAAAA_0001, 0xBBBB_0000, [0xCC, 0xDD]);
        vec![
            Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                volume_name: "vol0".into(),
                size_bytes: 1 << 30,
                role: Role::Primary,
                uuids: u.clone(),
                flags: WIRE_CRASHED_PRIMARY,
                node_id: 42,
                challenge: [7; 32],
            },
            Message::AuthResponse { mac: [9; 32] },
            Message::AuthOk,
            Message::AuthFailed {
                reason: "wrong secret".into(),
            },
            Message::StateChange {
                role: Role::Secondary,
                disk: DiskState::Inconsistent,
                uuids: u.clone(),
                flags: 1,
                bm_weight: 77,
            },
            Message::Bitmap {
                runs: vec![(0, 3), (100, 1 << 20)],
                last: true,
            },
            Message::Decision { hg: -100 },
            Message::SyncUuid { uuid: 0x1234 },
            Message::Write {
                seq: 1,
                offset: 4096,
                data: Bytes::from(vec![1u8; 8192]),
                fua: true,
            },
            Message::WriteAck {
                seq: 1,
                ok: false,
                err: "EIO".into(),
            },
            Message::Flush { seq: 2 },
            Message::FlushAck { seq: 2, ok: true },
            Message::ResyncData {
                seq: 3,
                offset: 0,
                data: Bytes::from_static(b"abcd"),
            },
            Message::ResyncAck { seq: 3, ok: true },
            Message::ResyncDone { uuids: u },
            Message::VerifyRequest {
                seq: 4,
                offset: 8192,
                len: 8192,
                alg: VerifyDigest::Crc32c,
                digests: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
            },
            Message::VerifyReply {
                seq: 4,
                offset: 8192,
                len: 8192,
                equal: false,
                mismatched: vec![12288],
            },
            Message::PrState {
                seq: 5,
                blob: Bytes::from_static(b"{\"generation\":3}"),
            },
            Message::PrStateAck { seq: 5, ok: true },
            Message::Ping,
            Message::Pong,
            Message::Disconnect {
                reason: "bye".into(),
            },
        ]
    }

    #[test]
    fn round_trip_every_message() {
        let mut buf = BytesMut::new();
        for m in samples() {
            FrameCodec.encode(m, &mut buf).unwrap();
        }
        let mut out = Vec::new();
        while let Some(m) = FrameCodec.decode(&mut buf).unwrap() {
            out.push(m);
        }
        assert_eq!(out, samples());
        assert!(buf.is_empty());
    }

    /// The vectored queue puts exactly the codec's bytes on the wire, whatever the write
    /// sizes (partial writes advance through headers, payloads and CRCs alike).
    #[test]
    fn frame_queue_writes_the_codec_bytes() {
        let mut want = BytesMut::new();
        let mut q = FrameQueue::default();
        let mut msgs = samples();
        msgs.push(Message::Write {
            seq: 9,
            offset: 0,
            data: Bytes::new(),
            fua: false,
        });
        msgs.extend(samples());
        for m in &msgs {
            FrameCodec.encode(m.clone(), &mut want).unwrap();
            q.push(m).unwrap();
        }
        assert_eq!(q.remaining(), want.len());
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut got = Vec::new();
        while q.has_remaining() {
            let mut io = [std::io::IoSlice::new(&[]); 5];
            let n = q.chunks_vectored(&mut io);
            assert!(n > 0);
            let avail: Vec<u8> = io[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(&avail[..q.chunk().len().min(avail.len())], q.chunk());
            let take = rng.gen_range(1..=avail.len());
            got.extend_from_slice(&avail[..take]);
            q.advance(take);
        }
        assert_eq!(got, want.to_vec());
        // Empty again, and usable for the next batch.
        q.push(&Message::Ping).unwrap();
        assert_eq!(q.chunk(), &encode_frame(&Message::Ping).unwrap()[..]);
    }

    #[test]
    fn frame_queue_append_keeps_the_order() {
        let msgs = samples();
        let (first, second) = msgs.split_at(9);
        let mut want = BytesMut::new();
        for m in &msgs {
            FrameCodec.encode(m.clone(), &mut want).unwrap();
        }
        let mut a = FrameQueue::default();
        for m in first {
            a.push(m).unwrap();
        }
        // Part of `a` already went out, as after a short direct write.
        let mut got = BytesMut::new();
        got.extend_from_slice(&a.copy_to_bytes(7));
        let mut b = FrameQueue::default();
        for m in second {
            b.push(m).unwrap();
        }
        a.append(b);
        a.append(FrameQueue::default());
        got.put(&mut a);
        assert_eq!(got, want);
    }

    #[test]
    fn frame_queue_refuses_an_oversized_frame_and_keeps_the_rest() {
        let mut q = FrameQueue::default();
        q.push(&Message::Ping).unwrap();
        let big = Message::Write {
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![0u8; MAX_FRAME_LEN]),
            fua: false,
        };
        assert!(matches!(q.push(&big), Err(FrameError::TooLarge(_))));
        let mut got = BytesMut::new();
        got.put(&mut q);
        assert_eq!(got, encode_frame(&Message::Ping).unwrap());
    }

    #[test]
    fn byte_at_a_time_decoding() {
        let mut all = BytesMut::new();
        for m in samples() {
            FrameCodec.encode(m, &mut all).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in all.iter() {
            buf.put_u8(*b);
            while let Some(m) = FrameCodec.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, samples());
    }

    #[test]
    fn crc_mismatch_detected() {
        let mut f = encode_frame(&Message::Write {
            seq: 9,
            offset: 0,
            data: Bytes::from(vec![0u8; 512]),
            fua: false,
        })
        .unwrap();
        let n = f.len();
        f[n / 2] ^= 0x40;
        assert!(matches!(
            FrameCodec.decode(&mut f),
            Err(FrameError::Crc { .. })
        ));
    }

    #[test]
    fn oversized_and_undersized_lengths_refused() {
        let mut b = BytesMut::new();
        b.put_u32((MAX_FRAME_LEN + 1) as u32);
        assert!(matches!(
            FrameCodec.decode(&mut b),
            Err(FrameError::BadLength(_))
        ));
        let mut b = BytesMut::new();
        b.put_u32(3);
        b.put_slice(&[0, 0, 0]);
        assert!(matches!(
            FrameCodec.decode(&mut b),
            Err(FrameError::BadLength(3))
        ));
        // Encoding a too-large message fails cleanly.
        let big = Message::Write {
            seq: 0,
            offset: 0,
            data: Bytes::from(vec![0u8; MAX_FRAME_LEN]),
            fua: false,
        };
        let mut out = BytesMut::new();
        assert!(FrameCodec.encode(big, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_frames_wait_and_truncated_payloads_fail() {
        let f = encode_frame(&samples()[0]).unwrap();
        for cut in 0..f.len() {
            let mut b = BytesMut::from(&f[..cut]);
            assert!(FrameCodec.decode(&mut b).unwrap().is_none());
        }
        // A well-framed (good CRC) but truncated payload is Malformed, not a panic.
        for m in samples() {
            let mut body = BytesMut::new();
            m.encode_body(&mut body);
            for cut in 1..body.len() {
                let r = Message::decode_body(Bytes::copy_from_slice(&body[..cut]));
                assert!(r.is_err(), "{} cut at {cut} parsed", m.name());
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..20_000 {
            let n = rng.gen_range(0..200);
            let mut v: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if i % 2 == 0 && v.len() >= 9 {
                // Plausible length and a valid CRC over random type+payload.
                let len = v.len() - 4;
                v[..4].copy_from_slice(&(len as u32).to_be_bytes());
                let crc = crc32c::crc32c(&v[4..v.len() - 4]);
                let l = v.len();
                v[l - 4..].copy_from_slice(&crc.to_be_bytes());
            }
            let mut b = BytesMut::from(&v[..]);
            for _ in 0..4 {
                match FrameCodec.decode(&mut b) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
