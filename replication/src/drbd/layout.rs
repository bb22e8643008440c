//! Where the metadata lives: byte offsets of superblock, activity log and
//! bitmap for the three DRBD layouts, and the data size they leave.
//!
//! Rules from drbd-utils `user/shared/drbdmeta.c` (`v07_style_md_get_byte_offset`,
//! `re_initialize_md_offsets`, `bm_bytes`, `max_usable_sectors`, `is_valid_md`):
//!
//! ```text
//! internal:          [ data ......... ][ bitmap ][ AL ][ superblock ]   (end of device)
//! flexible external: [ superblock ][ AL ][ bitmap ........ ]           (whole meta device)
//! indexed external:  slot N of 128 MiB: [ superblock ][ AL ][ bitmap ] at N * 128 MiB
//! ```

use std::fmt;

use thiserror::Error;

use super::superblock::{Superblock, DRBD_PEERS_MAX, MAX_EFFECTIVE_SIZE_SECT};
use super::{MD_BLOCK_SIZE, SECTOR_SIZE};

/// AL offset of external metadata, in sectors after the superblock (`MD_AL_OFFSET_07`).
pub const MD_AL_OFFSET_07: i32 = 8;
/// Size of one indexed external metadata slot in sectors: 128 MiB (`MD_RESERVED_SECT_07`).
pub const MD_RESERVED_SECT_07: u64 = 128 << 11;
/// drbdmeta refuses devices smaller than this (`SO_MUCH`, 68 KiB).
pub const MIN_DEVICE_SIZE: u64 = 68 * 1024;
/// Largest internal bitmap drbdmeta creates on 64-bit (`MD_BM_MAX_BYTE_FLEX`).
pub const MD_BM_MAX_BYTE_FLEX: u64 = 1 << (38 - 3);

/// Which of DRBD's metadata layouts is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `meta-disk internal`: flexible-size metadata at the end of the backing device.
    Internal,
    /// `meta-disk /dev/x` (flex-external): the whole meta device holds one resource's metadata.
    FlexExternal,
    /// `meta-disk /dev/x[N]`: slot N (0..=255) of 128 MiB on a shared meta device.
    IndexedExternal {
        /// Slot number.
        index: u8,
    },
}

impl Layout {
    /// drbdmeta's argument for this layout (`internal`, `flex-external`, `N`).
    pub fn drbdmeta_arg(&self) -> String {
        match self {
            Layout::Internal => "internal".into(),
            Layout::FlexExternal => "flex-external".into(),
            Layout::IndexedExternal { index } => index.to_string(),
        }
    }

    /// True for the two external layouts.
    pub fn is_external(&self) -> bool {
        !matches!(self, Layout::Internal)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Internal => f.write_str("internal"),
            Layout::FlexExternal => f.write_str("flexible external"),
            Layout::IndexedExternal { index } => write!(f, "indexed external [{index}]"),
        }
    }
}

/// Activity log striping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AlGeometry {
    /// Number of stripes.
    pub stripes: u32,
    /// Blocks of 4 KiB per stripe.
    pub stripe_size_4k: u32,
}

impl Default for AlGeometry {
    /// DRBD's default: one stripe of 32 KiB (8 transactions).
    fn default() -> Self {
        AlGeometry {
            stripes: 1,
            stripe_size_4k: 8,
        }
    }
}

impl AlGeometry {
    /// Number of 4 KiB transaction blocks.
    pub fn size_4k(&self) -> u64 {
        u64::from(self.stripes) * u64::from(self.stripe_size_4k)
    }

    /// Size in sectors.
    pub fn size_sect(&self) -> u64 {
        self.size_4k() * 8
    }

    /// The 4 KiB block (relative to the AL start) holding transaction number
    /// `tr_number` (kernel `al_tr_number_to_on_disk_sector`, drbdmeta
    /// `al_tr_number_to_on_disk_slot`). Returns 0 for a degenerate geometry.
    pub fn block_of(&self, tr_number: u32) -> u64 {
        let mx = self.size_4k();
        if mx == 0 || self.stripes == 0 {
            return 0;
        }
        let t = u64::from(tr_number) % mx;
        let stripes = u64::from(self.stripes);
        (t % stripes) * u64::from(self.stripe_size_4k) + t / stripes
    }
}

/// Layout errors.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// The device cannot hold the metadata.
    #[error("{layout} metadata needs a device of at least {need} bytes, this one has {have}")]
    DeviceTooSmall {
        /// Layout asked for.
        layout: Layout,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// A superblock field does not match what the layout and device size imply.
    #[error("superblock field {field} = {found} does not fit {layout} metadata on a {device_size}-byte device (expected {expected})")]
    Mismatch {
        /// Layout asked for.
        layout: Layout,
        /// Field name as in drbdmeta.c.
        field: &'static str,
        /// Value in the superblock.
        found: i64,
        /// Value the layout implies.
        expected: String,
        /// Device size used.
        device_size: u64,
    },
    /// The data area does not fit the bitmap.
    #[error(
        "{data_sectors} data sectors need {need} bitmap bytes, the {layout} bitmap area has {have}"
    )]
    BitmapTooSmall {
        /// Layout.
        layout: Layout,
        /// Data size asked for, in sectors.
        data_sectors: u64,
        /// Bitmap bytes needed.
        need: u64,
        /// Bitmap bytes available.
        have: u64,
    },
    /// The data size is beyond what DRBD supports.
    #[error("data size of {0} sectors is beyond DRBD's limit of 1 PiB")]
    TooLarge(u64),
    /// Bad max-peers value.
    #[error("max_peers = {0} must be 1 .. 32")]
    BadMaxPeers(u32),
    /// Bad activity log striping.
    #[error(
        "activity log striping {stripes} x {stripe_size_4k} blocks is outside 8 .. 4194304 blocks"
    )]
    BadAlStriping {
        /// Stripes.
        stripes: u32,
        /// Stripe size in 4 KiB blocks.
        stripe_size_4k: u32,
    },
}

/// Bitmap bytes needed for `sectors` of data with `max_peers` bitmap slots:
/// one bit per 4 KiB, rounded up to 64-bit words, times the slots, rounded up
/// to 4 KiB (drbdmeta.c `bm_bytes`).
pub fn bm_bytes(sectors: u64, max_peers: u32) -> u64 {
    let bits = sectors.div_ceil(8);
    let bits = bits.div_ceil(64) * 64;
    (bits / 8 * u64::from(max_peers)).div_ceil(MD_BLOCK_SIZE) * MD_BLOCK_SIZE
}

/// Number of bitmap bits (4 KiB blocks) covering `sectors` of data.
pub fn bm_bits(sectors: u64) -> u64 {
    sectors.div_ceil(8)
}

/// `md_size_sect` of internal metadata on a device of `device_bytes`:
/// `ALIGN(bm_bytes / 512, 8) + 8 + al_sectors` (drbdmeta.c `re_initialize_md_offsets`).
pub fn internal_md_size_sect(device_bytes: u64, max_peers: u32, al: AlGeometry) -> u64 {
    let bm_sect = bm_bytes(device_bytes / SECTOR_SIZE, max_peers) / SECTOR_SIZE;
    bm_sect.div_ceil(8) * 8 + MD_AL_OFFSET_07 as u64 + al.size_sect()
}

/// Usable data sectors with internal metadata on a device of `device_bytes`:
/// `floor_4k(size) / 512 - md_size_sect`.
pub fn internal_usable_sectors(device_bytes: u64, max_peers: u32, al: AlGeometry) -> u64 {
    ((device_bytes / MD_BLOCK_SIZE) * MD_BLOCK_SIZE / SECTOR_SIZE)
        .saturating_sub(internal_md_size_sect(device_bytes, max_peers, al))
}

/// Where everything is, in bytes from the start of the metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Layout.
    pub layout: Layout,
    /// Size of the device holding the metadata (for internal: the backing device).
    pub device_size: u64,
    /// Byte offset of the superblock.
    pub md_offset: u64,
    /// Byte offset of the activity log.
    pub al_offset: u64,
    /// Byte offset of the bitmap.
    pub bm_offset: u64,
    /// Metadata area size in sectors (superblock field).
    pub md_size_sect: u32,
    /// AL offset in sectors relative to the superblock (superblock field).
    pub al_offset_sect: i32,
    /// Bitmap offset in sectors relative to the superblock (superblock field).
    pub bm_offset_sect: i32,
    /// Activity log striping.
    pub al: AlGeometry,
    /// Bitmap slots (v09 `bm_max_peers`; 1 for v08).
    pub max_peers: u32,
    /// Bytes reserved for the bitmap.
    pub bitmap_area_bytes: u64,
    /// Largest data size in sectors this metadata can describe (drbdmeta.c
    /// `max_usable_sectors`). For internal metadata this is the data area
    /// in front of the metadata; for external metadata it is the bitmap's reach.
    pub max_usable_sectors: u64,
}

impl Geometry {
    /// Bitmap bytes (on disk, all slots, 4 KiB aligned) for `data_sectors`.
    pub fn bitmap_bytes_for(&self, data_sectors: u64) -> u64 {
        bm_bytes(data_sectors, self.max_peers)
    }

    /// Checks that `data_sectors` of data fit this metadata.
    pub fn check_data_sectors(&self, data_sectors: u64) -> Result<(), LayoutError> {
        if data_sectors > MAX_EFFECTIVE_SIZE_SECT {
            return Err(LayoutError::TooLarge(data_sectors));
        }
        let need = self.bitmap_bytes_for(data_sectors);
        if data_sectors > self.max_usable_sectors || need > self.bitmap_area_bytes {
            return Err(LayoutError::BitmapTooSmall {
                layout: self.layout,
                data_sectors,
                need,
                have: self.bitmap_area_bytes,
            });
        }
        Ok(())
    }

    /// Byte offset of AL transaction block `block` (0-based, see [`AlGeometry::block_of`]).
    pub fn al_block_offset(&self, block: u64) -> u64 {
        self.al_offset + block * MD_BLOCK_SIZE
    }

    fn finish(mut self) -> Result<Geometry, LayoutError> {
        let md = self.md_offset as i128;
        let al = md + i128::from(self.al_offset_sect) * 512;
        let bm = md + i128::from(self.bm_offset_sect) * 512;
        if al < 0 || bm < 0 {
            return Err(LayoutError::DeviceTooSmall {
                layout: self.layout,
                need: (md - al.min(bm)) as u64 + MD_BLOCK_SIZE,
                have: self.device_size,
            });
        }
        self.al_offset = al as u64;
        self.bm_offset = bm as u64;
        let md_size = u64::from(self.md_size_sect);
        let al_sect = self.al.size_sect();
        if self.layout.is_external() {
            let bm_sect = md_size.saturating_sub(self.bm_offset_sect as u64);
            self.bitmap_area_bytes = bm_sect * SECTOR_SIZE;
            // drbdmeta.c max_usable_sectors: bitmap sectors * 512 * 8 bits,
            // per slot in whole 64-bit words, times 8 sectors per bit.
            self.max_usable_sectors =
                bm_sect * SECTOR_SIZE * 8 / 64 / u64::from(self.max_peers.max(1)) * 64 * 8;
        } else {
            self.bitmap_area_bytes = md_size.saturating_sub(8 + al_sect) * SECTOR_SIZE;
            self.max_usable_sectors =
                self.md_offset.min(self.al_offset).min(self.bm_offset) / SECTOR_SIZE;
        }
        Ok(self)
    }

    /// Geometry of newly created metadata (drbdmeta.c `re_initialize_md_offsets`).
    /// `device_size` is the size of the device holding the metadata.
    pub fn for_create(
        layout: Layout,
        device_size: u64,
        max_peers: u32,
        al: AlGeometry,
    ) -> Result<Geometry, LayoutError> {
        check_peers_and_al(max_peers, al)?;
        let md_offset = md_offset(layout, device_size)?;
        let al_sect = al.size_sect();
        let (md_size_sect, al_offset_sect, bm_offset_sect) = match layout {
            Layout::Internal => {
                let bm_sect = bm_bytes(device_size / SECTOR_SIZE, max_peers) / SECTOR_SIZE;
                let bm_sect = bm_sect.div_ceil(8) * 8;
                if bm_sect > MD_BM_MAX_BYTE_FLEX / SECTOR_SIZE {
                    return Err(LayoutError::TooLarge(device_size / SECTOR_SIZE));
                }
                let md_size = bm_sect + 8 + al_sect;
                (md_size, -(al_sect as i64), 8 - md_size as i64)
            }
            Layout::FlexExternal => (device_size / SECTOR_SIZE, 8, 8 + al_sect as i64),
            Layout::IndexedExternal { .. } => (MD_RESERVED_SECT_07, 8, 8 + al_sect as i64),
        };
        let md_size_sect = u32::try_from(md_size_sect).map_err(|_| LayoutError::Mismatch {
            layout,
            field: "md_size_sect",
            found: md_size_sect as i64,
            expected: "at most 2^32-1 sectors".into(),
            device_size,
        })?;
        let need_min = 8 + al_sect;
        if u64::from(md_size_sect) <= need_min {
            return Err(LayoutError::DeviceTooSmall {
                layout,
                need: (need_min + 8) * SECTOR_SIZE,
                have: device_size,
            });
        }
        Geometry {
            layout,
            device_size,
            md_offset,
            al_offset: 0,
            bm_offset: 0,
            md_size_sect,
            al_offset_sect: al_offset_sect as i32,
            bm_offset_sect: bm_offset_sect as i32,
            al,
            max_peers,
            bitmap_area_bytes: 0,
            max_usable_sectors: 0,
        }
        .finish()
    }

    /// Geometry described by a superblock read from a device of `device_size`
    /// bytes with `layout`; checks it the way drbdmeta.c `is_valid_md` does.
    pub fn from_superblock(
        layout: Layout,
        sb: &Superblock,
        device_size: u64,
    ) -> Result<Geometry, LayoutError> {
        let (stripes, stripe_size_4k) = sb.al_striping();
        let al = AlGeometry {
            stripes,
            stripe_size_4k,
        };
        check_peers_and_al(sb.max_peers, al)?;
        let md_offset = md_offset(layout, device_size)?;
        let al_sect = al.size_sect() as i64;
        let mismatch = |field: &'static str, found: i64, expected: String| LayoutError::Mismatch {
            layout,
            field,
            found,
            expected,
            device_size,
        };
        match layout {
            Layout::Internal => {
                if i64::from(sb.al_offset) != -al_sect {
                    return Err(mismatch(
                        "al_offset",
                        sb.al_offset.into(),
                        format!("{}", -al_sect),
                    ));
                }
                let md_size = internal_md_size_sect(device_size, sb.max_peers, al) as i64;
                if i64::from(sb.bm_offset) != 8 - md_size {
                    return Err(mismatch(
                        "bm_offset",
                        sb.bm_offset.into(),
                        format!("{}", 8 - md_size),
                    ));
                }
                if i64::from(sb.md_size_sect) != md_size {
                    return Err(mismatch(
                        "md_size_sect",
                        sb.md_size_sect.into(),
                        format!("{md_size}"),
                    ));
                }
            }
            Layout::FlexExternal | Layout::IndexedExternal { .. } => {
                if sb.al_offset != MD_AL_OFFSET_07 {
                    return Err(mismatch("al_offset", sb.al_offset.into(), "8".into()));
                }
                if i64::from(sb.bm_offset) != 8 + al_sect {
                    return Err(mismatch(
                        "bm_offset",
                        sb.bm_offset.into(),
                        format!("{}", 8 + al_sect),
                    ));
                }
                // drbdmeta does not check md_size_sect of external metadata,
                // the kernel does (drbd_md_set_sector_offsets / drbd_md_read):
                // the whole meta device, or one 128 MiB slot.
                let expected = match layout {
                    Layout::IndexedExternal { .. } => MD_RESERVED_SECT_07,
                    _ => device_size / SECTOR_SIZE,
                };
                if u64::from(sb.md_size_sect) != expected {
                    return Err(mismatch(
                        "md_size_sect",
                        sb.md_size_sect.into(),
                        expected.to_string(),
                    ));
                }
            }
        }
        let g = Geometry {
            layout,
            device_size,
            md_offset,
            al_offset: 0,
            bm_offset: 0,
            md_size_sect: sb.md_size_sect,
            al_offset_sect: sb.al_offset,
            bm_offset_sect: sb.bm_offset,
            al,
            max_peers: sb.max_peers,
            bitmap_area_bytes: 0,
            max_usable_sectors: 0,
        }
        .finish()?;
        // The superblock and the activity log must be on the device.
        let end = g
            .md_offset
            .max(g.al_offset + al.size_4k() * MD_BLOCK_SIZE)
            .max(g.md_offset + MD_BLOCK_SIZE);
        if end > device_size {
            return Err(LayoutError::DeviceTooSmall {
                layout,
                need: end,
                have: device_size,
            });
        }
        Ok(g)
    }
}

fn check_peers_and_al(max_peers: u32, al: AlGeometry) -> Result<(), LayoutError> {
    if max_peers == 0 || max_peers as usize > DRBD_PEERS_MAX {
        return Err(LayoutError::BadMaxPeers(max_peers));
    }
    let n = al.size_4k();
    if al.stripes == 0 || !(8..=16 * 1024 * 1024 / 4).contains(&n) {
        return Err(LayoutError::BadAlStriping {
            stripes: al.stripes,
            stripe_size_4k: al.stripe_size_4k,
        });
    }
    Ok(())
}

/// Byte offset of the superblock (drbdmeta.c `v07_style_md_get_byte_offset`),
/// checking that it fits on the device.
pub fn md_offset(layout: Layout, device_size: u64) -> Result<u64, LayoutError> {
    if device_size < MIN_DEVICE_SIZE {
        return Err(LayoutError::DeviceTooSmall {
            layout,
            need: MIN_DEVICE_SIZE,
            have: device_size,
        });
    }
    let off = match layout {
        Layout::Internal => (device_size - MD_BLOCK_SIZE) & !(MD_BLOCK_SIZE - 1),
        Layout::FlexExternal => 0,
        Layout::IndexedExternal { index } => MD_RESERVED_SECT_07 * SECTOR_SIZE * u64::from(index),
    };
    if off > device_size - MD_BLOCK_SIZE {
        return Err(LayoutError::DeviceTooSmall {
            layout,
            need: off + MD_BLOCK_SIZE,
            have: device_size,
        });
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn internal_sizes_match_drbdmeta() {
        // Values checked with drbdmeta 9.22 create-md on sparse files.
        let al = AlGeometry::default();
        assert_eq!(internal_md_size_sect(GIB, 1, al), 136);
        assert_eq!(internal_md_size_sect(10 * GIB, 1, al), 712);
        assert_eq!(internal_md_size_sect(100 * GIB, 1, al), 6472);
        assert_eq!(internal_md_size_sect(1024 * GIB, 1, al), 65608);
        assert_eq!(internal_usable_sectors(GIB, 1, al), 2_097_016);
        let g = Geometry::for_create(Layout::Internal, GIB, 1, al).unwrap();
        assert_eq!(g.md_offset, 1_073_737_728);
        assert_eq!(g.al_offset, 1_073_704_960);
        assert_eq!(g.bm_offset, 1_073_672_192);
        assert_eq!(g.md_size_sect, 136);
        assert_eq!(g.al_offset_sect, -64);
        assert_eq!(g.bm_offset_sect, -128);
        assert_eq!(g.max_usable_sectors, 2_097_016);
        assert_eq!(g.bitmap_area_bytes, 32768);
        g.check_data_sectors(2_097_016).unwrap();
        assert!(g.check_data_sectors(2_097_017).is_err());
    }

    #[test]
    fn external_offsets_match_drbdmeta() {
        let al = AlGeometry::default();
        let g =
            Geometry::for_create(Layout::IndexedExternal { index: 1 }, 300 << 20, 1, al).unwrap();
        assert_eq!(g.md_offset, 134_217_728);
        assert_eq!(g.al_offset, 134_221_824);
        assert_eq!(g.bm_offset, 134_254_592);
        assert_eq!(g.md_size_sect, 262_144);
        assert_eq!(g.bm_offset_sect, 72);
        assert_eq!(g.max_usable_sectors, (262_144 - 72) * 512 * 8 * 8);

        let g = Geometry::for_create(Layout::FlexExternal, 4 << 20, 1, al).unwrap();
        assert_eq!(g.md_offset, 0);
        assert_eq!(g.al_offset, 4096);
        assert_eq!(g.bm_offset, 36864);
        assert_eq!(g.md_size_sect, 8192);

        assert!(matches!(
            Geometry::for_create(Layout::IndexedExternal { index: 3 }, 300 << 20, 1, al),
            Err(LayoutError::DeviceTooSmall { .. })
        ));
        assert!(Geometry::for_create(Layout::Internal, 4096, 1, al).is_err());
    }

    #[test]
    fn al_block_mapping() {
        let one = AlGeometry::default();
        assert_eq!(
            (0..10).map(|t| one.block_of(t)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
        );
        let striped = AlGeometry {
            stripes: 2,
            stripe_size_4k: 4,
        };
        assert_eq!(
            (0..8).map(|t| striped.block_of(t)).collect::<Vec<_>>(),
            vec![0, 4, 1, 5, 2, 6, 3, 7]
        );
    }

    #[test]
    fn random_superblocks_never_panic() {
        use crate::drbd::superblock::{Superblock, DRBD_MD_MAGIC_08, DRBD_MD_MAGIC_09};
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let layouts = [
            Layout::Internal,
            Layout::FlexExternal,
            Layout::IndexedExternal { index: 255 },
        ];
        let mut parsed = 0;
        for i in 0..4000 {
            let mut b = [0u8; 4096];
            rng.fill_bytes(&mut b[..128]);
            let magic = if i % 2 == 0 {
                DRBD_MD_MAGIC_08
            } else {
                DRBD_MD_MAGIC_09
            };
            b[60..64].copy_from_slice(&magic.to_be_bytes());
            b[80..84].copy_from_slice(&4096u32.to_be_bytes());
            b[..3].fill(0); // la_size below the 1 PiB limit
            b[3] &= 1;
            let al: u32 = if rng.gen_bool(0.5) {
                8
            } else {
                rng.gen_range(0..64)
            };
            let (so, zo) = if i % 2 == 0 { (88, 92) } else { (96, 100) };
            b[so..so + 4].copy_from_slice(&1u32.to_be_bytes());
            b[zo..zo + 4].copy_from_slice(&al.to_be_bytes());
            if i % 2 == 1 {
                b[88..92].copy_from_slice(&rng.gen_range(0u32..40).to_be_bytes());
                b[92..96].copy_from_slice(&(-1i32).to_be_bytes());
            }
            let md: u32 = rng.gen_range(0..1 << 20);
            b[64..68].copy_from_slice(&md.to_be_bytes());
            let al_sect = i64::from(al) * 8;
            if rng.gen_bool(0.5) {
                b[68..72].copy_from_slice(&(-(al_sect as i32)).to_be_bytes());
                b[76..80].copy_from_slice(&(8 - i64::from(md)).to_be_bytes()[4..]);
            } else {
                b[68..72].copy_from_slice(&8i32.to_be_bytes());
                b[76..80].copy_from_slice(&((8 + al_sect) as i32).to_be_bytes());
            }
            let Ok(sb) = Superblock::parse(&b) else {
                continue;
            };
            parsed += 1;
            for layout in layouts {
                let dev = match rng.gen_range(0..3) {
                    0 => rng.gen::<u64>(),
                    1 => rng.gen_range(0..1u64 << 40),
                    _ => u64::from(md) * 512,
                };
                if let Ok(g) = Geometry::from_superblock(layout, &sb, dev) {
                    let _ = g.check_data_sectors(sb.effective_size);
                    let _ = g.al_block_offset(g.al.block_of(rng.gen()));
                }
            }
        }
        assert!(parsed > 100, "{parsed}");
    }

    #[test]
    fn bm_bytes_rounding() {
        assert_eq!(bm_bytes(0, 1), 0);
        assert_eq!(bm_bytes(1, 1), 4096);
        assert_eq!(bm_bytes(8 * 64 * 512, 1), 4096);
        assert_eq!(bm_bytes(8 * 64 * 512 + 1, 1), 8192);
        assert_eq!(bm_bytes(8 * 64 * 512, 2), 8192);
    }
}
