//! `twinsan replication adopt`: take over the DRBD metadata of an existing resource so
//! that `twinsan serve` continues where DRBD stopped (generation UUIDs, flags and bitmap
//! kept; no full resync). The checks and the metadata work are in
//! [`twinsan_replication::drbd::adopt`]; this file maps the configuration onto them.

use crate::config::LunConfig;
use anyhow::{anyhow, Context};
use twinsan_replication::drbd::adopt::{adopt, AdoptOptions, AdoptReport, AdoptTarget};
use twinsan_replication::drbd::Layout;
use twinsan_replication::volume::MetaLocation;

/// Adopts the DRBD metadata of the replicated LUN `lun` (the daemon must be stopped).
/// Returns the report; a refusal is an error that says why and that nothing was written.
pub fn adopt_volume(lun: &LunConfig, opts: AdoptOptions) -> anyhow::Result<AdoptReport> {
    let r = lun.replication.as_ref().expect("replicated LUN");
    let (meta_path, layout) = match crate::volumes::meta_location(lun, r)? {
        MetaLocation::Internal(p) => (p, Layout::Internal),
        MetaLocation::External(p) => (p, Layout::FlexExternal),
        MetaLocation::Indexed(p, i) => {
            let index = u8::try_from(i)
                .map_err(|_| anyhow!("volume {}: meta index {i} is outside 0..=255", r.name))?;
            (p, Layout::IndexedExternal { index })
        }
    };
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
