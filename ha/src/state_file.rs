//! The persisted HA state (manual-mode flag), so that manual mode survives a restart of the
//! daemon during rolling maintenance. Written atomically: temporary file, fsync, rename, fsync
//! of the directory.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Content of the state file (TOML).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaState {
    /// Manual mode on.
    #[serde(default)]
    pub manual: bool,
}

/// Why the state file could not be read or written. The read errors name the file; the daemon
/// names it when it logs a write error.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file exists but does not parse as [`HaState`].
    #[error("HA state file {}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        reason: toml::de::Error,
    },
    /// The file exists but cannot be read.
    #[error("cannot read HA state file {}: {reason}", path.display())]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    /// Creating the directory, writing, syncing or renaming failed.
    #[error(transparent)]
    Write(#[from] std::io::Error),
    /// The state did not serialise (never expected for a flag).
    #[error(transparent)]
    Encode(#[from] toml::ser::Error),
}

/// Reads the state; a missing file is the default state, a corrupt one is an error.
pub fn load(path: &Path) -> Result<HaState, StateFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|reason| StateFileError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HaState::default()),
        Err(reason) => Err(StateFileError::Read {
            path: path.to_path_buf(),
            reason,
        }),
    }
}

/// Writes the state atomically.
pub fn store(path: &Path, state: &HaState) -> Result<(), StateFileError> {
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

    /// The daemon refuses to start on these and prints the message: it must name the file
    /// (the wording the daemon had before the module moved to this crate).
    #[test]
    fn errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ha-state.toml");
        std::fs::write(&p, "manual = 3").unwrap();
        let msg = load(&p).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("HA state file {}: ", p.display())),
            "{msg}"
        );
        // A directory where the file should be: readable path, unreadable content.
        let msg = load(d.path()).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot read HA state file {}: ",
                d.path().display()
            )),
            "{msg}"
        );
        // Storing below a regular file fails (its "directory" cannot be created).
        assert!(matches!(
            store(&p.join("x.toml"), &HaState::default()),
            Err(StateFileError::Write(_))
        ));
    }
}
