//! `twinsan import`: turns the configuration of the stack twinsan replaces (drbd.conf, tgt's
//! targets.conf or IET's ietd.conf + initiators.allow, iscsi-ha.conf) into one twinsan TOML
//! configuration for one host, with a comment on every value naming the file and line it
//! came from.
//!
//! The parsers (`drbd_conf`, `tgt_conf`, `ietd_conf`, `iscsi_ha_conf`) are pure functions over
//! text; this module reads the files (expanding includes), joins what they say (a LUN backed
//! by `/dev/drbdN` becomes the DRBD resource's lower-level disk with a replication table)
//! and renders the result.

pub mod drbd_conf;
pub mod ietd_conf;
pub mod iscsi_ha_conf;
pub mod tgt_conf;

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a value came from: file and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl Origin {
    pub fn new(file: &Path, line: usize) -> Origin {
        Origin {
            file: file.to_path_buf(),
            line,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A file the importer cannot use: which file, which line, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ImportError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl ImportError {
    pub fn new(file: &Path, line: usize, message: impl Into<String>) -> ImportError {
        ImportError {
            file: file.to_path_buf(),
            line,
            message: message.into(),
        }
    }
    pub fn at(origin: &Origin, message: impl Into<String>) -> ImportError {
        Self::new(&origin.file, origin.line, message)
    }
}

/// Something the importer could not carry over, with where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub at: Origin,
    pub message: String,
}

impl Warning {
    pub fn new(at: &Origin, message: impl Into<String>) -> Warning {
        Warning {
            at: at.clone(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// One `key = value` line of the output with the comment saying where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    /// TOML literal.
    pub value: String,
    pub origin: String,
}

impl Entry {
    pub fn new(key: &str, value: String, origin: impl fmt::Display) -> Entry {
        Entry {
            key: key.to_string(),
            value,
            origin: origin.to_string(),
        }
    }
}

/// A target as the old stack served it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedTarget {
    pub iqn: String,
    pub at: Origin,
    pub entries: Vec<Entry>,
    pub luns: Vec<ImportedLun>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImportedLun {
    pub number: u64,
    /// Comment for the number: the `lun` line, or how tgt-admin numbered it.
    pub number_origin: String,
    pub path: String,
    pub at: Origin,
    /// Everything but `number` and `path`.
    pub entries: Vec<Entry>,
}

/// Target-side negotiation limits, set from tgt/IET keys (`[negotiation]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Negotiation {
    pub entries: Vec<Entry>,
}

impl Negotiation {
    /// Maps one iSCSI negotiation key of targets.conf / ietd.conf (RFC 7143 §13 names).
    /// twinsan's limits are global: the same key with another value on a second target is
    /// reported and the first value kept.
    pub fn map(
        &mut self,
        key: &str,
        value: &str,
        at: &Origin,
        warnings: &mut Vec<Warning>,
    ) -> Result<bool, ImportError> {
        let number = |min: u32, max: u32| -> Result<String, ImportError> {
            let n: u32 = value
                .parse()
                .map_err(|_| ImportError::at(at, format!("{key} `{value}` is not a number")))?;
            if n < min || n > max {
                return Err(ImportError::at(
                    at,
                    format!("{key} {n} is outside {min}..={max} (RFC 7143 §13)"),
                ));
            }
            Ok(n.to_string())
        };
        let boolean = || -> Result<String, ImportError> {
            match value.to_ascii_lowercase().as_str() {
                "yes" | "1" | "true" => Ok("true".into()),
                "no" | "0" | "false" => Ok("false".into()),
                _ => Err(ImportError::at(
                    at,
                    format!("{key} `{value}` is not Yes or No"),
                )),
            }
        };
        let digests = || -> Result<String, ImportError> {
            let mut list = Vec::new();
            for d in value.split(',').map(str::trim) {
                match d.to_ascii_lowercase().as_str() {
                    "none" => list.push("\"None\""),
                    "crc32c" => list.push("\"CRC32C\""),
                    _ => {
                        return Err(ImportError::at(
                            at,
                            format!("{key}: `{d}` is not a digest (None, CRC32C)"),
                        ))
                    }
                }
            }
            Ok(format!("[{}]", list.join(", ")))
        };
        let (tk, lit) = match key.to_ascii_lowercase().as_str() {
            "maxrecvdatasegmentlength" => {
                ("max_recv_data_segment_length", number(512, (1 << 24) - 1)?)
            }
            "maxburstlength" => ("max_burst_length", number(512, (1 << 24) - 1)?),
            "firstburstlength" => ("first_burst_length", number(512, (1 << 24) - 1)?),
            "immediatedata" => ("immediate_data", boolean()?),
            "initialr2t" => ("initial_r2t", boolean()?),
            "maxoutstandingr2t" => ("max_outstanding_r2t", number(1, 65535)?),
            "headerdigest" => ("header_digest", digests()?),
            "datadigest" => ("data_digest", digests()?),
            "defaulttime2wait" => ("default_time2wait", number(0, 3600)?),
            "defaulttime2retain" => ("default_time2retain", number(0, 3600)?),
            "maxxmitdatasegmentlength" => {
                warnings.push(Warning::new(at, format!("{key} {value}: twinsan sends at most what the initiator's MaxRecvDataSegmentLength allows; nothing to set")));
                return Ok(true);
            }
            "maxconnections" => {
                if value != "1" {
                    warnings.push(Warning::new(at, format!("{key} {value}: twinsan runs one connection per session (MC/S is not offered); initiators use multipath instead")));
                }
                return Ok(true);
            }
            "datapduinorder" | "datasequenceinorder" => {
                if !matches!(value.to_ascii_lowercase().as_str(), "yes" | "1") {
                    warnings.push(Warning::new(
                        at,
                        format!("{key} {value}: twinsan requires in-order data (Yes)"),
                    ));
                }
                return Ok(true);
            }
            "errorrecoverylevel" => {
                if value != "0" {
                    warnings.push(Warning::new(
                        at,
                        format!("{key} {value}: twinsan offers ErrorRecoveryLevel 0 only"),
                    ));
                }
                return Ok(true);
            }
            "ifmarker" | "ofmarker" | "ifmarkint" | "ofmarkint" => {
                warnings.push(Warning::new(
                    at,
                    format!("{key}: markers are not offered (RFC 7143 removed them); ignored"),
                ));
                return Ok(true);
            }
            _ => return Ok(false),
        };
        if let Some(prev) = self.entries.iter().find(|e| e.key == tk) {
            if prev.value != lit {
                warnings.push(Warning::new(at, format!("{key} {value}: twinsan's negotiation limits are global; keeping {} from {}", prev.value, prev.origin)));
            }
            return Ok(true);
        }
        self.entries.push(Entry::new(tk, lit, at));
        Ok(true)
    }
}

/// Reads a file for the importer.
fn read(path: &Path) -> Result<String, ImportError> {
    std::fs::read_to_string(path)
        .map_err(|e| ImportError::new(path, 0, format!("cannot read: {e}")))
}

/// Files an include pattern names: `*` and `?` in the last path component, sorted (as
/// drbdadm and Config::General's glob do); relative patterns are relative to `base`.
pub fn expand_glob(pattern: &str, base: &Path, at: &Origin) -> Result<Vec<PathBuf>, ImportError> {
    let p = Path::new(pattern);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return Ok(vec![p]);
    }
    let dir = p.parent().unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ImportError::at(
            at,
            format!("include {pattern}: cannot list {}: {e}", dir.display()),
        )
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| wildcard(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

fn wildcard(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

/// Reads drbd.conf with its includes expanded in place (at most 16 levels deep).
pub fn load_drbd(path: &Path) -> Result<Vec<drbd_conf::Stmt>, ImportError> {
    fn load(path: &Path, depth: usize) -> Result<Vec<drbd_conf::Stmt>, ImportError> {
        let text = read(path)?;
        let mut out = Vec::new();
        for s in drbd_conf::parse(&text, path)? {
            if s.words[0] == "include" {
                if depth > 16 {
                    return Err(ImportError::at(
                        &s.at,
                        "includes nested more than 16 deep (a loop?)",
                    ));
                }
                let pattern = s
                    .words
                    .get(1)
                    .ok_or_else(|| ImportError::at(&s.at, "`include` needs a file or pattern"))?;
                let base = path.parent().unwrap_or(Path::new("."));
                for f in expand_glob(pattern, base, &s.at)? {
                    out.extend(load(&f, depth + 1)?);
                }
            } else {
                out.push(s);
            }
        }
        Ok(out)
    }
    load(path, 0)
}

/// What `twinsan import` was given.
#[derive(Debug, Clone, Default)]
pub struct ImportRequest {
    pub host: String,
    pub drbd: Option<PathBuf>,
    pub tgt: Option<PathBuf>,
    /// Saved `tgtadm --lld iscsi --mode target --op show` of the running tgtd: its tids and
    /// SCSI ID/SN win over what targets.conf implies.
    pub tgt_show: Option<PathBuf>,
    pub ietd: Option<PathBuf>,
    pub initiators_allow: Option<PathBuf>,
    pub iscsi_ha: Option<PathBuf>,
    /// Portals to serve on (default: the iscsi-ha VIP, else 0.0.0.0:3260 as tgt/IET did).
    pub portals: Vec<String>,
    pub data_dir: Option<PathBuf>,
    /// Identity rehearsal: every LUN on a small sparse file under this directory, no
    /// replication and no `[ha]`, so the imported identity can be compared with the running
    /// target (iscsi-inq) before anything is switched.
    pub rehearsal: Option<PathBuf>,
}

/// The generated configuration and what could not be carried over.
#[derive(Debug, Clone)]
pub struct ImportResult {
    pub toml: String,
    pub warnings: Vec<Warning>,
}

/// Reads the given files and renders the twinsan configuration.
pub fn import(req: &ImportRequest) -> Result<ImportResult, ImportError> {
    let mut warnings = Vec::new();
    let mut negotiation = Negotiation::default();
    let mut discovery: Vec<Entry> = Vec::new();
    let mut targets: Vec<ImportedTarget> = Vec::new();
    let no_file = Path::new("<command line>");
    if req.tgt.is_some() && req.ietd.is_some() {
        return Err(ImportError::new(
            no_file,
            0,
            "give --tgt or --ietd, not both (one host ran one target)",
        ));
    }
    if let Some(path) = &req.tgt {
        let files = tgt_conf::load(path)?;
        let show = match &req.tgt_show {
            Some(p) => Some(tgt_conf::parse_show(&read(p)?, p)?),
            None => None,
        };
        let out = tgt_conf::targets(&files, show.as_ref(), &mut negotiation, &mut warnings)?;
        discovery.extend(out.discovery);
        targets.extend(out.targets);
    }
    if req.tgt_show.is_some() && req.tgt.is_none() {
        return Err(ImportError::new(no_file, 0, "--tgt-show goes with --tgt"));
    }
    if let Some(path) = &req.ietd {
        let text = read(path)?;
        let allow = match &req.initiators_allow {
            Some(p) => Some((read(p)?, p.clone())),
            None => None,
        };
        let out = ietd_conf::targets(
            &text,
            path,
            allow.as_ref().map(|(t, p)| (t.as_str(), p.as_path())),
            &mut negotiation,
            &mut warnings,
        )?;
        discovery.extend(out.discovery);
        targets.extend(out.targets);
    } else if let Some(p) = &req.initiators_allow {
        return Err(ImportError::new(
            p,
            0,
            "--initiators-allow goes with --ietd",
        ));
    }
    if targets.is_empty() {
        return Err(ImportError::new(
            no_file,
            0,
            "no targets: give --tgt targets.conf or --ietd ietd.conf",
        ));
    }

    warn_shared_identities(&targets, &mut warnings);
    let resources = match &req.drbd {
        Some(path) => {
            let stmts = load_drbd(path)?;
            let (r, w) = drbd_conf::resources(&stmts, &req.host)?;
            warnings.extend(w);
            r
        }
        None => Vec::new(),
    };
    let ha = match &req.iscsi_ha {
        Some(path) => Some(iscsi_ha_conf::parse(&read(path)?, path, &mut warnings)?),
        None => None,
    };

    // Portals.
    let portals: Vec<Entry> = if !req.portals.is_empty() {
        req.portals
            .iter()
            .map(|p| Entry::new("", toml_str(p), "--portal"))
            .collect()
    } else if let Some(h) = &ha {
        vec![Entry::new(
            "",
            toml_str(&format!("{}:3260", h.vip.0)),
            format!("DRBD_VIRTUAL_IP at {} (iscsi port 3260)", h.vip.1),
        )]
    } else {
        warnings.push(Warning::new(&Origin::new(no_file, 0), "no --portal and no iscsi-ha VIP: serving on 0.0.0.0:3260 like tgt/IET (SendTargets then advertises 0.0.0.0; set portals to the address initiators use)"));
        vec![Entry::new(
            "",
            toml_str("0.0.0.0:3260"),
            "tgt/IET default (all addresses, port 3260)",
        )]
    };

    // LUNs backed by DRBD devices get the lower-level disk and a replication table.
    let mut used = vec![false; resources.len()];
    let mut out = String::new();
    out.push_str(&format!(
        "# twinsan configuration generated by `twinsan import` for host {}.\n# Every value says where it came from; check it, then `twinsan check-config --config FILE`.\n\n",
        req.host
    ));
    out.push_str("[server]\n");
    let data_dir = req
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/twinsan"));
    out.push_str(&line(
        "data_dir",
        &toml_str(&data_dir.to_string_lossy()),
        "--data-dir (default /var/lib/twinsan)",
    ));
    out.push('\n');
    if !negotiation.entries.is_empty() {
        out.push_str("[negotiation]\n");
        for e in &negotiation.entries {
            out.push_str(&line(&e.key, &e.value, &e.origin));
        }
        out.push('\n');
    }
    if !discovery.is_empty() {
        out.push_str("[discovery]\n");
        for e in &discovery {
            out.push_str(&line(&e.key, &e.value, &e.origin));
        }
        out.push('\n');
    }
    for (ti, t) in targets.iter().enumerate() {
        out.push_str("[[target]]\n");
        out.push_str(&line("iqn", &toml_str(&t.iqn), &t.at));
        out.push_str("portals = [\n");
        for p in &portals {
            out.push_str(&format!("    {},  # {}\n", p.value, p.origin));
        }
        out.push_str("]\n");
        for e in &t.entries {
            out.push_str(&line(&e.key, &e.value, &e.origin));
        }
        for l in &t.luns {
            out.push_str("\n[[target.lun]]\n");
            out.push_str(&line("number", &l.number.to_string(), &l.number_origin));
            if let Some(dir) = &req.rehearsal {
                let file = dir.join(format!("target{ti}-lun{}.img", l.number));
                out.push_str(&line(
                    "path",
                    &toml_str(&file.to_string_lossy()),
                    format!("--rehearsal stand-in for {} ({})", l.path, l.at),
                ));
                out.push_str(&line(
                    "size",
                    &toml_str("64MiB"),
                    "--rehearsal: identity does not depend on the size",
                ));
                for e in &l.entries {
                    out.push_str(&line(&e.key, &e.value, &e.origin));
                }
                continue;
            }
            let resource = resources.iter().position(|r| {
                r.device.0 == l.path
                    || l.path == format!("/dev/drbd/by-res/{}", r.name)
                    || l.path == format!("/dev/drbd/by-res/{}/0", r.name)
                    || r.minor.is_some_and(|m| l.path == format!("/dev/drbd{m}"))
            });
            match resource {
                Some(i) => {
                    let r = &resources[i];
                    if used[i] {
                        return Err(ImportError::at(
                            &l.at,
                            format!("{} (DRBD resource {}) backs a second LUN", l.path, r.name),
                        ));
                    }
                    used[i] = true;
                    out.push_str(&line(
                        "path",
                        &toml_str(&r.disk.0),
                        format!(
                            "{}: `disk` of DRBD resource {} (the LUN's backing-store {} at {})",
                            r.disk.1, r.name, l.path, l.at
                        ),
                    ));
                    for e in &l.entries {
                        out.push_str(&line(&e.key, &e.value, &e.origin));
                    }
                    out.push_str("\n[target.lun.replication]\n");
                    for (k, v, o) in &r.replication {
                        out.push_str(&line(k, v, o));
                    }
                    if ha.is_none() {
                        out.push_str(&line(
                            "role",
                            &toml_str("secondary"),
                            "start-up role until an operator promotes (without [ha])",
                        ));
                    }
                }
                None => {
                    if l.path.starts_with("/dev/drbd") {
                        if req.drbd.is_some() {
                            return Err(ImportError::at(&l.at, format!("{} is a DRBD device but no resource in the DRBD configuration has it for host {}", l.path, req.host)));
                        }
                        warnings.push(Warning::new(&l.at, format!("{} is a DRBD device: pass --drbd drbd.conf so twinsan serves the lower-level disk and replicates it", l.path)));
                    }
                    out.push_str(&line("path", &toml_str(&l.path), &l.at));
                    for e in &l.entries {
                        out.push_str(&line(&e.key, &e.value, &e.origin));
                    }
                }
            }
        }
        out.push('\n');
    }
    for (i, r) in resources.iter().enumerate() {
        if !used[i] && req.rehearsal.is_none() {
            warnings.push(Warning::new(
                &r.at,
                format!(
                    "DRBD resource {} ({}) is not exported by any target; not imported",
                    r.name, r.device.0
                ),
            ));
        }
    }
    if let (Some(h), None) = (&ha, &req.rehearsal) {
        let link = resources.iter().find(|_| true);
        out.push_str(&iscsi_ha_conf::render(h, &req.host, link, &mut warnings)?);
    }
    Ok(ImportResult {
        toml: out,
        warnings,
    })
}

/// tgt applies a target-level scsi_id / scsi_sn to every LUN of the target, so two disks
/// can carry the same designators. twinsan reproduces that (it is what initiators saw) but
/// says so: multipath and XenServer may take such LUNs for one disk.
fn warn_shared_identities(targets: &[ImportedTarget], warnings: &mut Vec<Warning>) {
    for key in ["scsi_id", "scsi_sn"] {
        let mut seen: Vec<(&str, &str, u64)> = Vec::new();
        for t in targets {
            for l in &t.luns {
                if let Some(e) = l.entries.iter().find(|e| e.key == key) {
                    if let Some((_, iqn, n)) = seen.iter().find(|(v, _, _)| *v == e.value) {
                        warnings.push(Warning::new(
                            &l.at,
                            format!(
                                "{key} {} is shared by LUN {} of {} and LUN {n} of {iqn}: both keep it, as tgt presented them, but initiators may take them for one disk",
                                e.value, l.number, t.iqn
                            ),
                        ));
                    } else {
                        seen.push((&e.value, &t.iqn, l.number));
                    }
                }
            }
        }
    }
}

/// `key = value  # origin`
fn line(key: &str, value: &str, origin: impl fmt::Display) -> String {
    format!("{key} = {value}  # {origin}\n")
}

/// Validates generated TOML with twinsan's own configuration parser, `[ha]` included.
pub fn check_generated(toml: &str, name: &Path) -> Result<(), crate::config::ConfigError> {
    crate::config::Config::parse(toml, name).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_strings() {
        assert!(wildcard("*.res", "r0.res"));
        assert!(wildcard("r?.res", "r1.res"));
        assert!(!wildcard("*.res", "r0.res.bak"));
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.res", "a.res", "c.conf"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let at = Origin::new(Path::new("drbd.conf"), 2);
        let got = expand_glob("*.res", dir.path(), &at).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.res", "b.res"]);
        let e = expand_glob("missing/*.res", dir.path(), &at).unwrap_err();
        assert_eq!((e.line, e.file.as_path()), (2, Path::new("drbd.conf")));
    }

    #[test]
    fn negotiation_is_global_and_conflicts_are_reported() {
        let mut n = Negotiation::default();
        let mut w = Vec::new();
        let a = Origin::new(Path::new("t.conf"), 3);
        let b = Origin::new(Path::new("t.conf"), 9);
        assert!(n.map("MaxBurstLength", "262144", &a, &mut w).unwrap());
        assert!(n.map("MaxBurstLength", "1048576", &b, &mut w).unwrap());
        assert_eq!(n.entries.len(), 1);
        assert!(
            w[0].to_string()
                .starts_with("t.conf:9: MaxBurstLength 1048576"),
            "{}",
            w[0]
        );
        assert!(!n.map("Bogus", "1", &a, &mut w).unwrap());
        assert!(n.map("FirstBurstLength", "12", &a, &mut w).is_err());
    }

    #[test]
    fn shared_tgt_identities_are_reported() {
        let lun = |n: u64, id: &str| ImportedLun {
            number: n,
            number_origin: String::new(),
            path: format!("/dev/x{n}"),
            at: Origin::new(Path::new("targets.conf"), n as usize),
            entries: vec![Entry::new("scsi_id", toml_str(id), "x")],
        };
        let t = ImportedTarget {
            iqn: "iqn.2001-04.com.example:a".into(),
            at: Origin::new(Path::new("targets.conf"), 1),
            entries: Vec::new(),
            luns: vec![lun(1, "SAME"), lun(2, "SAME"), lun(3, "OTHER")],
        };
        let mut w = Vec::new();
        warn_shared_identities(&[t], &mut w);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].to_string()
                .starts_with("targets.conf:2: scsi_id \"SAME\" is shared by LUN 2"),
            "{}",
            w[0]
        );
    }

    /// Garbage never panics any parser: every input gives a value or an ImportError.
    #[test]
    fn parsers_survive_random_input() {
        use rand::{Rng, SeedableRng};
        const ALPHABET: &[&str] = &[
            "{",
            "}",
            ";",
            "\"",
            "#",
            "\n",
            " ",
            "<",
            ">",
            "</",
            "=",
            ",",
            "[",
            "]",
            "on",
            "resource",
            "target",
            "backing-store",
            "Lun",
            "Target",
            "Path=",
            "LUN: ",
            "SCSI ID: ",
            "Target 1: ",
            "include",
            "device",
            "meta-disk",
            "address",
            "é",
            "0",
            "99999999999",
            "DRBD_VIRTUAL_IP",
            "'",
            "\\",
            "lun",
            "disk",
            "net",
            "common",
            "volume",
            "minor",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..3000 {
            let n = rng.gen_range(0..40);
            let text: String = (0..n)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
                .collect();
            let f = Path::new("fuzz");
            if let Ok(stmts) = drbd_conf::parse(&text, f) {
                let _ = drbd_conf::resources(&stmts, "on");
            }
            if let Ok(t) = tgt_conf::parse(&text, f) {
                let _ = tgt_conf::targets(&[t], None, &mut Negotiation::default(), &mut Vec::new());
            }
            let _ = tgt_conf::parse_show(&text, f);
            let _ = ietd_conf::targets(
                &text,
                f,
                Some((&text, f)),
                &mut Negotiation::default(),
                &mut Vec::new(),
            );
            let _ = iscsi_ha_conf::parse(&text, f, &mut Vec::new());
        }
    }
}
