//! `twinsan replication adopt`: take over the DRBD metadata of an existing resource so
//! that `twinsan serve` continues where DRBD stopped (generation UUIDs, flags and bitmap
//! kept; no full resync). The checks and the metadata work are in
//! [`twinsan_replication::drbd::adopt`]; this file maps the configuration onto them.

use crate::config::LunConfig;
use anyhow::{anyhow, bail, Context};
use std::path::Path;
use twinsan_replication::drbd::adopt::{adopt, AdoptOptions, AdoptReport, AdoptTarget};
use twinsan_replication::drbd::Layout;
use twinsan_replication::volume::MetaLocation;

/// Refuses when something else uses `path`: a block device that cannot be opened
/// exclusively (`O_EXCL`, Linux `blkdev_get`) is held by DRBD, a mount or device mapper.
fn check_not_in_use(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} is in use (DRBD still attached, mounted, or held by device mapper): run `drbdadm down` first",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
}

/// Adopts the DRBD metadata of the replicated LUN `lun`. The daemon must be stopped: when
/// `control_socket` answers, or DRBD still holds a block device, nothing is done. Returns
/// the report; a refusal is an error that says why and that nothing was written.
pub fn adopt_volume(
    lun: &LunConfig,
    control_socket: &Path,
    opts: AdoptOptions,
) -> anyhow::Result<AdoptReport> {
    let r = lun.replication.as_ref().expect("replicated LUN");
    if std::os::unix::net::UnixStream::connect(control_socket).is_ok() {
        bail!(
            "volume {}: refusing to adopt: the twinsan daemon is running ({} answers); stop it first\nNothing was written.",
            r.name,
            control_socket.display()
        );
    }
    let (meta_path, layout) = match crate::volumes::meta_location(lun, r)? {
        MetaLocation::Internal(p) => (p, Layout::Internal),
        MetaLocation::External(p) => (p, Layout::FlexExternal),
        MetaLocation::Indexed(p, i) => {
            let index = u8::try_from(i)
                .map_err(|_| anyhow!("volume {}: meta index {i} is outside 0..=255", r.name))?;
            (p, Layout::IndexedExternal { index })
        }
    };
    for p in [&meta_path, &lun.path] {
        check_not_in_use(p).map_err(|e| {
            anyhow!(
                "volume {}: refusing to adopt: {e:#}\nNothing was written.",
                r.name
            )
        })?;
    }
    let target = AdoptTarget {
        meta_path,
        layout,
        data_path: lun.path.clone(),
        configured_size: lun.size.map(|s| s.0),
        want_primary: r.role == "primary",
    };
    match adopt(&target, opts) {
        Ok(report) => {
            tracing::info!(
                volume = %r.name,
                dry_run = opts.dry_run,
                version = %report.version,
                bits_set = report.bits_set,
                current_uuid = format_args!("{:016X}", report.current_uuid),
                "DRBD metadata adopted"
            );
            Ok(report)
        }
        Err(e) if e.is_refusal() => Err(anyhow!(
            "volume {}: refusing to adopt the DRBD metadata: {e}\nNothing was written.",
            r.name
        )),
        Err(e) => Err(e).with_context(|| format!("volume {}: adopt", r.name)),
    }
}
