//! drbd.conf (DRBD 8.3 / 8.4 / 9 syntax): statements `word word ... ;` and sections
//! `word ... { ... }`, `#` comments, double-quoted strings, `include "glob";`.
//!
//! [`parse`] turns text into a statement tree (pure); [`resources`] interprets the tree for
//! one host: `common` defaults, `resource NAME { ... }` with resource-level values and
//! per-host `on NAME { ... }` sections, and the net / disk / syncer / startup / handlers /
//! options sections, mapping what twinsan supports and warning about the rest.

use super::{toml_str, ImportError, Origin, Warning};
use std::path::Path;

/// One statement or section of drbd.conf.
#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    pub words: Vec<String>,
    /// Present for a section (`words { ... }`).
    pub block: Option<Vec<Stmt>>,
    pub at: Origin,
}

/// Parses drbd.conf text into statements; `file` names the file in errors and origins.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Stmt>, ImportError> {
    let tokens = tokenize(text, file)?;
    let mut pos = 0;
    let stmts = parse_block(&tokens, &mut pos, file, None)?;
    Ok(stmts)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Open,
    Close,
    Semi,
}

fn tokenize(text: &str, file: &Path) -> Result<Vec<(Tok, usize)>, ImportError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let mut chars = raw.chars().peekable();
        while let Some(&c) = chars.peek() {
            match c {
                '#' => break,
                c if c.is_whitespace() => {
                    chars.next();
                }
                '{' => {
                    chars.next();
                    out.push((Tok::Open, line));
                }
                '}' => {
                    chars.next();
                    out.push((Tok::Close, line));
                }
                ';' => {
                    chars.next();
                    out.push((Tok::Semi, line));
                }
                '"' => {
                    chars.next();
                    let mut s = String::new();
                    let mut closed = false;
                    while let Some(c) = chars.next() {
                        match c {
                            '"' => {
                                closed = true;
                                break;
                            }
                            '\\' => {
                                if let Some(n) = chars.next() {
                                    s.push(n);
                                }
                            }
                            c => s.push(c),
                        }
                    }
                    if !closed {
                        return Err(ImportError::new(
                            file,
                            line,
                            "unterminated string (a `\"` is missing)",
                        ));
                    }
                    out.push((Tok::Word(s), line));
                }
                _ => {
                    let mut s = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || "{};#\"".contains(c) {
                            break;
                        }
                        s.push(c);
                        chars.next();
                    }
                    out.push((Tok::Word(s), line));
                }
            }
        }
    }
    Ok(out)
}

fn parse_block(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    file: &Path,
    opened_at: Option<usize>,
) -> Result<Vec<Stmt>, ImportError> {
    let mut stmts = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut first_line = 0;
    while *pos < toks.len() {
        let (tok, line) = &toks[*pos];
        *pos += 1;
        match tok {
            Tok::Word(w) => {
                if words.is_empty() {
                    first_line = *line;
                }
                words.push(w.clone());
            }
            Tok::Semi => {
                if !words.is_empty() {
                    stmts.push(Stmt {
                        words: std::mem::take(&mut words),
                        block: None,
                        at: Origin::new(file, first_line),
                    });
                }
            }
            Tok::Open => {
                if words.is_empty() {
                    return Err(ImportError::new(file, *line, "`{` without a section name"));
                }
                let start = first_line;
                let block = parse_block(toks, pos, file, Some(*line))?;
                stmts.push(Stmt {
                    words: std::mem::take(&mut words),
                    block: Some(block),
                    at: Origin::new(file, start),
                });
            }
            Tok::Close => {
                if !words.is_empty() {
                    return Err(ImportError::new(
                        file,
                        first_line,
                        format!("`{}` is missing its terminating `;`", words.join(" ")),
                    ));
                }
                if opened_at.is_none() {
                    return Err(ImportError::new(file, *line, "`}` without a matching `{`"));
                }
                return Ok(stmts);
            }
        }
    }
    if !words.is_empty() {
        return Err(ImportError::new(
            file,
            first_line,
            format!("`{}` is missing its terminating `;`", words.join(" ")),
        ));
    }
    if let Some(open) = opened_at {
        return Err(ImportError::new(
            file,
            open,
            "section opened here is never closed (a `}` is missing)",
        ));
    }
    Ok(stmts)
}

/// A DRBD resource as this host sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DrbdResource {
    pub name: String,
    pub at: Origin,
    /// `/dev/drbdN` (or what `device` says) and its minor number.
    pub device: (String, Origin),
    pub minor: Option<u32>,
    /// Lower-level disk.
    pub disk: (String, Origin),
    /// twinsan's `meta` value: "internal", "/dev/x" or "/dev/x[N]".
    pub meta: (String, Origin),
    pub local_address: (String, Origin),
    pub peer_address: (String, Origin),
    pub peer_host: String,
    /// Mapped `[target.lun.replication]` keys: (key, TOML literal, origin).
    pub replication: Vec<(String, String, Origin)>,
}

/// Net/disk/syncer options twinsan maps, as (DRBD section, DRBD option, twinsan key).
const MAPPED_SPLIT_BRAIN: &[(&str, &str)] = &[
    ("after-sb-0pri", "after_sb_0pri"),
    ("after-sb-1pri", "after_sb_1pri"),
    ("after-sb-2pri", "after_sb_2pri"),
];

/// Interprets the statement tree (includes already expanded) for host `host`.
pub fn resources(
    stmts: &[Stmt],
    host: &str,
) -> Result<(Vec<DrbdResource>, Vec<Warning>), ImportError> {
    let mut warnings = Vec::new();
    let mut common: Vec<&Stmt> = Vec::new();
    let mut out = Vec::new();
    for s in stmts {
        match s.words[0].as_str() {
            "global" => {
                for g in s.block.iter().flatten() {
                    if g.words[0] != "usage-count" {
                        warnings.push(Warning::new(
                            &g.at,
                            format!("global option `{}` has no twinsan equivalent; ignored", g.words[0]),
                        ));
                    }
                }
            }
            "common" => common.extend(s.block.iter().flatten()),
            "resource" => {}
            "include" => {
                return Err(ImportError::at(
                    &s.at,
                    "include was not expanded (internal error: use import::load_drbd)",
                ))
            }
            other => {
                return Err(ImportError::at(
                    &s.at,
                    format!("unknown top-level statement `{other}` (expected global, common, resource or include)"),
                ))
            }
        }
    }
    for s in stmts.iter().filter(|s| s.words[0] == "resource") {
        let Some(body) = &s.block else {
            return Err(ImportError::at(
                &s.at,
                "`resource` needs a `{ ... }` section",
            ));
        };
        let Some(name) = s.words.get(1) else {
            return Err(ImportError::at(&s.at, "`resource` needs a name"));
        };
        out.push(resource(name, &s.at, &common, body, host, &mut warnings)?);
    }
    Ok((out, warnings))
}

fn value(s: &Stmt, n: usize) -> Result<&str, ImportError> {
    s.words
        .get(n)
        .map(String::as_str)
        .ok_or_else(|| ImportError::at(&s.at, format!("`{}` needs a value", s.words[0])))
}

/// The `host:port` of an `address [af] ip:port` statement.
fn address(s: &Stmt) -> Result<String, ImportError> {
    let v = match s.words.len() {
        2 => &s.words[1],
        3 => {
            if !["ipv4", "ipv6"].contains(&s.words[1].as_str()) {
                return Err(ImportError::at(
                    &s.at,
                    format!(
                        "address family `{}` is not supported (ipv4 or ipv6)",
                        s.words[1]
                    ),
                ));
            }
            &s.words[2]
        }
        _ => {
            return Err(ImportError::at(
                &s.at,
                "`address` needs [ipv4|ipv6] ADDRESS:PORT",
            ))
        }
    };
    let normalized = if s.words.len() == 3 && s.words[1] == "ipv6" && !v.starts_with('[') {
        // DRBD writes IPv6 as `ipv6 [fd00::1]:7789`; accept the bracket-less form too.
        match v.rsplit_once(':') {
            Some((ip, port)) => format!("[{ip}]:{port}"),
            None => v.clone(),
        }
    } else {
        v.clone()
    };
    if normalized.parse::<std::net::SocketAddr>().is_err() {
        return Err(ImportError::at(
            &s.at,
            format!("`{v}` is not an ADDRESS:PORT (twinsan needs numeric addresses)"),
        ));
    }
    Ok(normalized)
}

#[derive(Default)]
struct HostValues {
    device: Option<(String, Option<u32>, Origin)>,
    disk: Option<(String, Origin)>,
    meta: Option<(String, Origin)>,
    address: Option<(String, Origin)>,
}

fn host_values(stmts: &[Stmt], v: &mut HostValues) -> Result<(), ImportError> {
    for s in stmts {
        let max_words = match s.words[0].as_str() {
            "device" => 4,
            "disk" if s.block.is_none() => 2,
            "meta-disk" | "flexible-meta-disk" | "address" => 3,
            _ => usize::MAX,
        };
        let stray_device_word =
            s.words[0] == "device" && s.words.len() > 2 && s.words[2] != "minor";
        if s.words.len() > max_words || stray_device_word {
            return Err(ImportError::at(
                &s.at,
                format!(
                    "`{}` has too many values (`{}`): is a `;` missing?",
                    s.words[0],
                    s.words[1..].join(" ")
                ),
            ));
        }
        match s.words[0].as_str() {
            "device" => {
                // device /dev/drbdN [minor N]; | device minor N;
                let (path, minor) = match s.words.get(1).map(String::as_str) {
                    Some("minor") => {
                        let m = value(s, 2)?;
                        (format!("/dev/drbd{m}"), m.parse().ok())
                    }
                    Some(p) => {
                        let minor = if s.words.get(2).map(String::as_str) == Some("minor") {
                            value(s, 3)?.parse().ok()
                        } else {
                            p.strip_prefix("/dev/drbd").and_then(|n| n.parse().ok())
                        };
                        (p.to_string(), minor)
                    }
                    None => return Err(ImportError::at(&s.at, "`device` needs a value")),
                };
                v.device = Some((path, minor, s.at.clone()));
            }
            "disk" if s.block.is_none() => v.disk = Some((value(s, 1)?.to_string(), s.at.clone())),
            "meta-disk" | "flexible-meta-disk" => {
                let m = value(s, 1)?;
                let meta = if m == "internal" {
                    "internal".to_string()
                } else if let Some(idx) = s.words.get(2) {
                    // DRBD 8.3 form: `meta-disk /dev/x [N];` with the index as its own word.
                    let idx = idx.trim_start_matches('[').trim_end_matches(']');
                    format!("{m}[{idx}]")
                } else {
                    m.to_string()
                };
                if let Err(e) = crate::config::parse_meta(&meta) {
                    return Err(ImportError::at(&s.at, format!("meta-disk: {e}")));
                }
                v.meta = Some((meta, s.at.clone()));
            }
            "address" => v.address = Some((address(s)?, s.at.clone())),
            "node-id" => {}
            "volume" => {
                let n = value(s, 1)?;
                if n != "0" {
                    return Err(ImportError::at(
                        &s.at,
                        format!("volume {n}: twinsan maps one volume per resource (volume 0); split the resource"),
                    ));
                }
                host_values(s.block.as_deref().unwrap_or(&[]), v)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn resource(
    name: &str,
    at: &Origin,
    common: &[&Stmt],
    body: &[Stmt],
    host: &str,
    warnings: &mut Vec<Warning>,
) -> Result<DrbdResource, ImportError> {
    // Resource-level defaults, then this host's section on top.
    let mut mine = HostValues::default();
    host_values(body, &mut mine)?;
    let mut local = HostValues::default();
    let mut peer = HostValues::default();
    let mut peer_name = None;
    let mut hosts = Vec::new();
    let ons = || body.iter().filter(|s| s.words[0] == "on");
    if !ons().any(|s| s.words[1..].iter().any(|n| n == host)) {
        let names: Vec<String> = ons().map(|s| s.words[1..].join(" ")).collect();
        return Err(ImportError::at(
            at,
            format!(
                "resource {name} has no `on {host}` section (hosts: {}); is --host right?",
                names.join(", ")
            ),
        ));
    }
    for s in ons() {
        let names = &s.words[1..];
        if names.is_empty() {
            return Err(ImportError::at(&s.at, "`on` needs a host name"));
        }
        hosts.push(names.join(" "));
        let block = s.block.as_deref().unwrap_or(&[]);
        if names.iter().any(|n| n == host) {
            host_values(block, &mut local)?;
        } else {
            if peer_name.is_some() {
                return Err(ImportError::at(
                    &s.at,
                    format!(
                        "resource {name}: more than one peer host; twinsan pairs exactly two hosts"
                    ),
                ));
            }
            peer_name = Some(names.join(" "));
            host_values(block, &mut peer)?;
        }
    }
    if !hosts.iter().any(|h| h.split(' ').any(|n| n == host)) {
        return Err(ImportError::at(
            at,
            format!(
                "resource {name} has no `on {host}` section (hosts: {}); is --host right?",
                hosts.join(", ")
            ),
        ));
    }
    let peer_host = peer_name.ok_or_else(|| {
        ImportError::at(
            at,
            format!("resource {name} has no section for the peer host"),
        )
    })?;
    let pick = |a: Option<(String, Origin)>, b: Option<(String, Origin)>| a.or(b);
    let need = |v: Option<(String, Origin)>, what: &str| {
        v.ok_or_else(|| {
            ImportError::at(at, format!("resource {name}: no `{what}` for host {host}"))
        })
    };
    let device = local.device.or(mine.device.clone());
    let (device_path, minor, device_at) = device.ok_or_else(|| {
        ImportError::at(at, format!("resource {name}: no `device` for host {host}"))
    })?;
    let disk = need(pick(local.disk, mine.disk.clone()), "disk")?;
    let meta = pick(local.meta, mine.meta.clone()).ok_or_else(|| {
        ImportError::at(
            at,
            format!("resource {name}: no `meta-disk` for host {host}"),
        )
    })?;
    let local_address = need(local.address, "address")?;
    let peer_address = peer.address.ok_or_else(|| {
        ImportError::at(
            at,
            format!("resource {name}: no `address` for peer {peer_host}"),
        )
    })?;

    let mut replication = vec![
        ("name".to_string(), toml_str(name), at.clone()),
        (
            "listen".into(),
            toml_str(&local_address.0),
            local_address.1.clone(),
        ),
        (
            "peer".into(),
            toml_str(&peer_address.0),
            peer_address.1.clone(),
        ),
        ("meta".into(), toml_str(&meta.0), meta.1.clone()),
    ];
    // Sections: common first, then the resource's own (later values win).
    let mut options: Vec<(String, String, Origin)> = Vec::new();
    let mut protocol: Option<(String, Origin)> = None;
    for s in common.iter().copied().chain(body.iter()) {
        match s.words[0].as_str() {
            "protocol" => protocol = Some((value(s, 1)?.to_string(), s.at.clone())),
            "net" | "disk" | "syncer" | "startup" | "handlers" | "options" if s.block.is_some() => {
                for o in s.block.as_deref().unwrap_or(&[]) {
                    if o.words[0] == "protocol" {
                        protocol = Some((value(o, 1)?.to_string(), o.at.clone()));
                        continue;
                    }
                    let v = o.words.get(1).cloned().unwrap_or_default();
                    options.retain(|(k, _, _)| k != &o.words[0]);
                    options.push((o.words[0].clone(), v, o.at.clone()));
                }
            }
            "on" | "device" | "disk" | "meta-disk" | "flexible-meta-disk" | "address"
            | "volume" | "connection-mesh" | "floating" => {}
            other if s.block.is_none() || other == "connection" => {
                warnings.push(Warning::new(
                    &s.at,
                    format!("resource {name}: `{other}` has no twinsan equivalent; ignored"),
                ));
            }
            other => warnings.push(Warning::new(
                &s.at,
                format!("resource {name}: section `{other}` has no twinsan equivalent; ignored"),
            )),
        }
    }
    match &protocol {
        Some((p, _)) if p.eq_ignore_ascii_case("C") => {}
        Some((p, o)) => {
            return Err(ImportError::at(
                o,
                format!(
                "resource {name}: protocol {p}: twinsan replicates synchronously (protocol C) only"
            ),
            ))
        }
        None => {} // DRBD's default is C.
    }
    for (key, v, o) in &options {
        let mapped: Option<(&str, String)> = match key.as_str() {
            "shared-secret" => Some(("secret", toml_str(v))),
            k if MAPPED_SPLIT_BRAIN.iter().any(|(d, _)| *d == k) => {
                let tk = MAPPED_SPLIT_BRAIN
                    .iter()
                    .find(|(d, _)| *d == k)
                    .map(|(_, t)| *t)
                    .unwrap_or(k);
                let allowed = match tk {
                    "after_sb_0pri" => crate::config::SPLIT_BRAIN_POLICIES_0PRI,
                    "after_sb_1pri" => crate::config::SPLIT_BRAIN_POLICIES_1PRI,
                    _ => crate::config::SPLIT_BRAIN_POLICIES_2PRI,
                };
                if allowed.contains(&v.as_str()) {
                    Some((tk, toml_str(v)))
                } else {
                    warnings.push(Warning::new(
                        o,
                        format!("resource {name}: {key} {v} is not supported (twinsan: {}); twinsan's default applies", allowed.join(", ")),
                    ));
                    None
                }
            }
            "rate" | "resync-rate" | "c-max-rate" => {
                let bytes = drbd_rate(v).map_err(|m| ImportError::at(o, format!("{key}: {m}")))?;
                if bytes < 1 << 20 {
                    warnings.push(Warning::new(
                        o,
                        format!(
                            "resource {name}: {key} {v} is below twinsan's minimum 1M; using 1M"
                        ),
                    ));
                    Some(("resync_rate", "\"1M\"".into()))
                } else {
                    Some(("resync_rate", bytes.to_string()))
                }
            }
            "verify-alg" => match v.as_str() {
                "crc32c" => Some(("verify_digest", "\"crc32c\"".into())),
                "sha256" => Some(("verify_digest", "\"sha256\"".into())),
                other => {
                    warnings.push(Warning::new(o, format!("resource {name}: verify-alg {other}: twinsan verifies with crc32c or sha256; using sha256 (online verify is run by twinsan on both hosts, so the choice only needs to match between them)")));
                    Some(("verify_digest", "\"sha256\"".into()))
                }
            },
            "fencing" => match v.as_str() {
                "dont-care" => Some(("fencing", "\"dont-care\"".into())),
                "resource-and-stonith" => Some(("fencing", "\"suspend-io\"".into())),
                "resource-only" => {
                    warnings.push(Warning::new(o, format!("resource {name}: fencing resource-only relies on a fence-peer handler twinsan does not run; mapped to dont-care")));
                    Some(("fencing", "\"dont-care\"".into()))
                }
                other => {
                    return Err(ImportError::at(
                        o,
                        format!("fencing `{other}` is not a DRBD fencing policy"),
                    ))
                }
            },
            "ping-int" => Some((
                "ping_interval_secs",
                v.parse::<u64>()
                    .map_err(|_| ImportError::at(o, format!("ping-int `{v}` is not a number")))?
                    .to_string(),
            )),
            "al-extents" => {
                warnings.push(Warning::new(o, format!("resource {name}: al-extents {v}: twinsan keeps DRBD's activity-log size from the metadata; nothing to set")));
                None
            }
            "on-io-error" => {
                if v != "detach" {
                    warnings.push(Warning::new(o, format!("resource {name}: on-io-error {v}: twinsan fails the I/O to the initiator and keeps the peer in sync (like detach); `{v}` is not mapped")));
                }
                None
            }
            "cram-hmac-alg" => {
                if v != "sha1" && v != "sha256" {
                    warnings.push(Warning::new(o, format!("resource {name}: cram-hmac-alg {v}: twinsan always authenticates the peer link with HMAC-SHA256")));
                }
                None
            }
            _ => {
                warnings.push(Warning::new(
                    o,
                    format!(
                        "resource {name}: option `{key}{}` has no twinsan equivalent; ignored",
                        if v.is_empty() {
                            String::new()
                        } else {
                            format!(" {v}")
                        }
                    ),
                ));
                None
            }
        };
        if let Some((tk, lit)) = mapped {
            replication.retain(|(k, _, _)| k != tk);
            replication.push((tk.to_string(), lit, o.clone()));
        }
    }
    if !replication.iter().any(|(k, _, _)| k == "secret") {
        return Err(ImportError::at(
            at,
            format!("resource {name}: no net {{ shared-secret ...; }}: twinsan authenticates the replication link and needs a shared secret of at least {} bytes (add one to drbd.conf or to the generated file)", crate::config::MIN_SECRET_LEN),
        ));
    }
    Ok(DrbdResource {
        name: name.to_string(),
        at: at.clone(),
        device: (device_path, device_at),
        minor,
        disk,
        meta,
        local_address,
        peer_address,
        peer_host,
        replication,
    })
}

/// A DRBD rate: number with optional K/M/G suffix (DRBD's unit is KiB/s when none).
fn drbd_rate(v: &str) -> Result<u64, String> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{v}` is not a rate"))?;
    let shift = match unit {
        "" | "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        _ => return Err(format!("`{v}`: unknown unit `{unit}` (K, M or G)")),
    };
    Ok(n << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
global { usage-count no; }
common {
  protocol C;
  net { cram-hmac-alg sha1; shared-secret "common-secret"; after-sb-0pri discard-zero-changes; }
  syncer { rate 33M; al-extents 257; }
}
resource r1 {
  device /dev/drbd1;
  meta-disk internal;
  net { after-sb-1pri consensus; after-sb-2pri disconnect; rr-conflict disconnect; }
  disk { on-io-error detach; fencing resource-and-stonith; }
  syncer { rate 100M; verify-alg sha1; }
  startup { degr-wfc-timeout 120; }
  handlers { fence-peer "/usr/lib/drbd/crm-fence-peer.sh"; }
  on xen1 { disk /dev/sdb1; address 10.10.1.1:7789; }
  on xen2 { disk /dev/sdb1; address 10.10.1.2:7789; }
}
"#;

    #[test]
    fn maps_resource_for_host() {
        let stmts = parse(CONF, Path::new("/etc/drbd.conf")).unwrap();
        let (res, warnings) = resources(&stmts, "xen2").unwrap();
        let r = &res[0];
        assert_eq!(r.device.0, "/dev/drbd1");
        assert_eq!(r.minor, Some(1));
        assert_eq!(r.disk.0, "/dev/sdb1");
        assert_eq!(r.local_address.0, "10.10.1.2:7789");
        assert_eq!(r.peer_address.0, "10.10.1.1:7789");
        let get = |k: &str| {
            r.replication
                .iter()
                .find(|(x, _, _)| x == k)
                .map(|(_, v, o)| (v.clone(), o.line))
        };
        assert_eq!(get("secret"), Some(("\"common-secret\"".into(), 5)));
        assert_eq!(get("resync_rate"), Some(((100u64 << 20).to_string(), 13)));
        assert_eq!(get("fencing").unwrap().0, "\"suspend-io\"");
        assert_eq!(get("after_sb_1pri").unwrap().0, "\"consensus\"");
        let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
        for w in [
            "rr-conflict",
            "degr-wfc-timeout",
            "fence-peer",
            "al-extents",
            "verify-alg sha1",
        ] {
            assert!(
                text.iter().any(|t| t.contains(w)),
                "no warning for {w}: {text:?}"
            );
        }
    }

    #[test]
    fn broken_files_name_the_line() {
        let e = parse("resource r {\n  device /dev/drbd0\n}\n", Path::new("x.res")).unwrap_err();
        assert_eq!(
            (e.line, e.message.contains("terminating `;`")),
            (2, true),
            "{e}"
        );
        let e = parse("resource r {\n  on a { disk /x; }\n", Path::new("x.res")).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = parse(
            "resource r { on a { address \"1.2.3.4:1; } }\n",
            Path::new("x.res"),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("x.res:1: unterminated"), "{e}");
        let stmts = parse(&CONF.replace("protocol C", "protocol A"), Path::new("d")).unwrap();
        let e = resources(&stmts, "xen1").unwrap_err();
        assert!(e.message.contains("protocol A"), "{e}");
        let e = resources(&parse(CONF, Path::new("d")).unwrap(), "xen3").unwrap_err();
        assert!(e.message.contains("no `on xen3`"), "{e}");
    }

    #[test]
    fn meta_disk_forms() {
        let conf = CONF.replace("meta-disk internal;", "meta-disk /dev/sdc1[2];");
        let (res, _) = resources(&parse(&conf, Path::new("d")).unwrap(), "xen1").unwrap();
        assert_eq!(res[0].meta.0, "/dev/sdc1[2]");
        let conf = CONF.replace("meta-disk internal;", "meta-disk /dev/sdc1 [3];");
        let (res, _) = resources(&parse(&conf, Path::new("d")).unwrap(), "xen1").unwrap();
        assert_eq!(res[0].meta.0, "/dev/sdc1[3]");
    }
}
