//! DRBD metadata on a file or block device: superblock + activity log +
//! bitmap, with positional I/O and `fsync` after every metadata write.
//!
//! [`Metadata::create`] writes what `drbdmeta create-md` writes (drbd-utils
//! `user/shared/drbdmeta.c`, `meta_create_md`), [`Metadata::apply_al`] does
//! what `drbdmeta apply-al` does (`meta_apply_al`).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::activity_log::{self, ActivityLog, AlError, AlReplay, AlWrite};
use super::bitmap::{BitmapError, OutOfSyncBitmap};
use super::layout::{AlGeometry, Geometry, Layout, LayoutError};
use super::superblock::{
    MdFlags, MdVersion, MetaState, PeerFlags, PeerMd, Superblock, SuperblockError,
    DRBD_MD_MAGIC_08, DRBD_PEERS_MAX, HISTORY_UUIDS_V08,
};
use super::uuid::GenerationUuids;
use super::{MD_BLOCK_SIZE, SECTOR_SIZE};

/// Metadata errors.
#[derive(Debug, Error)]
pub enum MetadataError {
    /// An I/O error.
    #[error("{path}: {op} at byte {offset}: {source}")]
    Io {
        /// Device path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No valid superblock where the layout puts it.
    #[error("{path}: no valid DRBD metadata at byte {offset} ({layout} layout): {source}")]
    Superblock {
        /// Device path.
        path: PathBuf,
        /// Superblock offset.
        offset: u64,
        /// Layout asked for.
        layout: Layout,
        /// Why.
        #[source]
        source: SuperblockError,
    },
    /// The superblock does not fit the layout or device.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Bitmap problem.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Activity log problem.
    #[error(transparent)]
    Al(#[from] AlError),
    /// The data size is not a whole number of sectors.
    #[error("data size {0} bytes is not a multiple of 512")]
    UnalignedDataSize(u64),
    /// External metadata that never recorded a size.
    #[error("external metadata with la-size-sect 0 does not say how big the data device is; use Metadata::open_with_data_size")]
    UnknownDataSize,
    /// Unsupported creation option.
    #[error("max-peers {0} is not supported: twinsan handles single-peer bitmaps only")]
    UnsupportedMaxPeers(u32),
    /// Too many history UUIDs for the format.
    #[error("{version} metadata keeps {max} history UUIDs, {given} were given")]
    TooManyHistoryUuids {
        /// Format.
        version: MdVersion,
        /// Capacity.
        max: usize,
        /// Given.
        given: usize,
    },
    /// Bad v09 peer slot.
    #[error("peer slot {0} is outside 0 .. 31")]
    BadPeerSlot(usize),
    /// A format conversion that cannot be done.
    #[error("cannot convert: {0}")]
    Convert(String),
    /// la-size beyond the data the bitmap covers.
    #[error("last agreed size {sectors} sectors exceeds the {limit} sectors this metadata covers")]
    SizeTooLarge {
        /// Asked for.
        sectors: u64,
        /// Limit.
        limit: u64,
    },
}

type Result<T, E = MetadataError> = std::result::Result<T, E>;

/// Options for [`Metadata::create_with`]; defaults are drbdmeta's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Format.
    pub version: MdVersion,
    /// v09 bitmap slots (`create-md MAX_PEERS`); only 1 is supported.
    pub max_peers: u32,
    /// Activity log striping (`--al-stripes`, `--al-stripe-size-kB`).
    pub al: AlGeometry,
    /// Value of `al_nr_extents` (drbdmeta writes 257, "arbitrary").
    pub al_extents: u32,
    /// `la_peer_max_bio_size` (`--peer-max-bio-size`, default 0).
    pub peer_max_bio_size: u32,
    /// v09 own node id (`--node-id`; drbdmeta writes -1).
    pub node_id: i32,
}

impl CreateOptions {
    /// drbdmeta's defaults for `version`.
    pub fn new(version: MdVersion) -> Self {
        CreateOptions {
            version,
            max_peers: 1,
            al: AlGeometry::default(),
            al_extents: 257,
            peer_max_bio_size: 0,
            node_id: -1,
        }
    }
}

/// What [`Metadata::convert_to_v08`] could not carry over (v08 has no place
/// for it); everything else, the bitmap UUID included, is kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct V08Conversion {
    /// Non-zero history UUIDs beyond the two v08 keeps.
    pub dropped_history: Vec<u64>,
    /// v09-only device flags (quorum).
    pub dropped_flags: MdFlags,
    /// Peer flags without a v08 equivalent (fencing, seen, exists).
    pub dropped_peer_flags: PeerFlags,
    /// The v09 node id (v08 has none).
    pub node_id: i32,
    /// The bitmap's data generation tag (v08 has none).
    pub bitmap_dagtag: u64,
}

/// What [`Metadata::apply_al`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlApplyReport {
    /// Metadata state before.
    pub was_clean: bool,
    /// The replay result, or the replay error that was ignored (drbdmeta
    /// ignores AL errors when the node was not primary).
    pub replay: Option<AlReplay>,
    /// Replay error ignored because `PRIMARY_IND` was not set.
    pub ignored_error: Option<AlError>,
    /// Whether hot extents were marked in the bitmap.
    pub applied: bool,
    /// Bits newly set by the replay.
    pub bits_newly_set: u64,
    /// Whether the activity log was re-initialised.
    pub al_reinitialized: bool,
    /// Whether the superblock was rewritten (clean flag / magic).
    pub superblock_updated: bool,
}

/// DRBD metadata on an open device.
#[derive(Debug)]
pub struct Metadata {
    file: File,
    path: PathBuf,
    geometry: Geometry,
    sb: Superblock,
    bitmap: OutOfSyncBitmap,
    peer_slot: usize,
}

fn device_size(file: &File, path: &Path) -> Result<u64> {
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|source| MetadataError::Io {
            path: path.to_owned(),
            op: "seek to end (device size)",
            offset: 0,
            source,
        })
}

impl Metadata {
    fn io(&self, op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> MetadataError + '_ {
        move |source| MetadataError::Io {
            path: self.path.clone(),
            op,
            offset,
            source,
        }
    }

    fn open_file(path: &Path) -> Result<File> {
        Self::open_file_mode(path, true)
    }

    fn open_file_mode(path: &Path, writable: bool) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| MetadataError::Io {
                path: path.to_owned(),
                op: "open",
                offset: 0,
                source,
            })
    }

    /// Creates metadata like `drbdmeta create-md` with default options.
    ///
    /// `data_size` is the size in bytes of the data the bitmap must cover:
    /// for [`Layout::Internal`] 0 means "everything in front of the metadata"
    /// (the usual case); for the external layouts it is the size of the data
    /// device and must be given. The file or device must exist and be big
    /// enough; it is not created or resized.
    pub fn create(
        path: impl AsRef<Path>,
        layout: Layout,
        data_size: u64,
        version: MdVersion,
    ) -> Result<Metadata> {
        Self::create_with(path, layout, data_size, &CreateOptions::new(version))
    }

    /// [`Metadata::create`] with explicit options.
    pub fn create_with(
        path: impl AsRef<Path>,
        layout: Layout,
        data_size: u64,
        opts: &CreateOptions,
    ) -> Result<Metadata> {
        let path = path.as_ref();
        if opts.max_peers != 1 {
            return Err(MetadataError::UnsupportedMaxPeers(opts.max_peers));
        }
        if data_size % SECTOR_SIZE != 0 {
            return Err(MetadataError::UnalignedDataSize(data_size));
        }
        let file = Self::open_file(path)?;
        let dev = device_size(&file, path)?;
        let geometry = Geometry::for_create(layout, dev, opts.max_peers, opts.al)?;
        let data_sectors = match (layout, data_size) {
            (Layout::Internal, 0) => geometry.max_usable_sectors,
            (_, 0) => return Err(MetadataError::UnknownDataSize),
            (_, n) => n / SECTOR_SIZE,
        };
        geometry.check_data_sectors(data_sectors)?;
        let bm_need = geometry.bitmap_bytes_for(data_sectors);
        if geometry.bm_offset + bm_need > dev {
            return Err(LayoutError::DeviceTooSmall {
                layout,
                need: geometry.bm_offset + bm_need,
                have: dev,
            }
            .into());
        }

        let mut sb = Superblock::new(opts.version, opts.max_peers);
        sb.md_size_sect = geometry.md_size_sect;
        sb.al_offset = geometry.al_offset_sect;
        sb.bm_offset = geometry.bm_offset_sect;
        sb.al_stripes = opts.al.stripes;
        sb.al_stripe_size_4k = opts.al.stripe_size_4k;
        sb.al_nr_extents = opts.al_extents;
        sb.la_peer_max_bio_size = opts.peer_max_bio_size;
        if opts.version == MdVersion::V09 {
            sb.node_id = opts.node_id;
        }
        sb.validate().map_err(|source| MetadataError::Superblock {
            path: path.to_owned(),
            offset: geometry.md_offset,
            layout,
            source,
        })?;

        let bitmap = OutOfSyncBitmap::for_sectors(data_sectors)?;
        let md = Metadata {
            file,
            path: path.to_owned(),
            geometry,
            sb,
            bitmap,
            peer_slot: 0,
        };
        // Same order as drbdmeta: activity log, bitmap, superblock.
        md.write_at(
            &activity_log::initialized_area(geometry.al),
            geometry.al_offset,
            "write activity log",
        )?;
        // drbdmeta zeroes the bitmap for the size of the device it is on:
        // the whole area for internal metadata. For external metadata it
        // only knows the meta device, so zero what the data needs.
        let zero_len = if layout.is_external() {
            bm_need
        } else {
            geometry.bitmap_area_bytes
        };
        md.zero(geometry.bm_offset, zero_len)?;
        md.write_superblock()?;
        Ok(md)
    }

    /// Opens existing metadata, detecting v08/v09 and clean/unclean. The
    /// bitmap covers the last agreed size; internal metadata that never
    /// recorded one covers the whole data area. See also
    /// [`Metadata::open_with_data_size`].
    pub fn open(path: impl AsRef<Path>, layout: Layout) -> Result<Metadata> {
        Self::open_inner(path.as_ref(), layout, None, true)
    }

    /// Opens existing metadata read-only (for inspection: every write method
    /// fails). `data_size` as in [`Metadata::open_with_data_size`]; `None`
    /// behaves like [`Metadata::open`].
    pub fn open_read_only(
        path: impl AsRef<Path>,
        layout: Layout,
        data_size: Option<u64>,
    ) -> Result<Metadata> {
        if let Some(d) = data_size {
            if d % SECTOR_SIZE != 0 {
                return Err(MetadataError::UnalignedDataSize(d));
            }
        }
        Self::open_inner(
            path.as_ref(),
            layout,
            data_size.map(|d| d / SECTOR_SIZE),
            false,
        )
    }

    /// Opens existing metadata with a bitmap covering `data_size` bytes.
    pub fn open_with_data_size(
        path: impl AsRef<Path>,
        layout: Layout,
        data_size: u64,
    ) -> Result<Metadata> {
        if data_size % SECTOR_SIZE != 0 {
            return Err(MetadataError::UnalignedDataSize(data_size));
        }
        Self::open_inner(path.as_ref(), layout, Some(data_size / SECTOR_SIZE), true)
    }

    /// Reads and checks the superblock only (no bitmap), e.g. to inspect
    /// metadata this crate cannot fully open (several bitmap slots).
    pub fn read_superblock(
        path: impl AsRef<Path>,
        layout: Layout,
    ) -> Result<(Superblock, Geometry)> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| MetadataError::Io {
            path: path.to_owned(),
            op: "open",
            offset: 0,
            source,
        })?;
        let dev = device_size(&file, path)?;
        Self::read_sb(&file, path, layout, dev)
    }

    fn read_sb(
        file: &File,
        path: &Path,
        layout: Layout,
        dev: u64,
    ) -> Result<(Superblock, Geometry)> {
        let md_offset = super::layout::md_offset(layout, dev)?;
        let mut buf = [0u8; 4096];
        file.read_exact_at(&mut buf, md_offset)
            .map_err(|source| MetadataError::Io {
                path: path.to_owned(),
                op: "read superblock",
                offset: md_offset,
                source,
            })?;
        let sb = Superblock::parse(&buf).map_err(|source| MetadataError::Superblock {
            path: path.to_owned(),
            offset: md_offset,
            layout,
            source,
        })?;
        let geometry = Geometry::from_superblock(layout, &sb, dev)?;
        Ok((sb, geometry))
    }

    fn open_inner(
        path: &Path,
        layout: Layout,
        data_sectors: Option<u64>,
        writable: bool,
    ) -> Result<Metadata> {
        let file = Self::open_file_mode(path, writable)?;
        let dev = device_size(&file, path)?;
        let (sb, geometry) = Self::read_sb(&file, path, layout, dev)?;
        if sb.max_peers != 1 {
            return Err(BitmapError::MultiplePeerSlots {
                max_peers: sb.max_peers,
            }
            .into());
        }
        let data_sectors = match data_sectors {
            Some(s) => s,
            None if sb.effective_size > 0 => sb.effective_size,
            None if layout == Layout::Internal => geometry.max_usable_sectors,
            None => return Err(MetadataError::UnknownDataSize),
        };
        geometry.check_data_sectors(data_sectors)?;
        let mut bitmap = OutOfSyncBitmap::for_sectors(data_sectors)?;
        let len = bitmap.word_bytes();
        if geometry.bm_offset + len > dev {
            return Err(LayoutError::DeviceTooSmall {
                layout,
                need: geometry.bm_offset + len,
                have: dev,
            }
            .into());
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, geometry.bm_offset)
            .map_err(|source| MetadataError::Io {
                path: path.to_owned(),
                op: "read bitmap",
                offset: geometry.bm_offset,
                source,
            })?;
        bitmap = OutOfSyncBitmap::from_slot(bitmap.data_bytes(), &bytes, sb.max_peers, 0)?;
        let peer_slot = sb.primary_peer_slot();
        Ok(Metadata {
            file,
            path: path.to_owned(),
            geometry,
            sb,
            bitmap,
            peer_slot,
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64, op: &'static str) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(self.io(op, offset))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done, "zero bitmap")?;
            done += n;
        }
        Ok(())
    }

    /// `fsync` the device.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(self.io("fsync", 0))
    }

    /// Device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version.
    pub fn version(&self) -> MdVersion {
        self.sb.version
    }

    /// Layout.
    pub fn layout(&self) -> Layout {
        self.geometry.layout
    }

    /// Offsets and sizes.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The superblock as last read or set.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Clean or unclean.
    pub fn state(&self) -> MetaState {
        self.sb.state()
    }

    /// Flags.
    pub fn flags(&self) -> MdFlags {
        self.sb.flags
    }

    /// Replaces the flags (in memory; [`Metadata::flush`] writes them).
    pub fn set_flags(&mut self, flags: MdFlags) {
        self.sb.flags = flags;
    }

    /// Device UUID.
    pub fn device_uuid(&self) -> u64 {
        self.sb.device_uuid
    }

    /// Sets the device UUID (in memory).
    pub fn set_device_uuid(&mut self, uuid: u64) {
        self.sb.device_uuid = uuid;
    }

    /// Last agreed size in sectors (0 if never recorded).
    pub fn effective_size(&self) -> u64 {
        self.sb.effective_size
    }

    /// Sets the last agreed size (in memory). It must be within the data the
    /// bitmap covers.
    pub fn set_effective_size(&mut self, sectors: u64) -> Result<()> {
        let limit = self.bitmap.data_bytes() / SECTOR_SIZE;
        if sectors > limit {
            return Err(MetadataError::SizeTooLarge { sectors, limit });
        }
        self.sb.effective_size = sectors;
        Ok(())
    }

    /// Data sectors covered by the bitmap.
    pub fn data_sectors(&self) -> u64 {
        self.bitmap.data_bytes() / SECTOR_SIZE
    }

    /// v09: the peer slot whose bitmap UUID [`Metadata::uuids`] uses (the slot
    /// with bitmap index 0, else 0). Always 0 for v08.
    pub fn peer_slot(&self) -> usize {
        self.peer_slot
    }

    /// v09: chooses the peer slot for [`Metadata::uuids`] / [`Metadata::set_uuids`].
    pub fn set_peer_slot(&mut self, slot: usize) -> Result<()> {
        if slot >= DRBD_PEERS_MAX || (self.sb.version == MdVersion::V08 && slot != 0) {
            return Err(MetadataError::BadPeerSlot(slot));
        }
        self.peer_slot = slot;
        Ok(())
    }

    /// v09: flags of the peer slot [`Metadata::peer_slot`]; `None` for v08.
    pub fn peer_flags(&self) -> Option<PeerFlags> {
        match self.sb.version {
            MdVersion::V08 => None,
            MdVersion::V09 => self.sb.peers.get(self.peer_slot).map(|p| p.flags),
        }
    }

    /// v09: replaces the flags of the peer slot (in memory); ignored for v08.
    pub fn set_peer_flags(&mut self, flags: PeerFlags) {
        if self.sb.version == MdVersion::V09 {
            if let Some(p) = self.sb.peers.get_mut(self.peer_slot) {
                p.flags = flags;
            }
        }
    }

    /// v09: gives the peer slot [`Metadata::peer_slot`] bitmap slot 0 (in
    /// memory), the way a DRBD 9 kernel does when it first connects to that
    /// peer, so that [`Metadata::open`] picks the same slot next time. Returns
    /// whether anything changed. No-op for v08.
    pub fn assign_bitmap_slot(&mut self) -> bool {
        if self.sb.version != MdVersion::V09 {
            return false;
        }
        let slot = self.peer_slot;
        let mut changed = false;
        for (i, p) in self.sb.peers.iter_mut().enumerate() {
            let want = if i == slot {
                0
            } else if p.bitmap_index == 0 {
                -1
            } else {
                p.bitmap_index
            };
            if p.bitmap_index != want {
                p.bitmap_index = want;
                changed = true;
            }
        }
        changed
    }

    /// Rewrites v09 metadata with one bitmap slot as v08 in place and `fsync`s
    /// (the layout is identical: same offsets, and a one-slot v09 bitmap is
    /// byte-identical to a v08 bitmap). Unlike `drbdmeta create-md` on v09
    /// metadata, the bitmap UUID of the peer slot is kept. The metadata must
    /// be clean (apply the activity log first). See [`V08Conversion`] for
    /// what v08 cannot hold.
    pub fn convert_to_v08(&mut self) -> Result<V08Conversion> {
        if self.state() != MetaState::Clean {
            return Err(MetadataError::Convert(
                "the metadata is unclean; replay the activity log first".into(),
            ));
        }
        let (sb, report) = self.v08_superblock()?;
        self.sb = sb;
        self.peer_slot = 0;
        self.write_superblock()?;
        Ok(report)
    }

    /// The clean v08 superblock [`Metadata::convert_to_v08`] would write, and what it
    /// drops; nothing is written.
    pub fn v08_superblock(&self) -> Result<(Superblock, V08Conversion)> {
        if self.sb.version != MdVersion::V09 {
            return Err(MetadataError::Convert("the metadata is already v08".into()));
        }
        if self.sb.max_peers != 1 {
            return Err(MetadataError::Convert(format!(
                "v09 metadata with {} bitmap slots cannot become v08 (one slot)",
                self.sb.max_peers
            )));
        }
        let old = self.sb.clone();
        let peer = old
            .peers
            .get(self.peer_slot)
            .copied()
            .unwrap_or(PeerMd::UNUSED);
        let mut sb = Superblock::new(MdVersion::V08, 1);
        // Device flags v08 and v09 share (drbd_meta_data.h / 8.4 drbd_int.h).
        let shared = MdFlags::CONSISTENT
            | MdFlags::PRIMARY_IND
            | MdFlags::WAS_UP_TO_DATE
            | MdFlags::CRASHED_PRIMARY
            | MdFlags::AL_CLEAN
            | MdFlags::AL_DISABLED;
        let mut flags = MdFlags(old.flags.bits() & shared.bits());
        // Per-peer flags that 8.4 keeps as device flags.
        flags.set(
            MdFlags::CONNECTED_IND,
            peer.flags.contains(PeerFlags::CONNECTED),
        );
        flags.set(
            MdFlags::PEER_OUT_DATED,
            peer.flags.contains(PeerFlags::OUTDATED),
        );
        flags.set(
            MdFlags::FULL_SYNC,
            peer.flags.contains(PeerFlags::FULL_SYNC),
        );
        sb.flags = flags;
        sb.effective_size = old.effective_size;
        sb.current_uuid = old.current_uuid;
        sb.bitmap_uuid = peer.bitmap_uuid;
        sb.history_uuids = old
            .history_uuids
            .iter()
            .copied()
            .take(HISTORY_UUIDS_V08)
            .collect();
        sb.device_uuid = old.device_uuid;
        sb.md_size_sect = old.md_size_sect;
        sb.al_offset = old.al_offset;
        sb.al_nr_extents = old.al_nr_extents;
        sb.bm_offset = old.bm_offset;
        sb.la_peer_max_bio_size = old.la_peer_max_bio_size;
        sb.al_stripes = old.al_stripes;
        sb.al_stripe_size_4k = old.al_stripe_size_4k;
        sb.mark_clean();
        sb.validate().map_err(|source| MetadataError::Superblock {
            path: self.path.clone(),
            offset: self.geometry.md_offset,
            layout: self.geometry.layout,
            source,
        })?;
        let report = V08Conversion {
            dropped_history: old
                .history_uuids
                .iter()
                .skip(HISTORY_UUIDS_V08)
                .copied()
                .filter(|&h| h != 0)
                .collect(),
            dropped_flags: MdFlags(old.flags.bits() & !shared.bits()),
            dropped_peer_flags: PeerFlags(
                peer.flags.bits()
                    & !(PeerFlags::CONNECTED | PeerFlags::OUTDATED | PeerFlags::FULL_SYNC).bits(),
            ),
            node_id: old.node_id,
            bitmap_dagtag: peer.bitmap_dagtag,
        };
        Ok((sb, report))
    }

    /// Generation UUIDs (current, bitmap UUID of the peer slot, history).
    pub fn uuids(&self) -> GenerationUuids {
        GenerationUuids {
            current: self.sb.current_uuid,
            bitmap: self.sb.bitmap_uuid_for(self.peer_slot),
            history: self.sb.history_uuids.clone(),
        }
    }

    /// Sets the generation UUIDs (in memory; [`Metadata::flush`] writes them).
    /// Missing history entries become 0.
    pub fn set_uuids(&mut self, uuids: &GenerationUuids) -> Result<()> {
        let max = self.sb.history_uuids.len();
        let used = uuids
            .history
            .iter()
            .rposition(|&h| h != 0)
            .map_or(0, |p| p + 1);
        if used > max {
            return Err(MetadataError::TooManyHistoryUuids {
                version: self.sb.version,
                max,
                given: uuids.history.len(),
            });
        }
        self.sb.current_uuid = uuids.current;
        match self.sb.version {
            MdVersion::V08 => self.sb.bitmap_uuid = uuids.bitmap,
            MdVersion::V09 => match self.sb.peers.get_mut(self.peer_slot) {
                Some(p) => p.bitmap_uuid = uuids.bitmap,
                None => return Err(MetadataError::BadPeerSlot(self.peer_slot)),
            },
        }
        for (i, h) in self.sb.history_uuids.iter_mut().enumerate() {
            *h = uuids.history.get(i).copied().unwrap_or(0);
        }
        debug_assert!(
            self.sb.version != MdVersion::V08 || self.sb.history_uuids.len() == HISTORY_UUIDS_V08
        );
        Ok(())
    }

    /// The out-of-sync bitmap.
    pub fn bitmap(&self) -> &OutOfSyncBitmap {
        &self.bitmap
    }

    /// The out-of-sync bitmap, for marking and clearing.
    pub fn bitmap_mut(&mut self) -> &mut OutOfSyncBitmap {
        &mut self.bitmap
    }

    /// Writes the superblock and `fsync`s.
    pub fn write_superblock(&self) -> Result<()> {
        self.write_at(
            &self.sb.to_bytes()[..],
            self.geometry.md_offset,
            "write superblock",
        )?;
        self.sync()
    }

    /// Writes the bitmap pages changed since the last write (all of them if
    /// `all`), without `fsync`. Bits past the data end are written as 0.
    pub fn write_bitmap(&mut self, all: bool) -> Result<()> {
        if all {
            self.bitmap.mark_all_dirty();
        }
        let pages = self.bitmap.take_dirty_pages();
        let mut page = vec![0u8; MD_BLOCK_SIZE as usize];
        for p in pages {
            let start = p * MD_BLOCK_SIZE;
            self.bitmap.read_image(start, &mut page);
            let off = self.geometry.bm_offset + start;
            if let Err(e) = self.write_at(&page, off, "write bitmap") {
                self.bitmap.mark_all_dirty();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes changed bitmap pages and the superblock, then `fsync`s.
    pub fn flush(&mut self) -> Result<()> {
        self.write_bitmap(false)?;
        self.write_superblock()
    }

    /// Marks the metadata unclean and writes the superblock, the way an
    /// attaching kernel does; do this before writing activity log
    /// transactions. Sets `PRIMARY_IND` when `primary` (drbdmeta only replays
    /// the activity log of a node that was primary).
    pub fn mark_unclean(&mut self, primary: bool) -> Result<()> {
        self.sb.mark_unclean();
        self.sb.flags.set(MdFlags::PRIMARY_IND, primary);
        self.flush()
    }

    /// Marks the metadata clean and writes bitmap and superblock (a clean
    /// detach: the bitmap already holds every out-of-sync block).
    pub fn mark_clean(&mut self) -> Result<()> {
        self.sb.mark_clean();
        self.flush()
    }

    /// Reads the raw activity log area.
    pub fn read_al_area(&self) -> Result<Vec<u8>> {
        let len = self.geometry.al.size_4k() * MD_BLOCK_SIZE;
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, self.geometry.al_offset)
            .map_err(self.io("read activity log", self.geometry.al_offset))?;
        Ok(buf)
    }

    /// Replays the activity log without changing anything.
    pub fn replay_al(&self) -> Result<AlReplay> {
        Ok(activity_log::replay(
            &self.read_al_area()?,
            self.geometry.al,
        )?)
    }

    /// Rewrites every AL block as "initialized" (drbdmeta.c `initialize_al`) and `fsync`s.
    pub fn initialize_al(&self) -> Result<()> {
        self.write_at(
            &activity_log::initialized_area(self.geometry.al),
            self.geometry.al_offset,
            "write activity log",
        )?;
        self.sync()
    }

    /// A fresh in-memory activity log with `al_extents` slots for this
    /// metadata, recording `al_extents` in the superblock (in memory). Call
    /// [`Metadata::initialize_al`] (or write [`ActivityLog::initialize_ring`])
    /// first if the on-disk ring may hold transactions of an earlier run.
    pub fn new_activity_log(&mut self, al_extents: u32) -> Result<ActivityLog> {
        let al = ActivityLog::new(al_extents, self.geometry.al, 0)?;
        self.sb.al_nr_extents = al_extents;
        Ok(al)
    }

    /// Writes one AL transaction block and `fdatasync`s; the data write it
    /// guards may go out only after this returns.
    pub fn write_al(&self, w: &AlWrite) -> Result<()> {
        let off = self.geometry.al_block_offset(w.block);
        self.write_at(&w.bytes[..], off, "write AL transaction")?;
        self.file.sync_data().map_err(self.io("fdatasync", off))
    }

    /// `drbdmeta apply-al`: replays the activity log; if the node was primary
    /// (`PRIMARY_IND`), marks every bit of every hot extent out of sync and
    /// writes the bitmap; re-initialises the log; marks the metadata clean.
    /// AL errors are fatal only when the node was primary, as in drbdmeta.
    pub fn apply_al(&mut self) -> Result<AlApplyReport> {
        let need = self.sb.flags.contains(MdFlags::PRIMARY_IND);
        self.apply_al_inner(need)
    }

    /// Like [`Metadata::apply_al`], but applies hot extents whatever the
    /// `PRIMARY_IND` flag says (for twinsan's own log).
    pub fn apply_al_always(&mut self) -> Result<AlApplyReport> {
        self.apply_al_inner(true)
    }

    fn apply_al_inner(&mut self, need_to_apply: bool) -> Result<AlApplyReport> {
        let mut report = AlApplyReport {
            was_clean: self.state() == MetaState::Clean,
            ..Default::default()
        };
        let mut reinit = false;
        let mut update_sb = false;
        match self.replay_al() {
            Ok(replay) => {
                if replay.has_updates() {
                    reinit = true;
                    if need_to_apply {
                        for &e in &replay.hot_extents {
                            report.bits_newly_set += self.bitmap.set_al_extent(e);
                        }
                        self.write_bitmap(false)?;
                        report.applied = true;
                        update_sb = true;
                    }
                }
                report.replay = Some(replay);
            }
            Err(MetadataError::Al(e)) if !need_to_apply => {
                report.ignored_error = Some(e);
                reinit = true;
            }
            Err(e) => return Err(e),
        }
        if reinit {
            self.initialize_al()?;
            report.al_reinitialized = true;
        }
        if !self.sb.flags.contains(MdFlags::AL_CLEAN) || self.sb.magic != DRBD_MD_MAGIC_08 {
            update_sb = true;
        }
        if update_sb {
            self.sb.mark_clean();
            self.write_superblock()?;
            report.superblock_updated = true;
        } else {
            self.sync()?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drbd::superblock::DRBD_MD_MAGIC_84_UNCLEAN;

    fn tmpfile(name: &str, size: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("twinsan-md-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn create_open_roundtrip_internal() {
        let p = tmpfile("int", 64 << 20);
        let mut md = Metadata::create(&p, Layout::Internal, 0, MdVersion::V08).unwrap();
        assert_eq!(md.uuids(), GenerationUuids::just_created());
        let sectors = md.data_sectors();
        assert_eq!(
            sectors,
            crate::drbd::layout::internal_usable_sectors(64 << 20, 1, AlGeometry::default())
        );
        md.bitmap_mut().set_range(0, 1 << 20).unwrap();
        md.set_effective_size(sectors).unwrap();
        let mut u = GenerationUuids::new(0x1111, 0x2222, [0x3333, 0x4444]);
        md.set_uuids(&u).unwrap();
        md.set_flags(MdFlags::CONSISTENT | MdFlags::AL_CLEAN);
        md.flush().unwrap();
        drop(md);

        let mut md = Metadata::open(&p, Layout::Internal).unwrap();
        assert_eq!(md.bitmap().count(), 256);
        assert_eq!(md.uuids(), u);
        assert_eq!(md.state(), MetaState::Clean);
        u.history.push(5);
        assert!(matches!(
            md.set_uuids(&u),
            Err(MetadataError::TooManyHistoryUuids { .. })
        ));
        assert!(md.set_effective_size(sectors + 1).is_err());

        // Primary writes with an activity log, then "crashes".
        md.mark_unclean(true).unwrap();
        assert_eq!(md.superblock().magic, DRBD_MD_MAGIC_84_UNCLEAN);
        let mut al = md.new_activity_log(61).unwrap();
        for e in [3u32, 7, 9] {
            if let Some(w) = al.activate(e).unwrap() {
                md.write_al(&w).unwrap();
            }
        }
        drop(md);
        let mut md = Metadata::open(&p, Layout::Internal).unwrap();
        assert_eq!(md.state(), MetaState::Unclean);
        let r = md.apply_al().unwrap();
        assert!(r.applied && r.al_reinitialized && r.superblock_updated);
        assert_eq!(r.replay.unwrap().hot_extents, vec![3, 7, 9]);
        assert_eq!(r.bits_newly_set, 3 * 1024);
        assert_eq!(md.state(), MetaState::Clean);
        drop(md);
        let md = Metadata::open(&p, Layout::Internal).unwrap();
        assert_eq!(md.bitmap().count(), 256 + 3 * 1024);
        assert!(!md.replay_al().unwrap().has_updates());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn external_needs_size_and_open_errors_are_clear() {
        let p = tmpfile("ext", 8 << 20);
        assert!(matches!(
            Metadata::create(&p, Layout::FlexExternal, 0, MdVersion::V09),
            Err(MetadataError::UnknownDataSize)
        ));
        assert!(matches!(
            Metadata::create(&p, Layout::FlexExternal, 1000, MdVersion::V09),
            Err(MetadataError::UnalignedDataSize(1000))
        ));
        Metadata::create(&p, Layout::FlexExternal, 1 << 30, MdVersion::V09).unwrap();
        assert!(matches!(
            Metadata::open(&p, Layout::FlexExternal),
            Err(MetadataError::UnknownDataSize)
        ));
        let md = Metadata::open_with_data_size(&p, Layout::FlexExternal, 1 << 30).unwrap();
        assert_eq!(md.version(), MdVersion::V09);
        assert_eq!(md.bitmap().bits(), 1 << 18);
        // wrong layout: the superblock is elsewhere
        let e = Metadata::open(&p, Layout::Internal)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no valid DRBD metadata") && e.contains("magic"),
            "{e}"
        );
        let e = Metadata::open(&p, Layout::IndexedExternal { index: 0 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("md_size_sect") || e.contains("la-size"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}
