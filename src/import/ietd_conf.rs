//! IET's ietd.conf and initiators.allow.
//!
//! ietd.conf: `Target NAME` starts a target; the lines after it (indented by convention)
//! are `Lun N Path=...,Type=fileio|blockio,ScsiId=...,ScsiSN=...,IOMode=wb|wt|ro,
//! BlockSize=N`, `Alias`, `IncomingUser U P`, `OutgoingUser U P` and the iSCSI negotiation
//! keys. User lines before the first Target are discovery authentication.
//! initiators.allow: `TARGET|ALL  initiator[, initiator...]|ALL` where an initiator is an
//! address, a network or an initiator name.
//!
//! IET keyed a LUN's default identity on the target name and LUN number (an MD5, see
//! `scsi::compat`), so the imported LUNs present `identity = "iet"` with the configured
//! ScsiId/ScsiSN when there were any.

use super::{
    toml_str, Entry, ImportError, ImportedLun, ImportedTarget, Negotiation, Origin, Warning,
};
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct IetdImport {
    pub discovery: Vec<Entry>,
    pub targets: Vec<ImportedTarget>,
}

fn credentials(words: &[&str], at: &Origin, key: &str) -> Result<String, ImportError> {
    match words {
        [u, p] => Ok(format!(
            "{{ user = {}, secret = {} }}",
            toml_str(u),
            toml_str(p)
        )),
        _ => Err(ImportError::at(at, format!("`{key}` needs USER PASSWORD"))),
    }
}

/// Parses ietd.conf (and initiators.allow when given) into twinsan targets.
pub fn targets(
    text: &str,
    file: &Path,
    initiators_allow: Option<(&str, &Path)>,
    negotiation: &mut Negotiation,
    warnings: &mut Vec<Warning>,
) -> Result<IetdImport, ImportError> {
    let mut out = IetdImport::default();
    let mut current: Option<ImportedTarget> = None;
    for (i, raw) in text.lines().enumerate() {
        let at = Origin::new(file, i + 1);
        let l = raw.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let mut words = l.split_whitespace();
        let key = words.next().unwrap_or_default();
        let rest: Vec<&str> = words.collect();
        match key.to_ascii_lowercase().as_str() {
            "target" => {
                let [name] = rest[..] else {
                    return Err(ImportError::at(&at, "`Target` needs exactly one name"));
                };
                if let Err(m) = crate::config::check_iscsi_name(name) {
                    return Err(ImportError::at(&at, format!("Target: {m}")));
                }
                if out
                    .targets
                    .iter()
                    .chain(current.iter())
                    .any(|t| t.iqn == name)
                {
                    return Err(ImportError::at(
                        &at,
                        format!("target {name} is defined twice"),
                    ));
                }
                if let Some(t) = current.take() {
                    out.targets.push(t);
                }
                current = Some(ImportedTarget {
                    iqn: name.to_string(),
                    at,
                    entries: Vec::new(),
                    luns: Vec::new(),
                });
            }
            "incominguser" | "outgoinguser" => {
                let tk = if key.eq_ignore_ascii_case("incominguser") {
                    "chap"
                } else {
                    "mutual_chap"
                };
                let creds = credentials(&rest, &at, key)?;
                let list = match current.as_mut() {
                    Some(t) => &mut t.entries,
                    None => &mut out.discovery,
                };
                if list.iter().any(|e| e.key == tk) {
                    warnings.push(Warning::new(
                        &at,
                        format!(
                            "twinsan has one {key} account per target; this one is not imported"
                        ),
                    ));
                } else {
                    list.push(Entry::new(tk, creds, &at));
                }
            }
            "lun" => {
                let Some(t) = current.as_mut() else {
                    return Err(ImportError::at(&at, "`Lun` before any `Target`"));
                };
                let (Some(n), Some(_)) = (rest.first(), rest.get(1)) else {
                    return Err(ImportError::at(
                        &at,
                        "`Lun` needs a number and Path=...[,Type=...]",
                    ));
                };
                let number: u64 = n.parse().ok().filter(|&n| n <= 16383).ok_or_else(|| {
                    ImportError::at(&at, format!("Lun `{n}` is not a number in 0..=16383"))
                })?;
                if t.luns.iter().any(|l| l.number == number) {
                    return Err(ImportError::at(
                        &at,
                        format!("Lun {number} is defined twice in target {}", t.iqn),
                    ));
                }
                let mut path = None;
                let mut entries = vec![Entry::new(
                    "identity",
                    toml_str("iet"),
                    "present the disk exactly as IET did (INQUIRY, VPD 0x80/0x83)",
                )];
                for p in rest[1..].join("").split(',').filter(|p| !p.is_empty()) {
                    let Some((k, v)) = p.split_once('=') else {
                        return Err(ImportError::at(
                            &at,
                            format!("Lun parameter `{p}` is not KEY=VALUE"),
                        ));
                    };
                    match k.to_ascii_lowercase().as_str() {
                        "path" => path = Some(v.to_string()),
                        "type" => match v.to_ascii_lowercase().as_str() {
                            "fileio" | "blockio" => {}
                            other => return Err(ImportError::at(&at, format!("Type={other}: twinsan serves files and block devices (fileio, blockio)"))),
                        },
                        "scsiid" => {
                            if v.is_empty() || v.len() > crate::scsi::compat::IET_ID_LEN {
                                return Err(ImportError::at(&at, format!("ScsiId `{v}` must be 1..=16 characters (IET's limit)")));
                            }
                            entries.push(Entry::new("scsi_id", toml_str(v), &at));
                        }
                        "scsisn" => {
                            if v.is_empty() || v.len() > crate::scsi::compat::IET_SN_LEN || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                                return Err(ImportError::at(&at, format!("ScsiSN `{v}` must be 1..=32 printable characters (IET's limit)")));
                            }
                            entries.push(Entry::new("scsi_sn", toml_str(v), &at));
                        }
                        "iomode" => match v.to_ascii_lowercase().as_str() {
                            "ro" => entries.push(Entry::new("read_only", "true".into(), &at)),
                            "wt" => entries.push(Entry::new("write_cache", "false".into(), &at)),
                            "wb" => entries.push(Entry::new("write_cache", "true".into(), &at)),
                            other => return Err(ImportError::at(&at, format!("IOMode={other} is not wb, wt or ro"))),
                        },
                        "blocksize" => match v {
                            "512" | "4096" => entries.push(Entry::new("block_size", v.to_string(), &at)),
                            _ => return Err(ImportError::at(&at, format!("BlockSize={v}: twinsan serves 512 or 4096 byte blocks"))),
                        },
                        other => warnings.push(Warning::new(&at, format!("Lun parameter `{other}` has no twinsan equivalent; ignored"))),
                    }
                }
                let path = path.ok_or_else(|| ImportError::at(&at, "Lun needs Path=..."))?;
                t.luns.push(ImportedLun {
                    number,
                    number_origin: at.to_string(),
                    path,
                    at,
                    entries,
                });
            }
            "alias" => {
                let Some(t) = current.as_mut() else {
                    return Err(ImportError::at(&at, "`Alias` before any `Target`"));
                };
                t.entries
                    .push(Entry::new("alias", toml_str(&rest.join(" ")), &at));
            }
            _ => {
                let value = rest.join(" ");
                if !negotiation.map(key, &value, &at, warnings)? {
                    warnings.push(Warning::new(
                        &at,
                        format!("`{key}` has no twinsan equivalent; ignored"),
                    ));
                }
            }
        }
    }
    if let Some(t) = current.take() {
        out.targets.push(t);
    }
    for t in &out.targets {
        if t.luns.is_empty() {
            warnings.push(Warning::new(
                &t.at,
                format!("target {} has no Lun; not imported", t.iqn),
            ));
        }
    }
    out.targets.retain(|t| !t.luns.is_empty());
    for t in &mut out.targets {
        t.luns.sort_by_key(|l| l.number);
    }
    if let Some((text, file)) = initiators_allow {
        apply_allow(text, file, &mut out.targets, warnings)?;
    }
    Ok(out)
}

/// initiators.allow: initiator names become `allowed_initiators`; addresses and networks
/// cannot be expressed in twinsan (warned).
fn apply_allow(
    text: &str,
    file: &Path,
    targets: &mut [ImportedTarget],
    warnings: &mut Vec<Warning>,
) -> Result<(), ImportError> {
    for (i, raw) in text.lines().enumerate() {
        let at = Origin::new(file, i + 1);
        let l = raw.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let (target, list) = l
            .split_once(char::is_whitespace)
            .ok_or_else(|| ImportError::at(&at, "expected `TARGET|ALL INITIATOR[, ...]|ALL`"))?;
        let list: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if list.is_empty() {
            return Err(ImportError::at(&at, "no initiators listed"));
        }
        let matching: Vec<usize> = targets
            .iter()
            .enumerate()
            .filter(|(_, t)| target == "ALL" || t.iqn == target)
            .map(|(i, _)| i)
            .collect();
        if matching.is_empty() {
            warnings.push(Warning::new(
                &at,
                format!("{target} is not a target of ietd.conf; line ignored"),
            ));
            continue;
        }
        if list == ["ALL"] {
            continue;
        }
        let mut names = Vec::new();
        for item in list {
            let lower = item.to_ascii_lowercase();
            if lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa.") {
                if let Err(m) = crate::config::check_iscsi_name(item) {
                    return Err(ImportError::at(&at, m));
                }
                names.push(item.to_string());
            } else {
                warnings.push(Warning::new(&at, format!("{item}: twinsan filters by initiator name, not address; use a firewall for address rules")));
            }
        }
        if names.is_empty() {
            continue;
        }
        for i in matching {
            let t = &mut targets[i];
            let mut all: Vec<String> = Vec::new();
            if let Some(prev) = t.entries.iter().position(|e| e.key == "allowed_initiators") {
                let e = t.entries.remove(prev);
                all.push(
                    e.value
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                );
            }
            all.extend(names.iter().map(|n| toml_str(n)));
            t.entries.push(Entry::new(
                "allowed_initiators",
                format!("[{}]", all.join(", ")),
                &at,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "IncomingUser disco discosecret12\n\
Target iqn.2001-04.com.example:sr1\n\
    IncomingUser xen xensecret1234\n\
    OutgoingUser tgt targetsecret12\n\
    Lun 0 Path=/dev/drbd0,Type=blockio,ScsiId=sr1lun0,ScsiSN=SN-SR1-0\n\
    Lun 3 Path=/srv/disk3.img,Type=fileio,IOMode=wt\n\
    Alias storage one\n\
    HeaderDigest None,CRC32C\n\
    MaxConnections 1\n\
    InitialR2T No\n\
    MaxRecvDataSegmentLength 131072\n";

    #[test]
    fn maps_targets_luns_and_allow() {
        let mut w = Vec::new();
        let mut n = Negotiation::default();
        let allow =
            "ALL 10.0.0.0/24\niqn.2001-04.com.example:sr1 iqn.2026-01.com.xen:host1, 10.1.1.1\n";
        let r = targets(
            CONF,
            Path::new("/etc/ietd.conf"),
            Some((allow, Path::new("/etc/initiators.allow"))),
            &mut n,
            &mut w,
        )
        .unwrap();
        assert_eq!(r.discovery[0].key, "chap");
        let t = &r.targets[0];
        assert_eq!(t.luns.len(), 2);
        assert!(t.luns[0]
            .entries
            .iter()
            .any(|e| e.key == "scsi_sn" && e.value == "\"SN-SR1-0\""));
        assert!(t.luns[1]
            .entries
            .iter()
            .any(|e| e.key == "write_cache" && e.value == "false"));
        assert!(
            t.entries
                .iter()
                .any(|e| e.key == "allowed_initiators"
                    && e.value == "[\"iqn.2026-01.com.xen:host1\"]")
        );
        assert!(n
            .entries
            .iter()
            .any(|e| e.key == "header_digest" && e.value == "[\"None\", \"CRC32C\"]"));
        assert!(n
            .entries
            .iter()
            .any(|e| e.key == "initial_r2t" && e.value == "false"));
        assert!(w.iter().any(|w| w.message.contains("10.0.0.0/24")));
    }

    #[test]
    fn broken_lines_are_named() {
        let mut n = Negotiation::default();
        let e = targets(
            &CONF.replace("Lun 3 Path", "Lun x Path"),
            Path::new("/etc/ietd.conf"),
            None,
            &mut n,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        let e = targets(
            &CONF.replace("Type=fileio", "Type=nullio"),
            Path::new("i"),
            None,
            &mut n,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(e.message.contains("nullio"), "{e}");
        let e = targets(
            "Lun 0 Path=/x\n",
            Path::new("i"),
            None,
            &mut n,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "i:1: `Lun` before any `Target`");
        let e = targets(
            &CONF.replace(
                "MaxRecvDataSegmentLength 131072",
                "MaxRecvDataSegmentLength lots",
            ),
            Path::new("i"),
            None,
            &mut Negotiation::default(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.line, 11, "{e}");
    }
}
