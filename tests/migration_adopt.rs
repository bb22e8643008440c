//! Migration from DRBD (issue 5, items 1 and 2): `twinsan replication adopt` takes over
//! metadata that the real `drbdmeta` (drbd-utils) built on plain files, and hands it back.
//!
//! * twinsan's report (UUIDs, flags, sizes, out-of-sync count) equals what `drbdmeta
//!   get-gi` / `dump-md` say after `drbdmeta apply-al` on a copy: v08 and v09; internal,
//!   flexible external and indexed external; clean, and unclean with an activity log to
//!   replay. After adopting, drbdmeta's dump of the adopted metadata equals its dump of
//!   the copy it replayed itself.
//! * Refusals (corrupt magic, data area smaller than DRBD's size, two v09 peer slots,
//!   metadata overlapping the data, Inconsistent disk configured primary) exit non-zero,
//!   explain, and leave every byte of metadata and data as it was (SHA-256 before/after).
//! * Two hosts adopted from in-sync DRBD metadata connect with zero resync bytes; with N
//!   bits set on one host exactly N * 4096 bytes move (status JSON counters), also when the
//!   N bits come from replaying a crashed DRBD primary's activity log.
//! * `--convert-to-v08` keeps the bitmap UUID, where drbdmeta's own conversion can drop it.
//! * Hand back: after a clean stop drbdmeta reads the metadata (dump-md, show-gi) with the
//!   right UUIDs and flags; DRBD -> twinsan -> DRBD keeps data and bitmap.

mod common;

use common::pair::{Init, Pair, PairSpec, MIB};
use common::raw::{Progress, TagWriter, WriteOpts};
use common::*;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use twinsan_replication::drbd::layout::{internal_usable_sectors, AlGeometry, Layout};
use twinsan_replication::drbd::{MdFlags, Metadata};

const CLI: Duration = Duration::from_secs(60);
const SYNC: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- drbdmeta helpers

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `drbdmeta --force [opts] - VERSION FILE LAYOUT CMD...`
fn drbdmeta(opts: &[&str], version: &str, file: &Path, layout: &str, cmd: &[&str]) -> Run {
    let o = run(
        Command::new(tool("drbdmeta"))
            .arg("--force")
            .args(opts)
            .arg("-")
            .arg(version)
            .arg(file)
            .arg(layout)
            .args(cmd),
        CLI,
    );
    Run {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn must(r: Run, what: &str) -> Run {
    assert!(r.ok, "drbdmeta {what} failed:\n{}\n{}", r.stdout, r.stderr);
    r
}

fn node_opt(version: &str) -> Vec<&'static str> {
    if version == "v09" {
        vec!["--node-id=0"]
    } else {
        vec![]
    }
}

fn create_md(version: &str, file: &Path, layout: &str, max_peers: u32) {
    let peers = max_peers.to_string();
    let args: Vec<&str> = if version == "v09" {
        vec!["create-md", &peers]
    } else {
        vec!["create-md"]
    };
    must(drbdmeta(&[], version, file, layout, &args), "create-md");
}

/// `dump-md` without its header (date, host, command line).
fn dump_body(version: &str, file: &Path, layout: &str) -> String {
    let r = must(
        drbdmeta(&[], version, file, layout, &["dump-md"]),
        "dump-md",
    );
    let start = r.stdout.find("version").expect("version line");
    r.stdout[start..].to_string()
}

/// Value of `key N;` / `# key N;` in a dump.
fn dump_num(dump: &str, key: &str) -> u64 {
    dump.lines()
        .map(str::trim)
        .find_map(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            l.strip_prefix(key)?
                .strip_prefix(' ')
                .map(|v| v.trim_end_matches(';').to_string())
        })
        .map(|v| match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse::<i64>().unwrap() as u64,
        })
        .unwrap_or_else(|| panic!("no {key} in dump:\n{dump}"))
}

/// The UUID/flags line of `get-gi`.
fn get_gi(version: &str, file: &Path, layout: &str) -> String {
    let r = must(
        drbdmeta(&node_opt(version), version, file, layout, &["get-gi"]),
        "get-gi",
    );
    r.stdout.lines().last().unwrap().trim().to_string()
}

/// Metadata for `restore-md`, in the format `dump-md` prints.
#[derive(Clone)]
struct Restore {
    version: &'static str,
    current: u64,
    bitmap: u64,
    history: [u64; 2],
    flags: u32,
    la_size: u64,
    device_uuid: u64,
    /// Out-of-sync bits (4 KiB blocks).
    bits: BTreeSet<u64>,
    /// v09: the peer slot (peer node id) holding the bitmap UUID, and its bitmap index.
    peer: (usize, i32),
}

impl Restore {
    fn text(&self) -> String {
        let mut t = format!("version \"{}\";\n", self.version);
        if self.version == "v08" {
            t += &format!(
                "uuid {{\n 0x{:016X}; 0x{:016X}; 0x{:016X}; 0x{:016X};\n flags 0x{:08X};\n}}\n",
                self.current, self.bitmap, self.history[0], self.history[1], self.flags
            );
        } else {
            t += &format!(
                "max-peers 1;\nnode-id 1;\ncurrent-uuid 0x{:016X};\nflags 0x{:08X};\n",
                self.current, self.flags
            );
            for p in 0..32 {
                let (idx, bm, fl) = if p == self.peer.0 {
                    (self.peer.1, self.bitmap, 0x11)
                } else {
                    (-1, 0, 0)
                };
                t += &format!(
                    "peer[{p}] {{\n bitmap-index {idx};\n bitmap-uuid 0x{bm:016X};\n bitmap-dagtag 0x0000000000000000;\n flags 0x{fl:08X};\n}}\n"
                );
            }
            t += "history-uuids {\n";
            for i in 0..32 {
                t += &format!(" 0x{:016X};", self.history.get(i).copied().unwrap_or(0));
            }
            t += "\n}\n";
        }
        t += &format!(
            "la-size-sect {};\nbm-byte-per-bit 4096;\ndevice-uuid 0x{:016X};\nla-peer-max-bio-size 1048576;\nal-stripes 1;\nal-stripe-size-4k 8;\n",
            self.la_size, self.device_uuid
        );
        t += if self.version == "v08" {
            "bm {\n"
        } else {
            "bitmap[0] {\n"
        };
        let total_words = self.la_size.div_ceil(8).div_ceil(64);
        let mut words = std::collections::BTreeMap::<u64, u64>::new();
        for b in &self.bits {
            *words.entry(b / 64).or_default() |= 1 << (b % 64);
        }
        let mut next = 0;
        for (i, w) in words {
            if i > next {
                t += &format!(" {} times 0x0000000000000000;\n", i - next);
            }
            t += &format!(" 0x{w:016X};\n");
            next = i + 1;
        }
        if total_words > next {
            t += &format!(" {} times 0x0000000000000000;\n", total_words - next);
        }
        t += "}\n";
        t
    }

    fn restore(&self, file: &Path, layout: &str) {
        let p = file.with_extension(format!("restore-{}.txt", self.version));
        fs::write(&p, self.text()).unwrap();
        must(
            drbdmeta(
                &[],
                self.version,
                file,
                layout,
                &["restore-md", p.to_str().unwrap()],
            ),
            "restore-md",
        );
    }
}

// ---------------------------------------------------------------- file helpers

fn sparse(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// Writes `blocks` random 4 KiB blocks (chosen by `seed`) below `limit` bytes.
fn scribble(path: &Path, limit: u64, blocks: u64, seed: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 4096];
    for _ in 0..blocks {
        rng.fill_bytes(&mut buf);
        let b = rng.gen_range(0..limit / 4096);
        f.write_all_at(&buf, b * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

fn sha_range(path: &Path, start: u64, len: u64) -> String {
    let f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = start;
    while off < start + len {
        let n = (start + len - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off).unwrap();
        // Sparse test files are mostly zeroes: hash a marker for an all-zero chunk
        // (SHA-256 is slow in debug builds).
        if buf[..n].iter().all(|&b| b == 0) {
            h.update(format!("zero:{off}:{n};").as_bytes());
        } else {
            h.update(&buf[..n]);
        }
        off += n as u64;
    }
    hex::encode(h.finalize())
}

fn sha_file(path: &Path) -> String {
    sha_range(path, 0, fs::metadata(path).unwrap().len())
}

/// Copies `from` to `to` keeping holes (only non-zero 64 KiB chunks are written).
fn sparse_copy(from: &Path, to: &Path) {
    let src = File::open(from).unwrap();
    let len = src.metadata().unwrap().len();
    let dst = File::create(to).unwrap();
    dst.set_len(len).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], off).unwrap();
        }
        off += n as u64;
    }
}

// ---------------------------------------------------------------- twinsan helpers

/// A one-LUN replicated configuration (the peer address is a closed port).
fn host_config(dir: &Path, lun: &Path, meta: &str, role: &str, size: Option<u64>) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("twinsan.toml");
    let size = size.map(|s| format!("size = {s}\n")).unwrap_or_default();
    fs::write(
        &cfg,
        format!(
            r#"[server]
data_dir = "{data}"

[[target]]
iqn = "{IQN}"
portals = ["127.0.0.1:{port}"]

[[target.lun]]
number = 0
path = "{lun}"
{size}
[target.lun.replication]
name = "r0"
listen = "127.0.0.1:{listen}"
peer = "127.0.0.1:9"
secret = "sharedsecret"
meta = "{meta}"
role = "{role}"
"#,
            data = dir.join("data").display(),
            port = free_port(),
            lun = lun.display(),
            listen = free_port(),
        ),
    )
    .unwrap();
    cfg
}

fn adopt_cmd(config: &Path, extra: &[&str]) -> Output {
    run(
        Command::new(bin())
            .env("RUST_BACKTRACE", "0")
            .args(["replication", "adopt", "--config"])
            .arg(config)
            .args(["--volume", "r0"])
            .args(extra),
        CLI,
    )
}

fn adopt_json(config: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = adopt_cmd(config, &args);
    assert!(o.status.success(), "adopt {extra:?} failed: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("adopt JSON: {e}: {}", text(&o)))
}

fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let t = scratch_dir();
    let d = t.path().join(name);
    fs::create_dir_all(&d).unwrap();
    (t, d)
}

// ---------------------------------------------------------------- report vs drbdmeta

struct Case {
    version: &'static str,
    /// drbdmeta's layout argument.
    layout: &'static str,
    /// twinsan's `meta` (None: internal).
    external: bool,
    unclean: bool,
}

/// One case: drbdmeta builds the metadata, a copy gets `drbdmeta apply-al`, twinsan adopts
/// the original (dry run first); everything twinsan reports must equal drbdmeta's view.
fn report_case(c: &Case) {
    let tag = format!(
        "{}-{}-{}",
        c.version,
        c.layout,
        if c.unclean { "unclean" } else { "clean" }
    );
    let (_t, dir) = scratch(&tag);
    let data = dir.join("data.img");
    let (meta_file, meta_cfg, usable) = if c.external {
        sparse(&data, 32 * MIB);
        let m = dir.join("meta.img");
        let meta_size = if c.layout == "flex-external" {
            4 * MIB
        } else {
            129 * MIB
        };
        sparse(&m, meta_size);
        let cfg = if c.layout == "flex-external" {
            m.display().to_string()
        } else {
            format!("{}[{}]", m.display(), c.layout)
        };
        (m, cfg, 32 * MIB / 512)
    } else {
        sparse(&data, 32 * MIB);
        (
            data.clone(),
            "internal".to_string(),
            internal_usable_sectors(32 * MIB, 1, AlGeometry::default()),
        )
    };
    create_md(c.version, &meta_file, c.layout, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xD4BD);
    let bits: BTreeSet<u64> = (0..57).map(|_| rng.gen_range(0..usable / 8)).collect();
    let mut flags = (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE).bits();
    if c.unclean {
        flags |= MdFlags::PRIMARY_IND.bits(); // a crashed primary, AL_CLEAN not set
    } else {
        flags |= MdFlags::AL_CLEAN.bits();
    }
    let r = Restore {
        version: c.version,
        current: 0x5EED_0000_1234_5679,
        bitmap: 0x5EED_0000_0000_AB00,
        history: [0x5EED_0000_0000_0C00, 0x5EED_0000_0000_0D00],
        flags,
        la_size: usable,
        device_uuid: 0xDE1C_E000_0000_0042,
        bits: bits.clone(),
        peer: (0, 0),
    };
    r.restore(&meta_file, c.layout);
    let layout = match c.layout {
        "internal" => Layout::Internal,
        "flex-external" => Layout::FlexExternal,
        n => Layout::IndexedExternal {
            index: n.parse().unwrap(),
        },
    };
    let mut hot = Vec::new();
    if c.unclean {
        // A primary's activity log with transactions to replay (written with twinsan's
        // AL writer, whose CRC drbdmeta checks).
        let mut md = Metadata::open(&meta_file, layout).unwrap();
        let mut al = md.new_activity_log(61).unwrap();
        for e in [1u32, 4, 6, 4, 2] {
            if let Some(w) = al.activate(e).unwrap() {
                md.write_al(&w).unwrap();
            }
        }
        hot = al.hot_extents();
        hot.sort_unstable();
    }
    let limit = usable * 512;
    scribble(&data, limit, 24, 7);
    let data_hash = sha_range(&data, 0, usable * 512);
    // drbdmeta's view, from a copy after its own apply-al.
    let oracle = dir.join("oracle.img");
    sparse_copy(&meta_file, &oracle);
    if c.unclean {
        must(
            drbdmeta(&[], c.version, &oracle, c.layout, &["apply-al"]),
            "apply-al",
        );
    }
    let oracle_dump = dump_body(c.version, &oracle, c.layout);
    let oracle_gi = get_gi(c.version, &oracle, c.layout);

    let cfg = host_config(&dir, &data, &meta_cfg, "secondary", None);
    let meta_hash = sha_file(&meta_file);
    let dry = adopt_json(&cfg, &["--dry-run"]);
    assert_eq!(
        sha_file(&meta_file),
        meta_hash,
        "{tag}: dry run wrote metadata"
    );
    let rep = adopt_json(&cfg, &[]);
    eprintln!("{tag}: adopt report: {rep}");
    for (name, j) in [("dry run", &dry), ("adopt", &rep)] {
        assert_eq!(
            j["get_gi"].as_str().unwrap(),
            oracle_gi,
            "{tag} {name}: get-gi"
        );
        assert_eq!(
            j["bits_set"].as_u64().unwrap(),
            dump_num(&oracle_dump, "bits-set"),
            "{tag} {name}: bits-set"
        );
        assert_eq!(
            j["la_size_sect"].as_u64().unwrap(),
            dump_num(&oracle_dump, "la-size-sect"),
            "{tag} {name}"
        );
        assert_eq!(j["usable_sect"].as_u64().unwrap(), usable, "{tag} {name}");
        assert_eq!(
            j["device_uuid"].as_u64().unwrap(),
            dump_num(&oracle_dump, "device-uuid"),
            "{tag} {name}"
        );
        assert_eq!(
            j["current_uuid"].as_u64().unwrap(),
            r.current,
            "{tag} {name}"
        );
        assert_eq!(j["bitmap_uuid"].as_u64().unwrap(), r.bitmap, "{tag} {name}");
        assert_eq!(
            j["md_size_sect"].as_u64().unwrap(),
            dump_num(&oracle_dump, "md_size_sect"),
            "{tag} {name}"
        );
        assert_eq!(j["bits_set_found"].as_u64().unwrap(), bits.len() as u64);
        assert_eq!(
            j["state_found"],
            if c.unclean { "unclean" } else { "clean" }
        );
        let js_hot: Vec<u32> = j["al_hot_extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(js_hot, hot, "{tag} {name}: replayed extents");
        if c.version == "v09" {
            assert_eq!(
                j["flags"].as_u64().unwrap(),
                dump_num(&oracle_dump, "flags")
            );
        }
    }
    if c.unclean {
        assert!(rep["bits_set"].as_u64().unwrap() > bits.len() as u64);
    }
    // drbdmeta sees in the adopted metadata exactly what it made of the copy itself.
    assert_eq!(
        dump_body(c.version, &meta_file, c.layout),
        oracle_dump,
        "{tag}: adopted metadata differs from drbdmeta's apply-al result"
    );
    assert_eq!(
        sha_range(&data, 0, usable * 512),
        data_hash,
        "{tag}: data changed"
    );
    // Adopting again changes nothing at all.
    let meta_hash = sha_file(&meta_file);
    let again = adopt_json(&cfg, &[]);
    assert_eq!(again["changes"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(sha_file(&meta_file), meta_hash);
}

#[test]
fn adopt_report_matches_drbdmeta() {
    for version in ["v08", "v09"] {
        for (layout, external) in [("internal", false), ("flex-external", true), ("0", true)] {
            for unclean in [false, true] {
                report_case(&Case {
                    version,
                    layout,
                    external,
                    unclean,
                });
            }
        }
    }
}

// ---------------------------------------------------------------- refusals

/// Runs adopt (and adopt --dry-run) expecting a refusal mentioning `why`; every byte of
/// the files must stay as it was.
fn assert_refused(cfg: &Path, files: &[&Path], why: &[&str]) {
    let before: Vec<String> = files.iter().map(|f| sha_file(f)).collect();
    for extra in [&["--dry-run"][..], &[][..]] {
        let o = adopt_cmd(cfg, extra);
        let out = text(&o);
        assert!(
            !o.status.success(),
            "adopt {extra:?} was not refused:\n{out}"
        );
        for w in why {
            assert!(out.contains(w), "refusal does not say `{w}`:\n{out}");
        }
        assert!(out.contains("Nothing was written"), "{out}");
        eprintln!("refused as expected ({extra:?}):\n{}", out.trim_end());
    }
    let after: Vec<String> = files.iter().map(|f| sha_file(f)).collect();
    assert_eq!(before, after, "a refused adopt changed bytes");
}

#[test]
fn adopt_refusals_change_nothing() {
    let (_t, dir) = scratch("refusals");

    // Corrupt magic.
    let d = dir.join("corrupt.img");
    sparse(&d, 64 * MIB);
    create_md("v08", &d, "internal", 1);
    scribble(&d, 32 * MIB, 50, 1);
    let md_offset = 64 * MIB - 4096;
    File::options()
        .write(true)
        .open(&d)
        .unwrap()
        .write_all_at(&0xDEAD_BEEFu32.to_be_bytes(), md_offset + 60)
        .unwrap();
    let cfg = host_config(&dir.join("c1"), &d, "internal", "secondary", None);
    assert_refused(&cfg, &[&d], &["magic", "0xdeadbeef"]);

    // The data device is smaller than DRBD's last agreed size (external metadata).
    let data = dir.join("small-data.img");
    let meta = dir.join("small-meta.img");
    sparse(&data, 32 * MIB);
    sparse(&meta, 4 * MIB);
    scribble(&data, 32 * MIB, 50, 2);
    create_md("v08", &meta, "flex-external", 1);
    Restore {
        version: "v08",
        current: 0xAAAA_0000_0000_0000,
        bitmap: 0,
        history: [0, 0],
        flags: 0x91,
        la_size: 64 * MIB / 512,
        device_uuid: 1,
        bits: BTreeSet::new(),
        peer: (0, 0),
    }
    .restore(&meta, "flex-external");
    let cfg = host_config(
        &dir.join("c2"),
        &data,
        meta.to_str().unwrap(),
        "secondary",
        None,
    );
    assert_refused(&cfg, &[&data, &meta], &["data area would shrink", "131072"]);

    // The configuration says the LUN is smaller than DRBD's device.
    let d = dir.join("cfgsize.img");
    sparse(&d, 64 * MIB);
    create_md("v08", &d, "internal", 1);
    let usable = internal_usable_sectors(64 * MIB, 1, AlGeometry::default());
    Restore {
        version: "v08",
        current: 0xAAAA_0000_0000_0000,
        bitmap: 0,
        history: [0, 0],
        flags: 0x91,
        la_size: usable,
        device_uuid: 1,
        bits: BTreeSet::new(),
        peer: (0, 0),
    }
    .restore(&d, "internal");
    let cfg = host_config(&dir.join("c3"), &d, "internal", "secondary", Some(32 * MIB));
    assert_refused(&cfg, &[&d], &["configured LUN size"]);

    // v09 with two peer slots.
    let d = dir.join("peers.img");
    sparse(&d, 64 * MIB);
    create_md("v09", &d, "internal", 2);
    scribble(&d, 32 * MIB, 50, 3);
    let cfg = host_config(&dir.join("c4"), &d, "internal", "secondary", None);
    assert_refused(&cfg, &[&d], &["2 peer bitmap slots", "exactly one peer"]);

    // Flexible external metadata placed on the data file itself: it overlaps the data.
    let d = dir.join("overlap.img");
    sparse(&d, 64 * MIB);
    create_md("v08", &d, "flex-external", 1);
    scribble(&d, 64 * MIB, 50, 4);
    let cfg = host_config(&dir.join("c5"), &d, d.to_str().unwrap(), "secondary", None);
    assert_refused(&cfg, &[&d], &["overlaps the data area"]);

    // An Inconsistent disk configured to start as primary.
    let d = dir.join("inconsistent.img");
    sparse(&d, 64 * MIB);
    create_md("v08", &d, "internal", 1);
    let cfg = host_config(&dir.join("c6"), &d, "internal", "primary", None);
    assert_refused(&cfg, &[&d], &["Inconsistent", "role"]);

    // Wrong layout in the configuration: says where the metadata really is.
    let d = dir.join("wrong-layout.img");
    let m = dir.join("wrong-layout-meta.img");
    sparse(&d, 32 * MIB);
    sparse(&m, 8 * MIB);
    create_md("v08", &m, "flex-external", 1);
    let cfg = host_config(
        &dir.join("c7"),
        &d,
        &format!("{}[0]", m.display()),
        "secondary",
        None,
    );
    assert_refused(&cfg, &[&d, &m], &["md_size_sect"]);
}

// ---------------------------------------------------------------- two hosts

/// Puts DRBD metadata on a pair host's backing file (internal) with `r`.
fn drbd_host(image: &Path, r: &Restore) {
    create_md(r.version, image, "internal", 1);
    r.restore(image, "internal");
}

fn usable_64m() -> u64 {
    internal_usable_sectors(64 * MIB, 1, AlGeometry::default())
}

#[test]
fn adopted_in_sync_hosts_connect_without_resync_and_hand_back() {
    let mut p = Pair::new(PairSpec {
        image_bytes: 64 * MIB,
        init: Init::Prepared,
        ..PairSpec::default()
    });
    let usable = usable_64m();
    p.size_bytes = usable * 512;
    // The same data on both (DRBD kept them in sync), v09 on A and v08 on B.
    scribble(&p.a.image, p.size_bytes, 400, 11);
    fs::copy(&p.a.image, &p.b.image).unwrap();
    let base = Restore {
        version: "v09",
        current: 0x7E57_1111_0000_0000,
        bitmap: 0,
        history: [0x7E57_0000_0000_0A00, 0x7E57_0000_0000_0B00],
        flags: (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN).bits(),
        la_size: usable,
        device_uuid: 0x1,
        bits: BTreeSet::new(),
        peer: (0, 0),
    };
    drbd_host(&p.a.image, &base);
    drbd_host(
        &p.b.image,
        &Restore {
            version: "v08",
            device_uuid: 0x2,
            ..base.clone()
        },
    );
    let hashes = (
        sha_range(&p.a.image, 0, p.size_bytes),
        sha_range(&p.b.image, 0, p.size_bytes),
    );
    assert_eq!(hashes.0, hashes.1);
    let ra = adopt_json(&p.a.config, &[]);
    let rb = adopt_json(&p.b.config, &[]);
    assert_eq!(ra["version"], "v09");
    assert_eq!(rb["version"], "v08");
    assert_eq!(ra["bits_set"], 0);
    // Both start as Secondary (as after `drbdadm down` on both): the handshake finds equal
    // current UUIDs and connects without a resync; then A is promoted while connected, so
    // no new data generation starts either.
    p.a.start("secondary");
    p.b.start("secondary");
    let (a, b) = p.wait_in_sync(SYNC);
    eprintln!("A: {}\nB: {}", a.brief(), b.brief());
    for v in [&a, &b] {
        assert_eq!(
            v.resync_sent_bytes + v.resync_received_bytes,
            0,
            "{}",
            v.brief()
        );
        assert!(v.resync.is_none(), "{}", v.brief());
        assert_eq!(v.current_uuid & !1, base.current, "{}", v.brief());
    }
    assert!(
        !p.a.log_text().contains("resync of") && !p.b.log_text().contains("resync of"),
        "a resync was started"
    );
    p.a.act_ok("primary", &[]);
    let (a, _) = p.wait_in_sync(SYNC);
    assert_eq!(a.role, "Primary");
    assert_eq!(a.current_uuid & !1, base.current);
    assert_eq!(a.resync_sent_bytes, 0);
    // `drbdadm secondary` then `down` on both: a primary that loses its peer would start a
    // new data generation, as DRBD does.
    p.a.act_ok("secondary", &[]);
    p.stop_both();
    p.assert_identical();
    assert_eq!(sha_range(&p.a.image, 0, p.size_bytes), hashes.0);

    // Hand back: drbdmeta reads both, same generation, clean, consistent, nothing out of sync.
    for (img, v) in [(&p.a.image, "v09"), (&p.b.image, "v08")] {
        let dump = dump_body(v, img, "internal");
        assert_eq!(dump_num(&dump, "bits-set"), 0, "{dump}");
        assert_eq!(dump_num(&dump, "la-size-sect"), usable);
        let gi = get_gi(v, img, "internal");
        assert!(gi.starts_with("7E57111100000000:"), "{v}: {gi}");
        let show = must(
            drbdmeta(&node_opt(v), v, img, "internal", &["show-gi"]),
            "show-gi",
        );
        assert!(show.stdout.contains("7E57111100000000"), "{}", show.stdout);
        if v == "v08" {
            assert!(
                show.stdout.contains("UpToDate") && show.stdout.contains("meta-data: clean"),
                "{}",
                show.stdout
            );
        } else {
            // consistent, was-up-to-date, not primary, not crashed, al-clean
            assert!(gi.contains(":1:1:0:0:1:"), "{gi}");
        }
    }
}

#[test]
fn host_with_n_bits_set_resyncs_exactly_those_blocks() {
    let mut p = Pair::new(PairSpec {
        image_bytes: 64 * MIB,
        init: Init::Prepared,
        ..PairSpec::default()
    });
    let usable = usable_64m();
    p.size_bytes = usable * 512;
    scribble(&p.b.image, p.size_bytes, 300, 21);
    fs::copy(&p.b.image, &p.a.image).unwrap();
    // A (primary under DRBD) wrote N blocks while B was away: new generation on A, the
    // blocks in A's bitmap, B behind with A's old current UUID.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xB175);
    let blocks: BTreeSet<u64> = (0..73).map(|_| rng.gen_range(0..usable / 8)).collect();
    let n = blocks.len() as u64;
    {
        let f = fs::OpenOptions::new().write(true).open(&p.a.image).unwrap();
        let mut buf = vec![0u8; 4096];
        for b in &blocks {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, b * 4096).unwrap();
        }
    }
    let old = 0x0DD0_0000_0000_1000u64;
    let uptodate = (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN).bits();
    drbd_host(
        &p.a.image,
        &Restore {
            version: "v08",
            current: 0x0DD0_0000_0000_2000,
            bitmap: old,
            history: [0x0DD0_0000_0000_0100, 0],
            flags: uptodate,
            la_size: usable,
            device_uuid: 0xA,
            bits: blocks.clone(),
            peer: (0, 0),
        },
    );
    drbd_host(
        &p.b.image,
        &Restore {
            version: "v08",
            current: old,
            bitmap: 0,
            history: [0x0DD0_0000_0000_0100, 0],
            flags: uptodate,
            la_size: usable,
            device_uuid: 0xB,
            bits: BTreeSet::new(),
            peer: (0, 0),
        },
    );
    let ra = adopt_json(&p.a.config, &[]);
    assert_eq!(ra["bits_set"].as_u64().unwrap(), n);
    adopt_json(&p.b.config, &[]);
    let differing =
        common::pair::differing_blocks(&p.a.data_area(p.size_bytes), &p.b.data_area(p.size_bytes));
    assert_eq!(differing.len() as u64, n);
    p.start();
    let (a, b) = p.wait_in_sync(SYNC);
    eprintln!(
        "{n} bits set on A: A resync sent {} bytes, B received {} bytes",
        a.resync_sent_bytes, b.resync_received_bytes
    );
    assert_eq!(a.resync_sent_bytes, n * 4096, "{}", a.brief());
    assert_eq!(b.resync_received_bytes, n * 4096, "{}", b.brief());
    assert_eq!(a.resync_received_bytes + b.resync_sent_bytes, 0);
    // `drbdadm secondary` then `down` on both: a primary that loses its peer would start a
    // new data generation, as DRBD does.
    p.a.act_ok("secondary", &[]);
    p.stop_both();
    p.assert_identical();
    // Back to DRBD: both in the same generation, nothing out of sync.
    let (ga, gb) = (
        get_gi("v08", &p.a.image, "internal"),
        get_gi("v08", &p.b.image, "internal"),
    );
    assert_eq!(ga[..16], gb[..16], "A {ga} / B {gb}");
    for img in [&p.a.image, &p.b.image] {
        assert_eq!(dump_num(&dump_body("v08", img, "internal"), "bits-set"), 0);
    }
}

#[test]
fn drbd_to_twinsan_to_drbd_keeps_data_and_bitmap() {
    let mut p = Pair::new(PairSpec {
        image_bytes: 64 * MIB,
        init: Init::Prepared,
        ..PairSpec::default()
    });
    let usable = usable_64m();
    p.size_bytes = usable * 512;
    scribble(&p.a.image, p.size_bytes, 500, 31);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4A4D);
    let bits: BTreeSet<u64> = (0..41).map(|_| rng.gen_range(0..usable / 8)).collect();
    let r = Restore {
        version: "v08",
        current: 0x4A4D_0000_0000_0002,
        bitmap: 0x4A4D_0000_0000_0000,
        history: [0x4A4D_0000_0000_0100, 0x4A4D_0000_0000_0200],
        flags: (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN).bits(),
        la_size: usable,
        device_uuid: 0x4A4D,
        bits,
        peer: (0, 0),
    };
    drbd_host(&p.a.image, &r);
    let dump_before = dump_body("v08", &p.a.image, "internal");
    let gi_before = get_gi("v08", &p.a.image, "internal");
    let data_before = sha_range(&p.a.image, 0, p.size_bytes);
    let before_area = p.a.data_area(p.size_bytes);

    // Secondary without a peer: nothing changes, DRBD finds its metadata as it left it.
    p.a.write_config("secondary");
    adopt_json(&p.a.config, &[]);
    p.a.start("secondary");
    p.a.wait("volume up", SYNC, |v| v.connection == "Connecting");
    // Adopting under a running daemon is refused.
    let o = adopt_cmd(&p.a.config, &[]);
    assert!(
        !o.status.success() && text(&o).contains("daemon is running"),
        "{}",
        text(&o)
    );
    let v = p.a.vol();
    assert_eq!(v.out_of_sync_bytes, r.bits.len() as u64 * 4096);
    assert_eq!(v.current_uuid, r.current);
    assert_eq!(v.bitmap_uuid, r.bitmap);
    p.a.stop();
    assert_eq!(dump_body("v08", &p.a.image, "internal"), dump_before);
    assert_eq!(get_gi("v08", &p.a.image, "internal"), gi_before);
    assert_eq!(sha_range(&p.a.image, 0, p.size_bytes), data_before);

    // Primary without a peer, writing: the written blocks join the bitmap.
    p.a.start("primary");
    p.a.wait("volume up", SYNC, |v| v.role == "Primary");
    let written: Vec<u64> = vec![3, 1000, 1001, 5000];
    let mut w = TagWriter::connect(p.a.iscsi_port).unwrap();
    let rep = w.run(&WriteOpts::list(1, written.clone()), &Progress::default());
    assert_eq!(rep.good(), written.len() as u64, "{}", rep.summary());
    drop(w);
    let v = p.a.vol();
    p.a.stop();
    let dump = dump_body("v08", &p.a.image, "internal");
    let mut expect: BTreeSet<u64> = r.bits.clone();
    expect.extend(written.iter().copied());
    assert_eq!(dump_num(&dump, "bits-set"), expect.len() as u64, "{dump}");
    // A bitmap UUID was already set, so (DRBD's drbd_uuid_new_current rule) the generation
    // stays; the UUIDs DRBD reads back are the ones twinsan showed.
    assert_eq!((v.current_uuid & !1, v.bitmap_uuid), (r.current, r.bitmap));
    let gi = get_gi("v08", &p.a.image, "internal");
    assert_eq!(
        &gi[..67],
        &format!(
            "{:016X}:{:016X}:{:016X}:{:016X}",
            r.current, r.bitmap, r.history[0], r.history[1]
        ),
        "{gi}"
    );
    let show = must(
        drbdmeta(&[], "v08", &p.a.image, "internal", &["show-gi"]),
        "show-gi",
    );
    assert!(
        show.stdout.contains("meta-data: clean") && show.stdout.contains("UpToDate"),
        "{}",
        show.stdout
    );
    // Data outside the written blocks is untouched.
    let after = p.a.data_area(p.size_bytes);
    let changed = common::pair::differing_blocks(&before_area, &after);
    assert!(
        changed.iter().all(|b| written.contains(b)),
        "blocks other than the written ones changed: {changed:?}"
    );
    assert_eq!(changed.len(), written.len(), "the writes must have landed");
}

/// v09 -> v08 in place. Case 1: the peer owns bitmap index 0 (what DRBD 9 writes).
/// Case 2: the bitmap UUID sits in peer slot 1 without a bitmap index (as `drbdmeta
/// set-gi --node-id=1` leaves it), where drbdmeta's own conversion drops it.
fn convert_case(peer: (usize, i32)) {
    let (_t, dir) = scratch(&format!("convert-{}", peer.0));
    let img = dir.join("disk.img");
    sparse(&img, 32 * MIB);
    let usable = internal_usable_sectors(32 * MIB, 1, AlGeometry::default());
    scribble(&img, usable * 512, 24, 41);
    let data_hash = sha_range(&img, 0, usable * 512);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0);
    let bits: BTreeSet<u64> = (0..29).map(|_| rng.gen_range(0..usable / 8)).collect();
    let r = Restore {
        version: "v09",
        current: 0xC0DE_0000_0000_0010,
        bitmap: 0xC0DE_0000_0000_0020,
        history: [0xC0DE_0000_0000_0030, 0xC0DE_0000_0000_0040],
        flags: (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN).bits(),
        la_size: usable,
        device_uuid: 0xC0DE,
        bits: bits.clone(),
        peer,
    };
    create_md("v09", &img, "internal", 1);
    r.restore(&img, "internal");

    // For comparison, drbdmeta's own conversion (create-md v08 over v09) on a copy.
    let copy = dir.join("drbdmeta-converted.img");
    sparse_copy(&img, &copy);
    must(
        drbdmeta(&[], "v08", &copy, "internal", &["create-md"]),
        "create-md (convert)",
    );
    let theirs = get_gi("v08", &copy, "internal");
    eprintln!("peer slot {peer:?}: drbdmeta's own v09 -> v08 conversion: get-gi {theirs}");

    let cfg = host_config(&dir.join("cfg"), &img, "internal", "secondary", None);
    let before = sha_file(&img);
    let dry = adopt_json(&cfg, &["--dry-run", "--convert-to-v08"]);
    assert_eq!(sha_file(&img), before, "dry run wrote");
    let rep = adopt_json(&cfg, &["--convert-to-v08"]);
    // UUIDs kept, bitmap UUID included; consistent, up-to-date and the peer slot's
    // "connected" become the v08 flags (drbdmeta maps them the same way).
    let expect_gi = format!(
        "{:016X}:{:016X}:{:016X}:{:016X}:1:1:0:1:0:0:0",
        r.current, r.bitmap, r.history[0], r.history[1],
    );
    if peer == (0, 0) {
        assert_eq!(theirs, expect_gi, "same result as drbdmeta's conversion");
    }
    for j in [&dry, &rep] {
        assert_eq!(j["version_found"], "v09");
        assert_eq!(j["version"], "v08");
        assert_eq!(j["get_gi"].as_str().unwrap(), expect_gi, "{j}");
        assert_eq!(j["bits_set"].as_u64().unwrap(), bits.len() as u64);
    }
    // DRBD 8.4's tools read the converted metadata: same UUIDs, flags, size and bitmap;
    // the data did not change.
    assert_eq!(get_gi("v08", &img, "internal"), expect_gi);
    let dump = dump_body("v08", &img, "internal");
    assert_eq!(dump_num(&dump, "bits-set"), bits.len() as u64);
    assert_eq!(dump_num(&dump, "la-size-sect"), usable);
    assert_eq!(dump_num(&dump, "device-uuid"), 0xC0DE);
    let show = must(
        drbdmeta(&[], "v08", &img, "internal", &["show-gi"]),
        "show-gi",
    );
    assert!(
        show.stdout.contains("UpToDate") && show.stdout.contains("meta-data: clean"),
        "{}",
        show.stdout
    );
    assert!(
        !drbdmeta(&node_opt("v09"), "v09", &img, "internal", &["get-gi"]).ok,
        "still v09"
    );
    assert_eq!(sha_range(&img, 0, usable * 512), data_hash);
}

#[test]
fn convert_to_v08_keeps_the_bitmap_uuid() {
    convert_case((0, 0));
    convert_case((1, -1));
}

/// A DRBD primary crashed while connected (same generation on both, its metadata unclean
/// with an activity log): adopt replays the log like `drbdmeta apply-al`, twinsan treats the
/// node as a crashed primary (as DRBD's attach does), and exactly the replayed extents plus
/// the bitmap's own bits move to the peer.
#[test]
fn crashed_drbd_primary_resyncs_its_activity_log_extents() {
    let mut p = Pair::new(PairSpec {
        image_bytes: 64 * MIB,
        init: Init::Prepared,
        ..PairSpec::default()
    });
    let usable = usable_64m();
    p.size_bytes = usable * 512;
    scribble(&p.a.image, p.size_bytes, 40, 51);
    fs::copy(&p.a.image, &p.b.image).unwrap();
    let bits: BTreeSet<u64> = [7u64, 4000, 4001, 9000, 15000].into_iter().collect();
    let base = Restore {
        version: "v08",
        current: 0xC4A5_0000_0000_1000,
        bitmap: 0,
        history: [0xC4A5_0000_0000_0100, 0],
        flags: (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::PRIMARY_IND).bits(),
        la_size: usable,
        device_uuid: 0xC4,
        bits: bits.clone(),
        peer: (0, 0),
    };
    drbd_host(&p.a.image, &base);
    let mut md = Metadata::open(&p.a.image, Layout::Internal).unwrap();
    let mut al = md.new_activity_log(61).unwrap();
    for e in [1u32, 3] {
        if let Some(w) = al.activate(e).unwrap() {
            md.write_al(&w).unwrap();
        }
    }
    drop(md);
    drbd_host(
        &p.b.image,
        &Restore {
            flags: (MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::AL_CLEAN).bits(),
            bits: BTreeSet::new(),
            device_uuid: 0xC5,
            ..base.clone()
        },
    );
    let ra = adopt_json(&p.a.config, &[]);
    assert_eq!(ra["state_found"], "unclean");
    assert_eq!(ra["al_hot_extents"], serde_json::json!([1, 3]));
    let in_al = bits
        .iter()
        .filter(|b| (1024..2048).contains(*b) || (3072..4096).contains(*b))
        .count() as u64;
    let n = bits.len() as u64 + 2048 - in_al;
    assert_eq!(ra["bits_set"].as_u64().unwrap(), n, "{ra}");
    adopt_json(&p.b.config, &[]);
    p.a.start("secondary");
    p.b.start("secondary");
    let (a, b) = p.wait_in_sync(SYNC);
    eprintln!(
        "crashed primary with {n} bits after the AL replay: A resync sent {} bytes, B received {}",
        a.resync_sent_bytes, b.resync_received_bytes
    );
    assert_eq!(a.resync_sent_bytes, n * 4096, "{}", a.brief());
    assert_eq!(b.resync_received_bytes, n * 4096, "{}", b.brief());
    p.stop_both();
    p.assert_identical();
}
