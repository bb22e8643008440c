//! The sync handshake decision, pure: given both sides' roles, disk states, generation
//! UUIDs, bitmap weights and flags, decide "no sync", "this side is source/target (bitmap
//! or full)", or "refuse", and resolve split brains with the configured after-sb policies.
//!
//! This is DRBD 8.4's `drbd_sync_handshake` with `drbd_asb_recover_0p/1p/2p`
//! (`drbd_receiver.c`). Both hosts run it on the same inputs (mirrored) and must come to
//! mirrored results; the volume cross-checks that with a `Decision` message.

use crate::drbd::{uuid_compare, CompareContext, GenerationUuids, Role, SyncDecision};
use crate::link::DiskState;

/// An after-split-brain policy (`after-sb-0pri`, `after-sb-1pri`, `after-sb-2pri`), as
/// DRBD 8.4 defines them (`drbd.conf(5)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Do not resolve: drop the connection, stay StandAlone, wait for the operator.
    Disconnect,
    /// (0pri) Discard the changes of the node that became primary last.
    DiscardYoungerPrimary,
    /// (0pri) Discard the changes of the node that became primary first.
    DiscardOlderPrimary,
    /// (0pri) If one node wrote nothing, sync from the other; otherwise disconnect.
    DiscardZeroChanges,
    /// (0pri) Discard the node with fewer changed blocks (zero changes first).
    DiscardLeastChanges,
    /// (0pri) Always discard this node's changes.
    DiscardLocal,
    /// (0pri) Always discard the peer's changes.
    DiscardRemote,
    /// (1pri) Apply the 0pri policy if its victim is the secondary, else disconnect.
    Consensus,
    /// (1pri) Discard the secondary's changes.
    DiscardSecondary,
}

impl SplitBrainPolicy {
    /// drbd.conf spelling.
    pub fn name(self) -> &'static str {
        match self {
            SplitBrainPolicy::Disconnect => "disconnect",
            SplitBrainPolicy::DiscardYoungerPrimary => "discard-younger-primary",
            SplitBrainPolicy::DiscardOlderPrimary => "discard-older-primary",
            SplitBrainPolicy::DiscardZeroChanges => "discard-zero-changes",
            SplitBrainPolicy::DiscardLeastChanges => "discard-least-changes",
            SplitBrainPolicy::DiscardLocal => "discard-local",
            SplitBrainPolicy::DiscardRemote => "discard-remote",
            SplitBrainPolicy::Consensus => "consensus",
            SplitBrainPolicy::DiscardSecondary => "discard-secondary",
        }
    }
}

/// The three policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitBrainPolicies {
    /// No primary at connect.
    pub after_sb_0pri: SplitBrainPolicy,
    /// One primary.
    pub after_sb_1pri: SplitBrainPolicy,
    /// Two primaries.
    pub after_sb_2pri: SplitBrainPolicy,
}

impl Default for SplitBrainPolicies {
    /// DRBD's defaults: disconnect everywhere.
    fn default() -> Self {
        SplitBrainPolicies {
            after_sb_0pri: SplitBrainPolicy::Disconnect,
            after_sb_1pri: SplitBrainPolicy::Disconnect,
            after_sb_2pri: SplitBrainPolicy::Disconnect,
        }
    }
}

/// One side's handshake facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    /// Role.
    pub role: Role,
    /// Disk state.
    pub disk: DiskState,
    /// Generation UUIDs.
    pub uuids: GenerationUuids,
    /// Crashed while primary (`MDF_CRASHED_PRIMARY`).
    pub crashed_primary: bool,
    /// Operator said `discard-my-data`.
    pub discard_my_data: bool,
    /// Set bits in its bitmap (blocks changed since the generations diverged).
    pub bm_weight: u64,
}

/// What to do after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Data identical: Connected.
    NoSync,
    /// This side is sync source.
    Source {
        /// Full sync (every block) rather than the bitmap.
        full: bool,
    },
    /// This side is sync target.
    Target {
        /// Full sync.
        full: bool,
    },
    /// Drop the connection.
    Refuse {
        /// Go StandAlone (no automatic reconnect) rather than retry.
        standalone: bool,
    },
}

/// The decision with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What to do.
    pub outcome: Outcome,
    /// DRBD's `hg` (0, ±1, ±2, -100 refuse, -1000 unrelated).
    pub hg: i32,
    /// `drbd_uuid_compare` rule.
    pub rule: u32,
    /// A split brain was detected (resolved or not).
    pub split_brain: bool,
    /// Our UUIDs after any correction `uuid_compare` made (persist them).
    pub local_uuids: GenerationUuids,
    /// Human explanation for the log.
    pub why: String,
}

fn role_bit(u: &GenerationUuids) -> u64 {
    u.bitmap & 1
}

/// `drbd_asb_recover_0p`: returns 1 (we are source), -1 (target) or -100 (unresolved).
fn recover_0p(
    policy: SplitBrainPolicy,
    local: &Side,
    peer: &Side,
    resolve_conflicts: bool,
    why: &mut String,
) -> i32 {
    use SplitBrainPolicy::*;
    let s = role_bit(&local.uuids);
    let p = role_bit(&peer.uuids);
    let (ch_self, ch_peer) = (local.bm_weight, peer.bm_weight);
    let tie = if resolve_conflicts { -1 } else { 1 };
    let least = |why: &mut String| {
        why.push_str(&format!(
            "; least changes: local {ch_self} blocks, peer {ch_peer} blocks"
        ));
        match ch_self.cmp(&ch_peer) {
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Greater => 1,
            std::cmp::Ordering::Equal => tie,
        }
    };
    let zero = |why: &mut String| -> Option<i32> {
        why.push_str(&format!(
            "; zero changes check: local {ch_self} blocks, peer {ch_peer} blocks"
        ));
        if ch_peer == 0 && ch_self == 0 {
            Some(tie)
        } else if ch_peer == 0 {
            Some(1)
        } else if ch_self == 0 {
            Some(-1)
        } else {
            None
        }
    };
    match policy {
        Disconnect => -100,
        Consensus | DiscardSecondary => {
            why.push_str(&format!(
                "; configuration error: {} is not valid for after-sb-0pri",
                policy.name()
            ));
            -100
        }
        DiscardLocal => -1,
        DiscardRemote => 1,
        DiscardYoungerPrimary | DiscardOlderPrimary => {
            let younger = policy == DiscardYoungerPrimary;
            // Bit 0 of the bitmap UUID: this node was primary when the generation split.
            if s == 0 && p == 1 {
                return if younger { -1 } else { 1 };
            }
            if s == 1 && p == 0 {
                return if younger { 1 } else { -1 };
            }
            why.push_str("; younger/older primary undecidable, using discard-least-changes");
            zero(why).unwrap_or_else(|| least(why))
        }
        DiscardZeroChanges => zero(why).unwrap_or(-100),
        DiscardLeastChanges => zero(why).unwrap_or_else(|| least(why)),
    }
}

/// Runs the handshake decision. `resolve_conflicts` must be true on exactly one side
/// (twinsan: the side that dialed the surviving connection).
pub fn decide(
    local: &Side,
    peer: &Side,
    resolve_conflicts: bool,
    policies: &SplitBrainPolicies,
) -> Verdict {
    let ctx = CompareContext {
        self_role: local.role,
        peer_role: peer.role,
        self_crashed_primary: local.crashed_primary,
        peer_crashed_primary: peer.crashed_primary,
        resolve_conflicts,
    };
    let o = uuid_compare(&local.uuids, &peer.uuids, &ctx);
    let mut why = format!("uuid_compare()={} by rule {}", o.decision.hg(), o.rule);
    let mut hg = o.decision.hg();
    let mut split_brain = matches!(o.decision, SyncDecision::SplitBrain { .. });
    let verdict = |outcome, hg, why: String, split_brain| Verdict {
        outcome,
        hg,
        rule: o.rule,
        split_brain,
        local_uuids: o.local.clone(),
        why,
    };
    if o.decision == SyncDecision::Unrelated {
        why.push_str("; unrelated data (no common generation), refusing");
        return verdict(Outcome::Refuse { standalone: true }, -1000, why, false);
    }
    // drbd_sync_handshake: disk states override.
    let (my, pd) = (local.disk, peer.disk);
    if (my == DiskState::Inconsistent && pd > DiskState::Inconsistent)
        || (pd == DiskState::Inconsistent && my > DiskState::Inconsistent)
    {
        let f = hg == -100 || hg.abs() == 2;
        hg = if my > DiskState::Inconsistent { 1 } else { -1 };
        if f {
            hg *= 2;
        }
        split_brain = false;
        why.push_str(&format!(
            "; becoming sync {} due to disk states (local {my}, peer {pd})",
            if hg > 0 { "source" } else { "target" }
        ));
    }
    if hg == 100 {
        let pcount = u8::from(local.role == Role::Primary) + u8::from(peer.role == Role::Primary);
        let policy = match pcount {
            0 => policies.after_sb_0pri,
            1 => policies.after_sb_1pri,
            _ => policies.after_sb_2pri,
        };
        why.push_str(&format!(
            "; split brain with {pcount} primaries, after-sb-{pcount}pri {}",
            policy.name()
        ));
        hg = match pcount {
            0 => recover_0p(policy, local, peer, resolve_conflicts, &mut why),
            1 => match policy {
                SplitBrainPolicy::Disconnect => -100,
                SplitBrainPolicy::Consensus => {
                    why.push_str(&format!(
                        " (using after-sb-0pri {})",
                        policies.after_sb_0pri.name()
                    ));
                    let h = recover_0p(
                        policies.after_sb_0pri,
                        local,
                        peer,
                        resolve_conflicts,
                        &mut why,
                    );
                    if (h == -1 && local.role == Role::Secondary)
                        || (h == 1 && local.role == Role::Primary)
                    {
                        h
                    } else {
                        if h.abs() == 1 {
                            why.push_str("; no consensus: the 0pri victim is the primary");
                        }
                        -100
                    }
                }
                SplitBrainPolicy::DiscardSecondary => {
                    if local.role == Role::Primary {
                        1
                    } else {
                        -1
                    }
                }
                other => {
                    why.push_str(&format!(
                        "; configuration error: {} is not valid for after-sb-1pri",
                        other.name()
                    ));
                    -100
                }
            },
            _ => {
                if policy != SplitBrainPolicy::Disconnect {
                    why.push_str(&format!(
                        "; configuration error: {} is not valid for after-sb-2pri",
                        policy.name()
                    ));
                }
                -100
            }
        };
        if hg.abs() < 100 {
            why.push_str(&format!(
                "; automatically resolved: sync from {} node, {} changes are discarded",
                if hg < 0 { "the peer" } else { "this" },
                if hg < 0 { "this node's" } else { "the peer's" }
            ));
        }
    }
    if hg == -100 {
        if local.discard_my_data && !peer.discard_my_data {
            hg = -1;
        }
        if !local.discard_my_data && peer.discard_my_data {
            hg = 1;
        }
        if hg.abs() < 100 {
            why.push_str(&format!(
                "; manually resolved (discard-my-data on {}): sync from {} node",
                if hg < 0 { "this node" } else { "the peer" },
                if hg < 0 { "the peer" } else { "this" }
            ));
        }
    }
    if hg == -100 {
        why.push_str("; split brain detected but unresolved, dropping connection (StandAlone)");
        return verdict(Outcome::Refuse { standalone: true }, -100, why, true);
    }
    if hg > 0 && local.disk <= DiskState::Inconsistent {
        why.push_str("; I shall become sync source, but I am inconsistent");
        return verdict(Outcome::Refuse { standalone: true }, -100, why, split_brain);
    }
    if hg < 0 && peer.disk <= DiskState::Inconsistent {
        why.push_str("; the peer shall become sync source, but it is inconsistent");
        return verdict(Outcome::Refuse { standalone: true }, -100, why, split_brain);
    }
    // rr-conflict disconnect (twinsan never lets a primary become sync target).
    if hg < 0 && local.role == Role::Primary {
        why.push_str("; I shall become sync target, but I am primary (demote first)");
        return verdict(
            Outcome::Refuse { standalone: false },
            -100,
            why,
            split_brain,
        );
    }
    if hg > 0 && peer.role == Role::Primary {
        why.push_str("; the peer shall become sync target, but it is primary");
        return verdict(
            Outcome::Refuse { standalone: false },
            -100,
            why,
            split_brain,
        );
    }
    if local.role == Role::Primary && peer.role == Role::Primary {
        why.push_str("; both nodes are primary: dual primary is never allowed");
        return verdict(Outcome::Refuse { standalone: true }, -100, why, split_brain);
    }
    let outcome = match hg {
        0 => Outcome::NoSync,
        1 => Outcome::Source { full: false },
        -1 => Outcome::Target { full: false },
        h if h >= 2 => Outcome::Source { full: true },
        _ => Outcome::Target { full: true },
    };
    verdict(outcome, hg.clamp(-2, 2), why, split_brain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use SplitBrainPolicy::*;

    const A: u64 = 0xAAAA_0000_0000_1000;
    const B: u64 = 0xBBBB_0000_0000_2000;
    const C: u64 = 0xCCCC_0000_0000_3000;

    fn side(role: Role, current: u64, bitmap: u64, h0: u64, weight: u64) -> Side {
        Side {
            role,
            disk: DiskState::UpToDate,
            uuids: GenerationUuids::new(current, bitmap, [h0, 0]),
            crashed_primary: false,
            discard_my_data: false,
            bm_weight: weight,
        }
    }

    fn pol(p0: SplitBrainPolicy, p1: SplitBrainPolicy) -> SplitBrainPolicies {
        SplitBrainPolicies {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
            after_sb_2pri: Disconnect,
        }
    }

    /// Both sides, mirrored; asserts the results mirror each other.
    fn both(a: &Side, b: &Side, p: &SplitBrainPolicies) -> (Verdict, Verdict) {
        let va = decide(a, b, true, p);
        let vb = decide(b, a, false, p);
        match (va.outcome, vb.outcome) {
            (Outcome::Refuse { .. }, Outcome::Refuse { .. }) => {}
            (Outcome::NoSync, Outcome::NoSync) => {}
            (Outcome::Source { full: f1 }, Outcome::Target { full: f2 })
            | (Outcome::Target { full: f1 }, Outcome::Source { full: f2 }) => assert_eq!(f1, f2),
            x => panic!("not mirrored: {x:?}\n{}\n{}", va.why, vb.why),
        }
        (va, vb)
    }

    #[test]
    fn equal_uuids_no_sync() {
        let a = side(Role::Primary, A | 1, 0, B, 0);
        let b = side(Role::Secondary, A, 0, B, 0);
        let (va, _) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::NoSync);
    }

    #[test]
    fn primary_after_disconnect_is_bitmap_source() {
        // A rotated (bitmap = old current A) while the peer stayed at A.
        let a = side(Role::Primary, C | 1, A | 1, B, 10);
        let b = side(Role::Secondary, A, 0, B, 0);
        let (va, vb) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::Source { full: false });
        assert_eq!(vb.outcome, Outcome::Target { full: false });
    }

    fn split(wa: u64, wb: u64, ra: Role, rb: Role) -> (Side, Side) {
        // Both rotated from common generation A: rule 90.
        let mut a = side(ra, B | 1, A | 1, 0, wa);
        let mut b = side(rb, C | 1, A, 0, wb);
        a.uuids.history = vec![0, 0];
        b.uuids.history = vec![0, 0];
        (a, b)
    }

    #[test]
    fn split_brain_disconnect_policy_refuses_standalone() {
        let (a, b) = split(5, 5, Role::Secondary, Role::Secondary);
        let (va, vb) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::Refuse { standalone: true });
        assert!(va.split_brain && vb.split_brain);
    }

    #[test]
    fn discard_zero_changes_picks_the_idle_side() {
        let (a, b) = split(7, 0, Role::Secondary, Role::Secondary);
        let (va, vb) = both(&a, &b, &pol(DiscardZeroChanges, Disconnect));
        assert_eq!(va.outcome, Outcome::Source { full: false });
        assert_eq!(vb.outcome, Outcome::Target { full: false });
        // Both changed: not resolved.
        let (a, b) = split(7, 1, Role::Secondary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(DiscardZeroChanges, Disconnect));
        assert_eq!(va.outcome, Outcome::Refuse { standalone: true });
    }

    #[test]
    fn discard_least_changes() {
        let (a, b) = split(3, 9, Role::Secondary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(DiscardLeastChanges, Disconnect));
        assert_eq!(va.outcome, Outcome::Target { full: false });
        // Tie: the side with resolve_conflicts (a) becomes target.
        let (a, b) = split(4, 4, Role::Secondary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(DiscardLeastChanges, Disconnect));
        assert_eq!(va.outcome, Outcome::Target { full: false });
    }

    #[test]
    fn discard_younger_and_older_primary() {
        // a's bitmap UUID has bit 0 (a was primary at the split, b was promoted later).
        let (a, b) = split(3, 9, Role::Secondary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(DiscardYoungerPrimary, Disconnect));
        assert_eq!(va.outcome, Outcome::Source { full: false });
        let (va, _) = both(&a, &b, &pol(DiscardOlderPrimary, Disconnect));
        assert_eq!(va.outcome, Outcome::Target { full: false });
    }

    #[test]
    fn consensus_one_primary() {
        // Primary a wrote, secondary b did not: 0pri zero-changes victim is b → agreed.
        let (a, b) = split(7, 0, Role::Primary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(DiscardZeroChanges, Consensus));
        assert_eq!(va.outcome, Outcome::Source { full: false });
        // The victim would be the primary: no consensus.
        let (a, b) = split(0, 7, Role::Primary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(DiscardZeroChanges, Consensus));
        assert_eq!(va.outcome, Outcome::Refuse { standalone: true });
        // discard-secondary
        let (a, b) = split(0, 7, Role::Primary, Role::Secondary);
        let (va, _) = both(&a, &b, &pol(Disconnect, DiscardSecondary));
        assert_eq!(va.outcome, Outcome::Source { full: false });
    }

    #[test]
    fn two_primaries_always_refused() {
        let (a, b) = split(7, 0, Role::Primary, Role::Primary);
        let (va, _) = both(&a, &b, &pol(DiscardZeroChanges, Consensus));
        assert!(matches!(va.outcome, Outcome::Refuse { .. }));
    }

    #[test]
    fn discard_my_data_resolves_manually() {
        let (a, mut b) = split(5, 5, Role::Secondary, Role::Secondary);
        b.discard_my_data = true;
        let (va, vb) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::Source { full: false });
        assert_eq!(vb.outcome, Outcome::Target { full: false });
        assert!(vb.why.contains("manually resolved"));
    }

    #[test]
    fn initial_full_sync_and_unrelated() {
        let a = side(Role::Secondary, A, 0, 0, 0);
        let mut b = side(Role::Secondary, 4, 0, 0, 0);
        b.disk = DiskState::Inconsistent;
        let (va, _) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::Source { full: true });
        let a = side(Role::Secondary, A, 0, B, 0);
        let b = side(Role::Secondary, C, 0, 0xDDDD_0000, 0);
        let (va, _) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::Refuse { standalone: true });
    }

    #[test]
    fn primary_never_becomes_target() {
        let a = side(Role::Primary, A | 1, 0, B, 0);
        let b = side(Role::Secondary, C, A, B, 3);
        let (va, _) = both(&a, &b, &SplitBrainPolicies::default());
        assert_eq!(va.outcome, Outcome::Refuse { standalone: false });
    }
}
