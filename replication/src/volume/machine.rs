//! The volume's protocol state machine, pure: `step(event) -> actions`, no I/O, no locks.
//!
//! It holds what DRBD 8.4 keeps in `union drbd_state` (`drbd_int.h`, `drbd_state.c`): our
//! role, our disk state, the connection state and the peer's role and disk while connected.
//! The connection state is one enum ([`Conn`]); the peer's facts, the resync progress and
//! the handshake's verdict live inside the variant where they are meaningful, so
//! "resync progress while not connected" or "handshaking with a link attached" cannot be
//! written down.
//!
//! The async side (`conn.rs`, `io.rs`, `sync.rs`, `mod.rs`) moves bytes and metadata: it
//! turns what happened into an [`Event`], calls [`VolumeMachine::step`] under the state
//! mutex, and carries out the returned [`Action`]s in order (logs, metadata changes, frames
//! to send, tasks to spawn). Decisions that already are pure functions are reused:
//! [`crate::policy::decide`] (`drbd_sync_handshake`, after-sb policies) and, through it,
//! [`crate::drbd::uuid_compare`].

use std::time::Instant;

use super::{ConnState, Fencing, ResyncProgress, VerifyProgress};
use crate::drbd::{GenerationUuids, Role};
use crate::link::DiskState;
use crate::policy::{decide, Outcome, Side, SplitBrainPolicies, Verdict};

/// The peer as it last reported itself (handshake `StateChange`, later `StateChange`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) role: Role,
    pub(crate) disk: DiskState,
}

/// Resync progress (bytes), started when a resync starts.
#[derive(Debug, Clone)]
pub(crate) struct Track {
    total: u64,
    done: u64,
    started: Instant,
}

impl Track {
    /// A resync of `total` bytes starting now.
    pub(crate) fn start(total: u64) -> Track {
        Track {
            total,
            done: 0,
            started: Instant::now(),
        }
    }

    pub(crate) fn progress(&self) -> ResyncProgress {
        let total = self.total.max(self.done);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let bps = (self.done as f64 / secs) as u64;
        ResyncProgress {
            done_bytes: self.done,
            total_bytes: total,
            percent: if total == 0 {
                100.0
            } else {
                self.done as f64 * 100.0 / total as f64
            },
            bytes_per_sec: bps,
            eta_secs: (bps > 0).then(|| (total - self.done) / bps),
        }
    }
}

/// What runs on an attached connection (DRBD `C_CONNECTED`, `C_SYNC_SOURCE`,
/// `C_SYNC_TARGET`, `C_VERIFY_S`).
#[derive(Debug, Clone)]
pub(crate) enum Repl {
    /// Replicas in sync (or only application writes pending).
    Established,
    /// Pushing the out-of-sync blocks to the peer.
    SyncSource(Track),
    /// Receiving the peer's out-of-sync blocks; our disk is Inconsistent meanwhile.
    SyncTarget(Track),
    /// Online verify running from this side (`C_VERIFY_S`).
    VerifyS,
}

/// The connection state. A link (socket + writer task) exists exactly in `Connected`.
#[derive(Debug, Clone)]
pub(crate) enum Conn {
    /// Not connected and not trying (split brain, refused peer, operator `disconnect`).
    StandAlone,
    /// Trying to connect (`C_WF_CONNECTION`).
    Connecting,
    /// Authenticated; exchanging state, bitmaps and the decision (`C_WF_REPORT_PARAMS`).
    /// Application writes wait so both bitmaps are exact.
    Handshake {
        epoch: u64,
        /// The peer's facts once its `StateChange` arrived.
        peer: Option<Side>,
        /// Our decision once we ran [`decide`].
        verdict: Option<Verdict>,
    },
    /// The link is attached.
    Connected { epoch: u64, peer: Peer, repl: Repl },
}

impl Conn {
    /// The public (status) view: the handshake shows as Connecting, as it always did.
    fn public(&self) -> ConnState {
        match self {
            Conn::StandAlone => ConnState::StandAlone,
            Conn::Connecting | Conn::Handshake { .. } => ConnState::Connecting,
            Conn::Connected { repl, .. } => match repl {
                Repl::Established => ConnState::Connected,
                Repl::SyncSource(_) => ConnState::SyncSource,
                Repl::SyncTarget(_) => ConnState::SyncTarget,
                Repl::VerifyS => ConnState::VerifySource,
            },
        }
    }
}

/// What the write path does with an application write (`drbd_req.c`
/// `drbd_request_prepare` / `__req_mod`), decided under the state lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteGate {
    /// Not primary: SBC-3 write protect.
    ReadOnly,
    /// Shutting down.
    Closed,
    /// Handshake running, or fencing suspended I/O: wait for the next state change.
    Wait,
    /// Send it to the peer on connection `epoch` (protocol C).
    Replicate { epoch: u64 },
    /// No peer: write locally and mark the range out of sync.
    Degraded,
}

/// Why the machine refused an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// Promotion needs an UpToDate disk (`drbd_set_role`: `SS_NO_UP_TO_DATE_DISK`).
    #[error("refusing to promote: local disk is {0} (use force to override)")]
    NotUpToDate(DiskState),
    /// Never two primaries (`SS_TWO_PRIMARIES`).
    #[error("refusing to promote: the peer is primary (dual primary is never allowed)")]
    PeerIsPrimary,
    /// Needs a connection.
    #[error("not connected to the peer")]
    NotConnected,
    /// Not allowed in the current state.
    #[error("not allowed now: {0}")]
    NotAllowed(String),
    /// The peer broke the protocol: drop the link with this reason.
    #[error("{0}")]
    Protocol(String),
}

/// Something that happened.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A peer authenticated (`link::auth`): start the handshake on a new epoch.
    LinkUp,
    /// The peer's handshake `StateChange` arrived.
    PeerState { epoch: u64, peer: Side },
    /// The peer's bitmap is complete: decide, given our own facts from the start of the
    /// handshake. `dialer` resolves conflicts (exactly one side has it).
    Decide {
        epoch: u64,
        local: Side,
        dialer: bool,
        policies: SplitBrainPolicies,
    },
    /// The peer's `Decision` arrived.
    PeerDecision { epoch: u64, hg: i32 },
    /// The decision's UUIDs and bitmap are on disk; attach the link.
    VerdictPersisted {
        epoch: u64,
        /// Our sync UUID when we are sync source.
        sync_uuid: Option<u64>,
        /// Out-of-sync bytes to resync.
        oos_bytes: u64,
        /// The link was closed while the metadata was written.
        killed: bool,
    },
    /// The link ended (or the handshake failed); `standalone`: do not reconnect.
    LinkLost { reason: String, standalone: bool },
    /// A `StateChange` after the handshake.
    PeerStateChange { role: Role, disk: DiskState },
    /// A replicated `Write` from the peer.
    PeerWrite,
    /// The peer starts a resync to us (`SyncUuid`); `oos_bytes` is our bitmap's weight.
    SyncUuid { uuid: u64, oos_bytes: u64 },
    /// `ResyncData` from the peer.
    ResyncData,
    /// A resync block was written (target) or acknowledged (source).
    ResyncBlockDone { bytes: u64 },
    /// The sync source's bitmap is empty and its metadata updated.
    ResyncFinishedSource { epoch: u64, uuids: GenerationUuids },
    /// The sync target took the source's UUIDs (`ResyncDone`) and flushed.
    ResyncFinishedTarget { epoch: u64 },
    /// Operator: start online verify on `total` bytes.
    StartVerify { total: u64 },
    /// Verify progress.
    VerifyProgress { done: u64, mismatches: u64 },
    /// The verify walk reached the end.
    VerifyFinished {
        epoch: u64,
        total: u64,
        mismatches: u64,
        secs: f64,
    },
    /// The repair resync after verify has its sync UUID on disk.
    RepairStart {
        epoch: u64,
        sync_uuid: u64,
        oos_bytes: u64,
    },
    /// The local write of an application request failed.
    LocalWriteFailed { offset: u64, len: u64 },
    /// The peer failed a replicated write.
    PeerWriteFailed { offset: u64, len: u64 },
    /// Operator: promote (`drbdadm primary [--force]`).
    Promote { force: bool },
    /// The promotion's metadata is on disk.
    Promoted { forced: bool },
    /// Operator: demote.
    Demote,
    /// The demotion drained, flushed and wrote clean metadata.
    Demoted,
    /// Operator: `resume-io`.
    ResumeIo,
    /// Operator: `connect`.
    Connect,
    /// Operator: `disconnect`.
    Disconnect,
    /// Operator: `connect --discard-my-data`.
    DiscardMyData,
    /// Operator: `invalidate`.
    Invalidate,
    /// `invalidate`'s bitmap and flags are on disk.
    Invalidated,
    /// `down` starts.
    Shutdown,
    /// `down` finished.
    ShutdownDone,
    /// Test hook: simulated crash.
    Crash,
}

/// Something to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    // Logs (the shell writes the exact lines operators and tests grep for).
    ConnChanged {
        from: ConnState,
        to: ConnState,
        why: String,
    },
    RoleChanged {
        from: Role,
        to: Role,
    },
    ForcedPromotion {
        disk: DiskState,
    },
    PeerRoleChanged {
        from: Option<Role>,
        to: Role,
    },
    PeerDiskChanged {
        from: Option<DiskState>,
        to: DiskState,
    },
    /// The handshake refused the peer.
    HandshakeRefused {
        why: String,
        split_brain: bool,
    },
    /// The handshake accepted the peer (maybe after resolving a split brain).
    HandshakeAccepted {
        why: String,
        split_brain: bool,
    },
    ResyncStarts {
        bytes: u64,
    },
    ResyncFinished {
        source: bool,
        progress: ResyncProgress,
    },
    ResyncInterrupted,
    VerifyFinished {
        mismatches: u64,
        /// How long the pass took (for the log line).
        secs: f64,
    },
    IoResumed,
    DiscardMyData,
    ShuttingDown,

    // Metadata, in memory (the shell persists later).
    /// A primary lost its peer: new current UUID if the bitmap UUID is 0
    /// (`drbd_uuid_new_current`).
    NewGeneration,
    MarkOutOfSync {
        offset: u64,
        len: u64,
    },
    /// `receive_sync_uuid`, and clear CONSISTENT / WAS_UP_TO_DATE.
    TakeSyncUuid(u64),

    // The link.
    /// Attach the link of `epoch` (the shell stores its sender and pending table).
    AttachLink {
        epoch: u64,
    },
    /// Cancel the attached link.
    DropLink,
    /// Send `Disconnect`, then end the connection (`standalone`: do not reconnect).
    RefusePeer {
        why: String,
        standalone: bool,
    },
    SendDecision(i32),
    SendStateChange,
    SendSyncUuid(u64),
    SendResyncDone(GenerationUuids),

    // I/O whose completion is the next event.
    /// Write the decision's UUIDs and bitmap durably, then [`Event::VerdictPersisted`].
    PersistVerdict {
        outcome: Outcome,
        uuids: GenerationUuids,
        peer_disk: DiskState,
    },
    /// Write the promotion's UUIDs and flags, then [`Event::Promoted`].
    PromoteMetadata {
        connected: bool,
        forced: bool,
    },
    /// Set the whole bitmap and clear the consistency flags, then [`Event::Invalidated`].
    InvalidateMetadata,
    StartResyncSource {
        epoch: u64,
    },
    StartVerify {
        epoch: u64,
    },
    /// Verify found differences and we are UpToDate: resync them from here.
    RepairAfterVerify {
        epoch: u64,
        mismatches: u64,
    },
    /// Verify found differences but this side cannot be sync source.
    CannotRepair,
    Persist(&'static str),
}

/// The handshake flags of `drbd_sync_handshake` we send (`WIRE_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HandshakeFlags {
    /// Operator `discard-my-data`: lose a split brain on the next connect.
    pub(crate) discard_my_data: bool,
    /// `MDF_CRASHED_PRIMARY`: we crashed as primary (affects `uuid_compare`).
    pub(crate) crashed_primary: bool,
}

/// The volume's state. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct VolumeMachine {
    role: Role,
    disk: DiskState,
    conn: Conn,
    /// Counts connections (handshakes); tasks of an old connection compare it.
    epoch: u64,
    /// After the current link ends, stay StandAlone instead of reconnecting.
    standalone: bool,
    flags: HandshakeFlags,
    /// The last handshake found a split brain (reported in the status).
    split_brain: bool,
    /// `resume-io`: writes go on degraded despite `fencing suspend-io`.
    io_resumed: bool,
    /// `down` (or a crash) started.
    closing: bool,
    /// Last or current verify pass (reported in the status).
    verify: Option<VerifyProgress>,
}

impl VolumeMachine {
    /// A volume just opened: Secondary, disk from the metadata flags, Connecting.
    pub(crate) fn new(disk: DiskState, crashed_primary: bool) -> Self {
        VolumeMachine {
            role: Role::Secondary,
            disk,
            conn: Conn::Connecting,
            epoch: 0,
            standalone: false,
            flags: HandshakeFlags {
                discard_my_data: false,
                crashed_primary,
            },
            split_brain: false,
            io_resumed: false,
            closing: false,
            verify: None,
        }
    }

    /// The current connection's epoch (the last [`Event::LinkUp`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn role(&self) -> Role {
        self.role
    }

    pub(crate) fn disk(&self) -> DiskState {
        self.disk
    }

    pub(crate) fn conn_state(&self) -> ConnState {
        self.conn.public()
    }

    pub(crate) fn peer(&self) -> Option<Peer> {
        match &self.conn {
            Conn::Connected { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    pub(crate) fn split_brain(&self) -> bool {
        self.split_brain
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing
    }

    pub(crate) fn standalone(&self) -> bool {
        self.standalone
    }

    pub(crate) fn flags(&self) -> HandshakeFlags {
        self.flags
    }

    pub(crate) fn verify(&self) -> Option<&VerifyProgress> {
        self.verify.as_ref()
    }

    pub(crate) fn resync(&self) -> Option<ResyncProgress> {
        match &self.conn {
            Conn::Connected {
                repl: Repl::SyncSource(t) | Repl::SyncTarget(t),
                ..
            } => Some(t.progress()),
            _ => None,
        }
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        matches!(self.conn, Conn::Handshake { .. })
    }

    fn connected_epoch(&self) -> Option<u64> {
        match self.conn {
            Conn::Connected { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// The link of `epoch` is attached.
    pub(crate) fn epoch_alive(&self, epoch: u64) -> bool {
        self.connected_epoch() == Some(epoch)
    }

    /// The link of `epoch` is attached and in state `c`.
    pub(crate) fn conn_is(&self, epoch: u64, c: ConnState) -> bool {
        self.epoch_alive(epoch) && self.conn.public() == c
    }

    /// The dialer should try: no link, no handshake, not StandAlone, not closing.
    pub(crate) fn wants_dial(&self) -> bool {
        matches!(self.conn, Conn::Connecting | Conn::StandAlone)
            && !self.standalone
            && !self.closing
    }

    /// Fencing `suspend-io` holds writes: primary, no link, not resumed.
    pub(crate) fn suspended(&self, fencing: Fencing) -> bool {
        fencing == Fencing::SuspendIo
            && self.role == Role::Primary
            && self.connected_epoch().is_none()
            && !self.io_resumed
    }

    /// Where an application write goes now.
    pub(crate) fn write_gate(&self, fencing: Fencing) -> WriteGate {
        if self.role != Role::Primary {
            return WriteGate::ReadOnly;
        }
        if self.closing {
            return WriteGate::Closed;
        }
        if self.is_handshaking() || self.suspended(fencing) {
            return WriteGate::Wait;
        }
        match self.connected_epoch() {
            Some(epoch) => WriteGate::Replicate { epoch },
            None => WriteGate::Degraded,
        }
    }

    /// Our handshake facts, given the metadata's UUIDs and bitmap weight.
    pub(crate) fn local_side(&self, uuids: GenerationUuids, bm_weight: u64) -> Side {
        Side {
            role: self.role,
            disk: self.disk,
            uuids,
            crashed_primary: self.flags.crashed_primary,
            discard_my_data: self.flags.discard_my_data,
            bm_weight,
        }
    }

    fn set_conn(&mut self, new: Conn, why: &str, out: &mut Vec<Action>) {
        let (from, to) = (self.conn.public(), new.public());
        self.conn = new;
        if from != to {
            out.push(Action::ConnChanged {
                from,
                to,
                why: why.to_string(),
            });
        }
    }

    fn in_handshake(
        &mut self,
        epoch: u64,
    ) -> Result<(&mut Option<Side>, &mut Option<Verdict>), Refusal> {
        match &mut self.conn {
            Conn::Handshake {
                epoch: e,
                peer,
                verdict,
            } if *e == epoch => Ok((peer, verdict)),
            _ => Err(Refusal::Protocol(
                "connection closed during the handshake".into(),
            )),
        }
    }

    /// Applies `ev`; returns what to do, in order, or why it was refused (the state is
    /// unchanged then).
    pub(crate) fn step(&mut self, ev: Event) -> Result<Vec<Action>, Refusal> {
        let mut out = Vec::new();
        match ev {
            Event::LinkUp => {
                self.epoch += 1;
                let epoch = self.epoch;
                self.set_conn(
                    Conn::Handshake {
                        epoch,
                        peer: None,
                        verdict: None,
                    },
                    "peer authenticated, exchanging state",
                    &mut out,
                );
            }
            Event::PeerState { epoch, peer } => {
                let (p, _) = self.in_handshake(epoch)?;
                if p.is_some() {
                    return Err(Refusal::Protocol(
                        "unexpected StateChange during the handshake".into(),
                    ));
                }
                *p = Some(peer);
            }
            Event::Decide {
                epoch,
                local,
                dialer,
                policies,
            } => {
                let (p, v) = self.in_handshake(epoch)?;
                let peer = p
                    .as_ref()
                    .ok_or(Refusal::Protocol("no state from peer".into()))?;
                let verdict = decide(&local, peer, dialer, &policies);
                out.push(Action::SendDecision(verdict.hg));
                *v = Some(verdict);
            }
            Event::PeerDecision { epoch, hg: peer_hg } => {
                let (p, v) = self.in_handshake(epoch)?;
                let (Some(peer), Some(v)) = (p.as_ref(), v.as_ref()) else {
                    return Err(Refusal::Protocol("unexpected Decision".into()));
                };
                // Both sides decide on mirrored inputs; the results must mirror (hg = -hg),
                // or both refuse (DRBD compares them implicitly through the sync UUIDs).
                let agree = (v.hg <= -100 && peer_hg <= -100) || (v.hg > -100 && peer_hg == -v.hg);
                if !agree {
                    return Err(Refusal::Protocol(format!(
                        "sync decisions disagree (ours {}, peer's {peer_hg}); {}",
                        v.hg, v.why
                    )));
                }
                let v = v.clone();
                let peer_disk = peer.disk;
                if let Outcome::Refuse { standalone } = v.outcome {
                    if v.split_brain {
                        self.split_brain = true;
                    }
                    out.push(Action::HandshakeRefused {
                        why: v.why.clone(),
                        split_brain: v.split_brain,
                    });
                    out.push(Action::RefusePeer {
                        why: v.why,
                        standalone,
                    });
                } else {
                    out.push(Action::HandshakeAccepted {
                        why: v.why.clone(),
                        split_brain: v.split_brain,
                    });
                    out.push(Action::PersistVerdict {
                        outcome: v.outcome,
                        uuids: v.local_uuids,
                        peer_disk,
                    });
                }
            }
            Event::VerdictPersisted {
                epoch,
                sync_uuid,
                oos_bytes,
                killed,
            } => {
                let (p, v) = self.in_handshake(epoch)?;
                if killed {
                    return Err(Refusal::Protocol(
                        "connection closed during the handshake".into(),
                    ));
                }
                let (Some(side), Some(v)) = (p.clone(), v.clone()) else {
                    return Err(Refusal::Protocol("no decision to apply".into()));
                };
                let mut peer = Peer {
                    role: side.role,
                    disk: side.disk,
                };
                out.push(Action::AttachLink { epoch });
                self.io_resumed = false;
                self.flags = HandshakeFlags::default();
                self.split_brain = v.split_brain;
                match v.outcome {
                    Outcome::NoSync => {
                        // An Outdated (or Consistent) disk that the UpToDate peer says is
                        // identical is UpToDate (drbd_sync_handshake, hg == 0).
                        if self.disk < DiskState::UpToDate
                            && self.disk >= DiskState::Outdated
                            && peer.disk == DiskState::UpToDate
                        {
                            self.disk = DiskState::UpToDate;
                        }
                        self.set_conn(
                            Conn::Connected {
                                epoch,
                                peer,
                                repl: Repl::Established,
                            },
                            "no resync needed",
                            &mut out,
                        );
                    }
                    Outcome::Source { full } => {
                        if let Some(u) = sync_uuid {
                            out.push(Action::SendSyncUuid(u));
                        }
                        peer.disk = DiskState::Inconsistent;
                        self.set_conn(
                            Conn::Connected {
                                epoch,
                                peer,
                                repl: Repl::SyncSource(Track::start(oos_bytes)),
                            },
                            sync_kind(full),
                            &mut out,
                        );
                        out.push(Action::ResyncStarts { bytes: oos_bytes });
                        out.push(Action::StartResyncSource { epoch });
                    }
                    Outcome::Target { full } => {
                        self.disk = DiskState::Inconsistent;
                        self.set_conn(
                            Conn::Connected {
                                epoch,
                                peer,
                                repl: Repl::SyncTarget(Track::start(oos_bytes)),
                            },
                            sync_kind(full),
                            &mut out,
                        );
                    }
                    Outcome::Refuse { .. } => {
                        return Err(Refusal::Protocol("the handshake refused the peer".into()))
                    }
                }
            }
            Event::LinkLost { reason, standalone } => {
                if matches!(
                    self.conn,
                    Conn::Connected {
                        repl: Repl::SyncSource(_) | Repl::SyncTarget(_),
                        ..
                    }
                ) {
                    out.push(Action::ResyncInterrupted);
                }
                // The bitmap keeps what is still out of sync; the disk state stays (a sync
                // target stays Inconsistent until a later resync finishes).
                if let Some(v) = self.verify.as_mut() {
                    if !v.finished {
                        v.finished = true;
                        v.aborted = true;
                    }
                }
                // drbd_state.c: a primary losing its peer starts a new data generation, so
                // the next connect resyncs exactly what it wrote meanwhile.
                if self.role == Role::Primary && self.disk == DiskState::UpToDate && !self.closing {
                    out.push(Action::NewGeneration);
                }
                if standalone {
                    self.standalone = true;
                }
                let new = if self.standalone {
                    Conn::StandAlone
                } else {
                    Conn::Connecting
                };
                self.set_conn(new, &reason, &mut out);
            }
            Event::PeerStateChange { role, disk } => {
                if role == Role::Primary && self.role == Role::Primary {
                    return Err(Refusal::Protocol(
                        "peer became primary while we are primary".into(),
                    ));
                }
                if let Conn::Connected { peer, .. } = &mut self.conn {
                    if peer.role != role {
                        out.push(Action::PeerRoleChanged {
                            from: Some(peer.role),
                            to: role,
                        });
                    }
                    if peer.disk != disk {
                        out.push(Action::PeerDiskChanged {
                            from: Some(peer.disk),
                            to: disk,
                        });
                    }
                    *peer = Peer { role, disk };
                }
            }
            Event::PeerWrite => {
                if self.role == Role::Primary {
                    return Err(Refusal::Protocol(
                        "peer sent a replicated write while we are primary".into(),
                    ));
                }
            }
            Event::SyncUuid { uuid, oos_bytes } => {
                if self.role == Role::Primary {
                    return Err(Refusal::Protocol(
                        "peer wants to resync to us, but we are primary".into(),
                    ));
                }
                let Conn::Connected { epoch, peer, repl } = &self.conn else {
                    return Err(Refusal::Protocol(
                        "peer started a resync while not connected".into(),
                    ));
                };
                if !matches!(repl, Repl::SyncTarget(_)) {
                    let new = Conn::Connected {
                        epoch: *epoch,
                        peer: *peer,
                        repl: Repl::SyncTarget(Track::start(oos_bytes)),
                    };
                    self.set_conn(new, "peer started a resync", &mut out);
                }
                self.disk = DiskState::Inconsistent;
                out.push(Action::TakeSyncUuid(uuid));
                out.push(Action::Persist("resync start"));
            }
            Event::ResyncData => {
                if self.conn.public() != ConnState::SyncTarget {
                    return Err(Refusal::Protocol(
                        "peer sent resync data while we are not sync target".into(),
                    ));
                }
            }
            Event::ResyncBlockDone { bytes } => {
                if let Conn::Connected {
                    repl: Repl::SyncSource(t) | Repl::SyncTarget(t),
                    ..
                } = &mut self.conn
                {
                    t.done += bytes;
                }
            }
            Event::ResyncFinishedSource { epoch, uuids } => {
                let Conn::Connected {
                    epoch: e,
                    peer,
                    repl,
                } = &self.conn
                else {
                    return Ok(out);
                };
                if *e != epoch {
                    return Ok(out);
                }
                let progress = match repl {
                    Repl::SyncSource(t) | Repl::SyncTarget(t) => Some(t.progress()),
                    _ => None,
                };
                out.push(Action::SendResyncDone(uuids));
                if let Some(progress) = progress {
                    out.push(Action::ResyncFinished {
                        source: true,
                        progress,
                    });
                }
                let peer = Peer {
                    disk: DiskState::UpToDate,
                    ..*peer
                };
                self.set_conn(
                    Conn::Connected {
                        epoch,
                        peer,
                        repl: Repl::Established,
                    },
                    "resync finished",
                    &mut out,
                );
            }
            Event::ResyncFinishedTarget { epoch } => {
                let Conn::Connected {
                    epoch: e,
                    peer,
                    repl,
                } = &self.conn
                else {
                    return Ok(out);
                };
                if *e != epoch {
                    return Ok(out);
                }
                let progress = match repl {
                    Repl::SyncSource(t) | Repl::SyncTarget(t) => Some(t.progress()),
                    _ => None,
                };
                let peer = *peer;
                self.disk = DiskState::UpToDate;
                if let Some(progress) = progress {
                    out.push(Action::ResyncFinished {
                        source: false,
                        progress,
                    });
                }
                self.set_conn(
                    Conn::Connected {
                        epoch,
                        peer,
                        repl: Repl::Established,
                    },
                    "resync finished",
                    &mut out,
                );
                out.push(Action::SendStateChange);
            }
            Event::StartVerify { total } => {
                let Conn::Connected { epoch, peer, repl } = &self.conn else {
                    return Err(Refusal::NotConnected);
                };
                let (epoch, peer) = (*epoch, *peer);
                if !matches!(repl, Repl::Established) {
                    return Err(Refusal::NotAllowed(format!(
                        "verify needs state Connected, not {}",
                        self.conn.public()
                    )));
                }
                // drbdadm verify runs from the primary; both secondary is fine too.
                if self.role == Role::Secondary && peer.role == Role::Primary {
                    return Err(Refusal::NotAllowed("run verify on the primary".into()));
                }
                self.verify = Some(VerifyProgress {
                    done_bytes: 0,
                    total_bytes: total,
                    mismatched_blocks: 0,
                    finished: false,
                    aborted: false,
                });
                self.set_conn(
                    Conn::Connected {
                        epoch,
                        peer,
                        repl: Repl::VerifyS,
                    },
                    "online verify started",
                    &mut out,
                );
                out.push(Action::StartVerify { epoch });
            }
            Event::VerifyProgress { done, mismatches } => {
                if let Some(v) = self.verify.as_mut() {
                    v.done_bytes = done;
                    v.mismatched_blocks = mismatches;
                }
            }
            Event::VerifyFinished {
                epoch,
                total,
                mismatches,
                secs,
            } => {
                let Conn::Connected { epoch: e, peer, .. } = &self.conn else {
                    return Ok(out);
                };
                if *e != epoch {
                    return Ok(out);
                }
                let peer = *peer;
                if let Some(v) = self.verify.as_mut() {
                    v.finished = true;
                    v.done_bytes = total;
                    v.mismatched_blocks = mismatches;
                }
                out.push(Action::VerifyFinished { mismatches, secs });
                self.set_conn(
                    Conn::Connected {
                        epoch,
                        peer,
                        repl: Repl::Established,
                    },
                    "online verify finished",
                    &mut out,
                );
                out.push(Action::Persist("verify"));
                // Only an UpToDate side that may be sync source repairs (never towards a
                // primary: it would become sync target).
                let can_repair = self.disk == DiskState::UpToDate
                    && (self.role == Role::Primary || peer.role != Role::Primary);
                if mismatches > 0 {
                    out.push(if can_repair {
                        Action::RepairAfterVerify { epoch, mismatches }
                    } else {
                        Action::CannotRepair
                    });
                }
            }
            Event::RepairStart {
                epoch,
                sync_uuid,
                oos_bytes,
            } => {
                let Conn::Connected {
                    epoch: e,
                    peer,
                    repl: Repl::Established,
                } = &self.conn
                else {
                    return Ok(out);
                };
                if *e != epoch {
                    return Ok(out);
                }
                let peer = Peer {
                    disk: DiskState::Inconsistent,
                    ..*peer
                };
                out.push(Action::SendSyncUuid(sync_uuid));
                self.set_conn(
                    Conn::Connected {
                        epoch,
                        peer,
                        repl: Repl::SyncSource(Track::start(oos_bytes)),
                    },
                    "repairing verify mismatches",
                    &mut out,
                );
                out.push(Action::StartResyncSource { epoch });
            }
            Event::LocalWriteFailed { offset, len } | Event::PeerWriteFailed { offset, len } => {
                // The disk state stays: DRBD would detach on local errors (on-io-error), we
                // fail the command and keep the range out of sync for the next resync.
                out.push(Action::MarkOutOfSync { offset, len });
            }
            Event::Promote { force } => {
                if self.role == Role::Primary {
                    return Ok(out);
                }
                let peer = self.peer();
                if peer.is_some_and(|p| p.role == Role::Primary) {
                    return Err(Refusal::PeerIsPrimary);
                }
                if self.conn.public() == ConnState::SyncTarget {
                    return Err(Refusal::NotUpToDate(self.disk));
                }
                if self.disk != DiskState::UpToDate && !force {
                    return Err(Refusal::NotUpToDate(self.disk));
                }
                out.push(Action::PromoteMetadata {
                    connected: peer.is_some(),
                    forced: self.disk != DiskState::UpToDate,
                });
            }
            Event::Promoted { forced } => {
                if forced {
                    out.push(Action::ForcedPromotion { disk: self.disk });
                    self.disk = DiskState::UpToDate;
                }
                self.role = Role::Primary;
                out.push(Action::RoleChanged {
                    from: Role::Secondary,
                    to: Role::Primary,
                });
                out.push(Action::SendStateChange);
            }
            Event::Demote => {
                if self.role == Role::Secondary {
                    return Ok(out);
                }
                self.role = Role::Secondary;
                out.push(Action::RoleChanged {
                    from: Role::Primary,
                    to: Role::Secondary,
                });
            }
            Event::Demoted => out.push(Action::SendStateChange),
            Event::ResumeIo => {
                self.io_resumed = true;
                out.push(Action::IoResumed);
            }
            Event::Connect => {
                self.standalone = false;
                if matches!(self.conn, Conn::StandAlone) {
                    self.set_conn(Conn::Connecting, "operator connect", &mut out);
                }
            }
            Event::Disconnect => {
                self.standalone = true;
                match self.conn {
                    Conn::Connected { .. } => out.push(Action::DropLink),
                    // The handshake ends on its own and then stays StandAlone.
                    Conn::Handshake { .. } => {}
                    _ => self.set_conn(Conn::StandAlone, "operator disconnect", &mut out),
                }
            }
            Event::DiscardMyData => {
                if self.role == Role::Primary {
                    return Err(Refusal::NotAllowed(
                        "discard-my-data on a primary; demote first".into(),
                    ));
                }
                out.push(Action::DiscardMyData);
                self.flags.discard_my_data = true;
                self.standalone = false;
                if matches!(self.conn, Conn::StandAlone) {
                    self.set_conn(Conn::Connecting, "discard-my-data", &mut out);
                }
            }
            Event::Invalidate => {
                if self.role == Role::Primary {
                    return Err(Refusal::NotAllowed("invalidate on a primary".into()));
                }
                out.push(Action::InvalidateMetadata);
            }
            Event::Invalidated => {
                self.disk = DiskState::Inconsistent;
                if self.connected_epoch().is_some() {
                    // Run the handshake again so the peer becomes sync source.
                    out.push(Action::DropLink);
                }
            }
            Event::Shutdown => {
                if self.closing {
                    return Ok(out);
                }
                self.closing = true;
                out.push(Action::ShuttingDown);
            }
            Event::ShutdownDone => {
                self.role = Role::Secondary;
                self.set_conn(Conn::StandAlone, "shut down", &mut out);
            }
            Event::Crash => {
                self.closing = true;
                if self.connected_epoch().is_some() {
                    out.push(Action::DropLink);
                }
            }
        }
        Ok(out)
    }
}

/// The reason logged when a resync starts.
fn sync_kind(full: bool) -> &'static str {
    if full {
        "full sync"
    } else {
        "bitmap-based resync"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SplitBrainPolicy::{self, *};

    const A: u64 = 0xAAAA_0000_0000_1000;
    const B: u64 = 0xBBBB_0000_0000_2000;
    const C: u64 = 0xCCCC_0000_0000_3000;
    const SYNC: u64 = 0x5555_0000_0000_5000;

    use DiskState::{Inconsistent, Outdated, UpToDate};
    use Role::{Primary, Secondary};

    /// One host: its machine and what its metadata would say.
    struct Host {
        m: VolumeMachine,
        uuids: GenerationUuids,
        weight: u64,
    }

    fn host(role: Role, disk: DiskState, uuids: GenerationUuids, weight: u64) -> Host {
        let mut m = VolumeMachine::new(disk, false);
        m.role = role;
        Host { m, uuids, weight }
    }

    fn gen(current: u64, bitmap: u64, h0: u64) -> GenerationUuids {
        GenerationUuids {
            current,
            bitmap,
            history: vec![h0, 0],
        }
    }

    fn pol(p0: SplitBrainPolicy, p1: SplitBrainPolicy, p2: SplitBrainPolicy) -> SplitBrainPolicies {
        SplitBrainPolicies {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
            after_sb_2pri: p2,
        }
    }

    /// The shell's answer to `PersistVerdict`: the event that attaches the link.
    fn persisted(epoch: u64, actions: &[Action], oos: u64) -> Option<Event> {
        actions.iter().find_map(|a| match a {
            Action::PersistVerdict { outcome, .. } => Some(Event::VerdictPersisted {
                epoch,
                sync_uuid: matches!(outcome, Outcome::Source { .. }).then_some(SYNC),
                oos_bytes: oos,
                killed: false,
            }),
            _ => None,
        })
    }

    /// One host's actions after the decision and after attaching the link.
    type Steps = (Vec<Action>, Vec<Action>);

    /// One split-brain case: policies, bitmap weights, roles, and the expected connection
    /// states of a and b (`None`: refused).
    type SbCase = (
        SplitBrainPolicies,
        u64,
        u64,
        Role,
        Role,
        Option<(ConnState, ConnState)>,
    );

    /// Runs a whole handshake between `a` (the dialer) and `b`; returns each side's
    /// actions after the decision and after attaching (empty when refused).
    fn handshake(a: &mut Host, b: &mut Host, p: SplitBrainPolicies) -> (Steps, Steps) {
        handshake2(a, b, p, p)
    }

    /// [`handshake`] with each host's own policies.
    fn handshake2(
        a: &mut Host,
        b: &mut Host,
        p: SplitBrainPolicies,
        pb: SplitBrainPolicies,
    ) -> (Steps, Steps) {
        a.m.step(Event::LinkUp).unwrap();
        b.m.step(Event::LinkUp).unwrap();
        let (ea, eb) = (a.m.epoch(), b.m.epoch());
        assert!(a.m.is_handshaking() && b.m.is_handshaking());
        assert_eq!(a.m.conn_state(), ConnState::Connecting);
        let sa = a.m.local_side(a.uuids.clone(), a.weight);
        let sb = b.m.local_side(b.uuids.clone(), b.weight);
        a.m.step(Event::PeerState {
            epoch: ea,
            peer: sb.clone(),
        })
        .unwrap();
        b.m.step(Event::PeerState {
            epoch: eb,
            peer: sa.clone(),
        })
        .unwrap();
        let hg = |v: Vec<Action>| match v.as_slice() {
            [Action::SendDecision(h)] => *h,
            x => panic!("expected SendDecision, got {x:?}"),
        };
        let ha = hg(a
            .m
            .step(Event::Decide {
                epoch: ea,
                local: sa,
                dialer: true,
                policies: p,
            })
            .unwrap());
        let hb = hg(b
            .m
            .step(Event::Decide {
                epoch: eb,
                local: sb,
                dialer: false,
                policies: pb,
            })
            .unwrap());
        let da = a.m.step(Event::PeerDecision { epoch: ea, hg: hb }).unwrap();
        let db = b.m.step(Event::PeerDecision { epoch: eb, hg: ha }).unwrap();
        let oos = (a.weight.max(b.weight)) * 4096;
        let aa = persisted(ea, &da, oos).map_or(Vec::new(), |e| a.m.step(e).unwrap());
        let ab = persisted(eb, &db, oos).map_or(Vec::new(), |e| b.m.step(e).unwrap());
        ((da, aa), (db, ab))
    }

    fn refused(actions: &[Action]) -> Option<bool> {
        actions.iter().find_map(|a| match a {
            Action::RefusePeer { standalone, .. } => Some(*standalone),
            _ => None,
        })
    }

    fn conn_changes(actions: &[Action]) -> Vec<(ConnState, ConnState)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ConnChanged { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }

    /// A and B connected with identical data (no sync), A primary if `a_primary`.
    fn connected(a_primary: bool) -> (Host, Host) {
        let ra = if a_primary { Primary } else { Secondary };
        let mut a = host(ra, UpToDate, gen(A, 0, B), 0);
        let mut b = host(Secondary, UpToDate, gen(A, 0, B), 0);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert_eq!(a.m.conn_state(), ConnState::Connected);
        assert_eq!(b.m.conn_state(), ConnState::Connected);
        (a, b)
    }

    /// A (primary, newer generation) resyncs to B.
    fn syncing() -> (Host, Host) {
        let mut a = host(Primary, UpToDate, gen(C, A, B), 10);
        let mut b = host(Secondary, UpToDate, gen(A, 0, B), 0);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        (a, b)
    }

    #[test]
    fn handshake_in_each_disk_state_pairing() {
        // Same generation on both sides, so only the disk states differ.
        let cases = [
            // (a disk, b disk, a conn, b conn, a disk after, b disk after)
            (
                UpToDate,
                UpToDate,
                ConnState::Connected,
                ConnState::Connected,
                UpToDate,
                UpToDate,
            ),
            // An Outdated disk the UpToDate peer says is identical becomes UpToDate.
            (
                UpToDate,
                Outdated,
                ConnState::Connected,
                ConnState::Connected,
                UpToDate,
                UpToDate,
            ),
            (
                Outdated,
                UpToDate,
                ConnState::Connected,
                ConnState::Connected,
                UpToDate,
                UpToDate,
            ),
            (
                Outdated,
                Outdated,
                ConnState::Connected,
                ConnState::Connected,
                Outdated,
                Outdated,
            ),
            // Inconsistent against anything consistent: the consistent side is source.
            (
                UpToDate,
                Inconsistent,
                ConnState::SyncSource,
                ConnState::SyncTarget,
                UpToDate,
                Inconsistent,
            ),
            (
                Inconsistent,
                UpToDate,
                ConnState::SyncTarget,
                ConnState::SyncSource,
                Inconsistent,
                UpToDate,
            ),
            (
                Outdated,
                Inconsistent,
                ConnState::SyncSource,
                ConnState::SyncTarget,
                Outdated,
                Inconsistent,
            ),
            (
                Inconsistent,
                Outdated,
                ConnState::SyncTarget,
                ConnState::SyncSource,
                Inconsistent,
                Outdated,
            ),
        ];
        for (da, db, ca, cb, da2, db2) in cases {
            let mut a = host(Secondary, da, gen(A, 0, B), 0);
            let mut b = host(Secondary, db, gen(A, 0, B), 0);
            handshake(&mut a, &mut b, SplitBrainPolicies::default());
            let what = format!("{da} / {db}");
            assert_eq!((a.m.conn_state(), b.m.conn_state()), (ca, cb), "{what}");
            assert_eq!((a.m.disk(), b.m.disk()), (da2, db2), "{what}");
            // Each side sees the other's reported disk (a sync target is Inconsistent).
            let pa = a.m.peer().unwrap().disk;
            assert_eq!(
                pa,
                if cb == ConnState::SyncTarget {
                    Inconsistent
                } else {
                    db
                },
                "{what}"
            );
        }
        // Both Inconsistent: nobody may be source; with different data it is refused.
        let mut a = host(Secondary, Inconsistent, gen(C, A, B), 3);
        let mut b = host(Secondary, Inconsistent, gen(A, 0, B), 0);
        let ((da, _), (db, _)) = handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert_eq!((refused(&da), refused(&db)), (Some(true), Some(true)));
    }

    #[test]
    fn uuid_decision_sync_source_and_target() {
        let (a, b) = syncing();
        assert_eq!(a.m.conn_state(), ConnState::SyncSource);
        assert_eq!(b.m.conn_state(), ConnState::SyncTarget);
        assert_eq!(b.m.disk(), Inconsistent);
        assert_eq!(a.m.peer().unwrap().disk, Inconsistent);
        assert_eq!(a.m.resync().unwrap().total_bytes, 10 * 4096);
    }

    #[test]
    fn uuid_decision_no_sync_keeps_state() {
        let (a, b) = connected(true);
        assert!(a.m.resync().is_none() && b.m.resync().is_none());
        assert_eq!(
            a.m.peer(),
            Some(Peer {
                role: Secondary,
                disk: UpToDate
            })
        );
        assert_eq!(
            b.m.peer(),
            Some(Peer {
                role: Primary,
                disk: UpToDate
            })
        );
        assert!(!a.m.split_brain());
    }

    #[test]
    fn uuid_decision_source_actions_in_order() {
        let mut a = host(Primary, UpToDate, gen(C, A, B), 10);
        let mut b = host(Secondary, UpToDate, gen(A, 0, B), 0);
        let ((da, aa), (_, ab)) = handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert!(matches!(
            da.as_slice(),
            [
                Action::HandshakeAccepted {
                    split_brain: false,
                    ..
                },
                Action::PersistVerdict {
                    outcome: Outcome::Source { full: false },
                    ..
                }
            ]
        ));
        let e = a.m.epoch();
        assert_eq!(
            aa,
            vec![
                Action::AttachLink { epoch: e },
                Action::SendSyncUuid(SYNC),
                Action::ConnChanged {
                    from: ConnState::Connecting,
                    to: ConnState::SyncSource,
                    why: "bitmap-based resync".into()
                },
                Action::ResyncStarts { bytes: 10 * 4096 },
                Action::StartResyncSource { epoch: e },
            ]
        );
        // The target waits for SyncUuid; it starts no walker.
        assert!(!ab
            .iter()
            .any(|a| matches!(a, Action::StartResyncSource { .. })));
    }

    #[test]
    fn uuid_decision_full_sync_for_just_created_peer() {
        let mut a = host(Primary, UpToDate, gen(A, 0, 0), 0);
        let mut b = host(Secondary, Inconsistent, GenerationUuids::just_created(), 0);
        let ((_, aa), _) = handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert!(aa
            .iter()
            .any(|x| matches!(x, Action::ConnChanged { why, .. } if why == "full sync")));
        assert_eq!(b.m.conn_state(), ConnState::SyncTarget);
    }

    #[test]
    fn uuid_decision_split_brain_refused_standalone() {
        let mut a = host(Secondary, UpToDate, gen(B | 1, A | 1, 0), 5);
        let mut b = host(Secondary, UpToDate, gen(C | 1, A, 0), 5);
        let ((da, aa), (db, _)) = handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert!(aa.is_empty());
        assert!(da.iter().any(|x| matches!(
            x,
            Action::HandshakeRefused {
                split_brain: true,
                ..
            }
        )));
        assert_eq!((refused(&da), refused(&db)), (Some(true), Some(true)));
        assert!(a.m.split_brain() && b.m.split_brain());
        // The shell sends Disconnect and ends the link; the machine goes StandAlone.
        a.m.step(Event::LinkLost {
            reason: "refused".into(),
            standalone: true,
        })
        .unwrap();
        assert_eq!(a.m.conn_state(), ConnState::StandAlone);
        assert!(!a.m.wants_dial());
        assert!(
            a.m.split_brain(),
            "reported until the next successful handshake"
        );
    }

    #[test]
    fn uuid_decision_unrelated_data_refused_without_split_brain() {
        // No generation in common, not even in the history (rule 1000).
        let mut a = host(
            Secondary,
            UpToDate,
            GenerationUuids::new(A, B, [C, 0x10]),
            0,
        );
        let mut b = host(
            Secondary,
            UpToDate,
            GenerationUuids::new(0xD0, 0xE0, [0x20, 0x30]),
            0,
        );
        let ((da, _), _) = handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert_eq!(refused(&da), Some(true), "{da:?}");
        assert!(
            da.iter().any(|x| matches!(
                x,
                Action::HandshakeRefused {
                    split_brain: false,
                    ..
                }
            )),
            "{da:?}"
        );
        assert!(!a.m.split_brain());
    }

    #[test]
    fn primary_never_becomes_sync_target_and_retries() {
        let mut a = host(Primary, UpToDate, gen(A | 1, 0, B), 0);
        let mut b = host(Secondary, UpToDate, gen(C, A, B), 3);
        let ((da, _), _) = handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert_eq!(refused(&da), Some(false));
        a.m.step(Event::LinkLost {
            reason: "refused".into(),
            standalone: false,
        })
        .unwrap();
        assert_eq!(a.m.conn_state(), ConnState::Connecting);
        assert!(a.m.wants_dial());
    }

    /// Split brain from common generation A, both secondary unless given.
    fn split_pair(wa: u64, wb: u64, ra: Role, rb: Role) -> (Host, Host) {
        (
            host(ra, UpToDate, gen(B | 1, A | 1, 0), wa),
            host(rb, UpToDate, gen(C | 1, A, 0), wb),
        )
    }

    #[test]
    fn each_after_split_brain_policy() {
        use ConnState::{SyncSource as S, SyncTarget as T};
        // (policies, a weight, b weight, a role, b role, expected a/b conn or None = refused)
        let cases: &[SbCase] = &[
            (
                pol(Disconnect, Disconnect, Disconnect),
                5,
                5,
                Secondary,
                Secondary,
                None,
            ),
            (
                pol(DiscardZeroChanges, Disconnect, Disconnect),
                7,
                0,
                Secondary,
                Secondary,
                Some((S, T)),
            ),
            (
                pol(DiscardZeroChanges, Disconnect, Disconnect),
                7,
                1,
                Secondary,
                Secondary,
                None,
            ),
            (
                pol(DiscardLeastChanges, Disconnect, Disconnect),
                3,
                9,
                Secondary,
                Secondary,
                Some((T, S)),
            ),
            // a's bitmap UUID has the primary bit: a was primary at the split (older).
            (
                pol(DiscardYoungerPrimary, Disconnect, Disconnect),
                3,
                9,
                Secondary,
                Secondary,
                Some((S, T)),
            ),
            (
                pol(DiscardOlderPrimary, Disconnect, Disconnect),
                3,
                9,
                Secondary,
                Secondary,
                Some((T, S)),
            ),
            (
                pol(DiscardLocal, Disconnect, Disconnect),
                1,
                1,
                Secondary,
                Secondary,
                Some((T, S)),
            ),
            (
                pol(DiscardRemote, Disconnect, Disconnect),
                1,
                1,
                Secondary,
                Secondary,
                Some((S, T)),
            ),
            // One primary.
            (
                pol(DiscardZeroChanges, Disconnect, Disconnect),
                7,
                0,
                Primary,
                Secondary,
                None,
            ),
            (
                pol(DiscardZeroChanges, Consensus, Disconnect),
                7,
                0,
                Primary,
                Secondary,
                Some((S, T)),
            ),
            (
                pol(DiscardZeroChanges, Consensus, Disconnect),
                0,
                7,
                Primary,
                Secondary,
                None,
            ),
            (
                pol(Disconnect, DiscardSecondary, Disconnect),
                0,
                7,
                Primary,
                Secondary,
                Some((S, T)),
            ),
            // Two primaries: always refused.
            (
                pol(DiscardZeroChanges, Consensus, Disconnect),
                7,
                0,
                Primary,
                Primary,
                None,
            ),
        ];
        for (i, (p, wa, wb, ra, rb, want)) in cases.iter().enumerate() {
            let (mut a, mut b) = split_pair(*wa, *wb, *ra, *rb);
            // discard-local / discard-remote are configured mirrored on the two hosts.
            let mirror = |x| match x {
                DiscardLocal => DiscardRemote,
                DiscardRemote => DiscardLocal,
                x => x,
            };
            let pb = SplitBrainPolicies {
                after_sb_0pri: mirror(p.after_sb_0pri),
                ..*p
            };
            let ((da, _), (db, _)) = handshake2(&mut a, &mut b, *p, pb);
            match want {
                None => {
                    assert!(
                        refused(&da).is_some() && refused(&db).is_some(),
                        "case {i}: {da:?}"
                    );
                    assert!(a.m.split_brain() && b.m.split_brain(), "case {i}");
                }
                Some((ca, cb)) => {
                    assert_eq!(
                        (a.m.conn_state(), b.m.conn_state()),
                        (*ca, *cb),
                        "case {i}: {da:?}"
                    );
                    assert!(
                        da.iter().any(|x| matches!(
                            x,
                            Action::HandshakeAccepted {
                                split_brain: true,
                                ..
                            }
                        )),
                        "case {i}: resolved split brains are reported"
                    );
                    assert!(a.m.split_brain(), "case {i}");
                }
            }
        }
    }

    #[test]
    fn discard_local_on_both_hosts_is_a_disagreement() {
        // Both hosts want to be the target: the Decision cross-check drops the link.
        let (mut a, mut b) = split_pair(1, 1, Secondary, Secondary);
        let p = pol(DiscardLocal, Disconnect, Disconnect);
        a.m.step(Event::LinkUp).unwrap();
        b.m.step(Event::LinkUp).unwrap();
        let (ea, eb) = (a.m.epoch(), b.m.epoch());
        let (sa, sb) = (
            a.m.local_side(a.uuids.clone(), 1),
            b.m.local_side(b.uuids.clone(), 1),
        );
        a.m.step(Event::PeerState {
            epoch: ea,
            peer: sb.clone(),
        })
        .unwrap();
        b.m.step(Event::PeerState {
            epoch: eb,
            peer: sa.clone(),
        })
        .unwrap();
        let hg = |v: Vec<Action>| match v.as_slice() {
            [Action::SendDecision(h)] => *h,
            x => panic!("{x:?}"),
        };
        let ha = hg(a
            .m
            .step(Event::Decide {
                epoch: ea,
                local: sa,
                dialer: true,
                policies: p,
            })
            .unwrap());
        let hb = hg(b
            .m
            .step(Event::Decide {
                epoch: eb,
                local: sb,
                dialer: false,
                policies: p,
            })
            .unwrap());
        assert_eq!((ha, hb), (-1, -1));
        assert!(matches!(
            a.m.step(Event::PeerDecision { epoch: ea, hg: hb }),
            Err(Refusal::Protocol(s)) if s.starts_with("sync decisions disagree")
        ));
    }

    #[test]
    fn discard_my_data_resolves_split_brain_and_is_cleared() {
        let (mut a, mut b) = split_pair(5, 5, Secondary, Secondary);
        b.m.step(Event::DiscardMyData).unwrap();
        assert!(b.m.local_side(b.uuids.clone(), 5).discard_my_data);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert_eq!(b.m.conn_state(), ConnState::SyncTarget);
        assert!(
            !b.m.flags().discard_my_data,
            "one-shot: cleared once attached"
        );
        // Refused on a primary.
        let mut p = host(Primary, UpToDate, gen(A, 0, 0), 0);
        assert!(matches!(
            p.m.step(Event::DiscardMyData),
            Err(Refusal::NotAllowed(_))
        ));
    }

    #[test]
    fn crashed_primary_flag_is_sent_and_cleared() {
        let mut a = host(Secondary, UpToDate, gen(A, 0, B), 0);
        a.m.flags.crashed_primary = true;
        assert!(a.m.local_side(a.uuids.clone(), 0).crashed_primary);
        let mut b = host(Secondary, UpToDate, gen(A, 0, B), 0);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert!(!a.m.flags().crashed_primary);
    }

    #[test]
    fn decisions_that_disagree_drop_the_link() {
        let mut a = host(Secondary, UpToDate, gen(A, 0, B), 0);
        a.m.step(Event::LinkUp).unwrap();
        let e = a.m.epoch();
        let peer = host(Secondary, UpToDate, gen(A, 0, B), 0);
        a.m.step(Event::PeerState {
            epoch: e,
            peer: peer.m.local_side(peer.uuids.clone(), 0),
        })
        .unwrap();
        let local = a.m.local_side(a.uuids.clone(), 0);
        a.m.step(Event::Decide {
            epoch: e,
            local,
            dialer: true,
            policies: SplitBrainPolicies::default(),
        })
        .unwrap();
        let r = a.m.step(Event::PeerDecision { epoch: e, hg: 1 });
        assert!(
            matches!(r, Err(Refusal::Protocol(ref s)) if s.starts_with("sync decisions disagree"))
        );
        assert!(a.m.is_handshaking(), "a refused event changes nothing");
        // A stale epoch is refused too.
        assert!(a
            .m
            .step(Event::PeerDecision {
                epoch: e + 1,
                hg: 0
            })
            .is_err());
    }

    #[test]
    fn link_closed_while_persisting_the_verdict() {
        let mut a = host(Secondary, UpToDate, gen(A, 0, B), 0);
        a.m.step(Event::LinkUp).unwrap();
        let e = a.m.epoch();
        let peer = host(Secondary, UpToDate, gen(A, 0, B), 0);
        a.m.step(Event::PeerState {
            epoch: e,
            peer: peer.m.local_side(peer.uuids.clone(), 0),
        })
        .unwrap();
        let local = a.m.local_side(a.uuids.clone(), 0);
        a.m.step(Event::Decide {
            epoch: e,
            local,
            dialer: true,
            policies: SplitBrainPolicies::default(),
        })
        .unwrap();
        a.m.step(Event::PeerDecision { epoch: e, hg: 0 }).unwrap();
        let ev = Event::VerdictPersisted {
            epoch: e,
            sync_uuid: None,
            oos_bytes: 0,
            killed: true,
        };
        assert_eq!(
            a.m.step(ev),
            Err(Refusal::Protocol(
                "connection closed during the handshake".into()
            ))
        );
        assert!(a.m.peer().is_none());
    }

    #[test]
    fn resync_progress_and_finish_as_source_and_target() {
        let (mut a, mut b) = syncing();
        let (ea, eb) = (a.m.epoch(), b.m.epoch());
        // The target learns the sync UUID.
        let t =
            b.m.step(Event::SyncUuid {
                uuid: SYNC,
                oos_bytes: 40960,
            })
            .unwrap();
        assert_eq!(
            t,
            vec![Action::TakeSyncUuid(SYNC), Action::Persist("resync start")]
        );
        b.m.step(Event::ResyncData).unwrap();
        a.m.step(Event::ResyncBlockDone { bytes: 4096 }).unwrap();
        b.m.step(Event::ResyncBlockDone { bytes: 4096 }).unwrap();
        assert_eq!(a.m.resync().unwrap().done_bytes, 4096);
        assert_eq!(b.m.resync().unwrap().done_bytes, 4096);
        // A finish from an older connection changes nothing.
        assert!(a
            .m
            .step(Event::ResyncFinishedSource {
                epoch: ea + 7,
                uuids: gen(C, 0, A)
            })
            .unwrap()
            .is_empty());
        let fa =
            a.m.step(Event::ResyncFinishedSource {
                epoch: ea,
                uuids: gen(C, 0, A),
            })
            .unwrap();
        assert_eq!(fa[0], Action::SendResyncDone(gen(C, 0, A)));
        assert!(matches!(fa[1], Action::ResyncFinished { source: true, .. }));
        assert_eq!(
            conn_changes(&fa),
            vec![(ConnState::SyncSource, ConnState::Connected)]
        );
        assert_eq!(a.m.peer().unwrap().disk, UpToDate);
        assert!(a.m.resync().is_none());
        let fb = b.m.step(Event::ResyncFinishedTarget { epoch: eb }).unwrap();
        assert!(matches!(
            fb[0],
            Action::ResyncFinished { source: false, .. }
        ));
        assert_eq!(fb.last(), Some(&Action::SendStateChange));
        assert_eq!(b.m.disk(), UpToDate);
        assert_eq!(b.m.conn_state(), ConnState::Connected);
    }

    #[test]
    fn resync_data_only_as_sync_target() {
        let (mut a, _) = connected(true);
        assert!(matches!(
            a.m.step(Event::ResyncData),
            Err(Refusal::Protocol(_))
        ));
        // A primary is never a sync target.
        assert!(a
            .m
            .step(Event::SyncUuid {
                uuid: SYNC,
                oos_bytes: 0
            })
            .is_err());
        let (_, mut b) = connected(true);
        b.m.step(Event::SyncUuid {
            uuid: SYNC,
            oos_bytes: 8192,
        })
        .unwrap();
        assert_eq!(b.m.conn_state(), ConnState::SyncTarget);
        assert_eq!(b.m.disk(), Inconsistent);
    }

    #[test]
    fn verify_start_refusals() {
        let mut lone = host(Primary, UpToDate, gen(A, 0, 0), 0);
        assert_eq!(
            lone.m.step(Event::StartVerify { total: 1 }),
            Err(Refusal::NotConnected)
        );
        let (mut a, _) = syncing();
        assert_eq!(
            a.m.step(Event::StartVerify { total: 1 }),
            Err(Refusal::NotAllowed(
                "verify needs state Connected, not SyncSource".into()
            ))
        );
        let (_, mut b) = connected(true);
        assert_eq!(
            b.m.step(Event::StartVerify { total: 1 }),
            Err(Refusal::NotAllowed("run verify on the primary".into()))
        );
        // Both secondary: either may verify.
        let (mut a, _) = connected(false);
        assert!(a.m.step(Event::StartVerify { total: 1 }).is_ok());
    }

    #[test]
    fn verify_without_mismatches() {
        let (mut a, _) = connected(true);
        let e = a.m.epoch();
        let s = a.m.step(Event::StartVerify { total: 1 << 20 }).unwrap();
        assert_eq!(
            conn_changes(&s),
            vec![(ConnState::Connected, ConnState::VerifySource)]
        );
        assert_eq!(s.last(), Some(&Action::StartVerify { epoch: e }));
        a.m.step(Event::VerifyProgress {
            done: 4096,
            mismatches: 0,
        })
        .unwrap();
        assert_eq!(a.m.verify().unwrap().done_bytes, 4096);
        let f =
            a.m.step(Event::VerifyFinished {
                epoch: e,
                total: 1 << 20,
                mismatches: 0,
                secs: 0.5,
            })
            .unwrap();
        assert_eq!(f.last(), Some(&Action::Persist("verify")));
        let v = a.m.verify().unwrap();
        assert!(v.finished && !v.aborted && v.done_bytes == 1 << 20);
        assert_eq!(a.m.conn_state(), ConnState::Connected);
    }

    #[test]
    fn verify_with_mismatches_repairs_from_an_up_to_date_side() {
        let (mut a, _) = connected(true);
        let e = a.m.epoch();
        a.m.step(Event::StartVerify { total: 1 << 20 }).unwrap();
        let f =
            a.m.step(Event::VerifyFinished {
                epoch: e,
                total: 1 << 20,
                mismatches: 3,
                secs: 1.0,
            })
            .unwrap();
        assert_eq!(
            f.last(),
            Some(&Action::RepairAfterVerify {
                epoch: e,
                mismatches: 3
            })
        );
        assert_eq!(a.m.verify().unwrap().mismatched_blocks, 3);
        let r =
            a.m.step(Event::RepairStart {
                epoch: e,
                sync_uuid: SYNC,
                oos_bytes: 3 * 4096,
            })
            .unwrap();
        assert_eq!(r[0], Action::SendSyncUuid(SYNC));
        assert_eq!(r.last(), Some(&Action::StartResyncSource { epoch: e }));
        assert_eq!(a.m.conn_state(), ConnState::SyncSource);
        assert_eq!(a.m.peer().unwrap().disk, Inconsistent);
    }

    #[test]
    fn verify_with_mismatches_cannot_repair_when_not_up_to_date() {
        let mut a = host(Secondary, Outdated, gen(A, 0, B), 0);
        let mut b = host(Secondary, Outdated, gen(A, 0, B), 0);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        let e = a.m.epoch();
        a.m.step(Event::StartVerify { total: 8192 }).unwrap();
        let f =
            a.m.step(Event::VerifyFinished {
                epoch: e,
                total: 8192,
                mismatches: 1,
                secs: 0.0,
            })
            .unwrap();
        assert_eq!(f.last(), Some(&Action::CannotRepair));
        // A repair start on a connection that is gone does nothing.
        assert!(a
            .m
            .step(Event::RepairStart {
                epoch: e + 1,
                sync_uuid: SYNC,
                oos_bytes: 1
            })
            .unwrap()
            .is_empty());
    }

    #[test]
    fn disconnect_in_every_state() {
        let lost = |m: &mut VolumeMachine| {
            m.step(Event::LinkLost {
                reason: "peer closed the connection".into(),
                standalone: false,
            })
            .unwrap()
        };
        // StandAlone and Connecting: nothing to interrupt.
        let mut h = host(Secondary, UpToDate, gen(A, 0, 0), 0);
        assert!(lost(&mut h.m).is_empty());
        assert_eq!(h.m.conn_state(), ConnState::Connecting);
        h.m.step(Event::Disconnect).unwrap();
        assert_eq!(h.m.conn_state(), ConnState::StandAlone);
        assert!(lost(&mut h.m).is_empty());
        assert_eq!(h.m.conn_state(), ConnState::StandAlone, "standalone sticks");
        // Mid-handshake.
        let mut h = host(Secondary, UpToDate, gen(A, 0, 0), 0);
        h.m.step(Event::LinkUp).unwrap();
        assert!(lost(&mut h.m).is_empty(), "Connecting -> Connecting");
        assert!(!h.m.is_handshaking() && h.m.wants_dial());
        // Connected, secondary: no new generation.
        let (_, mut b) = connected(true);
        assert_eq!(
            conn_changes(&lost(&mut b.m)),
            vec![(ConnState::Connected, ConnState::Connecting)]
        );
        assert!(b.m.peer().is_none());
        // Connected, UpToDate primary: a new current UUID (drbd_uuid_new_current).
        let (mut a, _) = connected(true);
        assert_eq!(lost(&mut a.m)[0], Action::NewGeneration);
        assert_eq!(a.m.write_gate(Fencing::DontCare), WriteGate::Degraded);
        // Mid-resync: the source keeps its bitmap and disk; the target stays Inconsistent.
        let (mut a, mut b) = syncing();
        let la = lost(&mut a.m);
        assert_eq!(la[0], Action::ResyncInterrupted);
        assert!(la.contains(&Action::NewGeneration));
        assert!(a.m.resync().is_none());
        assert_eq!(a.m.disk(), UpToDate);
        assert_eq!(lost(&mut b.m)[0], Action::ResyncInterrupted);
        assert_eq!(b.m.disk(), Inconsistent);
        let e = b.m.epoch();
        assert!(b
            .m
            .step(Event::ResyncFinishedTarget { epoch: e })
            .unwrap()
            .is_empty());
        assert_eq!(
            b.m.disk(),
            Inconsistent,
            "a late finish of the dead link does not count"
        );
        // An Inconsistent target cannot be promoted afterwards without force.
        assert_eq!(
            b.m.step(Event::Promote { force: false }),
            Err(Refusal::NotUpToDate(Inconsistent))
        );
        // Mid-verify: the pass is marked aborted, mismatches found so far stay.
        let (mut a, _) = connected(true);
        let e = a.m.epoch();
        a.m.step(Event::StartVerify { total: 1 << 20 }).unwrap();
        a.m.step(Event::VerifyProgress {
            done: 8192,
            mismatches: 1,
        })
        .unwrap();
        let la = lost(&mut a.m);
        assert_eq!(
            conn_changes(&la),
            vec![(ConnState::VerifySource, ConnState::Connecting)]
        );
        let v = a.m.verify().unwrap();
        assert!(v.finished && v.aborted && v.mismatched_blocks == 1);
        assert!(a
            .m
            .step(Event::VerifyFinished {
                epoch: e,
                total: 1,
                mismatches: 1,
                secs: 0.0
            })
            .unwrap()
            .is_empty());
        // A closing primary starts no new generation.
        let (mut a, _) = connected(true);
        a.m.step(Event::Shutdown).unwrap();
        assert!(!lost(&mut a.m).contains(&Action::NewGeneration));
    }

    #[test]
    fn operator_disconnect_and_connect() {
        let (mut a, _) = connected(true);
        assert_eq!(a.m.step(Event::Disconnect).unwrap(), vec![Action::DropLink]);
        assert_eq!(
            a.m.conn_state(),
            ConnState::Connected,
            "until the link is down"
        );
        a.m.step(Event::LinkLost {
            reason: "connection closed locally".into(),
            standalone: false,
        })
        .unwrap();
        assert_eq!(a.m.conn_state(), ConnState::StandAlone);
        assert!(!a.m.wants_dial());
        let c = a.m.step(Event::Connect).unwrap();
        assert_eq!(
            conn_changes(&c),
            vec![(ConnState::StandAlone, ConnState::Connecting)]
        );
        assert!(a.m.wants_dial());
    }

    #[test]
    fn promote_rules() {
        for (disk, force, ok) in [
            (UpToDate, false, true),
            (Outdated, false, false),
            (Inconsistent, false, false),
            (Outdated, true, true),
            (Inconsistent, true, true),
        ] {
            let mut h = host(Secondary, disk, gen(A, 0, 0), 0);
            let r = h.m.step(Event::Promote { force });
            if !ok {
                assert_eq!(r, Err(Refusal::NotUpToDate(disk)));
                continue;
            }
            let forced = disk != UpToDate;
            assert_eq!(
                r.unwrap(),
                vec![Action::PromoteMetadata {
                    connected: false,
                    forced
                }]
            );
            let p = h.m.step(Event::Promoted { forced }).unwrap();
            assert_eq!(p.contains(&Action::ForcedPromotion { disk }), forced);
            assert!(p.contains(&Action::RoleChanged {
                from: Secondary,
                to: Primary
            }));
            assert_eq!((h.m.role(), h.m.disk()), (Primary, UpToDate));
            // Already primary: nothing to do.
            assert!(h
                .m
                .step(Event::Promote { force: false })
                .unwrap()
                .is_empty());
        }
        // Never two primaries.
        let (_, mut b) = connected(true);
        assert_eq!(
            b.m.step(Event::Promote { force: true }),
            Err(Refusal::PeerIsPrimary)
        );
        // Connected to a secondary: promotion keeps the generation (connected: true).
        let (_, mut b) = connected(false);
        assert_eq!(
            b.m.step(Event::Promote { force: false }).unwrap(),
            vec![Action::PromoteMetadata {
                connected: true,
                forced: false
            }]
        );
        // A sync target cannot be promoted, not even forced.
        let mut a = host(Secondary, UpToDate, gen(C, A, B), 10);
        let mut b = host(Secondary, UpToDate, gen(A, 0, B), 0);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        assert_eq!(b.m.conn_state(), ConnState::SyncTarget);
        assert_eq!(
            b.m.step(Event::Promote { force: true }),
            Err(Refusal::NotUpToDate(Inconsistent))
        );
    }

    #[test]
    fn demote_rules_and_peer_role_changes() {
        let (mut a, mut b) = connected(true);
        // The peer may not become primary while we are.
        assert!(matches!(
            a.m.step(Event::PeerStateChange {
                role: Primary,
                disk: UpToDate
            }),
            Err(Refusal::Protocol(_))
        ));
        // A replicated write to a primary is a protocol error.
        assert!(a.m.step(Event::PeerWrite).is_err());
        assert!(b.m.step(Event::PeerWrite).is_ok());
        assert_eq!(
            a.m.step(Event::Demote).unwrap(),
            vec![Action::RoleChanged {
                from: Primary,
                to: Secondary
            }]
        );
        assert!(a.m.step(Event::Demote).unwrap().is_empty());
        assert_eq!(
            a.m.step(Event::Demoted).unwrap(),
            vec![Action::SendStateChange]
        );
        assert_eq!(a.m.write_gate(Fencing::DontCare), WriteGate::ReadOnly);
        let c =
            b.m.step(Event::PeerStateChange {
                role: Secondary,
                disk: UpToDate,
            })
            .unwrap();
        assert_eq!(
            c,
            vec![Action::PeerRoleChanged {
                from: Some(Primary),
                to: Secondary
            }]
        );
        // Now b may be promoted.
        assert!(b.m.step(Event::Promote { force: false }).is_ok());
        // Invalidate needs Secondary; it drops the link so the handshake runs again.
        let mut p = host(Primary, UpToDate, gen(A, 0, 0), 0);
        assert!(matches!(
            p.m.step(Event::Invalidate),
            Err(Refusal::NotAllowed(_))
        ));
        assert_eq!(
            a.m.step(Event::Invalidate).unwrap(),
            vec![Action::InvalidateMetadata]
        );
        assert_eq!(
            a.m.step(Event::Invalidated).unwrap(),
            vec![Action::DropLink]
        );
        assert_eq!(a.m.disk(), Inconsistent);
    }

    #[test]
    fn write_gate_follows_state_and_fencing() {
        let mut h = host(Secondary, UpToDate, gen(A, 0, 0), 0);
        assert_eq!(h.m.write_gate(Fencing::DontCare), WriteGate::ReadOnly);
        h.m.role = Primary;
        assert_eq!(h.m.write_gate(Fencing::DontCare), WriteGate::Degraded);
        // suspend-io holds writes without a peer until resume-io.
        assert_eq!(h.m.write_gate(Fencing::SuspendIo), WriteGate::Wait);
        assert!(h.m.suspended(Fencing::SuspendIo));
        assert_eq!(h.m.step(Event::ResumeIo).unwrap(), vec![Action::IoResumed]);
        assert_eq!(h.m.write_gate(Fencing::SuspendIo), WriteGate::Degraded);
        // Writes wait during the handshake so both bitmaps are exact.
        h.m.step(Event::LinkUp).unwrap();
        assert_eq!(h.m.write_gate(Fencing::DontCare), WriteGate::Wait);
        let (mut a, _) = connected(true);
        let e = a.m.epoch();
        assert_eq!(
            a.m.write_gate(Fencing::SuspendIo),
            WriteGate::Replicate { epoch: e }
        );
        assert!(a.m.epoch_alive(e) && !a.m.epoch_alive(e + 1));
        a.m.step(Event::Crash).unwrap();
        assert_eq!(a.m.write_gate(Fencing::DontCare), WriteGate::Closed);
        // A reconnect clears resume-io: the next outage suspends again.
        let mut a = host(Primary, UpToDate, gen(A, 0, B), 0);
        a.m.step(Event::ResumeIo).unwrap();
        let mut b = host(Secondary, UpToDate, gen(A, 0, B), 0);
        handshake(&mut a, &mut b, SplitBrainPolicies::default());
        a.m.step(Event::LinkLost {
            reason: "x".into(),
            standalone: false,
        })
        .unwrap();
        assert_eq!(a.m.write_gate(Fencing::SuspendIo), WriteGate::Wait);
    }

    #[test]
    fn write_failures_mark_out_of_sync_and_keep_the_disk() {
        let (mut a, _) = connected(true);
        assert_eq!(
            a.m.step(Event::LocalWriteFailed {
                offset: 4096,
                len: 512
            })
            .unwrap(),
            vec![Action::MarkOutOfSync {
                offset: 4096,
                len: 512
            }]
        );
        assert_eq!(
            a.m.step(Event::PeerWriteFailed {
                offset: 0,
                len: 4096
            })
            .unwrap(),
            vec![Action::MarkOutOfSync {
                offset: 0,
                len: 4096
            }]
        );
        assert_eq!(a.m.disk(), UpToDate);
        assert_eq!(a.m.conn_state(), ConnState::Connected);
    }

    #[test]
    fn shutdown_ends_standalone_secondary() {
        let (mut a, _) = connected(true);
        assert_eq!(
            a.m.step(Event::Shutdown).unwrap(),
            vec![Action::ShuttingDown]
        );
        assert!(a.m.step(Event::Shutdown).unwrap().is_empty());
        assert!(!a.m.wants_dial());
        a.m.step(Event::LinkLost {
            reason: "shutting down".into(),
            standalone: false,
        })
        .unwrap();
        a.m.step(Event::ShutdownDone).unwrap();
        assert_eq!(
            (a.m.role(), a.m.conn_state()),
            (Secondary, ConnState::StandAlone)
        );
    }
}
