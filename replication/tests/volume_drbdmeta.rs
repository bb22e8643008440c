//! A replicated volume on a real file with internal DRBD metadata (data and metadata in the
//! same file, as `meta-disk internal`), checked with `drbdmeta` when it is installed.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use twinsan_replication::drbd::{MdFlags, MdVersion};
use twinsan_replication::store::{BlockStore, StdFileStore, WriteMode};
use twinsan_replication::volume::{
    create_metadata, skip_sync_uuid, InitialSync, MetaLocation, ReplicatedVolume, Role,
};

const DRBDMETA: &str = "/usr/sbin/drbdmeta";

fn drbdmeta(file: &Path, cmd: &str) -> (bool, String) {
    let out = Command::new(DRBDMETA)
        .args(["--force", "-", "v08"])
        .arg(file)
        .args(["internal", cmd])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run drbdmeta");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_metadata_on_a_file_is_drbd_compatible() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let meta = MetaLocation::Internal(path.clone());
    let usable = create_metadata(
        &meta,
        0,
        MdVersion::V08,
        InitialSync::SkipIdentical {
            uuid: skip_sync_uuid("vol0", "t"),
        },
    )
    .unwrap();
    assert!(usable < 64 * MIB && usable > 63 * MIB);
    let data: Arc<dyn BlockStore> = Arc::new(StdFileStore::open(&path).unwrap());
    // No peer: nothing listens on the discard port.
    let mut cfg = config("vol0");
    cfg.peer = "127.0.0.1:9".parse().unwrap();
    let vol = ReplicatedVolume::open(cfg.clone(), data.clone(), meta.clone(), Role::Primary)
        .await
        .unwrap();
    assert_eq!(vol.size(), usable);
    let st = vol.store();
    st.write(0, Bytes::from(vec![0xAB; 8192]), WriteMode::Durable)
        .await
        .unwrap();
    // Writing past the data area (into the metadata) is refused.
    assert!(st
        .write(usable, Bytes::from(vec![0; 4096]), WriteMode::Cached)
        .await
        .is_err());
    let s = vol.status();
    assert_eq!(
        s.out_of_sync_bytes, 8192,
        "degraded writes are in the bitmap"
    );
    let have_oracle = Path::new(DRBDMETA).exists();
    if have_oracle {
        // While primary the metadata is unclean; show-gi still shows our UUIDs.
        let (ok, out) = drbdmeta(&path, "show-gi");
        assert!(ok, "{out}");
        assert!(
            out.to_uppercase()
                .contains(&format!("{:016X}", s.current_uuid)),
            "{out}"
        );
    }
    vol.shutdown().await.unwrap();
    drop(st);
    drop(vol);
    if have_oracle {
        let (ok, out) = drbdmeta(&path, "dump-md");
        assert!(ok, "{out}");
        let s_uuid = format!("0x{:016X}", (s.current_uuid & !1));
        assert!(
            out.to_uppercase().contains(&s_uuid.to_uppercase()),
            "{s_uuid} not in {out}"
        );
        assert!(out.contains("la-size-sect"), "{out}");
        let (ok, out) = drbdmeta(&path, "show-gi");
        assert!(ok, "{out}");
        eprintln!("{out}");
    } else {
        eprintln!("skipping drbdmeta checks: {DRBDMETA} not installed");
    }
    // Reopen: clean, bitmap kept (the 2 blocks written without a peer).
    let vol = ReplicatedVolume::open(cfg, data, meta, Role::Secondary)
        .await
        .unwrap();
    let s2 = vol.status();
    assert_eq!(s2.out_of_sync_bytes, 8192);
    assert!(!MdFlags::from_bits(s2.md_flags).contains(MdFlags::CRASHED_PRIMARY));
    assert_eq!(s2.current_uuid, s.current_uuid & !1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    vol.shutdown().await.unwrap();
}
