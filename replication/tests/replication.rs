//! Two replicated volumes in one process over 127.0.0.1 (through in-test proxies that can
//! cut or stall the link): protocol-C writes, disconnect + bitmap resync, verify, split
//! brain, crash recovery.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use rand::{Rng, SeedableRng};
use twinsan_replication::drbd::MdFlags;
use twinsan_replication::link::DiskState;
use twinsan_replication::policy::SplitBrainPolicy;
use twinsan_replication::store::{BlockStore, StoreError, WriteMode};
use twinsan_replication::volume::{ConnState, Fencing, InitialSync, ReplicationError, Role};

const SIZE: u64 = 32 * MIB;
const T: Duration = Duration::from_secs(20);

async fn wait_connected(p: &Pair) {
    wait_until("both Connected", T, || connected(&p.a) && connected(&p.b)).await;
    // Connected and in sync means the same data generation on both.
    let (a, b) = (p.a.vol.status(), p.b.vol.status());
    assert_eq!(a.current_uuid & !1, b.current_uuid & !1, "{a:?}\n{b:?}");
    assert_eq!(a.disk_state, DiskState::UpToDate);
    assert_eq!(b.disk_state, DiskState::UpToDate);
}

fn block(seed: u64, len: usize) -> Bytes {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_identically_protocol_c() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    // Garbage on the peer port is refused without harm.
    for seed in 0..3u64 {
        let mut s = tokio::net::TcpStream::connect(p.b.vol.local_addr())
            .await
            .unwrap();
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(&block(seed, 10_000)).await;
        let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
    }
    wait_connected(&p).await;
    let st = p.a.vol.store();
    assert_eq!(st.size(), p.a.vol.size());
    // Concurrent, partly overlapping writes of mixed sizes, some FUA.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let st = st.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = rand::rngs::StdRng::seed_from_u64(t);
            for i in 0..40u64 {
                let blocks = r.gen_range(1..=16u64);
                let off = r.gen_range(0..(SIZE / 4096 - blocks)) * 4096;
                let mode = if i % 5 == 0 {
                    WriteMode::Durable
                } else {
                    WriteMode::Cached
                };
                st.write(off, block(t * 1000 + i, (blocks * 4096) as usize), mode)
                    .await
                    .unwrap();
            }
        }));
    }
    // Overlapping writes to one block from many tasks: order must be the same on both.
    for t in 0..16u64 {
        let st = st.clone();
        tasks.push(tokio::spawn(async move {
            st.write(8 * MIB, block(99_000 + t, 8192), WriteMode::Cached)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    st.flush().await.unwrap();
    assert!(p.b.data.flush_count() >= 1, "flush reached the peer");
    // Protocol C: acknowledged writes are already on the peer, no waiting needed.
    assert!(p.a.snapshot() == p.b.snapshot(), "replicas differ");
    // A large write (split into several messages) and a discard.
    st.write(MIB, block(5, 9 * MIB as usize), WriteMode::Durable)
        .await
        .unwrap();
    st.discard(2 * MIB, 64 * 1024).await.unwrap();
    assert!(
        p.a.snapshot() == p.b.snapshot(),
        "replicas differ after large write"
    );
    let s = p.a.vol.status();
    assert_eq!(s.out_of_sync_bytes, 0);
    assert_eq!(s.write_errors, 0);
    assert!(s.sent_bytes > 9 * MIB);
    assert_eq!(s.peer_role, Some(Role::Secondary));
    assert_eq!(p.b.vol.status().received_bytes, s.sent_bytes);
    // The secondary never serves.
    let sb = p.b.vol.store();
    assert!(matches!(
        sb.write(0, block(1, 4096), WriteMode::Cached).await,
        Err(StoreError::ReadOnly)
    ));
    assert!(sb.read(0, 4096).await.is_err());
    // Dual primary is refused.
    assert!(matches!(
        p.b.vol.promote(false).await,
        Err(ReplicationError::PeerIsPrimary)
    ));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_write_error_is_reported_and_marked() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    p.b.data.inject_fault(4 * MIB, 4 * MIB + 4096);
    let st = p.a.vol.store();
    st.write(4 * MIB, block(1, 4096), WriteMode::Cached)
        .await
        .unwrap();
    let s = p.a.vol.status();
    assert_eq!(s.write_errors, 1, "peer write error counted");
    assert_eq!(s.out_of_sync_bytes, 4096, "range marked out of sync");
    p.shutdown().await;
}

/// A full backing filesystem on the primary (its store answers ENOSPC): the write fails with
/// `NoSpace` (which the SCSI layer answers DATA PROTECT / SPACE ALLOCATION FAILED), not a
/// generic I/O error, connected and degraded alike; reads go on. A full secondary fails only
/// its copy: the primary's write succeeds and the range is out of sync, as for any peer error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_primary_disk_is_no_space() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    let st = p.a.vol.store();
    st.write(0, block(1, 8192), WriteMode::Cached)
        .await
        .unwrap();
    p.a.data.set_full(true);
    for mode in [WriteMode::Cached, WriteMode::Durable] {
        let e = st.write(MIB, block(2, 8192), mode).await.unwrap_err();
        assert!(matches!(e, StoreError::NoSpace(_)), "{e:?}");
    }
    assert_eq!(&st.read(0, 8192).await.unwrap()[..], &block(1, 8192)[..]);
    assert_eq!(p.a.vol.status().write_errors, 2);
    p.a.data.set_full(false);
    st.write(MIB, block(3, 8192), WriteMode::Cached)
        .await
        .unwrap();

    // Secondary full: the primary holds the data, the range waits for a resync.
    p.b.data.set_full(true);
    st.write(2 * MIB, block(4, 4096), WriteMode::Cached)
        .await
        .unwrap();
    let s = p.a.vol.status();
    assert_eq!(s.write_errors, 3, "peer write error counted");
    assert!(s.out_of_sync_bytes >= 4096, "{s:?}");
    p.b.data.set_full(false);

    // Degraded (the link is cut): still NoSpace.
    p.cut();
    wait_until("A disconnected", T, || !connected(&p.a)).await;
    p.a.data.set_full(true);
    let e = st
        .write(3 * MIB, block(5, 4096), WriteMode::Cached)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NoSpace(_)), "{e:?}");
    p.a.data.set_full(false);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_full_sync_from_one_side() {
    // A's disk holds data from before twinsan.
    let p = Pair::build(
        SIZE,
        InitialSync::FullFrom,
        InitialSync::None,
        Role::Secondary,
        |c| c.resync_rate = 64 * MIB,
        Some(block(7, SIZE as usize).to_vec()),
    )
    .await;
    let started = std::time::Instant::now();
    // An Inconsistent node may not be promoted without force.
    assert!(matches!(
        p.b.vol.promote(false).await,
        Err(ReplicationError::NotUpToDate(_))
    ));
    wait_connected(&p).await;
    // 32 MiB at a 64 MiB/s cap cannot take less than ~0.5 s.
    let took = started.elapsed();
    eprintln!("full sync of 32 MiB at 64 MiB/s cap took {took:?}");
    assert!(
        took >= Duration::from_millis(400),
        "rate cap not applied: {took:?}"
    );
    assert_eq!(p.b.vol.status().disk_state, DiskState::UpToDate);
    assert!(p.a.snapshot() == p.b.snapshot());
    assert!(p.a.vol.status().resync_sent_bytes >= p.a.vol.size());
    let (sa, sb) = (p.a.vol.status(), p.b.vol.status());
    assert_eq!(sa.current_uuid & !1, sb.current_uuid & !1);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_then_resync_copies_only_changed_blocks() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    let st = p.a.vol.store();
    for i in 0..20 {
        st.write(i * 4096 * 3, block(i, 4096), WriteMode::Cached)
            .await
            .unwrap();
    }
    let resync_before = p.a.vol.status().resync_sent_bytes;
    p.cut();
    wait_until("A notices the cut", T, || !connected(&p.a)).await;
    // Writes continue while apart, marked in the bitmap.
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let mut blocks = std::collections::BTreeSet::new();
    for i in 0..200u64 {
        let n = r.gen_range(1..=4u64);
        let b = r.gen_range(0..SIZE / 4096 - n);
        for k in b..b + n {
            blocks.insert(k);
        }
        st.write(
            b * 4096,
            block(500 + i, (n * 4096) as usize),
            WriteMode::Cached,
        )
        .await
        .unwrap();
    }
    let written = blocks.len() as u64 * 4096;
    assert_eq!(p.a.vol.status().out_of_sync_bytes, written);
    p.restore();
    wait_connected(&p).await;
    let resynced = p.a.vol.status().resync_sent_bytes - resync_before;
    eprintln!("written while apart: {written} bytes, resynced: {resynced} bytes");
    assert!(resynced >= written);
    assert!(
        resynced as f64 <= 1.1 * written as f64,
        "resynced {resynced} > 1.1 x {written}"
    );
    assert!(
        p.a.snapshot() == p.b.snapshot(),
        "replicas differ after resync"
    );
    assert_eq!(p.a.vol.status().out_of_sync_bytes, 0);
    assert_eq!(p.b.vol.status().out_of_sync_bytes, 0);
    // Keepalive: a stalled (black-holed) link is detected by the timeout.
    p.ab.stall();
    p.ba.stall();
    wait_until("timeout detects the stall", T, || !connected(&p.a)).await;
    st.write(0, block(77, 4096), WriteMode::Cached)
        .await
        .unwrap();
    p.cut();
    p.restore();
    wait_connected(&p).await;
    assert!(
        p.a.snapshot() == p.b.snapshot(),
        "replicas differ after stall"
    );
    p.shutdown().await;
}

/// A black-holed link fills the socket buffers and then the bounded link queue, so
/// application writes wait for queue space. The ping timeout must still end the connection
/// and every write waiting on the full queue must complete (degraded, marked out of sync)
/// instead of hanging; after the link is back the replicas are identical again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_link_with_a_full_queue_does_not_hang_writes() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    p.ab.stall();
    p.ba.stall();
    let st = p.a.vol.store();
    // 64 MiB in 64 KiB writes: more than the loopback socket buffers plus the queue hold.
    // One buffer for all (made outside the timed part: a debug build fills slowly).
    const LEN: u64 = 64 * 1024;
    let data = block(9000, LEN as usize);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1024u64 {
        let (st, data) = (st.clone(), data.clone());
        set.spawn(async move { st.write((i * LEN) % SIZE, data, WriteMode::Cached).await });
    }
    let all = async {
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
    };
    tokio::time::timeout(T, all)
        .await
        .expect("application writes hung on a stalled link");
    assert!(!connected(&p.a));
    assert!(p.a.vol.status().out_of_sync_bytes > 0);
    p.cut();
    p.restore();
    wait_connected(&p).await;
    assert!(
        p.a.snapshot() == p.b.snapshot(),
        "replicas differ after the stall"
    );
    p.shutdown().await;
}

/// A write whose activity-log extent cannot be activated because every slot is held by a
/// write in flight waits until one of them completes, then goes through (DRBD blocks in
/// `drbd_al_begin_io` the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_waits_for_a_free_activity_log_extent() {
    const EXTENT: u64 = 4 * MIB;
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| c.al_extents = 7).await;
    wait_connected(&p).await;
    // Acks stop coming: seven writes in seven extents hold every slot until the link's
    // timeout drops the connection and they complete degraded.
    p.ab.stall();
    p.ba.stall();
    let st = p.a.vol.store();
    let mut holders = tokio::task::JoinSet::new();
    for e in 0..7u64 {
        let st = st.clone();
        holders.spawn(async move {
            st.write(e * EXTENT, block(e, 4096), WriteMode::Cached)
                .await
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(holders.len(), 7, "the holders wait for their acks");
    let st8 = st.clone();
    let mut waiter = tokio::spawn(async move {
        st8.write(7 * EXTENT, block(7, 4096), WriteMode::Cached)
            .await
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiter)
            .await
            .is_err(),
        "a write in an eighth extent went through while all seven slots were busy"
    );
    let r = tokio::time::timeout(T, waiter)
        .await
        .expect("the waiting write never got an extent");
    r.unwrap().unwrap();
    while let Some(r) = holders.join_next().await {
        r.unwrap().unwrap();
    }
    assert!(!connected(&p.a));
    p.cut();
    p.restore();
    wait_connected(&p).await;
    assert!(p.a.snapshot() == p.b.snapshot(), "replicas differ");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_corrupted_block_and_resync_repairs() {
    for digest in [
        twinsan_replication::link::VerifyDigest::Crc32c,
        twinsan_replication::link::VerifyDigest::Sha256,
    ] {
        let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| {
            c.verify_digest = digest
        })
        .await;
        wait_connected(&p).await;
        let st = p.a.vol.store();
        st.write(0, block(1, 4 * MIB as usize), WriteMode::Cached)
            .await
            .unwrap();
        // Corrupt one block directly on the secondary's backing store.
        p.b.data
            .write(
                3 * MIB + 8192,
                Bytes::from(vec![0xEE; 4096]),
                WriteMode::Cached,
            )
            .await
            .unwrap();
        assert!(p.a.snapshot() != p.b.snapshot());
        p.a.vol.start_verify().unwrap();
        wait_until("verify finished", T, || {
            p.a.vol.status().verify.is_some_and(|v| v.finished)
        })
        .await;
        let v = p.a.vol.status().verify.unwrap();
        assert_eq!(v.mismatched_blocks, 1, "{v:?}");
        assert!(!v.aborted);
        wait_connected(&p).await;
        wait_until("repaired", T, || p.a.snapshot() == p.b.snapshot()).await;
        assert_eq!(p.a.vol.status().out_of_sync_bytes, 0);
        assert_eq!(p.b.vol.status().disk_state, DiskState::UpToDate);
        p.shutdown().await;
    }
}

/// Both nodes primary while apart, both write; returns the pair with both demoted (if
/// `demote_a`) and the sets of blocks each wrote.
async fn make_split_brain(p: &Pair, a_blocks: &[u64], b_blocks: &[u64], demote_a: bool) {
    wait_connected(p).await;
    p.cut();
    wait_until("apart", T, || !connected(&p.a) && !connected(&p.b)).await;
    p.b.vol.promote(false).await.unwrap();
    let (sa, sb) = (p.a.vol.store(), p.b.vol.store());
    for &b in a_blocks {
        sa.write(b * 4096, block(b, 4096), WriteMode::Cached)
            .await
            .unwrap();
    }
    for &b in b_blocks {
        sb.write(b * 4096, block(100_000 + b, 4096), WriteMode::Cached)
            .await
            .unwrap();
    }
    p.b.vol.demote().await.unwrap();
    if demote_a {
        p.a.vol.demote().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_disconnect_policy_keeps_data_then_discard_my_data() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    make_split_brain(&p, &[1, 2, 3], &[10, 11], true).await;
    let (da, db) = (p.a.snapshot(), p.b.snapshot());
    p.restore();
    wait_until("split brain detected on both", T, || {
        p.a.vol.status().split_brain && p.b.vol.status().split_brain
    })
    .await;
    wait_until("both StandAlone", T, || {
        p.a.vol.status().connection == ConnState::StandAlone
            && p.b.vol.status().connection == ConnState::StandAlone
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(p.a.snapshot() == da && p.b.snapshot() == db, "data touched");
    // Operator recovery: B discards its changes.
    p.b.vol.discard_my_data().unwrap();
    p.a.vol.connect();
    wait_connected(&p).await;
    assert!(p.a.snapshot() == da, "survivor's data changed");
    assert!(p.b.snapshot() == da, "victim not synced to survivor");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_discard_zero_changes_with_consensus() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| {
        c.after_sb_0pri = SplitBrainPolicy::DiscardZeroChanges;
        c.after_sb_1pri = SplitBrainPolicy::Consensus;
    })
    .await;
    // A stays primary and writes; B was promoted but wrote nothing.
    make_split_brain(&p, &[1, 5, 9], &[], false).await;
    let da = p.a.snapshot();
    p.restore();
    wait_connected(&p).await;
    assert!(p.a.vol.status().split_brain);
    assert_eq!(p.a.vol.status().role, Role::Primary);
    assert!(p.a.snapshot() == da, "the primary's changes were discarded");
    assert!(p.b.snapshot() == da);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_discard_least_changes() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| {
        c.after_sb_0pri = SplitBrainPolicy::DiscardLeastChanges;
    })
    .await;
    // B changed more blocks than A: A's changes are discarded.
    make_split_brain(&p, &[1, 2], &[20, 21, 22, 23, 24], true).await;
    let db = p.b.snapshot();
    p.restore();
    wait_connected(&p).await;
    assert!(
        p.b.snapshot() == db,
        "B (more changes) must be the survivor"
    );
    assert!(p.a.snapshot() == db, "A not synced to B");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_replays_activity_log_and_resyncs() {
    let mut p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    let st = p.a.vol.store();
    // Writes into AL extents 0, 2 and 5 (4 MiB each).
    for off in [4096, 8 * MIB + 4096 * 7, 20 * MIB] {
        st.write(off, block(off, 4096), WriteMode::Cached)
            .await
            .unwrap();
    }
    drop(st);
    assert_eq!(p.a.vol.status().out_of_sync_bytes, 0);
    // No link until the reopened node's state is checked: A would otherwise reconnect
    // through the proxy to B at once, resync and clear the flags this test looks at.
    p.cut();
    p.a.vol.crash_for_test();
    // Something the crashed primary wrote locally but never replicated.
    p.a.data
        .write(8 * MIB + 4096 * 9, block(1234, 4096), WriteMode::Cached)
        .await
        .unwrap();
    p.a.reopen(Role::Secondary).await;
    let s = p.a.vol.status();
    assert!(MdFlags::from_bits(s.md_flags).contains(MdFlags::CRASHED_PRIMARY));
    assert_eq!(
        s.out_of_sync_bytes,
        3 * 4 * MIB,
        "every bit of the 3 hot extents is out of sync"
    );
    p.restore();
    p.repoint();
    wait_connected(&p).await;
    assert!(
        p.a.snapshot() == p.b.snapshot(),
        "replicas differ after crash resync"
    );
    let s = p.a.vol.status();
    assert_eq!(s.out_of_sync_bytes, 0);
    assert!(!MdFlags::from_bits(s.md_flags).contains(MdFlags::CRASHED_PRIMARY));
    p.shutdown().await;
}

/// A pair with `fencing = suspend-io`, connected once, then its link cut: A primary, apart.
async fn suspend_io_pair_apart() -> Pair {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| {
        c.fencing = Fencing::SuspendIo
    })
    .await;
    wait_connected(&p).await;
    p.cut();
    wait_until("apart", T, || !connected(&p.a)).await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_io_fencing_waits_for_peer_or_resume() {
    let p = suspend_io_pair_apart().await;
    let st = p.a.vol.store();
    let w = tokio::spawn({
        let st = st.clone();
        async move { st.write(0, block(1, 4096), WriteMode::Cached).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.is_finished(), "write must be suspended");
    assert!(p.a.vol.status().suspended);
    // Reconnect releases it (replicated, nothing out of sync).
    p.restore();
    tokio::time::timeout(T, w).await.unwrap().unwrap().unwrap();
    wait_connected(&p).await;
    assert!(p.a.snapshot() == p.b.snapshot());
    // resume-io releases suspended writes without the peer.
    p.cut();
    wait_until("apart", T, || !connected(&p.a)).await;
    let w = tokio::spawn({
        let st = st.clone();
        async move { st.write(4096, block(2, 4096), WriteMode::Cached).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!w.is_finished());
    p.a.vol.resume_io();
    tokio::time::timeout(T, w).await.unwrap().unwrap().unwrap();
    assert_eq!(p.a.vol.status().out_of_sync_bytes, 4096);
    p.restore();
    wait_connected(&p).await;
    assert!(p.a.snapshot() == p.b.snapshot());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused() {
    let n = std::sync::atomic::AtomicUsize::new(0);
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        c.secret = if i == 0 {
            b"one".to_vec()
        } else {
            b"two".to_vec()
        };
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.a.vol.status().connection, ConnState::Connecting);
    assert_eq!(p.b.vol.status().connection, ConnState::Connecting);
    assert_eq!(p.b.vol.status().received_bytes, 0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_secrets_from_one_address_are_spaced_out() {
    use twinsan_replication::drbd::GenerationUuids;
    use twinsan_replication::link::{establish, LinkError, LocalHello};
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    // A guesser dials A's listener with a wrong secret, one attempt after the other: the
    // first three are answered at once, then each waits longer (100 ms doubling).
    let guess = LocalHello {
        volume_name: p.a.cfg.name.clone(),
        size_bytes: p.a.vol.size(),
        secret: b"not the secret".to_vec(),
        node_id: rand::random(),
        role: Role::Secondary,
        uuids: GenerationUuids::just_created(),
        flags: 0,
    };
    let mut took = Vec::new();
    for _ in 0..6 {
        let start = std::time::Instant::now();
        let s = tokio::net::TcpStream::connect(p.a.vol.local_addr())
            .await
            .unwrap();
        let r = establish(s, &guess, true, Duration::from_secs(5)).await;
        assert!(
            matches!(r, Err(LinkError::Refused(_) | LinkError::WrongSecret)),
            "{:?}",
            r.err()
        );
        took.push(start.elapsed());
    }
    for (i, t) in took.iter().enumerate().take(3) {
        assert!(*t < Duration::from_millis(90), "attempt {}: {t:?}", i + 1);
    }
    assert!(took[3] >= Duration::from_millis(90), "{took:?}");
    assert!(took[5] >= Duration::from_millis(350), "{took:?}");
    // The established link is untouched.
    assert!(connected(&p.a) && connected(&p.b));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_demote_and_uuid_rotation() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Secondary, |_| {}).await;
    wait_connected(&p).await;
    let u0 = p.a.vol.status().current_uuid;
    p.a.vol.promote(false).await.unwrap();
    // Connected promotion keeps the generation (sets the primary bit).
    assert_eq!(p.a.vol.status().current_uuid, u0 | 1);
    wait_until("peer sees primary", T, || {
        p.b.vol.status().peer_role == Some(Role::Primary)
    })
    .await;
    p.a.vol.demote().await.unwrap();
    wait_until("peer sees secondary", T, || {
        p.b.vol.status().peer_role == Some(Role::Secondary)
    })
    .await;
    // Promotion while disconnected starts a new generation; reconnect syncs from it.
    p.cut();
    wait_until("apart", T, || !connected(&p.b)).await;
    p.b.vol.promote(false).await.unwrap();
    let s = p.b.vol.status();
    assert_eq!(s.bitmap_uuid, u0);
    assert_ne!(s.current_uuid & !1, u0);
    p.b.vol
        .store()
        .write(0, block(3, 4096), WriteMode::Cached)
        .await
        .unwrap();
    p.restore();
    wait_connected(&p).await;
    assert!(p.a.snapshot() == p.b.snapshot());
    let _ = Arc::clone(&p.a.vol);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_makes_a_full_sync_target() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    p.a.vol
        .store()
        .write(0, block(9, 4 * MIB as usize), WriteMode::Cached)
        .await
        .unwrap();
    // Scribble on B's disk behind twinsan's back, then invalidate B.
    p.b.data
        .write(20 * MIB, block(10, 4096), WriteMode::Cached)
        .await
        .unwrap();
    let before = p.a.vol.status().resync_sent_bytes;
    p.b.vol.invalidate().await.unwrap();
    assert!(
        p.a.vol.invalidate().await.is_err(),
        "primary may not invalidate"
    );
    wait_until("full sync done", T, || {
        connected(&p.a) && connected(&p.b) && p.a.vol.status().resync_sent_bytes - before >= SIZE
    })
    .await;
    assert!(p.a.snapshot() == p.b.snapshot());
    p.shutdown().await;
}

/// A sink that records what the secondary's "logical unit" was given.
fn recording_sink(n: &Node) -> Arc<std::sync::Mutex<Vec<Vec<u8>>>> {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    n.vol.set_pr_sink(Arc::new(move |b: &[u8]| {
        g.lock().unwrap().push(b.to_vec());
        Ok(())
    }));
    got
}

fn last(got: &std::sync::Mutex<Vec<Vec<u8>>>) -> Option<Vec<u8>> {
    got.lock().unwrap().last().cloned()
}

/// Reservation state (SPC-4 5.13) follows protocol C: the primary's change returns once the
/// secondary stored it; while apart it completes locally, is marked pending and is sent at
/// the reconnect; after a failover the new primary holds the last state it received and
/// replicates its own changes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_state_is_replicated_protocol_c_and_resent_at_reconnect() {
    use twinsan_replication::volume::PrReplicated;
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    let got_b = recording_sink(&p.b);
    let got_a = recording_sink(&p.a);
    wait_connected(&p).await;
    let s1 = Bytes::from_static(b"state 1");
    assert_eq!(
        p.a.vol.replicate_pr_state(s1.clone()).await.unwrap(),
        PrReplicated::Peer
    );
    // Stored on the peer before the change completed: no waiting.
    assert_eq!(p.b.vol.pr_state(), Some(s1.clone()));
    assert_eq!(last(&got_b), Some(s1.to_vec()));
    assert!(!p.a.vol.pr_state_pending());
    // The secondary does not change reservations.
    assert!(matches!(
        p.b.vol.replicate_pr_state(Bytes::from_static(b"no")).await,
        Err(ReplicationError::NotAllowed(_))
    ));

    // Apart: completes locally, pending, sent at the reconnect.
    p.cut();
    wait_until("A disconnected", T, || !connected(&p.a)).await;
    let s2 = Bytes::from_static(b"state 2");
    assert_eq!(
        p.a.vol.replicate_pr_state(s2.clone()).await.unwrap(),
        PrReplicated::Deferred
    );
    assert!(p.a.vol.pr_state_pending());
    assert_eq!(p.b.vol.pr_state(), Some(s1.clone()));
    p.restore();
    wait_connected(&p).await;
    wait_until("B has state 2", T, || {
        last(&got_b).as_deref() == Some(&s2[..]) && !p.a.vol.pr_state_pending()
    })
    .await;
    assert_eq!(p.b.vol.pr_state(), Some(s2.clone()));

    // Failover: B is primary with the last state it received, and replicates back.
    p.a.vol.demote().await.unwrap();
    wait_until("B sees A secondary", T, || {
        p.b.vol.status().peer_role == Some(Role::Secondary)
    })
    .await;
    p.b.vol.promote(false).await.unwrap();
    assert_eq!(p.b.vol.pr_state(), Some(s2.clone()));
    let s3 = Bytes::from_static(b"state 3");
    assert_eq!(
        p.b.vol.replicate_pr_state(s3.clone()).await.unwrap(),
        PrReplicated::Peer
    );
    assert_eq!(p.a.vol.pr_state(), Some(s3.clone()));
    assert_eq!(last(&got_a), Some(s3.to_vec()));
    p.shutdown().await;
}

/// Split brain: the data's winner (the sync source) sends its reservation state to the
/// loser at the reconnect, even with both sides secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_state_follows_the_split_brain_winner() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |c| {
        c.after_sb_0pri = SplitBrainPolicy::DiscardLeastChanges;
    })
    .await;
    let got_a = recording_sink(&p.a);
    wait_connected(&p).await;
    p.a.vol
        .replicate_pr_state(Bytes::from_static(b"before"))
        .await
        .unwrap();
    p.cut();
    wait_until("apart", T, || !connected(&p.a) && !connected(&p.b)).await;
    p.a.vol
        .replicate_pr_state(Bytes::from_static(b"A's"))
        .await
        .unwrap();
    p.b.vol.promote(false).await.unwrap();
    p.b.vol
        .replicate_pr_state(Bytes::from_static(b"B's"))
        .await
        .unwrap();
    // B changes more blocks: B wins.
    let (sa, sb) = (p.a.vol.store(), p.b.vol.store());
    sa.write(4096, block(1, 4096), WriteMode::Cached)
        .await
        .unwrap();
    for b in 20..25u64 {
        sb.write(b * 4096, block(b, 4096), WriteMode::Cached)
            .await
            .unwrap();
    }
    p.b.vol.demote().await.unwrap();
    p.a.vol.demote().await.unwrap();
    p.restore();
    wait_connected(&p).await;
    wait_until("A took B's state", T, || {
        last(&got_a).as_deref() == Some(&b"B's"[..])
    })
    .await;
    assert_eq!(p.a.vol.pr_state().as_deref(), Some(&b"B's"[..]));
    assert_eq!(p.b.vol.pr_state().as_deref(), Some(&b"B's"[..]));
    p.shutdown().await;
}

/// Start-up order in the daemon: the volume connects before the logical unit is wired. A
/// state received before the sink is set reaches it when it is set and is not replaced by
/// the secondary's own seed (its APTPL file may be older); the primary's seed, set once it
/// is already connected, is sent at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_state_seed_and_late_sink() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Primary, |_| {}).await;
    wait_connected(&p).await;
    p.a.vol.seed_pr_state(Bytes::from_static(b"from APTPL"));
    wait_until("B got A's seed", T, || {
        p.b.vol.pr_state().as_deref() == Some(&b"from APTPL"[..])
    })
    .await;
    p.b.vol.seed_pr_state(Bytes::from_static(b"B's stale file"));
    assert_eq!(p.b.vol.pr_state().as_deref(), Some(&b"from APTPL"[..]));
    let got_b = recording_sink(&p.b);
    wait_until("the late sink got the received state", T, || {
        last(&got_b).as_deref() == Some(&b"from APTPL"[..])
    })
    .await;
    p.shutdown().await;
}

/// `fencing = suspend-io`: a reservation change with the peer away waits like a write, and
/// the reconnect completes it replicated (protocol C), not deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_change_waits_while_fencing_suspends_io() {
    use twinsan_replication::volume::PrReplicated;
    let p = suspend_io_pair_apart().await;
    let v = p.a.vol.clone();
    let w = tokio::spawn(async move {
        v.replicate_pr_state(Bytes::from_static(b"fenced"))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.is_finished(), "reservation change must be suspended");
    p.restore();
    let r = tokio::time::timeout(T, w).await.unwrap().unwrap();
    assert_eq!(r, PrReplicated::Peer);
    assert_eq!(p.b.vol.pr_state().as_deref(), Some(&b"fenced"[..]));
    p.shutdown().await;
}
