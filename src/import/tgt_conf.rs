//! tgt's targets.conf (read by tgt-admin with Config::General): `<target IQN> ... </target>`
//! blocks, `<backing-store PATH> ... </backing-store>` sub-blocks or plain `backing-store
//! PATH` lines, `key value` options, `#` comments, `include FILE-or-glob`.
//!
//! tgt-admin numbers targets and LUNs itself, and tgt derives its default identity from
//! those numbers, so [`targets`] reproduces tgt-admin's assignment exactly: targets in
//! byte-wise sorted IQN order get tid 1, 2, ... (or `controller_tid`); within a target the
//! backing stores, sorted by path, get their `lun` or else the lowest free LUN from 1.

use super::{
    toml_str, Entry, ImportError, ImportedLun, ImportedTarget, Negotiation, Origin, Warning,
};
use std::path::Path;

/// One parsed targets.conf file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TgtFile {
    pub globals: Vec<(String, String, Origin)>,
    pub targets: Vec<TgtTarget>,
    pub includes: Vec<(String, Origin)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TgtTarget {
    pub iqn: String,
    pub at: Origin,
    pub options: Vec<(String, String, Origin)>,
    pub stores: Vec<TgtStore>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TgtStore {
    pub path: String,
    pub at: Origin,
    pub direct: bool,
    pub options: Vec<(String, String, Origin)>,
}

/// Per-LUN tgt options twinsan maps (or deliberately accepts, like `allow-in-use`).
const MAPPED_LUN_OPTIONS: &[&str] = &[
    "lun",
    "scsi_id",
    "scsi_sn",
    "vendor_id",
    "product_id",
    "product_rev",
    "readonly",
    "write-cache",
    "block-size",
    "bs-type",
    "device-type",
    "bsoflags",
    "allow-in-use",
    "removable",
    // For its `removable=N` item; the other items get one warning.
    "params",
];

/// Per-LUN tgt options that exist but have no twinsan equivalent: each gets a warning.
const UNMAPPED_LUN_OPTIONS: &[&str] = &[
    "mode_page",
    "sense_format",
    "online",
    "path",
    "lbppbe",
    "la_lba",
    "optimal_xfer_gran",
    "optimal_xfer_len",
    "bsopts",
];

/// tgt reads `removable` with atoi(3): leading blanks, a sign, then digits; anything else
/// counts as 0.
fn tgt_atoi(v: &str) -> i64 {
    let t = v.trim_start();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = digits
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0i64, |n, d| {
            n.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        });
    if neg {
        -n
    } else {
        n
    }
}

/// `removable=N` inside a `params` value (tgt's lu_config: comma-separated `key=value`),
/// and the other items, which have no twinsan equivalent.
fn params_removable(params: &str) -> (Option<&str>, Vec<&str>) {
    let mut removable = None;
    let mut rest = Vec::new();
    for item in params.split(',').filter(|i| !i.is_empty()) {
        match item.strip_prefix("removable=") {
            Some(v) => removable = Some(v),
            None => rest.push(item),
        }
    }
    (removable, rest)
}

/// `<name arg>` / `</name>` / `key value` / `key = value`.
fn split_kv(line: &str) -> (String, String) {
    let line = line.trim();
    let (k, v) = match line.find(|c: char| c.is_whitespace() || c == '=') {
        Some(i) => (
            &line[..i],
            line[i..].trim_start().trim_start_matches('=').trim(),
        ),
        None => (line, ""),
    };
    (k.to_string(), v.trim_matches('"').to_string())
}

/// Parses targets.conf text (pure; `include` lines are returned, not followed).
pub fn parse(text: &str, file: &Path) -> Result<TgtFile, ImportError> {
    let mut out = TgtFile::default();
    let mut target: Option<TgtTarget> = None;
    let mut store: Option<TgtStore> = None;
    for (i, raw) in text.lines().enumerate() {
        let at = Origin::new(file, i + 1);
        let l = match raw.find('#') {
            Some(p) if !raw[..p].ends_with('\\') => &raw[..p],
            _ => raw,
        }
        .trim();
        if l.is_empty() {
            continue;
        }
        if let Some(tag) = l.strip_prefix("</") {
            let name = tag.trim_end_matches('>').trim().to_ascii_lowercase();
            if !tag.ends_with('>') {
                return Err(ImportError::at(
                    &at,
                    format!("`{l}`: a closing tag needs `>`"),
                ));
            }
            match name.as_str() {
                "backing-store" | "direct-store" => match (store.take(), target.as_mut()) {
                    (Some(s), Some(t)) => t.stores.push(s),
                    _ => {
                        return Err(ImportError::at(
                            &at,
                            format!("`{l}` without an open <{name}>"),
                        ))
                    }
                },
                "target" => {
                    if let Some(s) = &store {
                        return Err(ImportError::at(
                            &s.at,
                            "<backing-store> opened here is not closed before </target>",
                        ));
                    }
                    match target.take() {
                        Some(t) => out.targets.push(t),
                        None => {
                            return Err(ImportError::at(
                                &at,
                                "`</target>` without an open <target>",
                            ))
                        }
                    }
                }
                other => {
                    return Err(ImportError::at(
                        &at,
                        format!("unknown closing tag </{other}>"),
                    ))
                }
            }
            continue;
        }
        if let Some(tag) = l.strip_prefix('<') {
            let Some(tag) = tag.strip_suffix('>') else {
                return Err(ImportError::at(
                    &at,
                    format!("`{l}`: a tag needs a closing `>`"),
                ));
            };
            let (name, arg) = split_kv(tag);
            if arg.is_empty() {
                return Err(ImportError::at(
                    &at,
                    format!("<{name}> needs a value (e.g. <target iqn...>)"),
                ));
            }
            match name.to_ascii_lowercase().as_str() {
                "target" => {
                    if let Some(t) = &target {
                        return Err(ImportError::at(&t.at, format!("<target {}> opened here is not closed before the next <target>", t.iqn)));
                    }
                    if let Err(m) = crate::config::check_iscsi_name(&arg) {
                        return Err(ImportError::at(&at, format!("<target>: {m}")));
                    }
                    target = Some(TgtTarget { iqn: arg, at, options: Vec::new(), stores: Vec::new() });
                }
                n @ ("backing-store" | "direct-store") => {
                    if target.is_none() {
                        return Err(ImportError::at(&at, format!("<{n}> outside a <target>")));
                    }
                    if store.is_some() {
                        return Err(ImportError::at(&at, format!("<{n}> inside another backing store")));
                    }
                    store = Some(TgtStore { path: arg, at, direct: n == "direct-store", options: Vec::new() });
                }
                other => return Err(ImportError::at(&at, format!("unknown block <{other}> (tgt knows <target>, <backing-store>, <direct-store>)"))),
            }
            continue;
        }
        let (k, v) = split_kv(l);
        if let Some(s) = store.as_mut() {
            s.options.push((k, v, at));
        } else if let Some(t) = target.as_mut() {
            if k == "backing-store" || k == "direct-store" {
                if v.is_empty() {
                    return Err(ImportError::at(&at, format!("`{k}` needs a path")));
                }
                t.stores.push(TgtStore {
                    path: v,
                    at,
                    direct: k == "direct-store",
                    options: Vec::new(),
                });
            } else {
                t.options.push((k, v, at));
            }
        } else if k == "include" {
            out.includes.push((v, at));
        } else {
            out.globals.push((k, v, at));
        }
    }
    if let Some(s) = store {
        return Err(ImportError::at(
            &s.at,
            format!("<backing-store {}> is never closed", s.path),
        ));
    }
    if let Some(t) = target {
        return Err(ImportError::at(
            &t.at,
            format!(
                "<target {}> is never closed (a </target> is missing)",
                t.iqn
            ),
        ));
    }
    Ok(out)
}

/// Reads targets.conf and its includes.
pub fn load(path: &Path) -> Result<Vec<TgtFile>, ImportError> {
    fn go(path: &Path, depth: usize, out: &mut Vec<TgtFile>) -> Result<(), ImportError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ImportError::new(path, 0, format!("cannot read: {e}")))?;
        let f = parse(&text, path)?;
        let includes = f.includes.clone();
        out.push(f);
        for (pattern, at) in includes {
            if depth > 16 {
                return Err(ImportError::at(
                    &at,
                    "includes nested more than 16 deep (a loop?)",
                ));
            }
            for p in super::expand_glob(&pattern, path.parent().unwrap_or(Path::new(".")), &at)? {
                go(&p, depth + 1, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(path, 0, &mut out)?;
    Ok(out)
}

/// The state of a running tgtd: `tgtadm --lld iscsi --mode target --op show` output.
#[derive(Debug, Clone, PartialEq)]
pub struct TgtShow {
    pub file: std::path::PathBuf,
    pub targets: Vec<ShowTarget>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShowTarget {
    pub iqn: String,
    pub tid: u32,
    pub at: Origin,
    pub luns: Vec<ShowLun>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShowLun {
    pub lun: u64,
    pub scsi_id: String,
    pub scsi_sn: String,
    pub at: Origin,
}

/// Parses `tgtadm --mode target --op show` output: `Target N: IQN`, then per LUN
/// `LUN: n`, `SCSI ID: ...`, `SCSI SN: ...` (values verbatim, inner spaces included).
pub fn parse_show(text: &str, file: &Path) -> Result<TgtShow, ImportError> {
    let mut show = TgtShow {
        file: file.to_path_buf(),
        targets: Vec::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let at = Origin::new(file, i + 1);
        let l = raw.trim_start();
        if let Some(rest) = raw.strip_prefix("Target ") {
            let (tid, iqn) = rest
                .split_once(": ")
                .ok_or_else(|| ImportError::at(&at, "expected `Target N: IQN`"))?;
            let tid = tid
                .parse()
                .map_err(|_| ImportError::at(&at, format!("`{tid}` is not a target id")))?;
            show.targets.push(ShowTarget {
                iqn: iqn.trim().to_string(),
                tid,
                at,
                luns: Vec::new(),
            });
        } else if let Some(n) = l.strip_prefix("LUN: ") {
            let t = show
                .targets
                .last_mut()
                .ok_or_else(|| ImportError::at(&at, "LUN before any Target"))?;
            let lun = n
                .trim()
                .parse()
                .map_err(|_| ImportError::at(&at, format!("`{n}` is not a LUN number")))?;
            t.luns.push(ShowLun {
                lun,
                scsi_id: String::new(),
                scsi_sn: String::new(),
                at,
            });
        } else if let Some(v) = l.strip_prefix("SCSI ID: ") {
            let lun = show
                .targets
                .last_mut()
                .and_then(|t| t.luns.last_mut())
                .ok_or_else(|| ImportError::at(&at, "SCSI ID before any LUN"))?;
            lun.scsi_id = v.to_string();
        } else if let Some(v) = l.strip_prefix("SCSI SN: ") {
            let lun = show
                .targets
                .last_mut()
                .and_then(|t| t.luns.last_mut())
                .ok_or_else(|| ImportError::at(&at, "SCSI SN before any LUN"))?;
            lun.scsi_sn = v.to_string();
        }
    }
    if show.targets.is_empty() {
        return Err(ImportError::new(
            file,
            0,
            "no `Target N: IQN` line: is this `tgtadm --mode target --op show` output?",
        ));
    }
    Ok(show)
}

/// What targets.conf says, in twinsan terms.
#[derive(Debug, Clone, Default)]
pub struct TgtImport {
    pub discovery: Vec<Entry>,
    pub targets: Vec<ImportedTarget>,
}

fn credentials(v: &str, at: &Origin, key: &str) -> Result<String, ImportError> {
    let mut it = v.split_whitespace();
    match (it.next(), it.next(), it.next()) {
        (Some(u), Some(p), None) => Ok(format!(
            "{{ user = {}, secret = {} }}",
            toml_str(u),
            toml_str(p)
        )),
        _ => Err(ImportError::at(at, format!("`{key}` needs USER PASSWORD"))),
    }
}

/// Interprets parsed files: tids, LUN numbers and each LUN's identity as tgt-admin and tgtd
/// would have produced them.
pub fn targets(
    files: &[TgtFile],
    show: Option<&TgtShow>,
    negotiation: &mut Negotiation,
    warnings: &mut Vec<Warning>,
) -> Result<TgtImport, ImportError> {
    let mut out = TgtImport::default();
    let mut all: Vec<&TgtTarget> = Vec::new();
    for f in files {
        for (k, v, at) in &f.globals {
            match k.as_str() {
                "default-driver" if v == "iscsi" => {}
                "default-driver" => {
                    return Err(ImportError::at(
                        at,
                        format!("default-driver {v}: only iSCSI targets can be imported"),
                    ))
                }
                "ignore-errors" => {}
                "incomingdiscoveryuser" => {
                    out.discovery
                        .push(Entry::new("chap", credentials(v, at, k)?, at))
                }
                "outgoingdiscoveryuser" => {
                    out.discovery
                        .push(Entry::new("mutual_chap", credentials(v, at, k)?, at))
                }
                _ => warnings.push(Warning::new(
                    at,
                    format!("global `{k}` has no twinsan equivalent; ignored"),
                )),
            }
        }
        all.extend(f.targets.iter());
    }
    // tgt-admin walks Perl's `sort keys`: byte-wise IQN order. Config::General merges
    // duplicate blocks; twinsan refuses them instead of guessing.
    all.sort_by(|a, b| a.iqn.as_bytes().cmp(b.iqn.as_bytes()));
    for w in all.windows(2) {
        if w[0].iqn == w[1].iqn {
            return Err(ImportError::at(
                &w[1].at,
                format!("target {} is defined twice (also at {})", w[1].iqn, w[0].at),
            ));
        }
    }
    let mut max_tid = 0u32;
    for t in all {
        let opt = |name: &str| t.options.iter().rev().find(|(k, _, _)| k == name);
        let (tid, tid_origin) = match opt("controller_tid") {
            Some((_, v, at)) => (
                v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    ImportError::at(at, format!("controller_tid `{v}` is not a positive number"))
                })?,
                format!("controller_tid at {at}"),
            ),
            None => (
                max_tid + 1,
                format!(
                    "tgt-admin numbering: target {} in sorted IQN order",
                    max_tid + 1
                ),
            ),
        };
        let shown = show.and_then(|sh| sh.targets.iter().find(|x| x.iqn == t.iqn));
        let (tid, tid_origin) = match shown {
            Some(st) => {
                if st.tid != tid {
                    warnings.push(Warning::new(
                        &st.at,
                        format!(
                            "target {}: the running tgtd has tid {}, targets.conf order gives {tid}; using the running tid",
                            t.iqn, st.tid
                        ),
                    ));
                }
                (st.tid, format!("tid of the running tgtd ({})", st.at))
            }
            None => {
                if let Some(sh) = show {
                    warnings.push(Warning::new(
                        &t.at,
                        format!(
                            "target {} is not in {} (not running in tgtd?): tid from targets.conf order",
                            t.iqn,
                            sh.file.display()
                        ),
                    ));
                }
                (tid, tid_origin)
            }
        };
        max_tid = max_tid.max(tid);
        if let Some((_, v, at)) = opt("driver") {
            if v != "iscsi" {
                return Err(ImportError::at(
                    at,
                    format!("driver {v}: only iSCSI targets can be imported"),
                ));
            }
        }
        let mut entries = Vec::new();
        let mut incoming = 0;
        let mut allow_names = Vec::new();
        for (k, v, at) in &t.options {
            match k.as_str() {
                "incominguser" => {
                    incoming += 1;
                    if incoming == 1 {
                        entries.push(Entry::new("chap", credentials(v, at, k)?, at));
                    } else {
                        warnings.push(Warning::new(at, format!("target {}: twinsan has one CHAP account per target; this incominguser is not imported", t.iqn)));
                    }
                }
                "outgoinguser" => {
                    if entries.iter().any(|e| e.key == "mutual_chap") {
                        warnings.push(Warning::new(
                            at,
                            "only one outgoinguser is allowed (tgt-admin uses the first)",
                        ));
                    } else {
                        entries.push(Entry::new("mutual_chap", credentials(v, at, k)?, at));
                    }
                }
                "initiator-name" => {
                    if let Err(m) = crate::config::check_iscsi_name(v) {
                        return Err(ImportError::at(at, format!("initiator-name: {m}")));
                    }
                    allow_names.push((v.clone(), at.clone()));
                }
                "initiator-address" => {
                    if v != "ALL" {
                        warnings.push(Warning::new(at, format!("target {}: initiator-address {v}: twinsan filters by initiator name, not address; use a firewall (or list the initiator IQNs in allowed_initiators)", t.iqn)));
                    }
                }
                "lun" | "scsi_id" | "scsi_sn" | "vendor_id" | "product_id" | "product_rev"
                | "readonly" | "write-cache" | "block-size" | "bs-type" | "bsoflags" | "bsopts"
                | "device-type" | "allow-in-use" | "controller_tid" | "driver" | "params"
                | "mode_page" | "removable" | "sense_format" | "online" | "path" | "lbppbe"
                | "la_lba" | "optimal_xfer_gran" | "optimal_xfer_len" => {}
                other => {
                    if !negotiation.map(other, v, at, warnings)? {
                        warnings.push(Warning::new(
                            at,
                            format!(
                                "target {}: `{other}` has no twinsan equivalent; ignored",
                                t.iqn
                            ),
                        ));
                    }
                }
            }
        }
        if !allow_names.is_empty() {
            let list: Vec<String> = allow_names.iter().map(|(n, _)| toml_str(n)).collect();
            entries.push(Entry::new(
                "allowed_initiators",
                format!("[{}]", list.join(", ")),
                &allow_names[0].1,
            ));
        }
        if t.stores.is_empty() {
            warnings.push(Warning::new(
                &t.at,
                format!("target {} has no backing-store; not imported", t.iqn),
            ));
            continue;
        }
        // LUN numbers: explicit ones reserved, the rest in sorted path order from 1.
        let mut stores: Vec<&TgtStore> = t.stores.iter().collect();
        stores.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let explicit = |s: &TgtStore| s.options.iter().rev().find(|(k, _, _)| k == "lun").cloned();
        let mut taken: Vec<u64> = Vec::new();
        for s in &stores {
            if let Some((_, v, at)) = explicit(s) {
                let n: u64 = v
                    .parse()
                    .map_err(|_| ImportError::at(&at, format!("lun `{v}` is not a number")))?;
                if n == 0 || n > 16383 {
                    return Err(ImportError::at(
                        &at,
                        format!("lun {n}: tgt keeps LUN 0 for its controller; LUNs are 1..=16383"),
                    ));
                }
                if taken.contains(&n) {
                    return Err(ImportError::at(
                        &at,
                        format!("lun {n} is used twice in target {}", t.iqn),
                    ));
                }
                taken.push(n);
            }
        }
        let mut imported = ImportedTarget {
            iqn: t.iqn.clone(),
            at: t.at.clone(),
            entries,
            luns: Vec::new(),
        };
        for s in stores {
            let (number, lun_origin) = match explicit(s) {
                Some((_, v, at)) => (
                    v.parse::<u64>().unwrap_or(0),
                    format!("{} (backing-store at {})", at, s.at),
                ),
                None => {
                    let mut n = 1;
                    while taken.contains(&n) {
                        n += 1;
                    }
                    taken.push(n);
                    (
                        n,
                        format!(
                            "{} (tgt-admin numbering: lowest free LUN in sorted path order)",
                            s.at
                        ),
                    )
                }
            };
            if s.direct {
                return Err(ImportError::at(&s.at, "direct-store passes the device's own SCSI identity through; twinsan cannot reproduce it (use backing-store in tgt first, or import without identity compatibility by editing targets.conf)"));
            }
            // Store options override the target's.
            let get = |name: &str| {
                s.options
                    .iter()
                    .rev()
                    .find(|(k, _, _)| k == name)
                    .or_else(|| opt(name))
                    .cloned()
            };
            let mut e = vec![
                Entry::new(
                    "identity",
                    toml_str("tgt"),
                    "present the disk exactly as tgt did (INQUIRY, VPD 0x80/0x83)",
                ),
                Entry::new(
                    "tgt_tid",
                    tid.to_string(),
                    format!("{tid_origin}; target at {}", t.at),
                ),
            ];
            let field = |name: &str, max: usize| -> Result<Option<(String, Origin)>, ImportError> {
                match get(name) {
                    Some((_, v, at)) => {
                        if v.is_empty()
                            || v.len() > max
                            || !v.bytes().all(|b| (0x20..0x7f).contains(&b))
                        {
                            return Err(ImportError::at(
                                &at,
                                format!(
                                    "{name} `{v}` must be 1..={max} printable ASCII characters"
                                ),
                            ));
                        }
                        Ok(Some((v, at)))
                    }
                    None => Ok(None),
                }
            };
            for (name, key, max) in [
                ("scsi_id", "scsi_id", crate::scsi::compat::TGT_ID_LEN),
                ("scsi_sn", "scsi_sn", crate::scsi::compat::TGT_SN_LEN),
                ("vendor_id", "vendor", 8),
                ("product_id", "product", 16),
                ("product_rev", "revision", 4),
            ] {
                if let Some((v, at)) = field(name, max)? {
                    e.push(Entry::new(key, toml_str(&v), at));
                }
            }
            // What the running tgtd presents wins over what the files say.
            if let Some(sl) = shown.and_then(|st| st.luns.iter().find(|l| l.lun == number)) {
                let configured = |e: &[Entry], key: &str| {
                    e.iter().find(|x| x.key == key).map(|x| x.value.clone())
                };
                for (key, running, default) in [
                    (
                        "scsi_id",
                        &sl.scsi_id,
                        crate::scsi::compat::tgt_default_scsi_id(tid, number),
                    ),
                    (
                        "scsi_sn",
                        &sl.scsi_sn,
                        crate::scsi::compat::tgt_default_scsi_sn(tid, number),
                    ),
                ] {
                    let effective = configured(&e, key).unwrap_or_else(|| toml_str(&default));
                    if effective != toml_str(running) {
                        if configured(&e, key).is_some() {
                            warnings.push(Warning::new(
                                &sl.at,
                                format!("LUN {number} of {}: the running tgtd's {key} `{running}` differs from targets.conf; using the running value", t.iqn),
                            ));
                        }
                        e.retain(|x| x.key != key);
                        e.push(Entry::new(
                            key,
                            toml_str(running),
                            format!("running tgtd ({})", sl.at),
                        ));
                    }
                }
            } else if shown.is_some() {
                warnings.push(Warning::new(
                    &s.at,
                    format!(
                        "LUN {number} of {} is not in the running tgtd: identity from targets.conf",
                        t.iqn
                    ),
                ));
            }
            if let Some((_, v, at)) = get("readonly") {
                if matches!(v.as_str(), "1" | "yes" | "on") {
                    e.push(Entry::new("read_only", "true".into(), at));
                }
            }
            if let Some((_, v, at)) = get("write-cache") {
                if v == "off" {
                    e.push(Entry::new("write_cache", "false".into(), at));
                }
            }
            if let Some((_, v, at)) = get("block-size") {
                match v.as_str() {
                    "512" | "4096" => e.push(Entry::new("block_size", v.clone(), at)),
                    _ => {
                        return Err(ImportError::at(
                            &at,
                            format!("block-size {v}: twinsan serves 512 or 4096 byte blocks"),
                        ))
                    }
                }
            }
            if let Some((_, v, at)) = get("bs-type") {
                if !matches!(v.as_str(), "rdwr" | "aio") {
                    return Err(ImportError::at(
                        &at,
                        format!(
                            "bs-type {v}: twinsan serves files and block devices (rdwr/aio) only"
                        ),
                    ));
                }
            }
            if let Some((_, v, at)) = get("device-type") {
                if v != "disk" {
                    return Err(ImportError::at(
                        &at,
                        format!("device-type {v}: twinsan serves disks only"),
                    ));
                }
            }
            if let Some((_, v, at)) = get("bsoflags") {
                e.push(Entry::new(
                    "direct",
                    if v.contains("direct") {
                        "true"
                    } else {
                        "false"
                    }
                    .into(),
                    at,
                ));
            }
            // `removable N`, or `removable=N` in `params` (tgt: RMB=1 when atoi(N) != 0). A
            // `removable` line wins over `params`.
            let (in_params, other_params) = match get("params") {
                Some((_, v, at)) => {
                    let (r, rest) = params_removable(&v);
                    (
                        r.map(|r| (r.to_string(), at.clone())),
                        (!rest.is_empty()).then(|| (rest.join(","), at)),
                    )
                }
                None => (None, None),
            };
            let removable = get("removable").map(|(_, v, at)| (v, at)).or(in_params);
            if let Some((v, at)) = removable {
                let n = tgt_atoi(&v);
                if n.to_string() != v.trim() {
                    warnings.push(Warning::new(
                        &at,
                        format!(
                            "LUN {number} of {}: removable `{v}` is read by tgt as {n}",
                            t.iqn
                        ),
                    ));
                }
                if n != 0 {
                    e.push(Entry::new("removable", "true".into(), at));
                }
            }
            if let Some((v, at)) = other_params {
                warnings.push(Warning::new(
                    &at,
                    format!(
                        "LUN {number} of {}: `params {v}` has no twinsan equivalent; ignored",
                        t.iqn
                    ),
                ));
            }
            for name in UNMAPPED_LUN_OPTIONS {
                if let Some((_, v, at)) = get(name) {
                    warnings.push(Warning::new(
                        &at,
                        format!(
                            "LUN {number} of {}: `{name} {v}` has no twinsan equivalent; ignored",
                            t.iqn
                        ),
                    ));
                }
            }
            for (k, _, at) in &s.options {
                if !MAPPED_LUN_OPTIONS.contains(&k.as_str())
                    && !UNMAPPED_LUN_OPTIONS.contains(&k.as_str())
                {
                    warnings.push(Warning::new(
                        at,
                        format!(
                            "backing-store option `{k}` is not a tgt option twinsan knows; ignored"
                        ),
                    ));
                }
            }
            imported.luns.push(ImportedLun {
                number,
                number_origin: lun_origin,
                path: s.path.clone(),
                at: s.at.clone(),
                entries: e,
            });
        }
        imported.luns.sort_by_key(|l| l.number);
        out.targets.push(imported);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "default-driver iscsi\n\
<target iqn.2001-04.com.example:b>\n\
    backing-store /dev/vg/z\n\
    backing-store /dev/vg/a\n\
    scsi_id SHARED\n\
</target>\n\
<target iqn.2001-04.com.example:a>\n\
    <backing-store /dev/vg/y>\n\
        lun 1\n\
        scsi_sn SN-Y\n\
    </backing-store>\n\
    <backing-store /dev/vg/x>\n\
        vendor_id ACME\n\
    </backing-store>\n\
    incominguser xen secretsecret12\n\
    initiator-address 10.0.0.5\n\
    MaxRecvDataSegmentLength 65536\n\
</target>\n";

    fn run(text: &str) -> Result<(TgtImport, Vec<Warning>), ImportError> {
        let f = parse(text, Path::new("/etc/tgt/targets.conf"))?;
        let mut w = Vec::new();
        let mut n = Negotiation::default();
        let r = targets(&[f], None, &mut n, &mut w)?;
        Ok((r, w))
    }

    fn val(l: &ImportedLun, k: &str) -> Option<String> {
        l.entries
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    }

    #[test]
    fn numbers_targets_and_luns_like_tgt_admin() {
        let (r, w) = run(CONF).unwrap();
        assert_eq!(r.targets[0].iqn, "iqn.2001-04.com.example:a");
        let a = &r.targets[0];
        assert_eq!(val(&a.luns[0], "tgt_tid").as_deref(), Some("1"));
        // /dev/vg/y has lun 1; /dev/vg/x gets the next free: 2.
        assert_eq!(
            (a.luns[0].number, a.luns[0].path.as_str()),
            (1, "/dev/vg/y")
        );
        assert_eq!(
            (a.luns[1].number, a.luns[1].path.as_str()),
            (2, "/dev/vg/x")
        );
        assert_eq!(val(&a.luns[1], "vendor").as_deref(), Some("\"ACME\""));
        let b = &r.targets[1];
        assert_eq!(val(&b.luns[0], "tgt_tid").as_deref(), Some("2"));
        assert_eq!(
            (b.luns[0].number, b.luns[0].path.as_str()),
            (1, "/dev/vg/a")
        );
        assert_eq!(val(&b.luns[1], "scsi_id").as_deref(), Some("\"SHARED\""));
        assert!(w.iter().any(|w| w.message.contains("initiator-address")));
        assert!(a
            .entries
            .iter()
            .any(|e| e.key == "chap" && e.origin.ends_with(":15")));
    }

    #[test]
    fn running_tgtd_state_wins() {
        let f = parse(CONF, Path::new("targets.conf")).unwrap();
        // tgtd numbered b first (targets added one by one), and LUN 2 of a got another id.
        let show_text = "Target 1: iqn.2001-04.com.example:b\n    LUN information:\n        LUN: 1\n            SCSI ID: SHARED\n            SCSI SN: beaf11\nTarget 2: iqn.2001-04.com.example:a\n    LUN information:\n        LUN: 2\n            SCSI ID: IET     00020002\n            SCSI SN: OTHER-SN\n";
        let show = parse_show(show_text, Path::new("show.txt")).unwrap();
        let mut w = Vec::new();
        let r = targets(&[f], Some(&show), &mut Negotiation::default(), &mut w).unwrap();
        let a = &r.targets[0];
        assert_eq!(val(&a.luns[1], "tgt_tid").as_deref(), Some("2"));
        assert_eq!(val(&a.luns[1], "scsi_sn").as_deref(), Some("\"OTHER-SN\""));
        // The default id for tid 2, LUN 2 is what tgtd shows: nothing to pin.
        assert_eq!(val(&a.luns[1], "scsi_id"), None);
        assert!(w
            .iter()
            .any(|w| w.message.contains("using the running tid")));
        // LUN 1 of a is not in the show output: warned.
        assert!(w.iter().any(|w| w
            .message
            .contains("LUN 1 of iqn.2001-04.com.example:a is not in the running tgtd")));
        assert!(parse_show("nothing\n", Path::new("s")).is_err());
    }

    #[test]
    fn removable_maps_from_the_option_and_from_params() {
        let conf = |opts: &str| {
            format!("<target iqn.2001-04.com.example:r>\n    <backing-store /dev/vg/r>\n{opts}    </backing-store>\n</target>\n")
        };
        let lun = |opts: &str| {
            let (r, w) = run(&conf(opts)).unwrap();
            (r.targets[0].luns[0].clone(), w)
        };
        let (l, w) = lun("        removable 1\n");
        assert_eq!(val(&l, "removable").as_deref(), Some("true"));
        assert!(w.iter().all(|w| !w.message.contains("removable")), "{w:?}");
        let (l, _) = lun("        removable 0\n");
        assert_eq!(val(&l, "removable"), None);
        // Inside params, with the other items still warned about.
        let (l, w) = lun("        params removable=1,sense_format=1\n");
        assert_eq!(val(&l, "removable").as_deref(), Some("true"));
        assert!(w.iter().any(|w| w
            .message
            .contains("`params sense_format=1` has no twinsan equivalent")));
        let (l, w) = lun("        params removable=1\n");
        assert_eq!(val(&l, "removable").as_deref(), Some("true"));
        assert!(w.iter().all(|w| !w.message.contains("params")), "{w:?}");
        // A `removable` line wins over params; atoi reads `yes` as 0, and says so.
        let (l, _) = lun("        params removable=1\n        removable 0\n");
        assert_eq!(val(&l, "removable"), None);
        let (l, w) = lun("        removable yes\n");
        assert_eq!(val(&l, "removable"), None);
        assert!(w.iter().any(|w| w.message.contains("read by tgt as 0")));
        // At target level too (store options override the target's).
        let (r, _) = run("<target iqn.2001-04.com.example:r>\n    backing-store /dev/vg/r\n    removable 1\n</target>\n").unwrap();
        assert_eq!(
            val(&r.targets[0].luns[0], "removable").as_deref(),
            Some("true")
        );
    }

    #[test]
    fn broken_files_name_the_line() {
        let e = run("<target iqn.2001-04.com.example:a>\n  backing-store /x\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("never closed"), "{e}");
        let e = run("<target iqn.x:a>\n<backing-store /x>\n</target>\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = run("<target bad name>\n</target>\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = run(&CONF.replace("lun 1", "lun x")).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        assert!(
            e.to_string()
                .starts_with("/etc/tgt/targets.conf:9: lun `x`"),
            "{e}"
        );
    }
}
