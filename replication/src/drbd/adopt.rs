//! Adopting the metadata of an existing DRBD resource (migration from DRBD to twinsan) and
//! checking that it fits before anything is written.
//!
//! [`adopt`] reads DRBD v08 or v09 metadata in any of the three layouts, checks that it
//! fits the backing device and the configuration, replays the activity log into the
//! bitmap when the metadata is unclean (exactly `drbdmeta apply-al`, see
//! [`Metadata::apply_al`]), and otherwise keeps generation UUIDs, flags and bitmap as they
//! are, so that [`crate::volume::ReplicatedVolume`] continues where DRBD stopped: two
//! hosts that were in sync connect without a resync, a host that was behind resyncs only
//! its out-of-sync blocks. Every check runs read-only first; a refusal leaves every byte
//! as it was. Only the metadata area is ever written (superblock, activity log, bitmap),
//! never the data area.
//!
//! What DRBD does at attach and what is mirrored here (DRBD 8.4 `drbd_nl.c`
//! `drbd_adm_attach`, DRBD 9 `drbd_nl.c`):
//! * `MDF_FULL_SYNC` (v08) / `MDF_PEER_FULL_SYNC` (v09): every bit is set and the flag
//!   cleared (`drbd_bmio_set_n_write`).
//! * `MDF_PRIMARY_IND` at attach: the node counts as a crashed primary.
//! * v09 with one bitmap slot: the peer slot that owns bitmap index 0 is the peer.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::layout::{internal_usable_sectors, AlGeometry, Layout, LayoutError};
use super::metadata::{Metadata, MetadataError, V08Conversion};
use super::superblock::{MdFlags, MdVersion, MetaState, PeerFlags, Superblock, SuperblockError};
use super::SECTOR_SIZE;

/// What to adopt: the metadata location and the data it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptTarget {
    /// File or device holding the metadata (the backing itself for internal metadata).
    pub meta_path: PathBuf,
    /// Layout of the metadata.
    pub layout: Layout,
    /// The backing file or device holding the data (`lun.path`).
    pub data_path: PathBuf,
    /// The LUN's configured `size`, if any (bytes).
    pub configured_size: Option<u64>,
    /// The configured start-up role is primary.
    pub want_primary: bool,
}

/// How to adopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdoptOptions {
    /// Check and report only; write nothing.
    pub dry_run: bool,
    /// Rewrite v09 metadata as v08 (keeping the bitmap UUID).
    pub convert_to_v08: bool,
}

/// Why adopting was refused (nothing was written) or failed.
#[derive(Debug, Error)]
pub enum AdoptError {
    /// A file could not be opened or sized.
    #[error("{path}: {op}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No DRBD superblock where the configured layout puts it.
    #[error("no usable DRBD metadata in {path} where `{layout}` metadata lives: {detail}{hint}")]
    NoMetadata {
        /// Metadata path.
        path: PathBuf,
        /// Layout asked for.
        layout: Layout,
        /// What was found.
        detail: String,
        /// Where something else was found, if anywhere.
        hint: String,
    },
    /// A superblock is there but its offsets and sizes do not fit the layout or device.
    #[error("the DRBD superblock in {path} does not fit `{layout}` metadata on this device: {source}. Check `meta` in the configuration (internal | /dev/x | /dev/x[N]) against the resource's `meta-disk` in drbd.conf")]
    LayoutMismatch {
        /// Metadata path.
        path: PathBuf,
        /// Layout asked for.
        layout: Layout,
        /// The mismatch.
        #[source]
        source: LayoutError,
    },
    /// v09 metadata with bitmaps for several peers.
    #[error("v09 metadata with {max_peers} peer bitmap slots (create-md max-peers {max_peers}): twinsan replicates to exactly one peer and keeps one bitmap. Reduce the resource to one peer under DRBD 9 first, or recreate the metadata with max-peers 1 and let the new pair do a full sync")]
    TooManyPeerSlots {
        /// `bm_max_peers`.
        max_peers: u32,
    },
    /// Several peer slots are in use although only one bitmap exists.
    #[error("v09 metadata knows several peers (node ids {slots:?} claim the bitmap or have a bitmap UUID): twinsan can only continue with one peer; run `drbdmeta ... forget-peer --node-id N` for the peers that no longer exist")]
    SeveralPeers {
        /// The peer slots (node ids) in use.
        slots: Vec<usize>,
    },
    /// The own node id owns a peer slot.
    #[error("v09 metadata is inconsistent: node id {node_id} is this node, but peer slot {node_id} holds the bitmap")]
    PeerSlotIsSelf {
        /// The node id.
        node_id: i32,
    },
    /// The backing holds less data than DRBD last agreed on.
    #[error("the data area would shrink: DRBD's last agreed size (la-size-sect) is {la_size_sect} sectors ({la_bytes} bytes) but {data_path} leaves only {data_area_sect} sectors ({data_bytes} bytes) of data{extra}. Restore the device to its former size; adopting would cut off the end of the disk")]
    DataAreaTooSmall {
        /// Backing path.
        data_path: PathBuf,
        /// `la_size_sect`.
        la_size_sect: u64,
        /// Bytes.
        la_bytes: u64,
        /// Data area available.
        data_area_sect: u64,
        /// Bytes.
        data_bytes: u64,
        /// More context.
        extra: String,
    },
    /// The configured LUN size is smaller than the DRBD device.
    #[error("the configured LUN size of {configured} bytes leaves {config_sect} data sectors, less than DRBD's last agreed size of {la_size_sect} sectors ({la_bytes} bytes); fix `size` in the configuration (or remove it: the backing's actual size is used)")]
    ConfiguredSizeTooSmall {
        /// Configured size.
        configured: u64,
        /// Data sectors it allows.
        config_sect: u64,
        /// `la_size_sect`.
        la_size_sect: u64,
        /// Bytes.
        la_bytes: u64,
    },
    /// External metadata placed on top of the data.
    #[error("the metadata area [{meta_start}, {meta_end}) of {path} overlaps the data area [0, {data_end}) of the same file: the `{layout}` layout would put metadata writes into the data. Use `meta = \"internal\"` if this is internal metadata, or point `meta` at the separate metadata device")]
    Overlap {
        /// The shared file.
        path: PathBuf,
        /// Layout.
        layout: Layout,
        /// Metadata area start (bytes).
        meta_start: u64,
        /// Metadata area end (bytes).
        meta_end: u64,
        /// Data area end (bytes).
        data_end: u64,
    },
    /// The bitmap area cannot describe the data.
    #[error("the bitmap does not fit: {0}")]
    Bitmap(#[source] LayoutError),
    /// The activity log of a node that was primary cannot be replayed.
    #[error("the metadata is unclean and the node was primary, but its activity log cannot be replayed ({0}); `drbdmeta apply-al` refuses too. Without the log the blocks written last are unknown: do a full resync of this node (recreate its metadata) instead")]
    CorruptActivityLog(String),
    /// Generation UUIDs that cannot be right.
    #[error("the generation UUIDs do not fit: {0}")]
    BadUuids(String),
    /// The start-up role is primary but the disk is not UpToDate.
    #[error("the disk is {disk} per its flags ({flags:?}) but the configured role is primary: twinsan would refuse to promote it. Set `role = \"secondary\"` for this host and let it resync from the peer, or check which host has the good data")]
    NotUpToDateForPrimary {
        /// Disk state from the flags.
        disk: &'static str,
        /// The flags.
        flags: MdFlags,
    },
    /// Metadata I/O after the checks passed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

impl AdoptError {
    /// True for refusals (a check failed before anything was written), false for
    /// I/O failures.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, AdoptError::Io { .. } | AdoptError::Metadata(_))
    }
}

/// What was found (and, unless a dry run, left on disk), in drbdmeta's terms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdoptReport {
    /// Metadata path.
    pub meta_path: PathBuf,
    /// Layout (`internal`, `flexible external`, `indexed external [N]`).
    pub layout: String,
    /// Version found: `v08` or `v09`.
    pub version_found: String,
    /// Version on disk afterwards.
    pub version: String,
    /// `clean` or `unclean` as found.
    pub state_found: String,
    /// Nothing was written.
    pub dry_run: bool,
    /// `md_size_sect`.
    pub md_size_sect: u32,
    /// Byte offset of the superblock.
    pub md_offset: u64,
    /// Byte offset of the activity log.
    pub al_offset: u64,
    /// Byte offset of the bitmap.
    pub bm_offset: u64,
    /// `al-stripes`.
    pub al_stripes: u32,
    /// `al-stripe-size-4k`.
    pub al_stripe_size_4k: u32,
    /// `al-extents`.
    pub al_extents: u32,
    /// `la-size-sect` as found (0: DRBD never recorded a size).
    pub la_size_sect: u64,
    /// Data sectors the backing leaves (in front of internal metadata, or the data device).
    pub data_area_sect: u64,
    /// Data sectors twinsan serves (the last agreed size, or the data area when 0).
    pub usable_sect: u64,
    /// `current-uuid`.
    pub current_uuid: u64,
    /// `bitmap-uuid` (v09: of the peer slot).
    pub bitmap_uuid: u64,
    /// `history-uuids` (2 for v08, 32 for v09).
    pub history_uuids: Vec<u64>,
    /// `device-uuid`.
    pub device_uuid: u64,
    /// Device flags (raw `MDF_*` bits).
    pub flags: u32,
    /// Device flags by name.
    pub flag_names: String,
    /// Disk state the flags imply: UpToDate, Outdated or Inconsistent.
    pub disk_state: String,
    /// v09: `node-id` (-1 unset); -1 for v08.
    pub node_id: i32,
    /// v09: `max-peers`; 1 for v08.
    pub max_peers: u32,
    /// v09: the peer slot (the peer's node id) whose bitmap UUID is used.
    pub peer_slot: Option<usize>,
    /// v09: that slot's flags (raw).
    pub peer_flags: Option<u32>,
    /// The line `drbdmeta get-gi` prints (v09: `--node-id` = the peer slot).
    pub get_gi: String,
    /// Out-of-sync bits in the bitmap as found (before any replay).
    pub bits_set_found: u64,
    /// Activity-log extents replayed into the bitmap (unclean metadata of a primary).
    pub al_hot_extents: Vec<u32>,
    /// Bits the replay newly set.
    pub al_bits_newly_set: u64,
    /// Out-of-sync bits afterwards (`bits-set` of `dump-md`): these 4 KiB blocks resync.
    pub bits_set: u64,
    /// Things the operator should know.
    pub warnings: Vec<String>,
    /// What was written (or, in a dry run, would be).
    pub changes: Vec<String>,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> AdoptError + 'a {
    move |source| AdoptError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Size in bytes of a file or block device.
fn byte_size(path: &Path) -> Result<u64, AdoptError> {
    let mut f = File::open(path).map_err(io(path, "open"))?;
    f.seek(SeekFrom::End(0))
        .map_err(io(path, "seek to end (size)"))
}

fn same_file(a: &Path, b: &Path) -> Result<bool, AdoptError> {
    let ma = std::fs::metadata(a).map_err(io(a, "stat"))?;
    let mb = std::fs::metadata(b).map_err(io(b, "stat"))?;
    let dev_of = |m: &std::fs::Metadata| {
        use std::os::unix::fs::FileTypeExt;
        if m.file_type().is_block_device() {
            (0, m.rdev())
        } else {
            (m.dev(), m.ino())
        }
    };
    Ok(dev_of(&ma) == dev_of(&mb))
}

/// Disk state from device flags (`drbdmeta show-gi`'s "flags:" line).
pub fn disk_state_of(flags: MdFlags) -> &'static str {
    if !flags.contains(MdFlags::CONSISTENT) {
        "Inconsistent"
    } else if flags.contains(MdFlags::WAS_UP_TO_DATE) {
        "UpToDate"
    } else {
        "Outdated"
    }
}

/// The line `drbdmeta get-gi` prints: UUIDs, then the flag columns of
/// `dt_print_uuids` (v08) or `dt_print_v9_uuids` (v09, drbd-utils 9.22).
pub fn get_gi_line(
    version: MdVersion,
    current: u64,
    bitmap: u64,
    history: &[u64],
    flags: MdFlags,
    peer_flags: PeerFlags,
) -> String {
    let h = |i: usize| history.get(i).copied().unwrap_or(0);
    let b = |f: bool| if f { "1" } else { "0" };
    let mut s = format!("{current:016X}:{bitmap:016X}:{:016X}:{:016X}:", h(0), h(1));
    let cols: Vec<&str> = match version {
        MdVersion::V08 => vec![
            b(flags.contains(MdFlags::CONSISTENT)),
            b(flags.contains(MdFlags::WAS_UP_TO_DATE)),
            b(flags.contains(MdFlags::PRIMARY_IND)),
            b(flags.contains(MdFlags::CONNECTED_IND)),
            b(flags.contains(MdFlags::FULL_SYNC)),
            b(flags.contains(MdFlags::PEER_OUT_DATED)),
            b(flags.contains(MdFlags::CRASHED_PRIMARY)),
        ],
        MdVersion::V09 => vec![
            b(flags.contains(MdFlags::CONSISTENT)),
            b(flags.contains(MdFlags::WAS_UP_TO_DATE)),
            b(flags.contains(MdFlags::PRIMARY_IND)),
            b(flags.contains(MdFlags::CRASHED_PRIMARY)),
            b(flags.contains(MdFlags::AL_CLEAN)),
            b(flags.contains(MdFlags::AL_DISABLED)),
            b(flags.contains(MdFlags::PRIMARY_LOST_QUORUM)),
            b(peer_flags.contains(PeerFlags::CONNECTED)),
            b(peer_flags.contains(PeerFlags::OUTDATED)),
            b(peer_flags.contains(PeerFlags::FENCING)),
            b(peer_flags.contains(PeerFlags::FULL_SYNC)),
            b(peer_flags.contains(PeerFlags::DEVICE_SEEN)),
        ],
    };
    s.push_str(&cols.join(":"));
    s
}

/// Which v09 peer slot is the peer: the one owning bitmap index 0; else the one slot
/// with a bitmap UUID or the "exists" flag; else slot 0 (never connected). Refuses when
/// several slots are in use.
fn choose_peer_slot(sb: &Superblock) -> Result<usize, AdoptError> {
    let indexed: Vec<usize> = sb
        .peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.bitmap_index >= 0)
        .map(|(i, _)| i)
        .collect();
    if indexed.len() > 1 {
        return Err(AdoptError::SeveralPeers { slots: indexed });
    }
    if let Some(&i) = indexed.first() {
        if sb.peers[i].bitmap_index != 0 {
            return Err(AdoptError::TooManyPeerSlots {
                max_peers: sb.peers[i].bitmap_index as u32 + 1,
            });
        }
        return Ok(i);
    }
    let used: Vec<usize> = sb
        .peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.bitmap_uuid != 0 || p.flags.contains(PeerFlags::NODE_EXISTS))
        .map(|(i, _)| i)
        .collect();
    match used.len() {
        0 => Ok(0),
        1 => Ok(used[0]),
        _ => Err(AdoptError::SeveralPeers { slots: used }),
    }
}

/// Looks for a superblock of another layout in `path`, for the refusal message.
fn probe_other_layouts(path: &Path, asked: Layout) -> String {
    let mut found = Vec::new();
    for l in [Layout::Internal, Layout::FlexExternal] {
        if l == asked {
            continue;
        }
        if let Ok((sb, _)) = Metadata::read_superblock(path, l) {
            found.push(format!("{} {} metadata", sb.version, l));
        }
    }
    if found.is_empty() {
        String::new()
    } else {
        format!(
            ". Found {} in the same file instead: is `meta` right?",
            found.join(" and ")
        )
    }
}

fn flag_names(f: MdFlags) -> String {
    let d = format!("{f:?}");
    // "MdFlags(0x000000d1: consistent | ...)" -> "consistent | ..."
    match (d.find(": "), d.rfind(')')) {
        (Some(a), Some(b)) if b > a => d[a + 2..b].to_string(),
        _ => "none".to_string(),
    }
}

/// Checks and adopts the DRBD metadata of `target`; see the module docs. With
/// `opts.dry_run` nothing is written. On a refusal nothing is written either.
pub fn adopt(target: &AdoptTarget, opts: AdoptOptions) -> Result<AdoptReport, AdoptError> {
    let meta = &target.meta_path;
    let layout = target.layout;
    let data_bytes = byte_size(&target.data_path)?;

    // 1. Superblock and layout (drbdmeta.c is_valid_md and the kernel's checks).
    let (sb, geometry) = match Metadata::read_superblock(meta, layout) {
        Ok(x) => x,
        Err(MetadataError::Superblock { offset, source, .. }) => {
            let detail = match source {
                SuperblockError::BadMagic { found } => format!(
                    "magic at byte {} is 0x{found:08x}, not a DRBD v08/v09 magic (corrupt or never created)",
                    offset + 60
                ),
                other => format!("superblock at byte {offset}: {other}"),
            };
            return Err(AdoptError::NoMetadata {
                path: meta.clone(),
                layout,
                detail,
                hint: probe_other_layouts(meta, layout),
            });
        }
        Err(MetadataError::Layout(source)) => {
            return Err(AdoptError::LayoutMismatch {
                path: meta.clone(),
                layout,
                source,
            })
        }
        Err(MetadataError::Io { source, .. }) => {
            return Err(AdoptError::Io {
                path: meta.clone(),
                op: "read superblock",
                source,
            })
        }
        Err(e) => return Err(e.into()),
    };

    // 2. Peers (v09).
    let mut warnings = Vec::new();
    let mut changes = Vec::new();
    let peer_slot = if sb.version == MdVersion::V09 {
        if sb.max_peers != 1 {
            return Err(AdoptError::TooManyPeerSlots {
                max_peers: sb.max_peers,
            });
        }
        let slot = choose_peer_slot(&sb)?;
        if sb.node_id >= 0 && sb.node_id as usize == slot && sb.peers[slot].bitmap_index == 0 {
            return Err(AdoptError::PeerSlotIsSelf {
                node_id: sb.node_id,
            });
        }
        if sb.node_id < 0 {
            warnings.push(
                "node-id is -1: DRBD 9 never attached this metadata (or it was created without --node-id)"
                    .into(),
            );
        }
        Some(slot)
    } else {
        None
    };

    // 3. Sizes.
    let la = sb.effective_size;
    let same = same_file(meta, &target.data_path)?;
    let data_area_sect = match layout {
        Layout::Internal => {
            if !same {
                warnings.push(format!(
                    "internal metadata is read from {} but the LUN's path is {}",
                    meta.display(),
                    target.data_path.display()
                ));
            }
            geometry.max_usable_sectors
        }
        _ => data_bytes / SECTOR_SIZE,
    };
    if layout.is_external() && same {
        let meta_start = geometry.md_offset;
        let meta_end = geometry.md_offset + u64::from(geometry.md_size_sect) * SECTOR_SIZE;
        let data_end = if la > 0 { la * SECTOR_SIZE } else { data_bytes };
        if meta_start < data_end {
            return Err(AdoptError::Overlap {
                path: meta.clone(),
                layout,
                meta_start,
                meta_end,
                data_end,
            });
        }
    }
    if la > data_area_sect {
        let extra = match layout {
            Layout::Internal => format!(
                " in front of the {} sectors of metadata",
                geometry.md_size_sect
            ),
            _ => String::new(),
        };
        return Err(AdoptError::DataAreaTooSmall {
            data_path: target.data_path.clone(),
            la_size_sect: la,
            la_bytes: la * SECTOR_SIZE,
            data_area_sect,
            data_bytes: data_area_sect * SECTOR_SIZE,
            extra,
        });
    }
    if let Some(configured) = target.configured_size {
        let config_sect = match layout {
            Layout::Internal => internal_usable_sectors(
                configured,
                1,
                AlGeometry {
                    stripes: geometry.al.stripes,
                    stripe_size_4k: geometry.al.stripe_size_4k,
                },
            ),
            _ => configured / SECTOR_SIZE,
        };
        if config_sect < la {
            return Err(AdoptError::ConfiguredSizeTooSmall {
                configured,
                config_sect,
                la_size_sect: la,
                la_bytes: la * SECTOR_SIZE,
            });
        }
        if configured != data_bytes {
            warnings.push(format!(
                "the configured size {configured} differs from the backing's actual size {data_bytes}: twinsan serves the actual size"
            ));
        }
    }
    let usable_sect = if la > 0 {
        if la < data_area_sect {
            warnings.push(format!(
                "the data area has {data_area_sect} sectors, DRBD last agreed on {la}: twinsan serves {la} sectors (the last agreed size) and does not grow the device"
            ));
        }
        la
    } else {
        warnings.push(format!(
            "la-size-sect is 0 (DRBD never recorded a size, e.g. never connected): twinsan will serve the whole data area of {data_area_sect} sectors"
        ));
        data_area_sect
    };
    geometry
        .check_data_sectors(usable_sect)
        .map_err(AdoptError::Bitmap)?;

    // 4. UUIDs and flags.
    if sb.current_uuid & !1 == 0 {
        return Err(AdoptError::BadUuids(
            "the current UUID is 0, which DRBD never writes (wiped or corrupt metadata)".into(),
        ));
    }
    let flags_found = sb.flags;
    if sb.current_uuid & !1 == 4 {
        warnings.push("current UUID 4: the metadata was created and never synced; this host will receive a full sync from a peer that has data".into());
    }
    let disk = disk_state_of(flags_found);
    if target.want_primary && disk != "UpToDate" {
        return Err(AdoptError::NotUpToDateForPrimary {
            disk,
            flags: flags_found,
        });
    }
    match disk {
        "Inconsistent" => warnings.push("the disk is Inconsistent (a resync into it was interrupted, or it was never synced): it can only be a sync target; its data is not usable until the resync from the peer ends".into()),
        "Outdated" => warnings.push("the disk is Outdated: the peer has newer data; this host becomes sync target".into()),
        _ => {}
    }
    if flags_found.contains(MdFlags::PRIMARY_IND) {
        warnings.push("the node was Primary when DRBD last wrote the metadata (crashed, or never demoted): it is treated as a crashed primary, as DRBD's attach does".into());
    }
    if flags_found.contains(MdFlags::AL_DISABLED) {
        warnings.push("the activity log was disabled (al-updates no): after a crash of a primary the whole device must be resynced".into());
    }

    // 5. The bitmap, read-only, and a simulated apply-al / attach.
    let mut ro = Metadata::open_read_only(meta, layout, Some(usable_sect * SECTOR_SIZE))?;
    if let Some(s) = peer_slot {
        ro.set_peer_slot(s)?;
    }
    let bits_set_found = ro.bitmap().count();
    let state_found = ro.state();
    let mut al_hot_extents = Vec::new();
    let mut al_bits_newly_set = 0;
    let primary = flags_found.contains(MdFlags::PRIMARY_IND);
    if state_found == MetaState::Unclean {
        match ro.replay_al() {
            Ok(r) => {
                if r.has_updates() && primary {
                    for &e in &r.hot_extents {
                        al_bits_newly_set += ro.bitmap_mut().set_al_extent(e);
                    }
                    al_hot_extents = r.hot_extents.clone();
                    changes.push(format!(
                        "apply-al: {} hot extents ({:?}) marked out of sync, {} bits newly set",
                        r.hot_extents.len(),
                        r.hot_extents,
                        al_bits_newly_set
                    ));
                } else if r.has_updates() {
                    changes.push("apply-al: the node was not primary, so the activity log is only reset (as drbdmeta does)".into());
                }
            }
            Err(MetadataError::Al(e)) if primary => {
                return Err(AdoptError::CorruptActivityLog(e.to_string()))
            }
            Err(MetadataError::Al(e)) => {
                warnings.push(format!("the activity log is unreadable ({e}); the node was not primary, so it is reset, as drbdmeta apply-al does"));
            }
            Err(e) => return Err(e.into()),
        }
        changes.push(format!(
            "metadata marked clean ({}), activity log re-initialised",
            match sb.version {
                MdVersion::V08 => "AL_CLEAN and the v08 clean magic",
                MdVersion::V09 => "AL_CLEAN",
            }
        ));
    }
    let mut flags = flags_found;
    flags.insert(MdFlags::AL_CLEAN);
    let mut peer_flags = ro.peer_flags().unwrap_or_default();
    let full_sync = flags.contains(MdFlags::FULL_SYNC) || peer_flags.contains(PeerFlags::FULL_SYNC);
    if full_sync {
        ro.bitmap_mut().set_all();
        flags.remove(MdFlags::FULL_SYNC);
        peer_flags.remove(PeerFlags::FULL_SYNC);
        changes.push("FULL_SYNC was set: every bit set in the bitmap and the flag cleared, as DRBD's attach does".into());
    }
    let slot_assigned = ro.assign_bitmap_slot();
    if slot_assigned {
        changes.push(format!(
            "peer slot {} given bitmap index 0",
            peer_slot.unwrap_or(0)
        ));
    }
    if la == 0 {
        changes.push(format!("la-size-sect set to {usable_sect}"));
    }
    let mut conversion: Option<V08Conversion> = None;
    if opts.convert_to_v08 {
        if sb.version == MdVersion::V08 {
            warnings.push("--convert-to-v08: the metadata is already v08".into());
        } else {
            changes.push("converted v09 -> v08 in place (same offsets), bitmap UUID kept".into());
        }
    }

    ro.set_flags(flags);
    ro.set_peer_flags(peer_flags);

    // 6. Write (unless a dry run, or nothing changes: then not a byte is written).
    if !opts.dry_run && !changes.is_empty() {
        drop(ro);
        let mut md = Metadata::open_with_data_size(meta, layout, usable_sect * SECTOR_SIZE)?;
        if let Some(s) = peer_slot {
            md.set_peer_slot(s)?;
        }
        if md.state() == MetaState::Unclean {
            md.apply_al()?;
        }
        let mut f = md.flags();
        let mut pf = md.peer_flags().unwrap_or_default();
        if f.contains(MdFlags::FULL_SYNC) || pf.contains(PeerFlags::FULL_SYNC) {
            md.bitmap_mut().set_all();
            f.remove(MdFlags::FULL_SYNC);
            pf.remove(PeerFlags::FULL_SYNC);
            md.set_flags(f);
            md.set_peer_flags(pf);
        }
        md.assign_bitmap_slot();
        if md.effective_size() == 0 {
            md.set_effective_size(usable_sect)?;
        }
        md.write_bitmap(true)?;
        md.mark_clean()?;
        if opts.convert_to_v08 && md.version() == MdVersion::V09 {
            conversion = Some(md.convert_to_v08()?);
        }
        drop(md);
        ro = Metadata::open_read_only(meta, layout, Some(usable_sect * SECTOR_SIZE))?;
        flags = ro.flags();
        peer_flags = ro.peer_flags().unwrap_or_default();
    } else if opts.convert_to_v08 && sb.version == MdVersion::V09 {
        // Dry run: what the conversion would drop.
        let (_, c) = ro.v08_superblock()?;
        conversion = Some(c);
    }
    if let Some(c) = &conversion {
        if !c.dropped_history.is_empty() {
            warnings.push(format!(
                "v08 keeps 2 history UUIDs: dropped {:016X?}",
                c.dropped_history
            ));
        }
        if c.dropped_flags.bits() != 0 || c.dropped_peer_flags.bits() != 0 {
            warnings.push(format!(
                "flags without a v08 equivalent dropped: {:?} {:?}",
                c.dropped_flags, c.dropped_peer_flags
            ));
        }
    }

    let uuids = ro.uuids();
    let version = if opts.dry_run && conversion.is_some() {
        MdVersion::V08
    } else {
        ro.version()
    };
    let g = *ro.geometry();
    let sbf = ro.superblock();
    let (current, bitmap, history) = (uuids.current, uuids.bitmap, uuids.history.clone());
    let get_gi = match (&conversion, opts.dry_run) {
        (Some(_), true) => {
            let (v8, _) = ro.v08_superblock()?;
            get_gi_line(
                MdVersion::V08,
                v8.current_uuid,
                v8.bitmap_uuid,
                &v8.history_uuids,
                v8.flags,
                PeerFlags::empty(),
            )
        }
        _ => get_gi_line(ro.version(), current, bitmap, &history, flags, peer_flags),
    };
    Ok(AdoptReport {
        meta_path: meta.clone(),
        layout: layout.to_string(),
        version_found: sb.version.drbdmeta_name().into(),
        version: version.drbdmeta_name().into(),
        state_found: match state_found {
            MetaState::Clean => "clean".into(),
            MetaState::Unclean => "unclean".into(),
        },
        dry_run: opts.dry_run,
        md_size_sect: g.md_size_sect,
        md_offset: g.md_offset,
        al_offset: g.al_offset,
        bm_offset: g.bm_offset,
        al_stripes: g.al.stripes,
        al_stripe_size_4k: g.al.stripe_size_4k,
        al_extents: sbf.al_nr_extents,
        la_size_sect: la,
        data_area_sect,
        usable_sect,
        current_uuid: current,
        bitmap_uuid: bitmap,
        history_uuids: history,
        device_uuid: sbf.device_uuid,
        flags: flags.bits(),
        flag_names: flag_names(flags),
        disk_state: disk_state_of(flags).into(),
        node_id: sb.node_id,
        max_peers: sb.max_peers,
        peer_slot,
        peer_flags: peer_slot.map(|_| peer_flags.bits()),
        get_gi,
        bits_set_found,
        al_hot_extents,
        al_bits_newly_set,
        bits_set: ro.bitmap().count(),
        warnings,
        changes,
    })
}

impl std::fmt::Display for AdoptReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "DRBD {} metadata ({} layout) in {}, found {}{}",
            self.version_found,
            self.layout,
            self.meta_path.display(),
            self.state_found,
            if self.dry_run {
                " [dry run: nothing written]"
            } else {
                ""
            }
        )?;
        writeln!(f, "  version \"{}\";", self.version)?;
        writeln!(
            f,
            "  md_size_sect {}; md_offset {}; al_offset {}; bm_offset {};",
            self.md_size_sect, self.md_offset, self.al_offset, self.bm_offset
        )?;
        writeln!(
            f,
            "  al-stripes {}; al-stripe-size-4k {}; al-extents {};",
            self.al_stripes, self.al_stripe_size_4k, self.al_extents
        )?;
        writeln!(
            f,
            "  la-size-sect {}; data area {} sectors; twinsan serves {} sectors ({} bytes)",
            self.la_size_sect,
            self.data_area_sect,
            self.usable_sect,
            self.usable_sect * SECTOR_SIZE
        )?;
        writeln!(f, "  current-uuid 0x{:016X};", self.current_uuid)?;
        writeln!(f, "  bitmap-uuid 0x{:016X};", self.bitmap_uuid)?;
        // All 32 v09 entries are in the JSON; the text stops after the last non-zero one.
        let used = self
            .history_uuids
            .iter()
            .rposition(|&h| h != 0)
            .map_or(0, |p| p + 1)
            .max(2);
        let hist: Vec<String> = self
            .history_uuids
            .iter()
            .take(used)
            .map(|h| format!("0x{h:016X}"))
            .collect();
        writeln!(f, "  history-uuids {};", hist.join(" "))?;
        writeln!(f, "  device-uuid 0x{:016X};", self.device_uuid)?;
        writeln!(
            f,
            "  flags 0x{:08X} ({}): disk {}",
            self.flags, self.flag_names, self.disk_state
        )?;
        if let Some(slot) = self.peer_slot {
            writeln!(
                f,
                "  max-peers {}; node-id {}; peer node {} (bitmap index 0), peer flags 0x{:08X}",
                self.max_peers,
                self.node_id,
                slot,
                self.peer_flags.unwrap_or(0)
            )?;
        }
        writeln!(f, "  get-gi {}", self.get_gi)?;
        writeln!(
            f,
            "  bits-set {} (out-of-sync 4 KiB blocks, {} bytes; {} before the activity log replay)",
            self.bits_set,
            self.bits_set * 4096,
            self.bits_set_found
        )?;
        for c in &self.changes {
            writeln!(
                f,
                "  {}: {c}",
                if self.dry_run { "would write" } else { "wrote" }
            )?;
        }
        if self.changes.is_empty() {
            writeln!(f, "  nothing to write: the metadata is used as it is")?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drbd::uuid::GenerationUuids;
    use sha2::Digest;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    fn digest(p: &Path) -> Vec<u8> {
        sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
    }

    fn target(meta: &Path, layout: Layout, data: &Path) -> AdoptTarget {
        AdoptTarget {
            meta_path: meta.to_owned(),
            layout,
            data_path: data.to_owned(),
            configured_size: None,
            want_primary: false,
        }
    }

    /// Internal v08 metadata with UUIDs, `bits` out-of-sync blocks and UpToDate flags.
    fn drbd_like(path: &Path, version: MdVersion, bits: u64) -> GenerationUuids {
        let mut md = Metadata::create(path, Layout::Internal, 0, version).unwrap();
        let s = md.data_sectors();
        md.set_effective_size(s).unwrap();
        let u = GenerationUuids::new(0xAAAA_0000_0000_0010, 0xBBBB_0000_0000_0020, [0xC0, 0xD0]);
        md.set_uuids(&u).unwrap();
        md.set_flags(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN);
        md.bitmap_mut().set_bits(100, 100 + bits).unwrap();
        md.flush().unwrap();
        u
    }

    #[test]
    fn clean_metadata_is_used_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "d", 16 * MIB);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[0x5A; 8192], 4096)
            .unwrap();
        let u = drbd_like(&p, MdVersion::V08, 7);
        let before = digest(&p);
        for dry_run in [true, false] {
            let r = adopt(
                &target(&p, Layout::Internal, &p),
                AdoptOptions {
                    dry_run,
                    convert_to_v08: false,
                },
            )
            .unwrap();
            assert_eq!(r.bits_set, 7);
            assert_eq!((r.current_uuid, r.bitmap_uuid), (u.current, u.bitmap));
            assert_eq!(r.disk_state, "UpToDate");
            assert!(r.changes.is_empty(), "{:?}", r.changes);
            assert_eq!(
                r.get_gi,
                "AAAA000000000010:BBBB000000000020:00000000000000C0:00000000000000D0:1:1:0:0:0:0:0"
            );
            assert!(r.to_string().contains("bits-set 7"));
        }
        assert_eq!(digest(&p), before, "nothing may be written");
    }

    #[test]
    fn unclean_primary_gets_its_activity_log_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "d", 32 * MIB);
        drbd_like(&p, MdVersion::V09, 3);
        let mut md = Metadata::open(&p, Layout::Internal).unwrap();
        md.mark_unclean(true).unwrap();
        let mut al = md.new_activity_log(61).unwrap();
        for e in [2u32, 5] {
            if let Some(w) = al.activate(e).unwrap() {
                md.write_al(&w).unwrap();
            }
        }
        drop(md);
        let before = digest(&p);
        let t = target(&p, Layout::Internal, &p);
        let dry = adopt(
            &t,
            AdoptOptions {
                dry_run: true,
                convert_to_v08: false,
            },
        )
        .unwrap();
        assert_eq!(digest(&p), before, "dry run wrote");
        assert_eq!(dry.state_found, "unclean");
        assert_eq!(dry.al_hot_extents, vec![2, 5]);
        assert_eq!(dry.bits_set, 3 + 2 * 1024);
        let r = adopt(&t, AdoptOptions::default()).unwrap();
        assert_eq!(r.bits_set, dry.bits_set);
        assert_eq!(r.get_gi, dry.get_gi);
        let md = Metadata::open(&p, Layout::Internal).unwrap();
        assert_eq!(md.state(), MetaState::Clean);
        assert_eq!(md.bitmap().count(), 3 + 2048);
        assert!(md.flags().contains(MdFlags::PRIMARY_IND), "flags are kept");
        assert!(r.warnings.iter().any(|w| w.contains("crashed primary")));
    }

    #[test]
    fn full_sync_flag_sets_every_bit() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "d", 16 * MIB);
        drbd_like(&p, MdVersion::V08, 1);
        let mut md = Metadata::open(&p, Layout::Internal).unwrap();
        let mut f = md.flags();
        f.insert(MdFlags::FULL_SYNC);
        md.set_flags(f);
        md.flush().unwrap();
        let bits = md.bitmap().bits();
        drop(md);
        let r = adopt(&target(&p, Layout::Internal, &p), AdoptOptions::default()).unwrap();
        assert_eq!(r.bits_set, bits);
        let md = Metadata::open(&p, Layout::Internal).unwrap();
        assert!(!md.flags().contains(MdFlags::FULL_SYNC));
        assert_eq!(md.bitmap().count(), bits);
    }

    fn refused(t: &AdoptTarget, files: &[&Path]) -> AdoptError {
        let before: Vec<_> = files.iter().map(|f| digest(f)).collect();
        let e = adopt(t, AdoptOptions::default()).unwrap_err();
        assert!(e.is_refusal(), "{e}");
        let after: Vec<_> = files.iter().map(|f| digest(f)).collect();
        assert_eq!(before, after, "refusal wrote: {e}");
        e
    }

    #[test]
    fn refusals_explain_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        // Flexible external metadata where internal is configured: says what is there.
        let m = file(d, "m", 4 * MIB);
        Metadata::create(&m, Layout::FlexExternal, 8 * MIB, MdVersion::V08).unwrap();
        let e = refused(&target(&m, Layout::Internal, &m), &[&m]);
        assert!(matches!(e, AdoptError::NoMetadata { .. }), "{e}");
        assert!(e.to_string().contains("flexible external"), "{e}");

        // v09 with two bitmap slots (flexible external: the size does not depend on it).
        let m2 = file(d, "m2", 4 * MIB);
        let data = file(d, "data", 8 * MIB);
        Metadata::create(&m2, Layout::FlexExternal, 8 * MIB, MdVersion::V09).unwrap();
        File::options()
            .write(true)
            .open(&m2)
            .unwrap()
            .write_all_at(&2u32.to_be_bytes(), 88)
            .unwrap();
        let e = refused(&target(&m2, Layout::FlexExternal, &data), &[&m2, &data]);
        assert!(
            matches!(e, AdoptError::TooManyPeerSlots { max_peers: 2 }),
            "{e}"
        );

        // The data device shrank below DRBD's size.
        let m3 = file(d, "m3", 4 * MIB);
        let mut md = Metadata::create(&m3, Layout::FlexExternal, 8 * MIB, MdVersion::V08).unwrap();
        md.set_effective_size(8 * MIB / 512).unwrap();
        md.set_uuids(&GenerationUuids::new(0x10, 0, [0, 0]))
            .unwrap();
        md.flush().unwrap();
        let small = file(d, "small", 4 * MIB);
        let e = refused(&target(&m3, Layout::FlexExternal, &small), &[&m3, &small]);
        assert!(matches!(e, AdoptError::DataAreaTooSmall { .. }), "{e}");

        // A current UUID of 0.
        let mut md = Metadata::open_with_data_size(&m3, Layout::FlexExternal, 8 * MIB).unwrap();
        md.set_uuids(&GenerationUuids::new(0, 0, [0, 0])).unwrap();
        md.flush().unwrap();
        let e = refused(&target(&m3, Layout::FlexExternal, &data), &[&m3, &data]);
        assert!(matches!(e, AdoptError::BadUuids(_)), "{e}");

        // Inconsistent, configured primary.
        let p = file(d, "inc", 16 * MIB);
        Metadata::create(&p, Layout::Internal, 0, MdVersion::V08).unwrap();
        let mut t = target(&p, Layout::Internal, &p);
        t.want_primary = true;
        let e = refused(&t, &[&p]);
        assert!(matches!(e, AdoptError::NotUpToDateForPrimary { .. }), "{e}");

        // External metadata on the data file itself.
        let e = refused(&target(&m, Layout::FlexExternal, &m), &[&m]);
        assert!(matches!(e, AdoptError::Overlap { .. }), "{e}");
    }

    #[test]
    fn v09_to_v08_keeps_the_bitmap_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "d", 16 * MIB);
        let u = drbd_like(&p, MdVersion::V09, 5);
        let r = adopt(
            &target(&p, Layout::Internal, &p),
            AdoptOptions {
                dry_run: false,
                convert_to_v08: true,
            },
        )
        .unwrap();
        assert_eq!(
            (r.version_found.as_str(), r.version.as_str()),
            ("v09", "v08")
        );
        let md = Metadata::open(&p, Layout::Internal).unwrap();
        assert_eq!(md.version(), MdVersion::V08);
        assert_eq!(md.uuids(), u);
        assert_eq!(md.bitmap().count(), 5);
        assert_eq!(md.state(), MetaState::Clean);
    }

    #[test]
    fn get_gi_matches_drbdmeta_columns() {
        // Lines printed by drbdmeta 9.22 get-gi for these values.
        let f = MdFlags(0x151);
        assert_eq!(
            get_gi_line(
                MdVersion::V09,
                0xAAAA_0000_0000_0000,
                0xBBBB_0000_0000_0000,
                &[0xCCCC_0000_0000_0000, 0xDDDD_0000_0000_0000],
                f,
                PeerFlags::empty()
            ),
            "AAAA000000000000:BBBB000000000000:CCCC000000000000:DDDD000000000000:1:1:0:1:0:1:0:0:0:0:0:0"
        );
        assert_eq!(
            get_gi_line(
                MdVersion::V08,
                0xAAAA_0000_0000_0000,
                0xBBBB_0000_0000_0000,
                &[0xCCCC_0000_0000_0000, 0xDDDD_0000_0000_0000],
                MdFlags(0x41 | 0x10),
                PeerFlags::empty()
            ),
            "AAAA000000000000:BBBB000000000000:CCCC000000000000:DDDD000000000000:1:1:0:0:0:0:1"
        );
    }
}
