//! The persisted HA state (manual-mode flag), so that manual mode survives a restart of the
//! daemon during rolling maintenance. Written atomically: temporary file, fsync, rename, fsync
//! of the directory.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// Content of the state file (TOML).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaState {
    /// Manual mode on.
    #[serde(default)]
    pub manual: bool,
}

/// Reads the state; a missing file is the default state, a corrupt one is an error.
pub fn load(path: &Path) -> anyhow::Result<HaState> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("HA state file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HaState::default()),
        Err(e) => Err(anyhow::anyhow!(
            "cannot read HA state file {}: {e}",
            path.display()
        )),
    }
}

/// Writes the state atomically.
pub fn store(path: &Path, state: &HaState) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let text = format!(
        "# twinsan HA state (written by the daemon)\n{}",
        toml::to_string(state)?
    );
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/ha-state.toml");
        assert_eq!(load(&p).unwrap(), HaState::default());
        store(&p, &HaState { manual: true }).unwrap();
        assert!(load(&p).unwrap().manual);
        store(&p, &HaState { manual: false }).unwrap();
        assert!(!load(&p).unwrap().manual);
        assert!(!p.with_extension("tmp").exists());
        std::fs::write(&p, "manual = \"perhaps\"").unwrap();
        assert!(load(&p).is_err());
    }
}
