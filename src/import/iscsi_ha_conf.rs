//! iscsi-ha.conf (the iscsi-ha add-on for XenServer/XCP-ng pools): shell assignments
//! `KEY=value` / `KEY="value"`, `#` comments. Mapped to twinsan's `[ha]` table (contract
//! shared with the HA daemon): the VIP (DRBD_VIRTUAL_IP / _MASK / DRBD_INTERFACE) and the
//! mail alert settings. iscsi-ha follows the XenServer pool master, hence `source = "xapi"`.

use super::drbd_conf::DrbdResource;
use super::{toml_str, ImportError, Origin, Warning};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// UDP port twinsan's HA heartbeat uses on the replication link (none existed before).
pub const HA_HEARTBEAT_PORT: u16 = 7799;

#[derive(Debug, Clone, PartialEq)]
pub struct IscsiHa {
    pub vip: (String, Origin),
    pub prefix: (u8, Origin),
    pub interface: (String, Origin),
    pub resources: Option<(Vec<String>, Origin)>,
    pub values: BTreeMap<String, (String, Origin)>,
}

const KNOWN: &[&str] = &[
    "DRBD_RESOURCES",
    "DRBD_VIRTUAL_IP",
    "DRBD_VIRTUAL_MASK",
    "DRBD_INTERFACE",
    "MAIL_ON",
    "SMTP_SERVER",
    "SMTP_PORT",
    "SMTP_USER",
    "SMTP_PASS",
    "MAIL_FROM",
    "MAIL_TO",
    "MAIL_SUBJECT",
];

fn prefix_of(mask: &str) -> Option<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        return (n <= 32).then_some(n);
    }
    let m: std::net::Ipv4Addr = mask.parse().ok()?;
    let bits = u32::from(m);
    (bits.leading_ones() + bits.trailing_zeros() == 32).then_some(bits.leading_ones() as u8)
}

/// Parses iscsi-ha.conf.
pub fn parse(text: &str, file: &Path, warnings: &mut Vec<Warning>) -> Result<IscsiHa, ImportError> {
    let mut values = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let at = Origin::new(file, i + 1);
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("export ").unwrap_or(l);
        let Some((k, v)) = l.split_once('=') else {
            return Err(ImportError::at(&at, format!("`{l}` is not KEY=value")));
        };
        let k = k.trim();
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ImportError::at(
                &at,
                format!("`{k}` is not a variable name"),
            ));
        }
        let v = v.trim();
        let v = if let Some(q) = v.strip_prefix('"') {
            q.strip_suffix('"')
                .ok_or_else(|| ImportError::at(&at, "unterminated \" quote"))?
                .to_string()
        } else if let Some(q) = v.strip_prefix('\'') {
            q.strip_suffix('\'')
                .ok_or_else(|| ImportError::at(&at, "unterminated ' quote"))?
                .to_string()
        } else {
            v.split('#').next().unwrap_or("").trim().to_string()
        };
        if !KNOWN.contains(&k) {
            warnings.push(Warning::new(
                &at,
                format!("{k} has no twinsan equivalent; ignored"),
            ));
        }
        values.insert(k.to_string(), (v, at));
    }
    let need = |k: &str| {
        values.get(k).cloned().ok_or_else(|| {
            ImportError::new(
                file,
                0,
                format!("{k} is not set (twinsan needs the VIP, its mask and interface)"),
            )
        })
    };
    let vip = need("DRBD_VIRTUAL_IP")?;
    if vip.0.parse::<std::net::IpAddr>().is_err() {
        return Err(ImportError::at(
            &vip.1,
            format!("DRBD_VIRTUAL_IP `{}` is not an IP address", vip.0),
        ));
    }
    let mask = need("DRBD_VIRTUAL_MASK")?;
    let prefix = prefix_of(&mask.0).ok_or_else(|| {
        ImportError::at(
            &mask.1,
            format!(
                "DRBD_VIRTUAL_MASK `{}` is not a netmask or prefix length",
                mask.0
            ),
        )
    })?;
    let interface = need("DRBD_INTERFACE")?;
    if interface.0.is_empty() || interface.0.len() > 15 {
        return Err(ImportError::at(
            &interface.1,
            "DRBD_INTERFACE must be an interface name (1..=15 characters)",
        ));
    }
    let resources = values.get("DRBD_RESOURCES").map(|(v, o)| {
        (
            v.split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            o.clone(),
        )
    });
    Ok(IscsiHa {
        vip,
        prefix: (prefix, mask.1),
        interface,
        resources,
        values,
    })
}

/// Renders the `[ha]` tables. The heartbeat runs on the replication link (the DRBD
/// addresses); its secret is derived from the DRBD shared secret so both hosts' imports agree.
pub fn render(
    h: &IscsiHa,
    host: &str,
    link: Option<&DrbdResource>,
    warnings: &mut Vec<Warning>,
) -> Result<String, ImportError> {
    let line = |k: &str, v: String, o: &dyn std::fmt::Display| format!("{k} = {v}  # {o}\n");
    let mut s = String::from("[ha]\n");
    s += &line(
        "source",
        toml_str("xapi"),
        &"iscsi-ha follows the XenServer pool master (pool.conf)",
    );
    s += &line("node", toml_str(host), &"--host");
    let Some(r) = link else {
        return Err(ImportError::new(
            &h.vip.1.file,
            0,
            "iscsi-ha needs the replication link: give --drbd drbd.conf too",
        ));
    };
    if let Some((names, at)) = &h.resources {
        if !names.iter().any(|n| n == &r.name) {
            warnings.push(Warning::new(
                at,
                format!("DRBD_RESOURCES does not list {}", r.name),
            ));
        }
    }
    let ip = |a: &str| {
        a.rsplit_once(':')
            .map(|(ip, _)| ip.to_string())
            .unwrap_or_default()
    };
    s += &line(
        "listen",
        toml_str(&format!("{}:{HA_HEARTBEAT_PORT}", ip(&r.local_address.0))),
        &format!(
            "{} (replication link address, UDP port {HA_HEARTBEAT_PORT} chosen by import)",
            r.local_address.1
        ),
    );
    s += &line(
        "peer",
        toml_str(&format!("{}:{HA_HEARTBEAT_PORT}", ip(&r.peer_address.0))),
        &format!("{} (peer {})", r.peer_address.1, r.peer_host),
    );
    let secret = r
        .replication
        .iter()
        .find(|(k, _, _)| k == "secret")
        .map(|(_, v, o)| (v.clone(), o.clone()));
    let Some((secret, secret_at)) = secret else {
        return Err(ImportError::at(
            &r.at,
            "no DRBD shared-secret to derive the HA secret from",
        ));
    };
    let mut d = Sha256::new();
    d.update(b"twinsan-ha-secret\0");
    d.update(secret.as_bytes());
    s += &line(
        "secret",
        toml_str(&hex::encode(&d.finalize()[..16])),
        &format!("derived from the DRBD shared-secret at {secret_at} (same on both hosts)"),
    );
    s += "\n[[ha.vip]]\n";
    s += &line(
        "address",
        toml_str(&format!("{}/{}", h.vip.0, h.prefix.0)),
        &format!(
            "DRBD_VIRTUAL_IP {} / DRBD_VIRTUAL_MASK {}",
            h.vip.1, h.prefix.1
        ),
    );
    s += &line("interface", toml_str(&h.interface.0), &h.interface.1);
    s += &line("label", toml_str("twinsan"), &"twinsan's VIP label");
    let get = |k: &str| h.values.get(k);
    let mail_on = get("MAIL_ON")
        .map(|(v, _)| v == "1" || v.eq_ignore_ascii_case("yes"))
        .unwrap_or(false);
    if mail_on {
        s += "\n[ha.alerts]\n";
        if let Some((v, o)) = get("SMTP_SERVER") {
            s += &line("smtp_server", toml_str(v), o);
        }
        if let Some((v, o)) = get("SMTP_PORT") {
            let port: u16 = v
                .parse()
                .map_err(|_| ImportError::at(o, format!("SMTP_PORT `{v}` is not a port")))?;
            s += &line("smtp_port", port.to_string(), o);
            let tls = match port {
                465 => "tls",
                587 => "starttls",
                _ => "none",
            };
            s += &line(
                "smtp_tls",
                toml_str(tls),
                &format!("from SMTP_PORT {port} at {o}; check"),
            );
        }
        for (k, tk) in [
            ("SMTP_USER", "smtp_user"),
            ("SMTP_PASS", "smtp_password"),
            ("MAIL_FROM", "from"),
            ("MAIL_SUBJECT", "subject"),
        ] {
            if let Some((v, o)) = get(k) {
                s += &line(tk, toml_str(v), o);
            }
        }
        if let Some((v, o)) = get("MAIL_TO") {
            let list: Vec<String> = v
                .split([',', ' '])
                .filter(|x| !x.is_empty())
                .map(toml_str)
                .collect();
            s += &line("to", format!("[{}]", list.join(", ")), o);
        }
        s += &line(
            "xencenter",
            "true".into(),
            &"iscsi-ha raised alerts in XenCenter too",
        );
    } else if let Some((_, o)) = get("MAIL_ON") {
        s += &format!("# MAIL_ON at {o} is off: no [ha.alerts]\n");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_lines() {
        let text = "# iscsi-ha\nDRBD_RESOURCES=\"iscsi1\"\nDRBD_VIRTUAL_IP=10.10.1.3\nDRBD_VIRTUAL_MASK=255.255.255.0\nDRBD_INTERFACE=xenbr1\nMAIL_ON=1\nFOO=bar\n";
        let mut w = Vec::new();
        let h = parse(text, Path::new("/etc/iscsi-ha/iscsi-ha.conf"), &mut w).unwrap();
        assert_eq!(
            (h.vip.0.as_str(), h.prefix.0, h.interface.0.as_str()),
            ("10.10.1.3", 24, "xenbr1")
        );
        assert_eq!(h.vip.1.line, 3);
        assert!(w[0]
            .to_string()
            .starts_with("/etc/iscsi-ha/iscsi-ha.conf:7: FOO"));
        let e = parse(
            &text.replace("255.255.255.0", "255.0.255.0"),
            Path::new("c"),
            &mut w,
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        let e = parse(
            &text.replace("DRBD_INTERFACE=xenbr1", "DRBD_INTERFACE=\"xenbr1"),
            Path::new("c"),
            &mut w,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "c:5: unterminated \" quote");
    }
}
