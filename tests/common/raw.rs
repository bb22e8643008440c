//! A minimal iSCSI initiator speaking raw PDUs ([`Raw`]), and on top of it a pipelined
//! block-tagging writer ([`TagWriter`]) that records which writes the target acknowledged,
//! so a test can check them later directly in a backing file.

use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};
use twinsan::iscsi::negotiation::encode_text;
use twinsan::iscsi::pdu::{Opcode, Pdu, PduCodec, RESERVED_TAG};

use super::{INIT1, IQN};

/// A minimal initiator speaking raw PDUs on one connection.
pub struct Raw {
    pub stream: TcpStream,
    pub codec: PduCodec,
    pub buf: BytesMut,
    /// CmdSN of the next non-immediate command.
    pub cmd_sn: u32,
    pub itt: u32,
    /// StatSN of the last status received, plus one.
    pub exp_stat_sn: u32,
    /// The target's MaxCmdSN from the last PDU that carried it.
    pub max_cmd_sn: u32,
    /// Keys of the final login response.
    pub negotiated: Vec<(String, String)>,
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl Raw {
    /// Logs in to [`IQN`] as [`INIT1`]; panics on failure.
    pub fn login(port: u16, header_digest: bool, data_digest: bool) -> Raw {
        Self::try_login(port, INIT1, header_digest, data_digest)
            .unwrap_or_else(|e| panic!("login: {e}"))
    }

    /// Logs in to [`IQN`] on 127.0.0.1:`port` as `initiator` (a normal session with
    /// immediate data and no initial R2T).
    pub fn try_login(
        port: u16,
        initiator: &str,
        header_digest: bool,
        data_digest: bool,
    ) -> std::io::Result<Raw> {
        Self::try_login_to(port, IQN, initiator, header_digest, data_digest)
    }

    /// Logs in to target `target` on 127.0.0.1:`port` as `initiator` (no CHAP).
    pub fn try_login_to(
        port: u16,
        target: &str,
        initiator: &str,
        header_digest: bool,
        data_digest: bool,
    ) -> std::io::Result<Raw> {
        Self::try_login_at(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            target,
            initiator,
            header_digest,
            data_digest,
            Duration::from_secs(10),
        )
    }

    /// Logs in to `target` on the portal `addr`, giving up connecting after `connect_limit`.
    pub fn try_login_at(
        addr: std::net::SocketAddr,
        target: &str,
        initiator: &str,
        header_digest: bool,
        data_digest: bool,
        connect_limit: Duration,
    ) -> std::io::Result<Raw> {
        let isid_low: u16 = rand::random();
        Self::try_login_isid(
            addr,
            target,
            initiator,
            isid_low,
            header_digest,
            data_digest,
            connect_limit,
        )
    }

    /// [`Raw::try_login_at`] with the low 16 bits of the ISID chosen by the caller: the
    /// same initiator port (name + ISID) on every login, as a real initiator's (what
    /// persistent reservations are keyed by).
    pub fn try_login_isid(
        addr: std::net::SocketAddr,
        target: &str,
        initiator: &str,
        isid_low: u16,
        header_digest: bool,
        data_digest: bool,
        connect_limit: Duration,
    ) -> std::io::Result<Raw> {
        let stream = TcpStream::connect_timeout(&addr, connect_limit)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let mut raw = Raw {
            stream,
            codec: PduCodec {
                max_recv_data_segment: 1 << 20,
                ..PduCodec::default()
            },
            buf: BytesMut::new(),
            cmd_sn: 1,
            itt: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            negotiated: Vec::new(),
        };
        let dig = |on: bool| if on { "CRC32C" } else { "None" };
        let text = encode_text(&[
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("HeaderDigest", dig(header_digest)),
            ("DataDigest", dig(data_digest)),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
        ]);
        let mut data = Bytes::from(text);
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        for _round in 0..4 {
            let mut p = Pdu::new(Opcode::LoginRequest);
            p.set_immediate(true);
            p.set_flags(0x80 | (1 << 2) | 3); // T, CSG=operational, NSG=full feature
            let [hi, lo] = isid_low.to_be_bytes();
            p.bhs[8..14].copy_from_slice(&[0x80, 0, 0x12, 0x34, hi, lo]);
            p.set_itt(0);
            p.set_u32_at(24, raw.cmd_sn);
            p.set_u32_at(28, raw.exp_stat_sn);
            p.set_data(std::mem::take(&mut data));
            raw.try_send(p)?;
            let r = raw
                .try_recv(Duration::from_secs(5))?
                .ok_or_else(|| bad("no login response within 5 s".into()))?;
            if r.opcode() != Some(Opcode::LoginResponse) {
                return Err(bad(format!("expected a login response, got {r:?}")));
            }
            if (r.bhs[36], r.bhs[37]) != (0, 0) {
                return Err(bad(format!(
                    "login refused: status {:#04x}/{:#04x}",
                    r.bhs[36], r.bhs[37]
                )));
            }
            for kv in r.data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
                let kv = String::from_utf8_lossy(kv);
                if let Some((k, v)) = kv.split_once('=') {
                    raw.negotiated.push((k.to_string(), v.to_string()));
                }
            }
            if r.flags() & 0x80 != 0 && r.flags() & 3 == 3 {
                raw.codec.header_digest = header_digest;
                raw.codec.data_digest = data_digest;
                return Ok(raw);
            }
        }
        Err(bad("login did not reach full feature phase".into()))
    }

    /// The value the target answered for `key` at login, if any.
    pub fn key(&self, key: &str) -> Option<&str> {
        self.negotiated
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn send(&mut self, p: Pdu) {
        self.try_send(p).expect("send PDU");
    }

    pub fn try_send(&mut self, p: Pdu) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.codec.encode(p, &mut out)?;
        self.stream.write_all(&out)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next PDU, or None on timeout; panics on EOF (use `closed`).
    pub fn recv(&mut self, limit: Duration) -> Option<Pdu> {
        match self.try_recv(limit) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => panic!("connection closed"),
            Err(e) => panic!("read: {e}"),
        }
    }

    /// The next PDU, None on timeout, an error when the connection is gone (EOF is
    /// `UnexpectedEof`). PDUs already received are returned before an EOF is reported.
    pub fn try_recv(&mut self, limit: Duration) -> std::io::Result<Option<Pdu>> {
        let deadline = Instant::now() + limit;
        loop {
            let frame = self.codec.decode(&mut self.buf).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("framing: {e:?}"))
            })?;
            if let Some(frame) = frame {
                let p = frame.expect("well-formed PDU from target");
                self.note_sns(&p);
                return Ok(Some(p));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Tracks StatSN and MaxCmdSN from PDUs that carry them.
    fn note_sns(&mut self, p: &Pdu) {
        let carries_sns = matches!(
            p.opcode(),
            Some(
                Opcode::ScsiResponse
                    | Opcode::DataIn
                    | Opcode::NopIn
                    | Opcode::R2t
                    | Opcode::TaskMgmtResponse
                    | Opcode::TextResponse
                    | Opcode::LogoutResponse
                    | Opcode::AsyncMessage
                    | Opcode::LoginResponse
            )
        );
        if !carries_sns {
            return;
        }
        let has_status = match p.opcode() {
            Some(Opcode::DataIn) => p.flags() & 0x01 != 0,
            Some(Opcode::R2t) => false,
            _ => true,
        };
        if has_status {
            self.exp_stat_sn = p.u32_at(24).wrapping_add(1);
        }
        let max = p.u32_at(32);
        if (max.wrapping_sub(self.max_cmd_sn) as i32) > 0 {
            self.max_cmd_sn = max;
        }
    }

    /// Whether the target closed the connection within `limit`.
    pub fn closed(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut tmp = [0u8; 4096];
        while Instant::now() < deadline {
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if timed_out(&e) => {}
                Err(_) => return true,
            }
        }
        false
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// NOP-Out ping; true when the matching NOP-In arrives.
    pub fn ping(&mut self) -> bool {
        let itt = self.next_itt();
        let mut p = Pdu::new(Opcode::NopOut);
        p.set_immediate(true);
        p.set_flags(0x80);
        p.set_itt(itt);
        p.set_u32_at(20, RESERVED_TAG);
        p.set_u32_at(24, self.cmd_sn);
        p.set_data(Bytes::from_static(b"ping"));
        self.send(p);
        self.wait_for(|r| r.opcode() == Some(Opcode::NopIn) && r.itt() == itt)
            .is_some_and(|r| &r.data[..] == b"ping")
    }

    pub fn wait_for(&mut self, want: impl Fn(&Pdu) -> bool) -> Option<Pdu> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(p) = self.recv(Duration::from_millis(500)) {
                if want(&p) {
                    return Some(p);
                }
            }
        }
        None
    }

    /// A TEST UNIT READY with an explicit CmdSN (not sent).
    pub fn test_unit_ready(&mut self, cmd_sn: u32) -> Pdu {
        let itt = self.next_itt();
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.set_flags(0x80 | 0x01);
        p.set_itt(itt);
        p.set_u32_at(24, cmd_sn);
        p
    }

    /// Whether the CmdSN window lets one more non-immediate command go out.
    pub fn window_open(&self) -> bool {
        (self.max_cmd_sn.wrapping_sub(self.cmd_sn) as i32) >= 0
    }

    /// A SCSI command on LUN `lun` with the next ITT and CmdSN (CmdSN advances), simple
    /// task attribute; `write` data goes as immediate data.
    pub fn scsi_command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        read_len: u32,
        write: Option<Bytes>,
    ) -> Pdu {
        assert!(cdb.len() <= 16);
        let itt = self.next_itt();
        let mut p = Pdu::new(Opcode::ScsiCommand);
        let mut flags = 0x80 | 0x01;
        if read_len > 0 {
            flags |= 0x40;
        }
        let mut edtl = read_len;
        if let Some(d) = &write {
            flags |= 0x20;
            edtl = d.len() as u32;
        }
        p.set_flags(flags);
        p.set_lun(lun << 48);
        p.set_itt(itt);
        p.set_u32_at(20, edtl);
        p.set_u32_at(24, self.cmd_sn);
        p.set_u32_at(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        if let Some(d) = write {
            p.set_data(d);
        }
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        p
    }

    /// Logs in to [`IQN`] on 127.0.0.1:`port` as `initiator` with a fixed ISID (the same
    /// initiator port on every login and every host); panics on failure.
    pub fn login_port(port: u16, initiator: &str, isid_low: u16) -> Raw {
        Self::try_login_isid(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            IQN,
            initiator,
            isid_low,
            false,
            false,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("login {initiator} to {port}: {e}"))
    }

    /// Runs a command on LUN 0 with `data` as immediate Data-Out; returns the SCSI status.
    pub fn status_with_data(&mut self, cdb: &[u8], data: Vec<u8>) -> u8 {
        let p = self.scsi_command(0, cdb, 0, Some(data.into()));
        let itt = p.itt();
        self.send(p);
        let resp = self
            .wait_for(|p| p.itt() == itt && p.opcode() == Some(Opcode::ScsiResponse))
            .expect("SCSI response");
        resp.bhs[3]
    }

    /// PERSISTENT RESERVE OUT(10) on LUN 0 with the basic 24-byte parameter list (SPC-4
    /// 6.16.3); returns the SCSI status.
    pub fn pr_out(
        &mut self,
        service_action: u8,
        pr_type: u8,
        key: u64,
        sa_key: u64,
        aptpl: bool,
    ) -> u8 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = service_action;
        cdb[2] = pr_type;
        cdb[8] = 24;
        let mut d = vec![0u8; 24];
        d[0..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        d[20] = u8::from(aptpl);
        self.status_with_data(&cdb, d)
    }

    /// Runs one command to completion: (status, data in, sense) or an error when the
    /// connection fails or no status arrives within `limit`.
    pub fn scsi_sync(
        &mut self,
        lun: u64,
        cdb: &[u8],
        read_len: u32,
        limit: Duration,
    ) -> std::io::Result<(u8, Vec<u8>, Vec<u8>)> {
        let p = self.scsi_command(lun, cdb, read_len, None);
        let itt = p.itt();
        self.try_send(p)?;
        let deadline = Instant::now() + limit;
        let mut data = Vec::new();
        while Instant::now() < deadline {
            let Some(r) = self.try_recv(Duration::from_millis(200))? else {
                continue;
            };
            if r.itt() != itt {
                continue;
            }
            match r.opcode() {
                Some(Opcode::DataIn) => {
                    data.extend_from_slice(&r.data);
                    if r.flags() & 0x01 != 0 {
                        return Ok((r.bhs[3], data, Vec::new()));
                    }
                }
                Some(Opcode::ScsiResponse) => {
                    let sense = if r.data.len() >= 2 {
                        r.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Ok((r.bhs[3], data, sense));
                }
                _ => {}
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no SCSI status",
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Tagged blocks
// ---------------------------------------------------------------------------------------

/// Size of one tagged block (the unit of the checker's writes and of the DRBD bitmap).
pub const TAG_BLOCK: u64 = 4096;
const TAG_MAGIC: &[u8; 8] = b"TWSNTAG1";

/// What a tagged block says about the write that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub iteration: u64,
    pub block: u64,
    pub seq: u64,
}

/// The 4 KiB content of write `seq` to `block`: magic, iteration, block, sequence number,
/// filler derived from them, CRC32C of everything before it in the last 4 bytes.
pub fn make_tag(iteration: u64, block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; TAG_BLOCK as usize];
    v[..8].copy_from_slice(TAG_MAGIC);
    v[8..16].copy_from_slice(&iteration.to_le_bytes());
    v[16..24].copy_from_slice(&block.to_le_bytes());
    v[24..32].copy_from_slice(&seq.to_le_bytes());
    let mut x = seq ^ block.rotate_left(32) ^ iteration.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in v[32..TAG_BLOCK as usize - 4].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&v[..TAG_BLOCK as usize - 4]);
    v[TAG_BLOCK as usize - 4..].copy_from_slice(&crc.to_le_bytes());
    v
}

/// What a 4 KiB block of a backing file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockContent {
    Zero,
    Tagged(Tag),
    /// Not zero and not an intact tag.
    Garbage(String),
}

pub fn read_tag(buf: &[u8]) -> BlockContent {
    assert_eq!(buf.len(), TAG_BLOCK as usize);
    if buf.iter().all(|&b| b == 0) {
        return BlockContent::Zero;
    }
    if &buf[..8] != TAG_MAGIC {
        return BlockContent::Garbage(format!("no tag magic: starts {:02x?}", &buf[..16]));
    }
    let u = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    let tag = Tag {
        iteration: u(8),
        block: u(16),
        seq: u(24),
    };
    let crc = crc32c::crc32c(&buf[..TAG_BLOCK as usize - 4]);
    let stored = u32::from_le_bytes(buf[TAG_BLOCK as usize - 4..].try_into().unwrap());
    if crc != stored {
        return BlockContent::Garbage(format!("checksum mismatch in {tag:?}"));
    }
    BlockContent::Tagged(tag)
}

/// Which blocks a [`TagWriter`] run writes.
#[derive(Debug, Clone)]
pub enum Blocks {
    /// Random 4 KiB blocks in `[first, first + count)`; never two writes to one block in
    /// flight at once (so the last acknowledged write of a block is also the last applied).
    Random { first: u64, count: u64 },
    /// Each listed block once, in order.
    List(Vec<u64>),
}

#[derive(Debug, Clone)]
pub struct WriteOpts {
    /// Goes into the tags; the sequence numbers of a run are `iteration << 32 | n`, so they
    /// grow across iterations.
    pub iteration: u64,
    pub blocks: Blocks,
    /// Commands in flight at most.
    pub queue_depth: usize,
    /// Stop issuing after this many writes.
    pub max_writes: u64,
    /// Stop issuing after this long.
    pub max_time: Duration,
    /// Percentage of writes sent with FUA.
    pub fua_percent: u32,
    pub seed: u64,
    /// Give the connection up when commands are outstanding and nothing arrived for this long,
    /// as an initiator's NOP-Out / replacement timeout does (open-iscsi: 5 s); None = wait.
    pub stall_limit: Option<Duration>,
}

impl WriteOpts {
    pub fn random(iteration: u64, first: u64, count: u64) -> WriteOpts {
        WriteOpts {
            iteration,
            blocks: Blocks::Random { first, count },
            queue_depth: 16,
            max_writes: u64::MAX,
            max_time: Duration::from_secs(10),
            fua_percent: 10,
            seed: iteration.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed,
            stall_limit: None,
        }
    }

    pub fn list(iteration: u64, blocks: Vec<u64>) -> WriteOpts {
        WriteOpts {
            blocks: Blocks::List(blocks),
            ..WriteOpts::random(iteration, 0, 0)
        }
    }
}

/// Shared with another thread while a run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    /// Acknowledged (GOOD) writes so far.
    pub acked: AtomicU64,
    /// Set to make the run stop issuing (in-flight writes are still waited for).
    pub stop: AtomicBool,
}

/// One finished write.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub block: u64,
    pub seq: u64,
    pub at: Instant,
    pub good: bool,
}

#[derive(Debug, Default)]
pub struct WriteReport {
    /// Block -> highest acknowledged sequence number.
    pub acked: BTreeMap<u64, u64>,
    /// Every write that got a status, in completion order.
    pub done: Vec<Done>,
    /// Writes that never got a status (connection lost): (block, seq).
    pub unanswered: Vec<(u64, u64)>,
    pub issued: u64,
    /// Writes answered with a status other than GOOD (first few described in `notes`).
    pub failed: u64,
    pub notes: Vec<String>,
    /// Why the run ended.
    pub end: String,
    pub elapsed: Duration,
}

impl WriteReport {
    pub fn good(&self) -> u64 {
        self.done.iter().filter(|d| d.good).count() as u64
    }

    /// Distinct blocks of writes that finished at or after `t` or never finished: what a
    /// peer that went away at `t` is missing.
    pub fn blocks_touched_since(&self, t: Instant) -> HashSet<u64> {
        let mut s: HashSet<u64> = self
            .done
            .iter()
            .filter(|d| d.at >= t)
            .map(|d| d.block)
            .collect();
        s.extend(self.unanswered.iter().map(|&(b, _)| b));
        s
    }

    pub fn summary(&self) -> String {
        format!(
            "issued {}, acked {}, failed {}, unanswered {}, distinct blocks acked {}, {:.2?}, ended: {}",
            self.issued,
            self.good(),
            self.failed,
            self.unanswered.len(),
            self.acked.len(),
            self.elapsed,
            self.end
        )
    }
}

struct Pending {
    block: u64,
    seq: u64,
    data: Bytes,
}

/// A pipelined writer of tagged 4 KiB blocks to LUN 0 through raw PDUs.
pub struct TagWriter {
    pub raw: Raw,
    pub block_size: u32,
    /// LUN size in bytes (READ CAPACITY).
    pub capacity: u64,
}

impl TagWriter {
    /// Logs in to 127.0.0.1:`port` and reads the capacity of LUN 0 (retrying unit
    /// attentions).
    pub fn connect(port: u16) -> std::io::Result<TagWriter> {
        Self::connect_at(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        )
    }

    /// Like [`TagWriter::connect`] on the portal `addr`.
    pub fn connect_at(
        addr: std::net::SocketAddr,
        connect_limit: Duration,
    ) -> std::io::Result<TagWriter> {
        let initiator = format!(
            "iqn.2026-11.org.twinsan.test:tagwriter-{:08x}",
            rand::random::<u32>()
        );
        let mut raw = Raw::try_login_at(addr, IQN, &initiator, false, false, connect_limit)?;
        let immediate = raw.key("ImmediateData").unwrap_or("Yes").to_string();
        assert_eq!(
            immediate, "Yes",
            "the target must accept ImmediateData: {:?}",
            raw.negotiated
        );
        let mut last = String::new();
        for _ in 0..5 {
            let (status, data, sense) = raw.scsi_sync(
                0,
                &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                8,
                Duration::from_secs(10),
            )?;
            if status == 0 && data.len() >= 8 {
                let last_lba = u32::from_be_bytes(data[0..4].try_into().unwrap()) as u64;
                let block_size = u32::from_be_bytes(data[4..8].try_into().unwrap());
                return Ok(TagWriter {
                    raw,
                    block_size,
                    capacity: (last_lba + 1) * block_size as u64,
                });
            }
            last = format!("status {status:#04x}, sense {sense:02x?}");
        }
        Err(std::io::Error::other(format!(
            "READ CAPACITY failed: {last}"
        )))
    }

    /// Number of 4 KiB blocks of the LUN.
    pub fn tag_blocks(&self) -> u64 {
        self.capacity / TAG_BLOCK
    }

    fn write_pdu(&mut self, block: u64, data: Bytes, fua: bool) -> Pdu {
        let lba = (block * TAG_BLOCK / self.block_size as u64) as u32;
        let n = (TAG_BLOCK / self.block_size as u64) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[1] = if fua { 0x08 } else { 0 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&n.to_be_bytes());
        self.raw.scsi_command(0, &cdb, 0, Some(data))
    }

    /// Writes until a bound in `o` is reached, `progress.stop` is set or the connection
    /// fails; then waits (at most 15 s) for the writes still in flight. Never panics on
    /// connection loss: that is how a killed target shows up.
    pub fn run(&mut self, o: &WriteOpts, progress: &Progress) -> WriteReport {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
        let start = Instant::now();
        let mut rep = WriteReport::default();
        let mut pending: HashMap<u32, Pending> = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut next_in_list = 0usize;
        let mut counter: u64 = 0;
        let mut ended: Option<String> = None;
        let mut drain_deadline = None;
        let mut last_rx = Instant::now();
        let limit = self.tag_blocks();
        'outer: loop {
            if ended.is_none() {
                if start.elapsed() >= o.max_time {
                    ended = Some("time limit reached".into());
                } else if progress.stop.load(Ordering::SeqCst) {
                    ended = Some("stopped".into());
                }
            }
            while ended.is_none() && pending.len() < o.queue_depth && self.raw.window_open() {
                if rep.issued >= o.max_writes {
                    ended = Some("write count reached".into());
                    break;
                }
                let block = match &o.blocks {
                    Blocks::Random { first, count } => {
                        let mut pick = None;
                        for _ in 0..64 {
                            let b = first + rng.gen_range(0..*count);
                            if !busy.contains(&b) {
                                pick = Some(b);
                                break;
                            }
                        }
                        match pick {
                            Some(b) => b,
                            None => break, // everything busy: wait for a completion
                        }
                    }
                    Blocks::List(l) => {
                        if next_in_list >= l.len() {
                            ended = Some("list written".into());
                            break;
                        }
                        if busy.contains(&l[next_in_list]) {
                            break;
                        }
                        next_in_list += 1;
                        l[next_in_list - 1]
                    }
                };
                assert!(
                    block < limit,
                    "block {block} beyond the LUN ({limit} blocks)"
                );
                let seq = (o.iteration << 32) | counter;
                counter += 1;
                let data = Bytes::from(make_tag(o.iteration, block, seq));
                let fua = rng.gen_range(0..100) < o.fua_percent;
                let p = self.write_pdu(block, data.clone(), fua);
                let itt = p.itt();
                if pending.is_empty() {
                    // The stall clock runs only while something is outstanding.
                    last_rx = Instant::now();
                }
                pending.insert(itt, Pending { block, seq, data });
                busy.insert(block);
                rep.issued += 1;
                if let Err(e) = self.raw.try_send(p) {
                    // Responses already received may still be read below.
                    ended = Some(format!("send failed: {e}"));
                    break;
                }
            }
            if ended.is_some() && pending.is_empty() {
                break;
            }
            if ended.is_some() && drain_deadline.is_none() {
                drain_deadline = Some(Instant::now() + Duration::from_secs(15));
            }
            if drain_deadline.is_some_and(|d| Instant::now() > d) {
                ended = Some(format!(
                    "{}; gave up waiting for {} writes",
                    ended.unwrap_or_default(),
                    pending.len()
                ));
                break;
            }
            let r = match self.raw.try_recv(Duration::from_millis(100)) {
                Ok(Some(r)) => {
                    last_rx = Instant::now();
                    r
                }
                Ok(None) => {
                    if let Some(limit) = o.stall_limit {
                        if !pending.is_empty() && last_rx.elapsed() > limit {
                            ended = Some(format!(
                                "connection lost: no response for {limit:?} with {} commands outstanding",
                                pending.len()
                            ));
                            break;
                        }
                    }
                    continue;
                }
                Err(e) => {
                    ended = Some(match ended {
                        Some(why) => format!("{why}; then connection lost: {e}"),
                        None => format!("connection lost: {e}"),
                    });
                    break;
                }
            };
            match r.opcode() {
                Some(Opcode::ScsiResponse) => {
                    let Some(p) = pending.remove(&r.itt()) else {
                        rep.notes
                            .push(format!("response for unknown ITT {:#x}", r.itt()));
                        continue;
                    };
                    busy.remove(&p.block);
                    let good = r.bhs[2] == 0 && r.bhs[3] == 0;
                    rep.done.push(Done {
                        block: p.block,
                        seq: p.seq,
                        at: Instant::now(),
                        good,
                    });
                    if good {
                        let e = rep.acked.entry(p.block).or_insert(p.seq);
                        *e = (*e).max(p.seq);
                        progress.acked.fetch_add(1, Ordering::SeqCst);
                    } else {
                        rep.failed += 1;
                        if rep.notes.len() < 5 {
                            let sense = if r.data.len() > 2 {
                                &r.data[2..r.data.len().min(20)]
                            } else {
                                &[][..]
                            };
                            rep.notes.push(format!(
                                "write to block {} failed: response {:#04x} status {:#04x} sense {sense:02x?}",
                                p.block, r.bhs[2], r.bhs[3]
                            ));
                        }
                    }
                }
                Some(Opcode::R2t) => {
                    // Only with InitialR2T/ImmediateData other than negotiated; answer anyway.
                    let Some(p) = pending.get(&r.itt()) else {
                        continue;
                    };
                    let (off, len) = (r.u32_at(40) as usize, r.u32_at(44) as usize);
                    let end = (off + len).min(p.data.len());
                    let mut d = Pdu::new(Opcode::DataOut);
                    d.set_flags(0x80);
                    d.set_itt(r.itt());
                    d.set_u32_at(20, r.u32_at(20));
                    d.set_u32_at(28, self.raw.exp_stat_sn);
                    d.set_u32_at(40, off as u32);
                    d.set_data(p.data.slice(off.min(end)..end));
                    if let Err(e) = self.raw.try_send(d) {
                        ended = Some(format!("send failed: {e}"));
                        break 'outer;
                    }
                }
                Some(Opcode::NopIn) if r.u32_at(20) != RESERVED_TAG => {
                    // A ping from the target: answer it.
                    let mut n = Pdu::new(Opcode::NopOut);
                    n.set_immediate(true);
                    n.set_flags(0x80);
                    n.set_itt(RESERVED_TAG);
                    n.set_u32_at(20, r.u32_at(20));
                    n.set_u32_at(24, self.raw.cmd_sn);
                    n.set_u32_at(28, self.raw.exp_stat_sn);
                    let _ = self.raw.try_send(n);
                }
                Some(Opcode::Reject) if rep.notes.len() < 5 => {
                    rep.notes.push(format!("Reject reason {:#04x}", r.bhs[2]));
                }
                _ => {}
            }
        }
        rep.unanswered = pending.values().map(|p| (p.block, p.seq)).collect();
        rep.end = ended.unwrap_or_else(|| "?".into());
        rep.elapsed = start.elapsed();
        rep
    }
}

/// Checks `acked` (block -> highest acknowledged seq) against the data area in `image`:
/// every acknowledged block must hold an intact tag for that block with a sequence number
/// at least the acknowledged one. Blocks in `scan` must be zero or intact tags. Returns
/// the problems found (empty = all good) and how many blocks held a newer, unacknowledged
/// write.
pub fn check_acked(
    image: &Path,
    acked: &BTreeMap<u64, u64>,
    scan: std::ops::Range<u64>,
) -> (Vec<String>, u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    let mut problems = Vec::new();
    let mut newer = 0;
    let mut buf = vec![0u8; TAG_BLOCK as usize];
    for (&block, &seq) in acked {
        f.read_exact_at(&mut buf, block * TAG_BLOCK).unwrap();
        match read_tag(&buf) {
            BlockContent::Tagged(t) if t.block == block && t.seq >= seq => {
                if t.seq > seq {
                    newer += 1;
                }
            }
            other => problems.push(format!(
                "block {block}: acknowledged seq {seq:#x}, found {other:?}"
            )),
        }
    }
    for block in scan {
        f.read_exact_at(&mut buf, block * TAG_BLOCK).unwrap();
        match read_tag(&buf) {
            BlockContent::Garbage(why) => problems.push(format!("block {block}: {why}")),
            BlockContent::Tagged(t) if t.block != block => problems.push(format!(
                "block {block}: holds the tag of block {} ({t:?})",
                t.block
            )),
            _ => {}
        }
    }
    (problems, newer)
}

/// Runs a [`TagWriter`] on `port` in a thread; the handle returns the report (or the
/// connect error as a string).
pub fn spawn_writer(
    port: u16,
    opts: WriteOpts,
    progress: Arc<Progress>,
) -> std::thread::JoinHandle<Result<WriteReport, String>> {
    std::thread::spawn(move || {
        let mut w = TagWriter::connect(port).map_err(|e| format!("connect to {port}: {e}"))?;
        Ok(w.run(&opts, &progress))
    })
}
