//! The 4 KiB DRBD metadata superblock, v08 (DRBD 8.4) and v09 (DRBD 9).
//!
//! All integers are big-endian. Layouts: `struct md_on_disk_08` in drbd-utils
//! `user/shared/drbdmeta.c` and `struct meta_data_on_disk_9` in drbd-headers
//! `drbd_meta_data.h`. Parsing keeps the raw block so that serializing an
//! unmodified superblock gives back the exact bytes, reserved and unknown bytes
//! included.

use std::fmt;

use thiserror::Error;

/// Size of the superblock on disk.
pub const SUPERBLOCK_SIZE: usize = 4096;

/// `DRBD_MAGIC` (`linux/drbd.h`); the metadata magics are small offsets from it.
pub const DRBD_MAGIC: u32 = 0x8374_0267;
/// DRBD 0.6 metadata magic (`DRBD_MAGIC + 2`), recognised only to refuse it.
pub const DRBD_MD_MAGIC_06: u32 = DRBD_MAGIC + 2;
/// DRBD 0.7 metadata magic (`DRBD_MAGIC + 3`), recognised only to refuse it.
pub const DRBD_MD_MAGIC_07: u32 = DRBD_MAGIC + 3;
/// DRBD 8.x clean metadata magic (`DRBD_MAGIC + 4`).
pub const DRBD_MD_MAGIC_08: u32 = DRBD_MAGIC + 4;
/// Written by a DRBD 8.4 kernel while attached (`DRBD_MAGIC + 5`): the activity
/// log must be replayed before the bitmap can be trusted.
pub const DRBD_MD_MAGIC_84_UNCLEAN: u32 = DRBD_MAGIC + 5;
/// DRBD 9 metadata magic (`DRBD_MAGIC + 6`).
pub const DRBD_MD_MAGIC_09: u32 = DRBD_MAGIC + 6;

/// Maximum number of peers (bitmap slots) of v09 metadata (`DRBD_PEERS_MAX`).
pub const DRBD_PEERS_MAX: usize = 32;
/// Number of history UUIDs in v08 metadata (`HISTORY_UUIDS_V08`).
pub const HISTORY_UUIDS_V08: usize = 2;
/// Current UUID of freshly created metadata (DRBD's `UUID_JUST_CREATED`).
pub const UUID_JUST_CREATED: u64 = 4;
/// Number of history UUIDs in v09 metadata (`HISTORY_UUIDS`).
pub const HISTORY_UUIDS_V09: usize = 32;

/// The only bitmap granularity DRBD uses: 4 KiB of data per bit.
pub const BM_BYTES_PER_BIT: u32 = 4096;

/// Largest last-agreed size drbdmeta accepts: 1 PiB in sectors (drbdmeta.c
/// `bm_bytes()` asserts `sectors <= 1 << (50 - 9)`).
pub const MAX_EFFECTIVE_SIZE_SECT: u64 = 1 << (50 - 9);

/// Smallest activity log in 4 KiB blocks (kernel `check_activity_log_stripe_size`).
pub const AL_SIZE_4K_MIN: u64 = 8;
/// Largest activity log in 4 KiB blocks: 16 GiB (kernel `check_activity_log_stripe_size`).
pub const AL_SIZE_4K_MAX: u64 = 16 * 1024 * 1024 / 4;

const PEER_MD_OFFSET: usize = 112;
const PEER_MD_SIZE: usize = 32;
const HISTORY_V09_OFFSET: usize = PEER_MD_OFFSET + DRBD_PEERS_MAX * PEER_MD_SIZE; // 1136

/// Metadata format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MdVersion {
    /// DRBD 8.4 ("v08" in drbdmeta).
    V08,
    /// DRBD 9 ("v09" in drbdmeta).
    V09,
}

impl MdVersion {
    /// The name drbdmeta uses for this format.
    pub fn drbdmeta_name(self) -> &'static str {
        match self {
            MdVersion::V08 => "v08",
            MdVersion::V09 => "v09",
        }
    }
}

impl fmt::Display for MdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.drbdmeta_name())
    }
}

/// Whether the activity log has been applied to the bitmap.
///
/// drbdmeta.c `meta_dump_md`: clean means "magic is not
/// `DRBD_MD_MAGIC_84_UNCLEAN` and `MDF_AL_CLEAN` is set".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaState {
    /// The bitmap can be trusted as is.
    Clean,
    /// A kernel had the device attached and did not detach cleanly (or is still
    /// attached): replay the activity log into the bitmap before use.
    Unclean,
}

macro_rules! flag_type {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $flag:ident = $bit:expr => $label:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u32);

        impl $name {
            $($(#[$fm])* pub const $flag: $name = $name($bit);)*
            const NAMES: &'static [(u32, &'static str)] = &[$(($bit, $label),)*];

            /// No flag set.
            pub const fn empty() -> Self {
                $name(0)
            }
            /// The raw on-disk value.
            pub const fn bits(self) -> u32 {
                self.0
            }
            /// From the raw on-disk value; unknown bits are kept.
            pub const fn from_bits(bits: u32) -> Self {
                $name(bits)
            }
            /// True if every bit of `other` is set in `self`.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
            /// Sets the bits of `other`.
            pub fn insert(&mut self, other: Self) {
                self.0 |= other.0;
            }
            /// Clears the bits of `other`.
            pub fn remove(&mut self, other: Self) {
                self.0 &= !other.0;
            }
            /// Sets or clears the bits of `other`.
            pub fn set(&mut self, other: Self, value: bool) {
                if value {
                    self.insert(other)
                } else {
                    self.remove(other)
                }
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(0x{:08x}", stringify!($name), self.0)?;
                let mut rest = self.0;
                let mut sep = ": ";
                for (bit, label) in Self::NAMES {
                    if self.0 & bit != 0 {
                        write!(f, "{sep}{label}")?;
                        sep = " | ";
                        rest &= !bit;
                    }
                }
                if rest != 0 {
                    write!(f, "{sep}0x{rest:x}")?;
                }
                f.write_str(")")
            }
        }
    };
}

flag_type! {
    /// Device flags (`enum mdf_flag`, `drbd_int.h` / `drbd_meta_data.h`).
    ///
    /// v09 keeps bits 0, 1, 4, 6, 7, 8 with the same meaning; bits 2, 3 and 5
    /// moved into the per-peer [`PeerFlags`] there.
    MdFlags {
        /// `MDF_CONSISTENT`: the data is consistent.
        CONSISTENT = 1 << 0 => "consistent",
        /// `MDF_PRIMARY_IND`: the node is (or was, when it crashed) primary.
        PRIMARY_IND = 1 << 1 => "primary",
        /// `MDF_CONNECTED_IND` (v08 only): was connected.
        CONNECTED_IND = 1 << 2 => "connected",
        /// `MDF_FULL_SYNC` (v08 only): a full sync was being set up.
        FULL_SYNC = 1 << 3 => "full-sync",
        /// `MDF_WAS_UP_TO_DATE`: the data was up to date.
        WAS_UP_TO_DATE = 1 << 4 => "was-up-to-date",
        /// `MDF_PEER_OUT_DATED` (v08 only): the peer's disk is outdated.
        PEER_OUT_DATED = 1 << 5 => "peer-outdated",
        /// `MDF_CRASHED_PRIMARY`: was primary and has not seen the peer since.
        CRASHED_PRIMARY = 1 << 6 => "crashed-primary",
        /// `MDF_AL_CLEAN`: the activity log was applied / the node detached cleanly.
        AL_CLEAN = 1 << 7 => "al-clean",
        /// `MDF_AL_DISABLED`: the activity log is disabled.
        AL_DISABLED = 1 << 8 => "al-disabled",
        /// `MDF_PRIMARY_LOST_QUORUM` (v09 only).
        PRIMARY_LOST_QUORUM = 1 << 9 => "primary-lost-quorum",
        /// `MDF_HAVE_QUORUM` (v09 only).
        HAVE_QUORUM = 1 << 10 => "have-quorum",
    }
}

flag_type! {
    /// Per-peer flags of v09 metadata (`enum mdf_peer_flag`, `drbd_int.h` of DRBD 9).
    PeerFlags {
        /// `MDF_PEER_CONNECTED`.
        CONNECTED = 1 << 0 => "connected",
        /// `MDF_PEER_OUTDATED`.
        OUTDATED = 1 << 1 => "outdated",
        /// `MDF_PEER_FENCING`.
        FENCING = 1 << 2 => "fencing",
        /// `MDF_PEER_FULL_SYNC`.
        FULL_SYNC = 1 << 3 => "full-sync",
        /// `MDF_PEER_DEVICE_SEEN`.
        DEVICE_SEEN = 1 << 4 => "seen",
        /// `MDF_NODE_EXISTS`.
        NODE_EXISTS = 1 << 16 => "exists",
    }
}

/// One peer slot of v09 metadata (`struct peer_dev_md_on_disk_9`, 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerMd {
    /// Bitmap UUID towards this peer.
    pub bitmap_uuid: u64,
    /// Data generation tag of the bitmap.
    pub bitmap_dagtag: u64,
    /// Per-peer flags.
    pub flags: PeerFlags,
    /// Bitmap slot used for this peer, -1 for none.
    pub bitmap_index: i32,
}

impl PeerMd {
    /// An unused slot as drbdmeta `create-md` writes it (bitmap index -1).
    pub const UNUSED: PeerMd = PeerMd {
        bitmap_uuid: 0,
        bitmap_dagtag: 0,
        flags: PeerFlags(0),
        bitmap_index: -1,
    };
}

/// Why a superblock could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SuperblockError {
    /// The buffer is not one 4 KiB block.
    #[error("superblock buffer is {0} bytes, expected 4096")]
    BadLength(usize),
    /// The magic at byte 60 is none of the DRBD metadata magics.
    #[error(
        "no DRBD metadata: magic at byte 60 is 0x{found:08x} (expected 0x8374026b v08, \
         0x8374026c v08 unclean or 0x8374026d v09)"
    )]
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// DRBD 0.6/0.7 metadata.
    #[error(
        "DRBD {0} metadata (magic at byte 60) is not supported; convert it with drbdmeta first"
    )]
    UnsupportedVersion(&'static str),
    /// A field has a value DRBD would refuse.
    #[error("superblock field {field} (byte {offset}) = {value}: {reason}")]
    BadField {
        /// Field name as in drbdmeta.c.
        field: &'static str,
        /// Byte offset in the superblock.
        offset: usize,
        /// The value found.
        value: i64,
        /// What is wrong with it.
        reason: String,
    },
}

fn bad(
    field: &'static str,
    offset: usize,
    value: i64,
    reason: impl Into<String>,
) -> SuperblockError {
    SuperblockError::BadField {
        field,
        offset,
        value,
        reason: reason.into(),
    }
}

/// A parsed superblock, v08 or v09.
///
/// Fields that exist in only one version are documented as such; for v08,
/// `max_peers` is 1, `node_id` is -1 and `peers` is empty.
#[derive(Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format version.
    pub version: MdVersion,
    /// The magic read (or to be written). For v08 this is either
    /// [`DRBD_MD_MAGIC_08`] or [`DRBD_MD_MAGIC_84_UNCLEAN`].
    pub magic: u32,
    /// Last agreed size of the replicated device in sectors (`la_size_sect`).
    pub effective_size: u64,
    /// Current generation UUID.
    pub current_uuid: u64,
    /// v08: the bitmap UUID (`uuid[UI_BITMAP]`). Unused (0) for v09, where each
    /// peer slot has its own.
    pub bitmap_uuid: u64,
    /// History UUIDs: 2 for v08, 32 for v09.
    pub history_uuids: Vec<u64>,
    /// v09 only: members bitmask (`members`, byte 16).
    pub members: u64,
    /// Device UUID.
    pub device_uuid: u64,
    /// Device flags.
    pub flags: MdFlags,
    /// Size of the whole metadata area in sectors.
    pub md_size_sect: u32,
    /// Activity log offset in sectors, relative to the superblock.
    pub al_offset: i32,
    /// Number of activity log extents (`al-extents`) of the last attach.
    pub al_nr_extents: u32,
    /// Bitmap offset in sectors, relative to the superblock.
    pub bm_offset: i32,
    /// Bytes of data per bitmap bit (always 4096).
    pub bm_bytes_per_bit: u32,
    /// Last agreed peer max bio size.
    pub la_peer_max_bio_size: u32,
    /// Activity log stripes as stored (v08 may store 0 meaning 1).
    pub al_stripes: u32,
    /// Activity log stripe size in 4 KiB blocks as stored (v08 may store 0 meaning 8).
    pub al_stripe_size_4k: u32,
    /// v09 only: number of bitmap slots (`bm_max_peers`); 1 for v08.
    pub max_peers: u32,
    /// v09 only: own node id, -1 when unset; -1 for v08.
    pub node_id: i32,
    /// v09 only: the 32 peer slots; empty for v08.
    pub peers: Vec<PeerMd>,
    raw: Box<[u8; SUPERBLOCK_SIZE]>,
}

impl fmt::Debug for Superblock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Superblock");
        d.field("version", &self.version)
            .field("magic", &format_args!("0x{:08x}", self.magic))
            .field("effective_size", &self.effective_size)
            .field(
                "current_uuid",
                &format_args!("0x{:016X}", self.current_uuid),
            )
            .field("bitmap_uuid", &format_args!("0x{:016X}", self.bitmap_uuid))
            .field("device_uuid", &format_args!("0x{:016X}", self.device_uuid))
            .field("flags", &self.flags)
            .field("md_size_sect", &self.md_size_sect)
            .field("al_offset", &self.al_offset)
            .field("al_nr_extents", &self.al_nr_extents)
            .field("bm_offset", &self.bm_offset)
            .field("bm_bytes_per_bit", &self.bm_bytes_per_bit)
            .field("la_peer_max_bio_size", &self.la_peer_max_bio_size)
            .field("al_stripes", &self.al_stripes)
            .field("al_stripe_size_4k", &self.al_stripe_size_4k);
        if self.version == MdVersion::V09 {
            d.field("max_peers", &self.max_peers)
                .field("node_id", &self.node_id)
                .field("members", &self.members);
        }
        d.finish_non_exhaustive()
    }
}

fn be_u64(b: &[u8; SUPERBLOCK_SIZE], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8; SUPERBLOCK_SIZE], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn put_u64(b: &mut [u8; SUPERBLOCK_SIZE], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_u32(b: &mut [u8; SUPERBLOCK_SIZE], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Byte offsets of the fields shared by v08 and v09.
mod off {
    pub const EFFECTIVE_SIZE: usize = 0;
    pub const CURRENT_UUID: usize = 8;
    pub const V08_BITMAP_UUID: usize = 16;
    pub const V08_HISTORY: usize = 24;
    pub const V09_MEMBERS: usize = 16;
    pub const DEVICE_UUID: usize = 40;
    pub const V09_DEVICE_UUID: usize = 48;
    pub const FLAGS: usize = 56;
    pub const MAGIC: usize = 60;
    pub const MD_SIZE_SECT: usize = 64;
    pub const AL_OFFSET: usize = 68;
    pub const AL_NR_EXTENTS: usize = 72;
    pub const BM_OFFSET: usize = 76;
    pub const BM_BYTES_PER_BIT: usize = 80;
    pub const LA_PEER_MAX_BIO_SIZE: usize = 84;
    pub const V08_AL_STRIPES: usize = 88;
    pub const V08_AL_STRIPE_SIZE_4K: usize = 92;
    pub const V09_BM_MAX_PEERS: usize = 88;
    pub const V09_NODE_ID: usize = 92;
    pub const V09_AL_STRIPES: usize = 96;
    pub const V09_AL_STRIPE_SIZE_4K: usize = 100;
}

impl Superblock {
    /// Peeks at the magic (byte 60) of a superblock-sized buffer.
    pub fn peek_magic(buf: &[u8]) -> Option<u32> {
        let b = buf.get(off::MAGIC..off::MAGIC + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Parses a 4096-byte superblock and checks the fields that do not depend
    /// on the device it was read from (see [`crate::drbd::layout`] for the rest).
    pub fn parse(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        let raw: Box<[u8; SUPERBLOCK_SIZE]> = match <[u8; SUPERBLOCK_SIZE]>::try_from(buf) {
            Ok(a) => Box::new(a),
            Err(_) => return Err(SuperblockError::BadLength(buf.len())),
        };
        let magic = be_u32(&raw, off::MAGIC);
        let version = match magic {
            DRBD_MD_MAGIC_08 | DRBD_MD_MAGIC_84_UNCLEAN => MdVersion::V08,
            DRBD_MD_MAGIC_09 => MdVersion::V09,
            DRBD_MD_MAGIC_07 => return Err(SuperblockError::UnsupportedVersion("0.7")),
            DRBD_MD_MAGIC_06 => return Err(SuperblockError::UnsupportedVersion("0.6")),
            found => return Err(SuperblockError::BadMagic { found }),
        };
        let sb = match version {
            MdVersion::V08 => Superblock {
                version,
                magic,
                effective_size: be_u64(&raw, off::EFFECTIVE_SIZE),
                current_uuid: be_u64(&raw, off::CURRENT_UUID),
                bitmap_uuid: be_u64(&raw, off::V08_BITMAP_UUID),
                history_uuids: (0..HISTORY_UUIDS_V08)
                    .map(|i| be_u64(&raw, off::V08_HISTORY + 8 * i))
                    .collect(),
                members: 0,
                device_uuid: be_u64(&raw, off::DEVICE_UUID),
                flags: MdFlags(be_u32(&raw, off::FLAGS)),
                md_size_sect: be_u32(&raw, off::MD_SIZE_SECT),
                al_offset: be_u32(&raw, off::AL_OFFSET) as i32,
                al_nr_extents: be_u32(&raw, off::AL_NR_EXTENTS),
                bm_offset: be_u32(&raw, off::BM_OFFSET) as i32,
                bm_bytes_per_bit: be_u32(&raw, off::BM_BYTES_PER_BIT),
                la_peer_max_bio_size: be_u32(&raw, off::LA_PEER_MAX_BIO_SIZE),
                al_stripes: be_u32(&raw, off::V08_AL_STRIPES),
                al_stripe_size_4k: be_u32(&raw, off::V08_AL_STRIPE_SIZE_4K),
                max_peers: 1,
                node_id: -1,
                peers: Vec::new(),
                raw,
            },
            MdVersion::V09 => {
                let peers = (0..DRBD_PEERS_MAX)
                    .map(|p| {
                        let o = PEER_MD_OFFSET + p * PEER_MD_SIZE;
                        PeerMd {
                            bitmap_uuid: be_u64(&raw, o),
                            bitmap_dagtag: be_u64(&raw, o + 8),
                            flags: PeerFlags(be_u32(&raw, o + 16)),
                            bitmap_index: be_u32(&raw, o + 20) as i32,
                        }
                    })
                    .collect();
                Superblock {
                    version,
                    magic,
                    effective_size: be_u64(&raw, off::EFFECTIVE_SIZE),
                    current_uuid: be_u64(&raw, off::CURRENT_UUID),
                    bitmap_uuid: 0,
                    history_uuids: (0..HISTORY_UUIDS_V09)
                        .map(|i| be_u64(&raw, HISTORY_V09_OFFSET + 8 * i))
                        .collect(),
                    members: be_u64(&raw, off::V09_MEMBERS),
                    device_uuid: be_u64(&raw, off::V09_DEVICE_UUID),
                    flags: MdFlags(be_u32(&raw, off::FLAGS)),
                    md_size_sect: be_u32(&raw, off::MD_SIZE_SECT),
                    al_offset: be_u32(&raw, off::AL_OFFSET) as i32,
                    al_nr_extents: be_u32(&raw, off::AL_NR_EXTENTS),
                    bm_offset: be_u32(&raw, off::BM_OFFSET) as i32,
                    bm_bytes_per_bit: be_u32(&raw, off::BM_BYTES_PER_BIT),
                    la_peer_max_bio_size: be_u32(&raw, off::LA_PEER_MAX_BIO_SIZE),
                    al_stripes: be_u32(&raw, off::V09_AL_STRIPES),
                    al_stripe_size_4k: be_u32(&raw, off::V09_AL_STRIPE_SIZE_4K),
                    max_peers: be_u32(&raw, off::V09_BM_MAX_PEERS),
                    node_id: be_u32(&raw, off::V09_NODE_ID) as i32,
                    peers,
                    raw,
                }
            }
        };
        sb.validate()?;
        Ok(sb)
    }

    /// A fresh superblock as `drbdmeta create-md` initialises it
    /// (drbdmeta.c `v08_md_initialize` / `v09_md_initialize`): current UUID
    /// [`UUID_JUST_CREATED`], flags `AL_CLEAN`, al-extents
    /// 257, everything else zero (v09: node id -1, all bitmap indexes -1).
    /// Offsets and sizes are left zero for [`crate::drbd::layout`] to fill in.
    pub fn new(version: MdVersion, max_peers: u32) -> Superblock {
        let (magic, history, peers, max_peers) = match version {
            MdVersion::V08 => (DRBD_MD_MAGIC_08, HISTORY_UUIDS_V08, Vec::new(), 1),
            MdVersion::V09 => (
                DRBD_MD_MAGIC_09,
                HISTORY_UUIDS_V09,
                vec![PeerMd::UNUSED; DRBD_PEERS_MAX],
                max_peers,
            ),
        };
        Superblock {
            version,
            magic,
            effective_size: 0,
            current_uuid: UUID_JUST_CREATED,
            bitmap_uuid: 0,
            history_uuids: vec![0; history],
            members: 0,
            device_uuid: 0,
            flags: MdFlags::AL_CLEAN,
            md_size_sect: 0,
            al_offset: 0,
            al_nr_extents: 257,
            bm_offset: 0,
            bm_bytes_per_bit: BM_BYTES_PER_BIT,
            la_peer_max_bio_size: 0,
            al_stripes: 1,
            al_stripe_size_4k: 8,
            max_peers,
            node_id: -1,
            peers,
            raw: Box::new([0u8; SUPERBLOCK_SIZE]),
        }
    }

    /// Effective activity log striping: `(stripes, stripe_size_4k)`, with the
    /// v08 "both zero means 1 x 32 KiB" rule (drbdmeta.c `md_disk_08_to_cpu`).
    pub fn al_striping(&self) -> (u32, u32) {
        if self.al_stripes == 0 && self.al_stripe_size_4k == 0 {
            (1, 8)
        } else {
            (self.al_stripes, self.al_stripe_size_4k)
        }
    }

    /// Activity log size in 4 KiB blocks.
    pub fn al_size_4k(&self) -> u64 {
        let (s, z) = self.al_striping();
        u64::from(s) * u64::from(z)
    }

    /// Activity log size in sectors.
    pub fn al_size_sect(&self) -> u64 {
        self.al_size_4k() * 8
    }

    /// Clean or unclean, as drbdmeta.c `meta_dump_md` decides it.
    pub fn state(&self) -> MetaState {
        if self.magic != DRBD_MD_MAGIC_84_UNCLEAN && self.flags.contains(MdFlags::AL_CLEAN) {
            MetaState::Clean
        } else {
            MetaState::Unclean
        }
    }

    /// Marks the metadata clean: sets `AL_CLEAN` and, for v08, the clean magic
    /// (drbdmeta.c `meta_apply_al`).
    pub fn mark_clean(&mut self) {
        self.flags.insert(MdFlags::AL_CLEAN);
        if self.version == MdVersion::V08 {
            self.magic = DRBD_MD_MAGIC_08;
        }
    }

    /// Marks the metadata unclean the way an attached kernel does: v08 writes
    /// the unclean magic (drbd 8.4 `drbd_md_write`), v09 clears `AL_CLEAN`.
    pub fn mark_unclean(&mut self) {
        match self.version {
            MdVersion::V08 => self.magic = DRBD_MD_MAGIC_84_UNCLEAN,
            MdVersion::V09 => self.flags.remove(MdFlags::AL_CLEAN),
        }
    }

    /// The peer slot whose bitmap is bitmap slot 0 (v09), or 0 when none is
    /// assigned yet. Always 0 for v08.
    pub fn primary_peer_slot(&self) -> usize {
        self.peers
            .iter()
            .position(|p| p.bitmap_index == 0)
            .unwrap_or(0)
    }

    /// The bitmap UUID towards peer slot `peer` (v09) or the single bitmap UUID (v08).
    pub fn bitmap_uuid_for(&self, peer: usize) -> u64 {
        match self.version {
            MdVersion::V08 => self.bitmap_uuid,
            MdVersion::V09 => self.peers.get(peer).map_or(0, |p| p.bitmap_uuid),
        }
    }

    /// Checks the fields that must hold whatever the layout (drbdmeta.c
    /// `is_valid_md` and the kernel's `check_activity_log_stripe_size`).
    pub fn validate(&self) -> Result<(), SuperblockError> {
        if self.bm_bytes_per_bit != BM_BYTES_PER_BIT {
            return Err(bad(
                "bm_bytes_per_bit",
                off::BM_BYTES_PER_BIT,
                self.bm_bytes_per_bit.into(),
                "only 4096 bytes per bitmap bit is supported",
            ));
        }
        if self.effective_size > MAX_EFFECTIVE_SIZE_SECT {
            return Err(bad(
                "la_size_sect",
                off::EFFECTIVE_SIZE,
                self.effective_size as i64,
                "larger than 1 PiB",
            ));
        }
        let (stripes_off, size_off) = match self.version {
            MdVersion::V08 => (off::V08_AL_STRIPES, off::V08_AL_STRIPE_SIZE_4K),
            MdVersion::V09 => (off::V09_AL_STRIPES, off::V09_AL_STRIPE_SIZE_4K),
        };
        let (stripes, stripe_size) = self.al_striping();
        if stripes == 0 {
            return Err(bad(
                "al_stripes",
                stripes_off,
                0,
                "must not be 0 unless al_stripe_size_4k is 0 too",
            ));
        }
        if stripe_size == 0 {
            return Err(bad(
                "al_stripe_size_4k",
                size_off,
                0,
                "must not be 0 unless al_stripes is 0 too",
            ));
        }
        let al_4k = self.al_size_4k();
        if !(AL_SIZE_4K_MIN..=AL_SIZE_4K_MAX).contains(&al_4k) {
            return Err(bad(
                "al_stripe_size_4k",
                size_off,
                stripe_size.into(),
                format!("activity log of {stripes} x {stripe_size} blocks is outside 8 .. 4194304 blocks"),
            ));
        }
        let al_sect = al_4k * 8;
        let md_size = u64::from(self.md_size_sect);
        if md_size < 8 + al_sect {
            return Err(bad(
                "md_size_sect",
                off::MD_SIZE_SECT,
                md_size as i64,
                format!(
                    "smaller than superblock plus activity log ({} sectors)",
                    8 + al_sect
                ),
            ));
        }
        let al_offset = i64::from(self.al_offset);
        let bm_offset = i64::from(self.bm_offset);
        if al_offset == 8 {
            // External layout: [superblock][AL][bitmap].
            if bm_offset != 8 + al_sect as i64 {
                return Err(bad(
                    "bm_offset",
                    off::BM_OFFSET,
                    bm_offset,
                    format!(
                        "external metadata needs bm_offset = 8 + AL sectors = {}",
                        8 + al_sect
                    ),
                ));
            }
        } else if al_offset == -(al_sect as i64) {
            // Internal layout: [bitmap][AL][superblock].
            if bm_offset != 8 - md_size as i64 {
                return Err(bad(
                    "bm_offset",
                    off::BM_OFFSET,
                    bm_offset,
                    format!(
                        "internal metadata needs bm_offset = 8 - md_size_sect = {}",
                        8 - md_size as i64
                    ),
                ));
            }
            if md_size == 8 + al_sect {
                return Err(bad(
                    "md_size_sect",
                    off::MD_SIZE_SECT,
                    md_size as i64,
                    "leaves no room for a bitmap",
                ));
            }
        } else {
            return Err(bad(
                "al_offset",
                off::AL_OFFSET,
                al_offset,
                format!("must be 8 (external) or -{al_sect} (internal, minus the AL size)"),
            ));
        }
        if self.version == MdVersion::V09 {
            if self.max_peers < 1 || self.max_peers as usize > DRBD_PEERS_MAX {
                return Err(bad(
                    "bm_max_peers",
                    off::V09_BM_MAX_PEERS,
                    self.max_peers.into(),
                    "must be 1 .. 32",
                ));
            }
            // drbdmeta.c is_valid_md allows -1 .. DRBD_PEERS_MAX + 1.
            let id_ok = |v: i32| (-1..=DRBD_PEERS_MAX as i32 + 1).contains(&v);
            if !id_ok(self.node_id) {
                return Err(bad(
                    "node_id",
                    off::V09_NODE_ID,
                    self.node_id.into(),
                    "must be -1 .. 33",
                ));
            }
            for (n, p) in self.peers.iter().take(self.max_peers as usize).enumerate() {
                if !id_ok(p.bitmap_index) {
                    return Err(bad(
                        "peers[].bitmap_index",
                        PEER_MD_OFFSET + n * PEER_MD_SIZE + 20,
                        p.bitmap_index.into(),
                        format!("peer slot {n}: must be -1 .. 33"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Serializes into 4096 bytes. Bytes the format reserves, and any bytes of
    /// a parsed block this type does not interpret, are copied unchanged from
    /// the parsed block, so `parse(b)?.to_bytes() == b`.
    pub fn to_bytes(&self) -> Box<[u8; SUPERBLOCK_SIZE]> {
        let mut b = self.raw.clone();
        put_u64(&mut b, off::EFFECTIVE_SIZE, self.effective_size);
        put_u64(&mut b, off::CURRENT_UUID, self.current_uuid);
        put_u32(&mut b, off::FLAGS, self.flags.0);
        put_u32(&mut b, off::MAGIC, self.magic);
        put_u32(&mut b, off::MD_SIZE_SECT, self.md_size_sect);
        put_u32(&mut b, off::AL_OFFSET, self.al_offset as u32);
        put_u32(&mut b, off::AL_NR_EXTENTS, self.al_nr_extents);
        put_u32(&mut b, off::BM_OFFSET, self.bm_offset as u32);
        put_u32(&mut b, off::BM_BYTES_PER_BIT, self.bm_bytes_per_bit);
        put_u32(&mut b, off::LA_PEER_MAX_BIO_SIZE, self.la_peer_max_bio_size);
        match self.version {
            MdVersion::V08 => {
                put_u64(&mut b, off::V08_BITMAP_UUID, self.bitmap_uuid);
                for i in 0..HISTORY_UUIDS_V08 {
                    let v = self.history_uuids.get(i).copied().unwrap_or(0);
                    put_u64(&mut b, off::V08_HISTORY + 8 * i, v);
                }
                put_u64(&mut b, off::DEVICE_UUID, self.device_uuid);
                put_u32(&mut b, off::V08_AL_STRIPES, self.al_stripes);
                put_u32(&mut b, off::V08_AL_STRIPE_SIZE_4K, self.al_stripe_size_4k);
            }
            MdVersion::V09 => {
                put_u64(&mut b, off::V09_MEMBERS, self.members);
                put_u64(&mut b, off::V09_DEVICE_UUID, self.device_uuid);
                put_u32(&mut b, off::V09_BM_MAX_PEERS, self.max_peers);
                put_u32(&mut b, off::V09_NODE_ID, self.node_id as u32);
                put_u32(&mut b, off::V09_AL_STRIPES, self.al_stripes);
                put_u32(&mut b, off::V09_AL_STRIPE_SIZE_4K, self.al_stripe_size_4k);
                for p in 0..DRBD_PEERS_MAX {
                    let peer = self.peers.get(p).copied().unwrap_or(PeerMd::UNUSED);
                    let o = PEER_MD_OFFSET + p * PEER_MD_SIZE;
                    put_u64(&mut b, o, peer.bitmap_uuid);
                    put_u64(&mut b, o + 8, peer.bitmap_dagtag);
                    put_u32(&mut b, o + 16, peer.flags.0);
                    put_u32(&mut b, o + 20, peer.bitmap_index as u32);
                }
                for i in 0..HISTORY_UUIDS_V09 {
                    let v = self.history_uuids.get(i).copied().unwrap_or(0);
                    put_u64(&mut b, HISTORY_V09_OFFSET + 8 * i, v);
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    /// The v08 superblock `drbdmeta --force - v08 FILE internal create-md` writes
    /// for a 1 GiB file (first 96 bytes; the rest is zero).
    pub(crate) fn drbdmeta_v08_1g() -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        let head: [u8; 96] = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0x83, 0x74, 0x02, 0x6b, //
            0, 0, 0, 0x88, 0xff, 0xff, 0xff, 0xc0, 0, 0, 0x01, 0x01, 0xff, 0xff, 0xff,
            0x80, //
            0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8, //
        ];
        b[..96].copy_from_slice(&head);
        b
    }

    #[test]
    fn parses_drbdmeta_v08() {
        let raw = drbdmeta_v08_1g();
        let sb = Superblock::parse(&raw).unwrap();
        assert_eq!(sb.version, MdVersion::V08);
        assert_eq!(sb.current_uuid, 4);
        assert_eq!(sb.flags, MdFlags::AL_CLEAN);
        assert_eq!(sb.md_size_sect, 136);
        assert_eq!(sb.al_offset, -64);
        assert_eq!(sb.bm_offset, -128);
        assert_eq!(sb.al_nr_extents, 257);
        assert_eq!(sb.al_striping(), (1, 8));
        assert_eq!(sb.state(), MetaState::Clean);
        assert_eq!(&sb.to_bytes()[..], &raw[..]);

        let mut fresh = Superblock::new(MdVersion::V08, 1);
        fresh.md_size_sect = 136;
        fresh.al_offset = -64;
        fresh.bm_offset = -128;
        assert_eq!(&fresh.to_bytes()[..], &raw[..]);
    }

    #[test]
    fn unclean_magic_and_flag() {
        let mut raw = drbdmeta_v08_1g();
        raw[60..64].copy_from_slice(&DRBD_MD_MAGIC_84_UNCLEAN.to_be_bytes());
        let mut sb = Superblock::parse(&raw).unwrap();
        assert_eq!(sb.state(), MetaState::Unclean);
        sb.mark_clean();
        assert_eq!(sb.state(), MetaState::Clean);
        assert_eq!(sb.magic, DRBD_MD_MAGIC_08);
        sb.flags.remove(MdFlags::AL_CLEAN);
        assert_eq!(sb.state(), MetaState::Unclean);
    }

    #[test]
    fn round_trip_preserves_reserved_bytes() {
        let mut raw = drbdmeta_v08_1g();
        raw[48] = 0xaa; // reserved_u64_1
        raw[97] = 0xbb; // reserved_u32
        raw[4000] = 0xcc;
        let sb = Superblock::parse(&raw).unwrap();
        assert_eq!(&sb.to_bytes()[..], &raw[..]);

        let mut v9 = Superblock::new(MdVersion::V09, 1);
        v9.md_size_sect = 136;
        v9.al_offset = -64;
        v9.bm_offset = -128;
        let mut raw9 = *v9.to_bytes();
        raw9[30] = 1; // reserved_u64[]
        raw9[106] = 2; // reserved_u32[]
        raw9[112 + 24] = 3; // peer reserved
        raw9[2000] = 4; // padding
        let p = Superblock::parse(&raw9).unwrap();
        assert_eq!(p.version, MdVersion::V09);
        assert_eq!(p.node_id, -1);
        assert_eq!(p.peers[5].bitmap_index, -1);
        assert_eq!(&p.to_bytes()[..], &raw9[..]);
    }

    #[test]
    fn clear_errors() {
        let raw = drbdmeta_v08_1g();
        let mut b = raw;
        b[60..64].copy_from_slice(&0xdeadbeefu32.to_be_bytes());
        let e = Superblock::parse(&b).unwrap_err();
        assert!(e.to_string().contains("0xdeadbeef"), "{e}");
        b[60..64].copy_from_slice(&DRBD_MD_MAGIC_07.to_be_bytes());
        assert_eq!(
            Superblock::parse(&b).unwrap_err(),
            SuperblockError::UnsupportedVersion("0.7")
        );

        let mut b = raw;
        b[68..72].copy_from_slice(&(-60i32).to_be_bytes());
        let e = Superblock::parse(&b).unwrap_err().to_string();
        assert!(e.contains("al_offset") && e.contains("byte 68"), "{e}");

        let mut b = raw;
        b[76..80].copy_from_slice(&(-100i32).to_be_bytes());
        let e = Superblock::parse(&b).unwrap_err().to_string();
        assert!(e.contains("bm_offset"), "{e}");

        let mut b = raw;
        b[80..84].copy_from_slice(&8192u32.to_be_bytes());
        assert!(Superblock::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("bm_bytes_per_bit"));

        let mut b = raw;
        b[88..92].copy_from_slice(&0u32.to_be_bytes());
        assert!(Superblock::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("al_stripes"));

        assert_eq!(
            Superblock::parse(&raw[..100]).unwrap_err(),
            SuperblockError::BadLength(100)
        );
    }

    #[test]
    fn flags_debug_lists_names() {
        let f = MdFlags::CONSISTENT | MdFlags::AL_CLEAN | MdFlags(1 << 20);
        let s = format!("{f:?}");
        assert!(
            s.contains("consistent") && s.contains("al-clean") && s.contains("0x100000"),
            "{s}"
        );
        let mut g = MdFlags::empty();
        g.set(MdFlags::PRIMARY_IND, true);
        assert!(g.contains(MdFlags::PRIMARY_IND));
        g.set(MdFlags::PRIMARY_IND, false);
        assert_eq!(g.bits(), 0);
    }

    #[test]
    fn random_blocks_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let magics = [DRBD_MD_MAGIC_08, DRBD_MD_MAGIC_84_UNCLEAN, DRBD_MD_MAGIC_09];
        for i in 0..3_000 {
            let mut b = [0u8; SUPERBLOCK_SIZE];
            rng.fill_bytes(&mut b);
            if i % 2 == 0 {
                let m = magics[rng.gen_range(0..magics.len())];
                b[60..64].copy_from_slice(&m.to_be_bytes());
            }
            if i % 4 == 0 {
                // plausible offsets so validation gets further
                b[64..68].copy_from_slice(&136u32.to_be_bytes());
                b[68..72].copy_from_slice(&(-64i32).to_be_bytes());
                b[76..80].copy_from_slice(&(-128i32).to_be_bytes());
                b[80..84].copy_from_slice(&4096u32.to_be_bytes());
            }
            if let Ok(sb) = Superblock::parse(&b) {
                assert_eq!(&sb.to_bytes()[..], &b[..]);
                let _ = sb.state();
                let _ = format!("{sb:?}");
            }
        }
    }
}
