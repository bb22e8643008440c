//! Stable SCSI identity for each LUN (INQUIRY, VPD 0x80 serial, VPD 0x83 designators).
//!
//! XenServer keys an SR on the VPD 0x83 designator, so identity must never change across
//! restarts or failovers, and two hosts configured alike must present the same bytes. Values
//! come from the configuration when given. Otherwise twinsan derives them once from the target
//! IQN and LUN number (never from paths, ordering or process state) and persists them in
//! `<data_dir>/identity.toml`; from then on the persisted value wins, so a later change in the
//! derivation can never alter an existing disk's identity.

use crate::config::{parse_naa, IdentityMode, LunConfig, TargetConfig};
use crate::scsi::compat::{self, CompatIdentity};
use crate::scsi::LunIdentity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const DEFAULT_VENDOR: &str = "TWINSAN";
pub const DEFAULT_PRODUCT: &str = "TWINSAN-DISK";
pub const DEFAULT_REVISION: &str = "0001";
const FILE_NAME: &str = "identity.toml";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity file {file}: {message}")]
    Corrupt { file: PathBuf, message: String },
    #[error("cannot write identity file {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct IdentityFile {
    #[serde(default, rename = "lun")]
    luns: Vec<PersistedIdentity>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PersistedIdentity {
    target: String,
    number: u64,
    serial: String,
    naa: String,
}

/// The persisted identities under a data directory.
pub struct IdentityStore {
    file: PathBuf,
    state: IdentityFile,
}

impl IdentityStore {
    pub fn open(data_dir: &Path) -> Result<IdentityStore, IdentityError> {
        let file = data_dir.join(FILE_NAME);
        let state = match std::fs::read_to_string(&file) {
            Ok(text) => toml::from_str(&text).map_err(|e| IdentityError::Corrupt {
                file: file.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IdentityFile::default(),
            Err(e) => {
                return Err(IdentityError::Corrupt {
                    file,
                    message: e.to_string(),
                })
            }
        };
        Ok(IdentityStore { file, state })
    }

    /// Resolves the identity of one LUN, persisting derived values that were not stored yet.
    pub fn resolve(
        &mut self,
        target: &TargetConfig,
        lun: &LunConfig,
    ) -> Result<LunIdentity, IdentityError> {
        if lun.identity != IdentityMode::Twinsan {
            return Ok(compat_identity(target, lun));
        }
        let key_target = target.iqn.to_ascii_lowercase();
        let stored = self
            .state
            .luns
            .iter()
            .find(|p| p.target == key_target && p.number == lun.number)
            .cloned();
        let stored = match stored {
            Some(s) => s,
            None => {
                let (naa, serial) = derive(&key_target, lun.number);
                let p = PersistedIdentity {
                    target: key_target,
                    number: lun.number,
                    serial,
                    naa: hex::encode(naa),
                };
                self.state.luns.push(p.clone());
                self.save()?;
                tracing::info!(target = %target.iqn, lun = lun.number, naa = %p.naa, serial = %p.serial,
                    "generated SCSI identity (persisted in {})", self.file.display());
                p
            }
        };
        let naa = match &lun.naa {
            Some(s) => parse_naa(s),
            None => parse_naa(&stored.naa),
        }
        .map_err(|message| IdentityError::Corrupt {
            file: self.file.clone(),
            message,
        })?;
        let serial = lun.serial.clone().unwrap_or(stored.serial);
        Ok(LunIdentity {
            vendor: lun.vendor.clone().unwrap_or_else(|| DEFAULT_VENDOR.into()),
            product: lun
                .product
                .clone()
                .unwrap_or_else(|| DEFAULT_PRODUCT.into()),
            revision: lun
                .revision
                .clone()
                .unwrap_or_else(|| DEFAULT_REVISION.into()),
            t10_vendor_specific: lun
                .t10_vendor_specific
                .clone()
                .unwrap_or_else(|| serial.clone()),
            serial,
            naa,
            target_port_name: format!("{},t,0x{:04x}", target.iqn, target.tpgt),
            relative_port: 1,
            port_group: None,
            compat: None,
        })
    }

    fn save(&self) -> Result<(), IdentityError> {
        let werr = |source| IdentityError::Write {
            file: self.file.clone(),
            source,
        };
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let text = format!(
            "# SCSI identities twinsan generated; initiators (XenServer SRs) key on them. Do not edit.\n{}",
            toml::to_string(&self.state).expect("identity file serializes")
        );
        let tmp = self.file.with_extension("toml.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(text.as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, &self.file).map_err(werr)?;
        if let Some(dir) = self.file.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// The identity tgt or IET presented for this LUN: nothing derived from twinsan's own
/// scheme and nothing persisted, since the configuration (tid, LUN, scsi_id, scsi_sn)
/// determines it completely.
fn compat_identity(target: &TargetConfig, lun: &LunConfig) -> LunIdentity {
    let (compat, revision) = match lun.identity {
        IdentityMode::Tgt => {
            let tid = lun.tgt_tid.unwrap_or(1);
            (
                CompatIdentity::Tgt {
                    scsi_id: lun
                        .scsi_id
                        .clone()
                        .unwrap_or_else(|| compat::tgt_default_scsi_id(tid, lun.number)),
                    scsi_sn: lun
                        .scsi_sn
                        .clone()
                        .unwrap_or_else(|| compat::tgt_default_scsi_sn(tid, lun.number)),
                    numeric_id: (u64::from(tid) << 32) | lun.number,
                },
                "0001",
            )
        }
        _ => {
            let scsi_id = match &lun.scsi_id {
                Some(text) => compat::iet_scsi_id_from_text(text),
                None => compat::iet_default_scsi_id(&target.iqn, lun.number as u32),
            };
            let scsi_sn = lun
                .scsi_sn
                .clone()
                .unwrap_or_else(|| compat::iet_default_scsi_sn(&scsi_id));
            (CompatIdentity::Iet { scsi_id, scsi_sn }, "0")
        }
    };
    let naa = match &compat {
        CompatIdentity::Tgt { numeric_id, .. } => {
            let mut b = numeric_id.to_be_bytes();
            b[0] |= 0x30;
            b.to_vec()
        }
        CompatIdentity::Iet { .. } => Vec::new(),
    };
    LunIdentity {
        vendor: lun.vendor.clone().unwrap_or_else(|| "IET".into()),
        product: lun.product.clone().unwrap_or_else(|| "VIRTUAL-DISK".into()),
        revision: lun.revision.clone().unwrap_or_else(|| revision.into()),
        serial: compat.serial().to_string(),
        naa,
        t10_vendor_specific: String::new(),
        target_port_name: format!("{},t,0x{:04x}", target.iqn, target.tpgt),
        relative_port: 1,
        port_group: None,
        compat: Some(compat),
    }
}

/// NAA 3 (locally assigned, SPC-4 §7.8.6.6.3) and a 16-hex-digit serial from IQN and LUN.
fn derive(target_lower: &str, number: u64) -> ([u8; 8], String) {
    let mut h = Sha256::new();
    h.update(b"twinsan-identity-v1\0");
    h.update(target_lower.as_bytes());
    h.update(b"\0");
    h.update(number.to_be_bytes());
    let d = h.finalize();
    let mut naa = [0u8; 8];
    naa.copy_from_slice(&d[..8]);
    naa[0] = 0x30 | (naa[0] & 0x0f);
    (naa, hex::encode_upper(&d[8..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(dir: &Path) -> Config {
        Config::embedded_default(dir)
    }

    #[test]
    fn derived_identity_is_persisted_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let (t, l) = (&c.targets[0], &c.targets[0].luns[0]);
        let a = IdentityStore::open(dir.path())
            .unwrap()
            .resolve(t, l)
            .unwrap();
        assert_eq!(a.naa[0] >> 4, 3);
        let b = IdentityStore::open(dir.path())
            .unwrap()
            .resolve(t, l)
            .unwrap();
        assert_eq!(a, b);
        // Another host configured alike (different data dir and path) presents the same identity.
        let other = tempfile::tempdir().unwrap();
        let c2 = cfg(other.path());
        let b2 = IdentityStore::open(other.path())
            .unwrap()
            .resolve(&c2.targets[0], &c2.targets[0].luns[0])
            .unwrap();
        assert_eq!(a, b2);
    }

    #[test]
    fn persisted_value_wins_over_derivation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            "[[lun]]\ntarget = \"iqn.2026-11.org.twinsan:default\"\nnumber = 0\nserial = \"S1\"\nnaa = \"3000000000000001\"\n",
        )
        .unwrap();
        let c = cfg(dir.path());
        let id = IdentityStore::open(dir.path())
            .unwrap()
            .resolve(&c.targets[0], &c.targets[0].luns[0])
            .unwrap();
        assert_eq!(id.serial, "S1");
        assert_eq!(id.naa, vec![0x30, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn configured_values_win() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.targets[0].luns[0].serial = Some("MYSERIAL".into());
        c.targets[0].luns[0].naa = Some("6001405aabbccddeeff0011223344556".into());
        let id = IdentityStore::open(dir.path())
            .unwrap()
            .resolve(&c.targets[0], &c.targets[0].luns[0])
            .unwrap();
        assert_eq!(id.serial, "MYSERIAL");
        assert_eq!(id.naa.len(), 16);
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "[[lun]\n").unwrap();
        assert!(matches!(
            IdentityStore::open(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
