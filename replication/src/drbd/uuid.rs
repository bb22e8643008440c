//! Generation UUIDs and DRBD 8.4's resync decision (`drbd_uuid_compare`).
//!
//! Every data generation has a random 64-bit UUID. Bit 0 marks "was primary"
//! and is ignored in comparisons. The bitmap UUID is the generation the
//! out-of-sync bitmap is relative to; history UUIDs are older generations.
//! Rules from the DRBD 8.4 kernel driver: `drbd_main.c` (`drbd_uuid_new_current`,
//! `drbd_uuid_set`, `drbd_uuid_set_bm`, `drbd_uuid_move_history`),
//! `drbd_receiver.c` (`drbd_uuid_compare`, `receive_sync_uuid`) and
//! `drbd_worker.c` (`drbd_resync_finished`).

use super::superblock::HISTORY_UUIDS_V08;
/// Current UUID of freshly created metadata (`UUID_JUST_CREATED`); the superblock writes it.
pub use super::superblock::UUID_JUST_CREATED;

/// Bit 0 of a current UUID: the node was primary in this generation.
pub const UUID_PRIMARY: u64 = 1;
/// Added to the bitmap UUID when a resync starts (`UUID_NEW_BM_OFFSET`).
pub const UUID_NEW_BM_OFFSET: u64 = 1 << 48;

fn m(u: u64) -> u64 {
    u & !UUID_PRIMARY
}

/// The generation UUIDs of one node towards one peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GenerationUuids {
    /// Current data generation.
    pub current: u64,
    /// Generation the out-of-sync bitmap is relative to, 0 if none.
    pub bitmap: u64,
    /// Older generations, youngest first (2 for v08, up to 32 for v09).
    pub history: Vec<u64>,
}

impl Default for GenerationUuids {
    fn default() -> Self {
        Self::just_created()
    }
}

impl GenerationUuids {
    /// UUIDs of freshly created metadata: current = 4, the rest 0.
    pub fn just_created() -> Self {
        GenerationUuids {
            current: UUID_JUST_CREATED,
            bitmap: 0,
            history: vec![0; HISTORY_UUIDS_V08],
        }
    }

    /// v08-style UUIDs with two history entries.
    pub fn new(current: u64, bitmap: u64, history: [u64; 2]) -> Self {
        GenerationUuids {
            current,
            bitmap,
            history: history.to_vec(),
        }
    }

    fn hist(&self, i: usize) -> u64 {
        self.history.get(i).copied().unwrap_or(0)
    }

    /// True if the current UUID is [`UUID_JUST_CREATED`] (bit 0 ignored).
    pub fn is_just_created(&self) -> bool {
        m(self.current) == UUID_JUST_CREATED
    }

    /// Shifts the history one place older, dropping the oldest
    /// (`drbd_uuid_move_history`).
    pub fn move_history(&mut self) {
        if !self.history.is_empty() {
            self.history.rotate_right(1);
            self.history[0] = 0;
        }
    }

    /// Pushes `val` as the youngest history UUID.
    pub fn push_history(&mut self, val: u64) {
        self.move_history();
        if let Some(h) = self.history.first_mut() {
            *h = val;
        }
    }

    /// Sets the current UUID with bit 0 = `primary` (`__drbd_uuid_set` for
    /// `UI_CURRENT`), without touching the history.
    pub fn set_current(&mut self, val: u64, primary: bool) {
        self.current = if primary { val | UUID_PRIMARY } else { m(val) };
    }

    /// Starts a new data generation (`drbd_uuid_new_current`): the bitmap
    /// UUID takes the old current UUID, the current UUID becomes `random`
    /// with bit 0 = `primary`. Called when a primary loses its peer (or
    /// starts writing without it), so that the next connect resyncs only the
    /// bitmap. DRBD warns if the bitmap UUID was already set and overwrites it.
    pub fn new_current(&mut self, primary: bool, random: u64) {
        self.bitmap = self.current;
        self.set_current(random, primary);
    }

    /// [`GenerationUuids::new_current`] with a random value from the OS RNG.
    pub fn new_current_random(&mut self, primary: bool) {
        let mut v: u64 = rand::random();
        // Avoid the special values 0 and 4 after masking.
        while m(v) == 0 || m(v) == UUID_JUST_CREATED {
            v = rand::random();
        }
        self.new_current(primary, v);
    }

    /// Sets the bitmap UUID (`drbd_uuid_set_bm`): 0 moves the old bitmap UUID
    /// into the history (a resync finished); other values are stored with
    /// bit 0 cleared.
    pub fn set_bitmap(&mut self, val: u64) {
        if self.bitmap == 0 && val == 0 {
            return;
        }
        if val == 0 {
            let old = self.bitmap;
            self.push_history(old);
            self.bitmap = 0;
        } else {
            self.bitmap = m(val);
        }
    }

    /// `drbd_uuid_set(UI_BITMAP, val)`: an existing bitmap UUID goes into the
    /// history first.
    fn set_bitmap_with_history(&mut self, val: u64) {
        if self.bitmap != 0 {
            let old = self.bitmap;
            self.push_history(old);
        }
        self.bitmap = val;
    }

    /// Sync source at resync start (`drbd_gen_and_send_sync_uuid`): the bitmap
    /// UUID is bumped by [`UUID_NEW_BM_OFFSET`] (or made random if unset) and
    /// returned, to be sent to the target as the sync UUID.
    pub fn start_resync_as_source(&mut self) -> u64 {
        let mut uuid = self.bitmap;
        if uuid != 0 && uuid != UUID_JUST_CREATED {
            uuid = uuid.wrapping_add(UUID_NEW_BM_OFFSET);
        } else {
            uuid = rand::random();
        }
        self.set_bitmap_with_history(uuid);
        uuid
    }

    /// Sync target receiving the source's sync UUID (`receive_sync_uuid`):
    /// current = sync UUID, bitmap UUID = 0. The target is secondary.
    pub fn receive_sync_uuid(&mut self, sync_uuid: u64) {
        self.set_current(sync_uuid, false);
        self.bitmap = 0;
    }

    /// Sync source after a completed resync (`drbd_resync_finished`): the
    /// bitmap UUID moves into the history.
    pub fn resync_finished_as_source(&mut self) {
        self.set_bitmap(0);
    }

    /// Sync target after a completed resync (`drbd_resync_finished`): take the
    /// source's bitmap and history UUIDs, put the own current UUID in the
    /// bitmap slot, adopt the source's current UUID, then retire the bitmap
    /// UUID into the history.
    pub fn resync_finished_as_target(&mut self, source: &GenerationUuids, primary: bool) {
        let own_current = self.current;
        self.bitmap = source.bitmap;
        for (i, h) in self.history.iter_mut().enumerate() {
            *h = source.hist(i);
        }
        self.set_bitmap_with_history(own_current);
        self.set_current(source.current, primary);
        self.set_bitmap(0);
    }
}

/// Node role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Writable, serves I/O.
    Primary,
    /// Read-only replica.
    #[default]
    Secondary,
}

/// What else [`uuid_compare`] needs besides the two UUID sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompareContext {
    /// Our current role.
    pub self_role: Role,
    /// The peer's current role.
    pub peer_role: Role,
    /// We were primary when we crashed (`MDF_CRASHED_PRIMARY` at attach).
    pub self_crashed_primary: bool,
    /// The peer reports it crashed as primary (bit 1 of its UUID flags).
    pub peer_crashed_primary: bool,
    /// We hold the `RESOLVE_CONFLICTS` role of the connection (decided once
    /// per connection; exactly one side has it). Breaks the tie when both
    /// crashed as primary: the side with it becomes sync target.
    pub resolve_conflicts: bool,
}

/// The resync decision (`hg` of `drbd_uuid_compare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncDecision {
    /// Data is identical (0).
    NoSync,
    /// We are sync source; resync what the bitmap says (1).
    SourceUseBitmap,
    /// We are sync source; full resync (2).
    SourceFullSync,
    /// We are sync target; resync what the bitmap says (-1).
    TargetUseBitmap,
    /// We are sync target; full resync (-2).
    TargetFullSync,
    /// Both sides wrote independently. `auto_recoverable` (100) means the
    /// after-split-brain policies may resolve it; otherwise (-100) disconnect
    /// and wait for manual recovery (`--discard-my-data`).
    SplitBrain {
        /// 100 rather than -100.
        auto_recoverable: bool,
    },
    /// No common generation at all (-1000): refuse to connect.
    Unrelated,
}

impl SyncDecision {
    /// DRBD's numeric value.
    pub fn hg(&self) -> i32 {
        match self {
            SyncDecision::NoSync => 0,
            SyncDecision::SourceUseBitmap => 1,
            SyncDecision::SourceFullSync => 2,
            SyncDecision::TargetUseBitmap => -1,
            SyncDecision::TargetFullSync => -2,
            SyncDecision::SplitBrain {
                auto_recoverable: true,
            } => 100,
            SyncDecision::SplitBrain {
                auto_recoverable: false,
            } => -100,
            SyncDecision::Unrelated => -1000,
        }
    }
}

/// A UUID repair `drbd_uuid_compare` made on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UuidCorrection {
    /// Rule 34: we were sync source and missed the "resync finished" event;
    /// our bitmap UUID was moved into the history.
    SelfMissedResyncFinished,
    /// Rule 35: the peer was sync source and missed the "resync finished"
    /// event; the peer's UUIDs were corrected the same way.
    PeerMissedResyncFinished,
    /// Rule 51: the peer's last sync UUID was lost; the peer's resync-start
    /// modifications were undone.
    PeerSyncUuidLost,
    /// Rule 71: our last sync UUID did not get through; our resync-start
    /// modifications were undone.
    SelfSyncUuidLost,
}

/// Result of [`uuid_compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareOutcome {
    /// The decision.
    pub decision: SyncDecision,
    /// DRBD's rule number (as logged by "uuid_compare()=%d by rule %d").
    pub rule: u32,
    /// A correction applied to `local` or `peer`, if any.
    pub correction: Option<UuidCorrection>,
    /// Our UUIDs after any correction (persist them if `correction` is a
    /// `Self*` variant).
    pub local: GenerationUuids,
    /// The peer's UUIDs after any correction.
    pub peer: GenerationUuids,
}

/// DRBD 8.4's `drbd_uuid_compare` (`drbd_receiver.c`), for peers that speak
/// protocol >= 96 with the `DRBD_FF_WSAME` feature (twinsan always does).
/// Bit 0 of every UUID is masked unless DRBD compares the raw values.
///
/// Rules, in order: 10 both just created -> no sync; 20/30 one side just
/// created (or zero) -> full sync from the other; equal current UUIDs: 34-37
/// repair a missed "resync finished", 40/41 crashed-primary arbitration;
/// 50/51 our current is the peer's bitmap (or, after a lost sync UUID, its
/// history) -> target with bitmap; 60 our current in the peer's history ->
/// target full; 70/71 the mirror -> source with bitmap; 80 -> source full;
/// 90 equal non-zero bitmap UUIDs -> split brain, auto-recoverable;
/// 100 any common history UUID -> split brain, disconnect; else unrelated.
///
/// Quirk kept from DRBD: rule 100 compares history entries that are still 0,
/// so two nodes with unrelated current UUIDs and empty histories report a
/// split brain rather than unrelated data.
pub fn uuid_compare(
    local: &GenerationUuids,
    peer: &GenerationUuids,
    ctx: &CompareContext,
) -> CompareOutcome {
    let mut local = local.clone();
    let mut peer = peer.clone();
    let (decision, rule, correction) = compare_inner(&mut local, &mut peer, ctx);
    CompareOutcome {
        decision,
        rule,
        correction,
        local,
        peer,
    }
}

fn compare_inner(
    local: &mut GenerationUuids,
    peer: &mut GenerationUuids,
    ctx: &CompareContext,
) -> (SyncDecision, u32, Option<UuidCorrection>) {
    use SyncDecision::*;
    let s = m(local.current);
    let p = m(peer.current);

    if s == UUID_JUST_CREATED && p == UUID_JUST_CREATED {
        return (NoSync, 10, None);
    }
    if (s == UUID_JUST_CREATED || s == 0) && p != UUID_JUST_CREATED {
        return (TargetFullSync, 20, None);
    }
    if s != UUID_JUST_CREATED && (p == UUID_JUST_CREATED || p == 0) {
        return (SourceFullSync, 30, None);
    }

    if s == p {
        // DRBD compares the raw bitmap UUIDs against 0 here.
        if peer.bitmap == 0 && local.bitmap != 0 {
            if m(local.bitmap) == m(peer.hist(0)) && m(local.hist(0)) == m(peer.hist(1)) {
                // was SyncSource, missed the resync finished event
                let old = local.bitmap;
                local.push_history(old);
                local.bitmap = 0;
                return (
                    SourceUseBitmap,
                    34,
                    Some(UuidCorrection::SelfMissedResyncFinished),
                );
            }
            // was SyncSource (peer failed to write sync_uuid)
            return (SourceUseBitmap, 36, None);
        }
        if local.bitmap == 0 && peer.bitmap != 0 {
            if m(local.hist(0)) == m(peer.bitmap) && m(local.hist(1)) == m(peer.hist(0)) {
                // was SyncTarget, peer missed the resync finished event
                let old = peer.bitmap;
                peer.push_history(old);
                peer.bitmap = 0;
                return (
                    TargetUseBitmap,
                    35,
                    Some(UuidCorrection::PeerMissedResyncFinished),
                );
            }
            // was SyncTarget (failed to write sync_uuid)
            return (TargetUseBitmap, 37, None);
        }

        // Common power [off|failure]: bit 0 we crashed as primary, bit 1 the peer.
        let rct = u8::from(ctx.self_crashed_primary) + 2 * u8::from(ctx.peer_crashed_primary);
        if rct == 0 {
            return (NoSync, 40, None);
        }
        if ctx.self_role == Role::Primary || ctx.peer_role == Role::Primary {
            // Equal current UUIDs, nobody rotated, but a primary is present.
            if ctx.self_role == Role::Primary && ctx.peer_role == Role::Primary {
                return (
                    SplitBrain {
                        auto_recoverable: false,
                    },
                    41,
                    None,
                );
            }
            return if ctx.self_role == Role::Primary {
                (SourceUseBitmap, 41, None)
            } else {
                (TargetUseBitmap, 41, None)
            };
        }
        // Both secondary: recovery from a simultaneous hard crash.
        return match rct {
            1 => (SourceUseBitmap, 40, None),
            2 => (TargetUseBitmap, 40, None),
            _ if ctx.resolve_conflicts => (TargetUseBitmap, 40, None),
            _ => (SourceUseBitmap, 40, None),
        };
    }

    if m(peer.bitmap) == s {
        return (TargetUseBitmap, 50, None);
    }

    let ph0 = m(peer.hist(0));
    if ph0 == s && ph0.wrapping_add(UUID_NEW_BM_OFFSET) == m(peer.bitmap) {
        // The last P_SYNC_UUID did not get through: undo the peer's
        // resync-start modifications.
        peer.bitmap = peer.hist(0);
        if peer.history.len() >= 2 {
            peer.history[0] = peer.history[1];
        }
        return (TargetUseBitmap, 51, Some(UuidCorrection::PeerSyncUuidLost));
    }

    if peer.history.iter().any(|&h| m(h) == s) {
        return (TargetFullSync, 60, None);
    }

    let sb = m(local.bitmap);
    if sb == p {
        return (SourceUseBitmap, 70, None);
    }

    let sh0 = m(local.hist(0));
    if sh0 == p && sh0.wrapping_add(UUID_NEW_BM_OFFSET) == sb {
        // Our last sync UUID did not get through: undo our resync-start
        // modifications.
        local.bitmap = local.hist(0);
        if local.history.len() >= 2 {
            local.history[0] = local.history[1];
        }
        return (SourceUseBitmap, 71, Some(UuidCorrection::SelfSyncUuidLost));
    }

    if local.history.iter().any(|&h| m(h) == p) {
        return (SourceFullSync, 80, None);
    }

    if sb == m(peer.bitmap) && sb != 0 {
        return (
            SplitBrain {
                auto_recoverable: true,
            },
            90,
            None,
        );
    }

    for &h in &local.history {
        if peer.history.iter().any(|&q| m(q) == m(h)) {
            return (
                SplitBrain {
                    auto_recoverable: false,
                },
                100,
                None,
            );
        }
    }

    (Unrelated, 1000, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use SyncDecision::*;

    fn u(current: u64, bitmap: u64, h0: u64, h1: u64) -> GenerationUuids {
        GenerationUuids::new(current, bitmap, [h0, h1])
    }

    fn cmp(a: &GenerationUuids, b: &GenerationUuids) -> (SyncDecision, u32) {
        let o = uuid_compare(a, b, &CompareContext::default());
        (o.decision, o.rule)
    }

    /// The decision must be the mirror image when the sides swap (for rules
    /// without side-specific context).
    fn mirror(d: SyncDecision) -> SyncDecision {
        match d {
            SourceUseBitmap => TargetUseBitmap,
            SourceFullSync => TargetFullSync,
            TargetUseBitmap => SourceUseBitmap,
            TargetFullSync => SourceFullSync,
            x => x,
        }
    }

    const A: u64 = 0xAAAA_0000_0000_1000;
    const B: u64 = 0xBBBB_0000_0000_2000;
    const C: u64 = 0xCCCC_0000_0000_3000;
    const D: u64 = 0xDDDD_0000_0000_4000;
    const E: u64 = 0xEEEE_0000_0000_5000;

    #[test]
    fn rule_10_both_just_created() {
        let j = GenerationUuids::just_created();
        assert_eq!(cmp(&j, &j), (NoSync, 10));
        // bit 0 masked
        assert_eq!(cmp(&u(5, 0, 0, 0), &j), (NoSync, 10));
    }

    #[test]
    fn rule_20_30_one_side_just_created() {
        let j = GenerationUuids::just_created();
        let a = u(A, 0, 0, 0);
        assert_eq!(cmp(&j, &a), (TargetFullSync, 20));
        assert_eq!(cmp(&u(0, 0, 0, 0), &a), (TargetFullSync, 20));
        assert_eq!(cmp(&a, &j), (SourceFullSync, 30));
        assert_eq!(cmp(&a, &u(1, 0, 0, 0)), (SourceFullSync, 30));
    }

    #[test]
    fn rule_40_equal_current_no_crash() {
        assert_eq!(cmp(&u(A, 0, B, 0), &u(A | 1, 0, B, 0)), (NoSync, 40));
    }

    #[test]
    fn rule_34_36_self_was_source() {
        // We finished a resync as source but did not retire the bitmap UUID.
        let local = u(A, B, C, 0);
        let peer = u(A, 0, B, C);
        let o = uuid_compare(&local, &peer, &CompareContext::default());
        assert_eq!((o.decision, o.rule), (SourceUseBitmap, 34));
        assert_eq!(o.correction, Some(UuidCorrection::SelfMissedResyncFinished));
        assert_eq!(o.local, u(A, 0, B, C));
        assert_eq!(cmp(&u(A, B, C, 0), &u(A, 0, D, 0)), (SourceUseBitmap, 36));
    }

    #[test]
    fn rule_35_37_self_was_target() {
        let local = u(A, 0, B, C);
        let peer = u(A, B, C, 0);
        let o = uuid_compare(&local, &peer, &CompareContext::default());
        assert_eq!((o.decision, o.rule), (TargetUseBitmap, 35));
        assert_eq!(o.correction, Some(UuidCorrection::PeerMissedResyncFinished));
        assert_eq!(o.peer, u(A, 0, B, C));
        assert_eq!(o.local, local);
        assert_eq!(cmp(&u(A, 0, D, 0), &u(A, B, C, 0)), (TargetUseBitmap, 37));
    }

    #[test]
    fn rule_40_41_crashed_primary_arbitration() {
        let x = u(A, 0, B, 0);
        let ctx = |s: bool, p: bool, sr: Role, pr: Role, rc: bool| CompareContext {
            self_role: sr,
            peer_role: pr,
            self_crashed_primary: s,
            peer_crashed_primary: p,
            resolve_conflicts: rc,
        };
        let d = |c: CompareContext| {
            let o = uuid_compare(&x, &x, &c);
            (o.decision, o.rule)
        };
        use Role::*;
        assert_eq!(
            d(ctx(true, false, Secondary, Secondary, false)),
            (SourceUseBitmap, 40)
        );
        assert_eq!(
            d(ctx(false, true, Secondary, Secondary, false)),
            (TargetUseBitmap, 40)
        );
        assert_eq!(
            d(ctx(true, true, Secondary, Secondary, false)),
            (SourceUseBitmap, 40)
        );
        assert_eq!(
            d(ctx(true, true, Secondary, Secondary, true)),
            (TargetUseBitmap, 40)
        );
        // a current primary wins, whoever crashed
        assert_eq!(
            d(ctx(true, false, Secondary, Primary, false)),
            (TargetUseBitmap, 41)
        );
        assert_eq!(
            d(ctx(false, true, Primary, Secondary, false)),
            (SourceUseBitmap, 41)
        );
        assert_eq!(
            d(ctx(true, false, Primary, Primary, false)),
            (
                SplitBrain {
                    auto_recoverable: false
                },
                41
            )
        );
        // no crash flag: roles do not matter
        assert_eq!(
            d(ctx(false, false, Primary, Secondary, false)),
            (NoSync, 40)
        );
    }

    #[test]
    fn rule_50_70_bitmap_based() {
        // The peer went on writing (new current B, bitmap A = our current).
        let local = u(A, 0, C, 0);
        let peer = u(B | 1, A, C, 0);
        assert_eq!(cmp(&local, &peer), (TargetUseBitmap, 50));
        assert_eq!(cmp(&peer, &local), (SourceUseBitmap, 70));
    }

    #[test]
    fn rule_51_71_lost_sync_uuid() {
        // The source bumped its bitmap UUID for a resync (history got the old
        // one), the sync UUID never reached us.
        let local = u(A, 0, C, 0);
        let peer = u(B, A + UUID_NEW_BM_OFFSET, A, C);
        let o = uuid_compare(&local, &peer, &CompareContext::default());
        assert_eq!((o.decision, o.rule), (TargetUseBitmap, 51));
        assert_eq!(o.correction, Some(UuidCorrection::PeerSyncUuidLost));
        assert_eq!(o.peer, u(B, A, C, C));
        let o = uuid_compare(&peer, &local, &CompareContext::default());
        assert_eq!((o.decision, o.rule), (SourceUseBitmap, 71));
        assert_eq!(o.correction, Some(UuidCorrection::SelfSyncUuidLost));
        assert_eq!(o.local, u(B, A, C, C));
        // history match without the offset is not rule 51: falls to 60.
        assert_eq!(cmp(&u(A, 0, 0, 0), &u(B, D, A, 0)), (TargetFullSync, 60));
    }

    #[test]
    fn rule_60_80_history_full_sync() {
        let local = u(A, 0, 0, 0);
        let peer = u(B, D, C, A);
        assert_eq!(cmp(&local, &peer), (TargetFullSync, 60));
        assert_eq!(cmp(&peer, &local), (SourceFullSync, 80));
    }

    #[test]
    fn rule_90_split_brain_auto() {
        // Both went on writing from generation C.
        let local = u(A | 1, C, D, 0);
        let peer = u(B | 1, C, D, 0);
        assert_eq!(
            cmp(&local, &peer),
            (
                SplitBrain {
                    auto_recoverable: true
                },
                90
            )
        );
        assert_eq!(
            cmp(&peer, &local),
            (
                SplitBrain {
                    auto_recoverable: true
                },
                90
            )
        );
    }

    #[test]
    fn rule_100_split_brain_disconnect() {
        let local = u(A, B, D, 0);
        let peer = u(C, E, 0xF0, D);
        assert_eq!(
            cmp(&local, &peer),
            (
                SplitBrain {
                    auto_recoverable: false
                },
                100
            )
        );
        // DRBD quirk: empty histories match each other.
        assert_eq!(
            cmp(&u(A, 0, 0, 0), &u(B, 0, 0, 0)),
            (
                SplitBrain {
                    auto_recoverable: false
                },
                100
            )
        );
    }

    #[test]
    fn rule_1000_unrelated() {
        assert_eq!(
            cmp(&u(A, B, C, 0x10), &u(D, E, 0x20, 0x30)),
            (Unrelated, 1000)
        );
        assert_eq!(Unrelated.hg(), -1000);
    }

    #[test]
    fn decisions_mirror() {
        let sets = [
            u(A, 0, C, 0),
            u(B | 1, A, C, 0),
            u(B, D, C, A),
            u(A | 1, C, D, 0),
            u(B | 1, C, D, 0),
            u(C, E, 0xF0, D),
            GenerationUuids::just_created(),
        ];
        for a in &sets {
            for b in &sets {
                let (x, rx) = cmp(a, b);
                let (y, _) = cmp(b, a);
                if !(34..=41).contains(&rx) {
                    assert_eq!(mirror(x), y, "{a:?} vs {b:?}");
                }
            }
        }
    }

    #[test]
    fn rotation_and_resync_lifecycle() {
        // Both connected and in sync at generation A.
        let mut p = u(A | 1, 0, C, 0);
        let mut s = u(A, 0, C, 0);
        // The primary loses the secondary and writes on: new generation.
        p.new_current(true, B);
        assert_eq!(p, u(B | 1, A | 1, C, 0));
        assert_eq!(cmp(&s, &p), (TargetUseBitmap, 50));
        // Resync: source bumps its bitmap UUID and sends it; target adopts it.
        let sync = p.start_resync_as_source();
        assert_eq!(sync, (A | 1) + UUID_NEW_BM_OFFSET);
        assert_eq!(p.history[0], A | 1);
        s.receive_sync_uuid(sync);
        // Finish.
        p.resync_finished_as_source();
        s.resync_finished_as_target(&p, false);
        assert_eq!(m(s.current), m(p.current));
        assert_eq!(cmp(&s, &p).0, NoSync);
        assert_eq!(p.bitmap, 0);

        let mut r = GenerationUuids::just_created();
        r.new_current_random(true);
        assert_eq!(r.current & 1, 1);
        assert_eq!(r.bitmap, UUID_JUST_CREATED);
        r.set_bitmap(0);
        assert_eq!(r.history, vec![UUID_JUST_CREATED, 0]);
        r.set_bitmap(B | 1);
        assert_eq!(r.bitmap, B);
    }
}
