//! twinsan's DRBD metadata code against `drbdmeta` (drbd-utils 9.22) as the
//! oracle, on sparse files. Every test skips (and says why) when
//! `/usr/sbin/drbdmeta` is not installed.
//!
//! drbdmeta quirks found while writing these (also noted where they matter):
//! * v08 `dump-md` always prints `flags 0x00000000` in the `uuid {}` block: it
//!   prints the (unused for v08) per-peer flags instead of the device flags.
//!   `restore-md` however writes that value into the device flags, so a v08
//!   dump -> restore round trip clears every flag, AL_CLEAN included, and the
//!   restored metadata is "unclean". We use that to make unclean metadata.
//! * `dump-md` only shows the bitmap for `la-size-sect`; right after
//!   `create-md` that is 0, so the dump has an empty `bm {}`.
//! * `restore-md` clips `la-size-sect` to the usable size ("la-size-sect was too
//!   big ... truncated"); we use that to read drbdmeta's idea of the usable size.
//! * `apply-al` only replays the AL when `PRIMARY_IND` is set, and sets whole
//!   128-byte extents in the on-disk bitmap, including bits past the end of
//!   the data in the last extent; twinsan (like the kernel's
//!   `bm_clear_surplus`) ignores such surplus bits.
//! * For external metadata `create-md` zeroes only as much bitmap as the
//!   size of the *meta* device would need, since it does not know the data
//!   device.
//! * `show-gi`/`get-gi` on v09 need `--node-id`, and `set-gi` rewrites the
//!   flags it lists (a 0 in the al-clean position clears AL_CLEAN).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use twinsan_replication::drbd::activity_log::ActivityLog;
use twinsan_replication::drbd::layout::{internal_md_size_sect, AlGeometry, Layout};
use twinsan_replication::drbd::metadata::{CreateOptions, Metadata};
use twinsan_replication::drbd::superblock::{MdFlags, MdVersion, MetaState};
use twinsan_replication::drbd::uuid::GenerationUuids;

const DRBDMETA: &str = "/usr/sbin/drbdmeta";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn oracle() -> bool {
    if Path::new(DRBDMETA).exists() {
        true
    } else {
        eprintln!("skipping: {DRBDMETA} is not installed (apt-get install drbd-utils)");
        false
    }
}

fn tmpdir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("drbdmeta-oracle")
        .join(test);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// Copies a file, keeping it sparse (only non-zero 64 KiB chunks are written).
fn sparse_copy(from: &Path, to: &Path) {
    let mut src = File::open(from).unwrap();
    let len = src.seek(SeekFrom::End(0)).unwrap();
    src.seek(SeekFrom::Start(0)).unwrap();
    let dst = File::create(to).unwrap();
    dst.set_len(len).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], off).unwrap();
        }
        off += n as u64;
    }
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `drbdmeta [opts] --force - VERSION FILE LAYOUT CMD [args]`.
fn drbdmeta(opts: &[&str], version: &str, file: &Path, layout: &str, cmd: &[&str]) -> Run {
    let out = Command::new(DRBDMETA)
        .arg("--force")
        .args(opts)
        .arg("-")
        .arg(version)
        .arg(file)
        .arg(layout)
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run drbdmeta");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn must(r: Run, what: &str) -> Run {
    assert!(r.ok, "drbdmeta {what} failed:\n{}\n{}", r.stdout, r.stderr);
    r
}

fn vname(v: MdVersion) -> &'static str {
    v.drbdmeta_name()
}

fn create_md(v: MdVersion, file: &Path, layout: &str, opts: &[&str]) {
    let args: &[&str] = if v == MdVersion::V09 {
        &["create-md", "1"]
    } else {
        &["create-md"]
    };
    must(drbdmeta(opts, vname(v), file, layout, args), "create-md");
}

/// A parsed `dump-md`.
struct Dump {
    text: String,
}

impl Dump {
    fn of(v: MdVersion, file: &Path, layout: &str) -> Dump {
        let r = must(
            drbdmeta(&[], vname(v), file, layout, &["dump-md"]),
            "dump-md",
        );
        Dump { text: r.stdout }
    }

    /// The dump without the header (date, host, command line).
    fn body(&self) -> String {
        let start = self.text.find("version").expect("version line");
        self.text[start..].to_string()
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.lines().map(str::trim)
    }

    /// Value of a `key value;` or `# key value` line.
    fn value(&self, key: &str) -> Option<&str> {
        self.lines().find_map(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            let rest = l.strip_prefix(key)?.strip_prefix(' ')?;
            Some(rest.trim_end_matches(';'))
        })
    }

    fn num(&self, key: &str) -> u64 {
        let v = self
            .value(key)
            .unwrap_or_else(|| panic!("no {key} in dump:\n{}", self.text));
        parse_num(v)
    }

    /// v08 `uuid { c; b; h0; h1; flags f; }`.
    fn v08_uuids(&self) -> GenerationUuids {
        let l = self
            .lines()
            .skip_while(|l| !l.starts_with("uuid {"))
            .nth(1)
            .expect("uuid block");
        let v: Vec<u64> = l
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_num(s.trim()))
            .collect();
        GenerationUuids::new(v[0], v[1], [v[2], v[3]])
    }

    /// v09 UUIDs towards peer slot `slot`.
    fn v09_uuids(&self, slot: usize) -> GenerationUuids {
        let current = self.num("current-uuid");
        let peer = self
            .lines()
            .skip_while(|l| *l != format!("peer[{slot}] {{"))
            .find_map(|l| {
                l.strip_prefix("bitmap-uuid ")
                    .map(|v| parse_num(v.trim_end_matches(';')))
            })
            .expect("peer block");
        let hist: Vec<u64> = self
            .lines()
            .skip_while(|l| !l.starts_with("history-uuids"))
            .skip(1)
            .take_while(|l| *l != "}")
            .flat_map(|l| {
                l.split(';')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| parse_num(s.trim()))
                    .collect::<Vec<_>>()
            })
            .collect();
        GenerationUuids {
            current,
            bitmap: peer,
            history: hist,
        }
    }

    /// The bitmap words shown (`bm {}` / `bitmap[0] {}`), expanded.
    fn bm_words(&self) -> Vec<u64> {
        let mut words = Vec::new();
        let mut inside = false;
        for l in self.lines() {
            if l.starts_with("bm {") || l.starts_with("bitmap[0] {") {
                inside = true;
                continue;
            }
            if !inside {
                continue;
            }
            if l == "}" {
                break;
            }
            if l.starts_with('#') {
                continue;
            }
            for item in l.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                if let Some((n, w)) = item.split_once(" times ") {
                    let n: u64 = n.parse().unwrap();
                    words.extend(std::iter::repeat_n(parse_num(w), n as usize));
                } else {
                    words.push(parse_num(item));
                }
            }
        }
        words
    }
}

fn parse_num(s: &str) -> u64 {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad hex {s}"))
    } else {
        s.parse::<i64>()
            .map(|v| v as u64)
            .unwrap_or_else(|_| panic!("bad number {s}"))
    }
}

/// `get-gi`: UUIDs and the flag columns.
fn get_gi(v: MdVersion, file: &Path, layout: &str) -> (Vec<u64>, Vec<u8>) {
    let opts: &[&str] = if v == MdVersion::V09 {
        &["--node-id=0"]
    } else {
        &[]
    };
    let r = must(
        drbdmeta(opts, vname(v), file, layout, &["get-gi"]),
        "get-gi",
    );
    let line = r.stdout.lines().last().unwrap().trim().to_string();
    let parts: Vec<&str> = line.split(':').collect();
    let uuids = parts[..4]
        .iter()
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .collect();
    let flags = parts[4..].iter().map(|f| f.parse().unwrap()).collect();
    (uuids, flags)
}

/// Text for `restore-md` (the format `dump-md` prints).
struct RestoreInput {
    version: MdVersion,
    uuids: GenerationUuids,
    flags: u32,
    la_size: u64,
    device_uuid: u64,
    al: AlGeometry,
    /// (64-bit word index, value); everything else 0.
    words: Vec<(u64, u64)>,
    total_words: u64,
}

impl RestoreInput {
    fn text(&self) -> String {
        let mut t = format!("version \"{}\";\n", vname(self.version));
        let u = &self.uuids;
        match self.version {
            MdVersion::V08 => {
                t += &format!(
                    "uuid {{\n 0x{:016X}; 0x{:016X}; 0x{:016X}; 0x{:016X};\n flags 0x{:08X};\n}}\n",
                    u.current, u.bitmap, u.history[0], u.history[1], self.flags
                );
            }
            MdVersion::V09 => {
                t += &format!(
                    "max-peers 1;\nnode-id 1;\ncurrent-uuid 0x{:016X};\nflags 0x{:08X};\n",
                    u.current, self.flags
                );
                for p in 0..32 {
                    let (idx, bm) = if p == 0 { (0, u.bitmap) } else { (-1, 0) };
                    t += &format!(
                        "peer[{p}] {{\n bitmap-index {idx};\n bitmap-uuid 0x{bm:016X};\n bitmap-dagtag 0x0000000000000000;\n flags 0x{:08X};\n}}\n",
                        if p == 0 { 0x11 } else { 0 }
                    );
                }
                t += "history-uuids {\n";
                for i in 0..32 {
                    t += &format!(" 0x{:016X};", u.history.get(i).copied().unwrap_or(0));
                }
                t += "\n}\n";
            }
        }
        t += &format!(
            "la-size-sect {};\nbm-byte-per-bit 4096;\ndevice-uuid 0x{:016X};\nla-peer-max-bio-size 1048576;\nal-stripes {};\nal-stripe-size-4k {};\n",
            self.la_size, self.device_uuid, self.al.stripes, self.al.stripe_size_4k
        );
        t += if self.version == MdVersion::V08 {
            "bm {\n"
        } else {
            "bitmap[0] {\n"
        };
        let mut words = self.words.clone();
        words.sort();
        let mut next = 0;
        for (i, w) in words {
            if i > next {
                t += &format!(" {} times 0x0000000000000000;\n", i - next);
            }
            t += &format!(" 0x{w:016X};\n");
            next = i + 1;
        }
        if self.total_words > next {
            t += &format!(" {} times 0x0000000000000000;\n", self.total_words - next);
        }
        t += "}\n";
        t
    }

    fn restore(&self, dir: &Path, file: &Path, layout: &str, opts: &[&str]) {
        let p = dir.join(format!("restore-{}.txt", vname(self.version)));
        fs::write(&p, self.text()).unwrap();
        must(
            drbdmeta(
                opts,
                vname(self.version),
                file,
                layout,
                &["restore-md", p.to_str().unwrap()],
            ),
            "restore-md",
        );
    }
}

/// Reads `len` bytes at `off`.
fn read_at(file: &Path, off: u64, len: u64) -> Vec<u8> {
    let f = File::open(file).unwrap();
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn layout_cases() -> Vec<(Layout, &'static str, u64, u64)> {
    // (layout, drbdmeta arg, meta device size, data size for twinsan)
    vec![
        (Layout::Internal, "internal", GIB, 0),
        (Layout::FlexExternal, "flex-external", 4 * MIB, GIB),
        (Layout::IndexedExternal { index: 1 }, "1", 300 * MIB, GIB),
    ]
}

#[test]
fn create_md_matches_drbdmeta() {
    if !oracle() {
        return;
    }
    let dir = tmpdir("create");
    for v in [MdVersion::V08, MdVersion::V09] {
        for (layout, arg, size, data) in layout_cases() {
            let tag = format!("{}-{}", vname(v), arg);
            let theirs = sparse(&dir, &format!("drbdmeta-{tag}"), size);
            let ours = sparse(&dir, &format!("twinsan-{tag}"), size);
            create_md(v, &theirs, arg, &[]);
            let md = Metadata::create(&ours, layout, data, v).unwrap();
            let g = *md.geometry();
            drop(md);

            // Same dump, header aside.
            let a = Dump::of(v, &theirs, arg);
            let b = Dump::of(v, &ours, arg);
            assert_eq!(a.body(), b.body(), "{tag}: dump-md differs");
            assert_eq!(a.num("md_offset"), g.md_offset, "{tag}");
            assert_eq!(a.num("al_offset"), g.al_offset, "{tag}");
            assert_eq!(a.num("bm_offset"), g.bm_offset, "{tag}");
            assert_eq!(a.num("md_size_sect"), u64::from(g.md_size_sect), "{tag}");

            // Same bytes: superblock, activity log and the bitmap drbdmeta wrote.
            let (start, len) = match layout {
                Layout::Internal => (g.bm_offset, size - g.bm_offset),
                _ => (g.md_offset, g.bm_offset - g.md_offset + 4096),
            };
            assert!(
                read_at(&theirs, start, len) == read_at(&ours, start, len),
                "{tag}: bytes differ"
            );

            // And twinsan reads drbdmeta's metadata.
            let m = match layout {
                Layout::Internal => Metadata::open(&theirs, layout).unwrap(),
                _ => Metadata::open_with_data_size(&theirs, layout, data).unwrap(),
            };
            assert_eq!(m.version(), v);
            assert_eq!(m.state(), MetaState::Clean);
            assert_eq!(
                m.uuids(),
                GenerationUuids {
                    history: m.uuids().history.clone(),
                    ..GenerationUuids::just_created()
                }
            );
            assert_eq!(*m.geometry(), g, "{tag}");
            assert_eq!(m.bitmap().count(), 0);
        }
    }
}

#[test]
fn al_striping_matches_drbdmeta() {
    if !oracle() {
        return;
    }
    let dir = tmpdir("striping");
    let theirs = sparse(&dir, "drbdmeta", 256 * MIB);
    let ours = sparse(&dir, "twinsan", 256 * MIB);
    create_md(
        MdVersion::V08,
        &theirs,
        "internal",
        &["--al-stripes=2", "--al-stripe-size-kB=64"],
    );
    let mut opts = CreateOptions::new(MdVersion::V08);
    opts.al = AlGeometry {
        stripes: 2,
        stripe_size_4k: 16,
    };
    Metadata::create_with(&ours, Layout::Internal, 0, &opts).unwrap();
    assert_eq!(
        Dump::of(MdVersion::V08, &theirs, "internal").body(),
        Dump::of(MdVersion::V08, &ours, "internal").body()
    );
    let n = 280 * 512;
    assert!(read_at(&theirs, 256 * MIB - n, n) == read_at(&ours, 256 * MIB - n, n));
}

#[test]
fn internal_sizes_match_drbdmeta() {
    if !oracle() {
        return;
    }
    let dir = tmpdir("sizes");
    for (gib, md_size) in [(1u64, 136u64), (10, 712), (100, 6472), (1024, 65608)] {
        let size = gib * GIB;
        let f = sparse(&dir, &format!("d{gib}"), size);
        create_md(MdVersion::V08, &f, "internal", &[]);
        let d = Dump::of(MdVersion::V08, &f, "internal");
        assert_eq!(d.num("md_size_sect"), md_size, "{gib} GiB");
        assert_eq!(
            internal_md_size_sect(size, 1, AlGeometry::default()),
            md_size
        );
        let usable = Metadata::open(&f, Layout::Internal)
            .unwrap()
            .geometry()
            .max_usable_sectors;
        assert_eq!(usable, size / 512 - md_size);

        // drbdmeta clips la-size-sect to what it thinks is usable.
        let input = RestoreInput {
            version: MdVersion::V08,
            uuids: GenerationUuids::new(0x10, 0, [0, 0]),
            flags: MdFlags::AL_CLEAN.bits(),
            la_size: usable + 12345,
            device_uuid: 0,
            al: AlGeometry::default(),
            words: vec![],
            total_words: 0,
        };
        input.restore(&dir, &f, "internal", &[]);
        let d = Dump::of(MdVersion::V08, &f, "internal");
        assert_eq!(d.num("la-size-sect"), usable, "{gib} GiB");
        // twinsan's bitmap for that size matches drbdmeta's bm-bytes
        let md = Metadata::open(&f, Layout::Internal).unwrap();
        assert_eq!(md.bitmap().on_disk_bytes(), d.num("bm-bytes"));
        assert_eq!(md.data_sectors(), usable);
        drop(md);
        fs::remove_file(&f).unwrap();
    }
}

#[test]
fn reads_uuids_set_by_drbdmeta_set_gi() {
    if !oracle() {
        return;
    }
    let dir = tmpdir("set-gi");
    // v08: C:B:H0:H1 then consistent, was-up-to-date, primary, connected,
    // full-sync, peer-outdated, crashed-primary.
    let f = sparse(&dir, "v08", 256 * MIB);
    create_md(MdVersion::V08, &f, "internal", &[]);
    must(
        drbdmeta(
            &[],
            "v08",
            &f,
            "internal",
            &[
                "set-gi",
                "1234567890ABCDEF:00000000000000A0:B0:C0:1:1:0:0:0:1:1",
            ],
        ),
        "set-gi",
    );
    let md = Metadata::open(&f, Layout::Internal).unwrap();
    assert_eq!(
        md.uuids(),
        GenerationUuids::new(0x1234567890ABCDEF, 0xA0, [0xB0, 0xC0])
    );
    let want = MdFlags::CONSISTENT
        | MdFlags::WAS_UP_TO_DATE
        | MdFlags::PEER_OUT_DATED
        | MdFlags::CRASHED_PRIMARY
        | MdFlags::AL_CLEAN;
    assert_eq!(md.flags(), want);
    let (uuids, flags) = get_gi(MdVersion::V08, &f, "internal");
    assert_eq!(uuids, vec![0x1234567890ABCDEF, 0xA0, 0xB0, 0xC0]);
    assert_eq!(flags, vec![1, 1, 0, 0, 0, 1, 1]);

    // v09 with --node-id=0: ...:consistent:wutd:primary:crashed:al-clean:
    // al-disabled:lost-quorum:peer-connected:outdated:fencing:full-sync:seen.
    let f = sparse(&dir, "v09", 256 * MIB);
    create_md(MdVersion::V09, &f, "internal", &[]);
    must(
        drbdmeta(
            &["--node-id=0"],
            "v09",
            &f,
            "internal",
            &["set-gi", "AAAA000000000002:BBBB000000000000:CCCC000000000000:DDDD000000000000:1:0:1:0:1:0:0:1:0:0:0:1"],
        ),
        "set-gi",
    );
    let md = Metadata::open(&f, Layout::Internal).unwrap();
    let u = md.uuids();
    assert_eq!(
        (u.current, u.bitmap),
        (0xAAAA000000000002, 0xBBBB000000000000)
    );
    assert_eq!(&u.history[..2], &[0xCCCC000000000000, 0xDDDD000000000000]);
    assert_eq!(
        md.flags(),
        MdFlags::CONSISTENT | MdFlags::PRIMARY_IND | MdFlags::AL_CLEAN
    );
    let peer = md.superblock().peers[0];
    assert_eq!(peer.flags.bits(), 0x1 | 0x10);
    assert_eq!(md.state(), MetaState::Clean);
    drop(md);

    // Quirk: set-gi with 0 in the al-clean column clears AL_CLEAN -> unclean.
    must(
        drbdmeta(
            &["--node-id=0"],
            "v09",
            &f,
            "internal",
            &["set-gi", "::::::::0"],
        ),
        "set-gi",
    );
    let md = Metadata::open(&f, Layout::Internal).unwrap();
    assert_eq!(md.state(), MetaState::Unclean);
    assert_eq!(md.uuids().current, 0xAAAA000000000002);
}

/// Writes AL transactions for `extents` with twinsan's writer (as a primary
/// would), returning the writer.
fn write_al_transactions(md: &mut Metadata, al_extents: u32, extents: &[u32]) -> ActivityLog {
    let mut al = md.new_activity_log(al_extents).unwrap();
    for &e in extents {
        if let Some(w) = al.activate(e).unwrap() {
            md.write_al(&w).unwrap();
        }
        al.release(e).unwrap();
    }
    al
}

/// drbdmeta restores a bitmap and unclean metadata; twinsan writes AL
/// transactions on top; `drbdmeta apply-al` on one copy and twinsan's
/// `apply_al` on another must give identical metadata.
fn restore_and_apply_al(v: MdVersion, al_geo: AlGeometry, al_extents: u32, extents: &[u32]) {
    let dir = tmpdir(&format!(
        "apply-al-{}-{}x{}-{}",
        vname(v),
        al_geo.stripes,
        al_geo.stripe_size_4k,
        al_extents
    ));
    let size = 256 * MIB;
    let f = sparse(&dir, "dev", size);
    let stripe_kb = (al_geo.stripe_size_4k * 4).to_string();
    let stripes = al_geo.stripes.to_string();
    let opts_owned = [
        format!("--al-stripes={stripes}"),
        format!("--al-stripe-size-kB={stripe_kb}"),
    ];
    let opts: Vec<&str> = opts_owned.iter().map(String::as_str).collect();
    create_md(v, &f, "internal", &opts);
    let usable = Metadata::open(&f, Layout::Internal)
        .unwrap()
        .geometry()
        .max_usable_sectors;

    let uuids = GenerationUuids {
        current: 0x1234_5678_9ABC_DEF1,
        bitmap: 0x0BAD_F00D_0000_0010,
        history: vec![0x0000_0000_0000_00B0, 0x0000_0000_0000_00C0],
    };
    // consistent + primary, AL_CLEAN not set: unclean metadata of a crashed primary.
    let flags = (MdFlags::CONSISTENT | MdFlags::PRIMARY_IND).bits();
    let words = vec![
        (0, 1),
        (1, u64::MAX),
        (5, 0x8000_0000_0000_0000),
        (700, 0x00F0_0000_0000_0F00),
    ];
    let expected_bits: u64 = words.iter().map(|(_, w)| u64::from(w.count_ones())).sum();
    let input = RestoreInput {
        version: v,
        uuids: uuids.clone(),
        flags,
        la_size: usable,
        device_uuid: 0x42,
        al: al_geo,
        words,
        total_words: usable.div_ceil(8).div_ceil(64),
    };
    input.restore(&dir, &f, "internal", &opts);

    // twinsan reads what drbdmeta restored.
    let mut md = Metadata::open(&f, Layout::Internal).unwrap();
    assert_eq!(md.version(), v);
    assert_eq!(md.state(), MetaState::Unclean);
    assert_eq!(md.flags().bits(), flags);
    assert_eq!(md.effective_size(), usable);
    assert_eq!(md.device_uuid(), 0x42);
    let mut got = md.uuids();
    got.history.truncate(2);
    assert_eq!(got, uuids);
    assert_eq!(md.bitmap().count(), expected_bits);
    assert!(md.bitmap().test_bit(64) && md.bitmap().test_bit(0) && !md.bitmap().test_bit(1));
    let d = must(
        drbdmeta(&[], vname(v), &f, "internal", &["dump-md"]),
        "dump-md (forced, unclean)",
    );
    assert!(d.stdout.contains("This_is_an_unclean_meta_data_dump"));
    assert!(d.stderr.contains("apply-al first"));

    // A primary's activity log, written by twinsan.
    let al = write_al_transactions(&mut md, al_extents, extents);
    drop(md);
    let mut expected: Vec<u32> = al.hot_extents();
    expected.sort_unstable();

    let copy = dir.join("copy");
    sparse_copy(&f, &copy);

    // drbdmeta replays twinsan's transactions (which checks their crc32c).
    let r = must(
        drbdmeta(&[], vname(v), &f, "internal", &["apply-al"]),
        "apply-al",
    );
    assert!(r.stderr.contains("Marked additional"), "{}", r.stderr);

    // twinsan replays the copy.
    let mut md = Metadata::open(&copy, Layout::Internal).unwrap();
    assert_eq!(md.replay_al().unwrap().hot_extents, expected);
    let before = md.bitmap().count();
    let rep = md.apply_al().unwrap();
    assert!(rep.applied && rep.al_reinitialized && rep.superblock_updated);
    assert_eq!(md.state(), MetaState::Clean);
    let after = md.bitmap().count();
    assert_eq!(after - before, rep.bits_newly_set);
    drop(md);

    // Identical metadata: dumps and raw bytes.
    let a = Dump::of(v, &f, "internal");
    let b = Dump::of(v, &copy, "internal");
    assert_eq!(a.body(), b.body());
    assert_eq!(a.num("bits-set"), after);
    let md_bytes = u64::from(
        Metadata::open(&f, Layout::Internal)
            .unwrap()
            .geometry()
            .md_size_sect,
    ) * 512;
    assert!(read_at(&f, size - md_bytes, md_bytes) == read_at(&copy, size - md_bytes, md_bytes));

    // What show-gi/get-gi say matches what twinsan reads.
    let (gi_uuids, gi_flags) = get_gi(v, &f, "internal");
    let md = Metadata::open(&f, Layout::Internal).unwrap();
    let u = md.uuids();
    assert_eq!(
        gi_uuids,
        vec![u.current, u.bitmap, u.history[0], u.history[1]]
    );
    assert_eq!(gi_flags[0] == 1, md.flags().contains(MdFlags::CONSISTENT));
    assert_eq!(gi_flags[2] == 1, md.flags().contains(MdFlags::PRIMARY_IND));
    let show = must(
        drbdmeta(
            if v == MdVersion::V09 {
                &["--node-id=0"]
            } else {
                &[]
            },
            vname(v),
            &f,
            "internal",
            &["show-gi"],
        ),
        "show-gi",
    );
    assert!(
        show.stdout.contains(&format!("({usable} sectors)")),
        "{}",
        show.stdout
    );
    assert!(
        show.stdout.contains("meta-data: clean") || v == MdVersion::V09,
        "{}",
        show.stdout
    );
    for e in &expected {
        let first = u64::from(*e) * 1024;
        assert_eq!(
            md.bitmap().count_bits(first, first + 1024).unwrap(),
            1024,
            "extent {e}"
        );
    }
}

#[test]
fn apply_al_matches_drbdmeta_v08() {
    if !oracle() {
        return;
    }
    restore_and_apply_al(
        MdVersion::V08,
        AlGeometry::default(),
        257,
        &[0, 1, 5, 17, 40, 41, 62],
    );
}

#[test]
fn apply_al_matches_drbdmeta_v09() {
    if !oracle() {
        return;
    }
    restore_and_apply_al(MdVersion::V09, AlGeometry::default(), 1237, &[2, 3, 9, 33]);
}

#[test]
fn apply_al_matches_drbdmeta_wrapped_ring_and_stripes() {
    if !oracle() {
        return;
    }
    // 30 slots and 60 distinct extents: evictions, and more transactions than
    // ring blocks, so the ring wraps.
    let extents: Vec<u32> = (0..60).map(|i| (i * 7) % 61).collect();
    restore_and_apply_al(MdVersion::V08, AlGeometry::default(), 30, &extents);
    restore_and_apply_al(
        MdVersion::V08,
        AlGeometry {
            stripes: 2,
            stripe_size_4k: 8,
        },
        30,
        &extents,
    );
}

#[test]
fn drbdmeta_reads_twinsan_metadata() {
    if !oracle() {
        return;
    }
    let dir = tmpdir("reverse");
    for v in [MdVersion::V08, MdVersion::V09] {
        for (layout, arg, size, data) in layout_cases() {
            let tag = format!("{}-{}", vname(v), arg);
            let f = sparse(&dir, &tag, size);
            let mut md = Metadata::create(&f, layout, data, v).unwrap();
            let uuids =
                GenerationUuids::new(0xFEDC_BA98_7654_3211, 0x1111_2222_3333_4444, [0x55, 0x66]);
            md.set_uuids(&uuids).unwrap();
            md.set_flags(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN);
            md.set_device_uuid(0xD00D);
            let sectors = md.data_sectors();
            md.set_effective_size(sectors).unwrap();
            let bm = md.bitmap_mut();
            bm.set_range(0, 4096).unwrap();
            bm.set_range(10 * MIB, 3 * 4096 + 1).unwrap(); // 4 blocks
            bm.set_bit(bm.bits() - 1).unwrap();
            let count = bm.count();
            md.flush().unwrap();
            drop(md);

            let d = Dump::of(v, &f, arg);
            let (got, flags) = match v {
                MdVersion::V08 => (d.v08_uuids(), None),
                MdVersion::V09 => {
                    let mut u = d.v09_uuids(0);
                    u.history.truncate(2);
                    (u, Some(d.num("flags")))
                }
            };
            assert_eq!(got, uuids, "{tag}");
            if let Some(f) = flags {
                assert_eq!(f, 0x91, "{tag}");
            }
            assert_eq!(d.num("la-size-sect"), sectors, "{tag}");
            assert_eq!(d.num("device-uuid"), 0xD00D, "{tag}");
            assert_eq!(d.num("bits-set"), count, "{tag}");
            let words = d.bm_words();
            assert_eq!(words.len() as u64 * 8, d.num("bm-bytes"), "{tag}");
            assert_eq!(words[0], 1);
            let w = (10 * MIB / 4096 / 64) as usize;
            assert_eq!(words[w], 0xF, "{tag}");
            let last = (sectors.div_ceil(8) - 1) as usize;
            assert_eq!(words[last / 64], 1 << (last % 64), "{tag}");

            let (gi, gflags) = get_gi(v, &f, arg);
            assert_eq!(gi, vec![uuids.current, uuids.bitmap, 0x55, 0x66], "{tag}");
            assert_eq!(&gflags[..2], &[1, 1], "{tag}");
        }
    }
}

#[test]
fn drbdmeta_apply_al_tail_extent_quirk() {
    if !oracle() {
        return;
    }
    // drbdmeta sets whole extents, including bits past the end of the data in
    // the last one; twinsan ignores those surplus bits when it loads.
    let dir = tmpdir("tail");
    let f = sparse(&dir, "dev", 256 * MIB);
    let mut md = Metadata::create(&f, Layout::Internal, 0, MdVersion::V08).unwrap();
    let sectors = md.data_sectors();
    md.set_effective_size(sectors).unwrap();
    md.mark_unclean(true).unwrap();
    let last_extent = ((sectors.div_ceil(8) - 1) / 1024) as u32;
    write_al_transactions(&mut md, 61, &[last_extent]);
    drop(md);
    must(
        drbdmeta(&[], "v08", &f, "internal", &["apply-al"]),
        "apply-al",
    );
    let d = Dump::of(MdVersion::V08, &f, "internal");
    let md = Metadata::open(&f, Layout::Internal).unwrap();
    let in_range = md.bitmap().bits() - u64::from(last_extent) * 1024;
    assert_eq!(md.bitmap().count(), in_range);
    assert_eq!(
        d.num("bits-set"),
        1024,
        "drbdmeta counts the surplus bits too"
    );
    assert!(in_range < 1024);
}
