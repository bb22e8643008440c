//! Connection setup: `Hello` exchange, the direction rule, and mutual HMAC-SHA256
//! challenge-response authentication over the shared secret (DRBD's `cram-hmac-alg`,
//! `drbd_receiver.c` `drbd_do_auth`, with SHA-256 instead of SHA-1).
//!
//! **Direction rule.** Both hosts listen on their `listen` address and dial the configured
//! `peer` address, so either can bring the link up. When both dials succeed there are two
//! connections; every process has a random 64-bit `node_id` that it sends in `Hello`, and
//! a connection survives only if it was dialed by the node with the *higher* id. Both ends
//! evaluate the same rule on the same two ids, so they agree without further messages; the
//! other connection is closed once both ends have checked each other's `AuthResponse`
//! ([`LinkError::WrongDirection`]): a peer with the wrong secret is refused on either.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use super::proto::{FrameCodec, FrameError, Message, PROTOCOL_VERSION};
use crate::drbd::{GenerationUuids, Role};

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length (longer ones are hashed first), so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The response to `challenge`: `HMAC-SHA256(secret, challenge || volume_name)`.
pub fn auth_response(secret: &[u8], challenge: &[u8; 32], volume: &str) -> [u8; 32] {
    let mut m = Vec::with_capacity(32 + volume.len());
    m.extend_from_slice(challenge);
    m.extend_from_slice(volume.as_bytes());
    hmac_sha256(secret, &m)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a connection was not established.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Framing / socket error.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// Nothing received in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Unexpected message.
    #[error("protocol error: expected {expected}, got {got}")]
    Unexpected {
        /// What we waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// Different protocol version.
    #[error("peer speaks protocol version {theirs}, we speak {ours}")]
    Version {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// Different volume name.
    #[error("peer serves volume {theirs:?}, we serve {ours:?}")]
    VolumeName {
        /// Ours.
        ours: String,
        /// Theirs.
        theirs: String,
    },
    /// Different usable size.
    #[error("peer's usable size is {theirs} bytes, ours is {ours} bytes")]
    Size {
        /// Ours.
        ours: u64,
        /// Theirs.
        theirs: u64,
    },
    /// The peer's HMAC response was wrong.
    #[error("peer failed authentication (wrong shared secret)")]
    WrongSecret,
    /// The peer refused us.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// Connection dialed in the losing direction (see the module docs); not an error.
    #[error("duplicate connection in the losing direction")]
    WrongDirection,
    /// Both ends have the same node id (a connection to ourselves).
    #[error("peer has our own node id (connected to ourselves?)")]
    SameNode,
}

impl LinkError {
    /// True for refusals an operator must fix (logged as errors).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LinkError::Version { .. }
                | LinkError::VolumeName { .. }
                | LinkError::Size { .. }
                | LinkError::WrongSecret
                | LinkError::Refused(_)
                | LinkError::SameNode
        )
    }
}

/// What we tell the peer in `Hello`.
#[derive(Debug, Clone)]
pub struct LocalHello {
    /// Volume name.
    pub volume_name: String,
    /// Usable size.
    pub size_bytes: u64,
    /// Shared secret.
    pub secret: Vec<u8>,
    /// Our process id for the direction rule.
    pub node_id: u64,
    /// Role.
    pub role: Role,
    /// UUIDs.
    pub uuids: GenerationUuids,
    /// Flags.
    pub flags: u32,
}

/// What we learned from the peer's `Hello`.
#[derive(Debug, Clone)]
pub struct PeerHello {
    /// The peer's node id.
    pub node_id: u64,
    /// Role at connect.
    pub role: Role,
    /// UUIDs at connect.
    pub uuids: GenerationUuids,
    /// Flags.
    pub flags: u32,
}

/// An authenticated connection.
pub struct Established<T> {
    /// The framed stream.
    pub framed: Framed<T, FrameCodec>,
    /// The peer's hello.
    pub peer: PeerHello,
    /// True if we dialed.
    pub dialer: bool,
}

async fn recv<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, FrameCodec>,
    timeout: Duration,
    what: &'static str,
) -> Result<Message, LinkError> {
    match tokio::time::timeout(timeout, f.next()).await {
        Err(_) => Err(LinkError::Timeout(what)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(Some(Ok(m))) => Ok(m),
    }
}

async fn refuse<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, FrameCodec>,
    timeout: Duration,
    err: LinkError,
) -> LinkError {
    let _ = tokio::time::timeout(
        timeout,
        f.send(Message::AuthFailed {
            reason: err.to_string(),
        }),
    )
    .await;
    err
}

/// Runs `Hello` + mutual authentication on a fresh connection. `timeout` bounds each
/// step. On success both sides have proven knowledge of the secret and agree on name,
/// size and protocol version.
pub async fn establish<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    local: &LocalHello,
    dialer: bool,
    timeout: Duration,
) -> Result<Established<T>, LinkError> {
    let mut f = Framed::new(io, FrameCodec);
    let challenge: [u8; 32] = rand::random();
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        volume_name: local.volume_name.clone(),
        size_bytes: local.size_bytes,
        role: local.role,
        uuids: local.uuids.clone(),
        flags: local.flags,
        node_id: local.node_id,
        challenge,
    };
    tokio::time::timeout(timeout, f.send(hello))
        .await
        .map_err(|_| LinkError::Timeout("sending Hello"))??;
    let peer_challenge;
    let peer = match recv(&mut f, timeout, "Hello").await? {
        Message::Hello {
            protocol_version,
            volume_name,
            size_bytes,
            role,
            uuids,
            flags,
            node_id,
            challenge,
        } => {
            if protocol_version != PROTOCOL_VERSION {
                let e = LinkError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: protocol_version,
                };
                return Err(refuse(&mut f, timeout, e).await);
            }
            if volume_name != local.volume_name {
                let e = LinkError::VolumeName {
                    ours: local.volume_name.clone(),
                    theirs: volume_name,
                };
                return Err(refuse(&mut f, timeout, e).await);
            }
            if size_bytes != local.size_bytes {
                let e = LinkError::Size {
                    ours: local.size_bytes,
                    theirs: size_bytes,
                };
                return Err(refuse(&mut f, timeout, e).await);
            }
            if node_id == local.node_id {
                return Err(refuse(&mut f, timeout, LinkError::SameNode).await);
            }
            peer_challenge = challenge;
            PeerHello {
                node_id,
                role,
                uuids,
                flags,
            }
        }
        Message::AuthFailed { reason } => return Err(LinkError::Refused(reason)),
        other => {
            return Err(LinkError::Unexpected {
                expected: "Hello",
                got: other.name(),
            })
        }
    };
    let (dialer_id, acceptor_id) = if dialer {
        (local.node_id, peer.node_id)
    } else {
        (peer.node_id, local.node_id)
    };
    let losing = dialer_id < acceptor_id;
    let mac = auth_response(&local.secret, &peer_challenge, &local.volume_name);
    // The peer's response is checked in the losing direction too, so a peer with the wrong
    // secret is refused (and logged) on every connection, whichever node id is higher. A
    // peer that closes right after Hello there (versions that dropped the losing
    // connection before authenticating) is a plain duplicate.
    let sent = tokio::time::timeout(timeout, f.send(Message::AuthResponse { mac }))
        .await
        .map_err(|_| LinkError::Timeout("sending AuthResponse"))
        .and_then(|r| r.map_err(LinkError::from));
    let answer = match sent {
        Ok(()) => recv(&mut f, timeout, "AuthResponse").await,
        Err(e) => Err(e),
    };
    let answer = match answer {
        Err(LinkError::Closed | LinkError::Frame(FrameError::Io(_))) if losing => {
            return Err(LinkError::WrongDirection)
        }
        r => r?,
    };
    match answer {
        Message::AuthResponse { mac } => {
            let want = auth_response(&local.secret, &challenge, &local.volume_name);
            if !ct_eq(&mac, &want) {
                return Err(refuse(&mut f, timeout, LinkError::WrongSecret).await);
            }
        }
        Message::AuthFailed { reason } => return Err(LinkError::Refused(reason)),
        other => {
            return Err(LinkError::Unexpected {
                expected: "AuthResponse",
                got: other.name(),
            })
        }
    }
    if losing {
        return Err(LinkError::WrongDirection);
    }
    tokio::time::timeout(timeout, f.send(Message::AuthOk))
        .await
        .map_err(|_| LinkError::Timeout("sending AuthOk"))??;
    match recv(&mut f, timeout, "AuthOk").await? {
        Message::AuthOk => {}
        Message::AuthFailed { reason } => return Err(LinkError::Refused(reason)),
        other => {
            return Err(LinkError::Unexpected {
                expected: "AuthOk",
                got: other.name(),
            })
        }
    }
    Ok(Established {
        framed: f,
        peer,
        dialer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_rfc4231_case_6_long_key() {
        let key = [0xaau8; 131];
        let mac = hmac_sha256(
            &key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn hello(name: &str, size: u64, secret: &str, id: u64) -> LocalHello {
        LocalHello {
            volume_name: name.into(),
            size_bytes: size,
            secret: secret.as_bytes().to_vec(),
            node_id: id,
            role: Role::Secondary,
            uuids: GenerationUuids::just_created(),
            flags: 0,
        }
    }

    async fn pair(
        a: LocalHello,
        b: LocalHello,
    ) -> (
        Result<Established<tokio::io::DuplexStream>, LinkError>,
        Result<Established<tokio::io::DuplexStream>, LinkError>,
    ) {
        let (x, y) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(2);
        tokio::join!(establish(x, &a, true, t), establish(y, &b, false, t))
    }

    #[tokio::test]
    async fn matching_peers_authenticate() {
        let (a, b) = pair(hello("v", 100, "s3cret", 9), hello("v", 100, "s3cret", 3)).await;
        let a = a.unwrap();
        let b = b.unwrap();
        assert_eq!(a.peer.node_id, 3);
        assert_eq!(b.peer.node_id, 9);
        assert!(a.dialer && !b.dialer);
    }

    #[tokio::test]
    async fn wrong_secret_refused_both_ways() {
        let (a, b) = pair(hello("v", 100, "s3cret", 9), hello("v", 100, "other", 3)).await;
        assert!(
            matches!(a, Err(LinkError::WrongSecret) | Err(LinkError::Refused(_))),
            "{:?}",
            a.err()
        );
        assert!(
            matches!(b, Err(LinkError::WrongSecret) | Err(LinkError::Refused(_))),
            "{:?}",
            b.err()
        );
    }

    #[tokio::test]
    async fn wrong_volume_refused() {
        let (a, b) = pair(hello("v1", 100, "s", 9), hello("v2", 100, "s", 3)).await;
        assert!(matches!(a, Err(LinkError::VolumeName { .. })));
        assert!(matches!(b, Err(LinkError::VolumeName { .. })));
    }

    #[tokio::test]
    async fn size_mismatch_refused() {
        let (a, b) = pair(hello("v", 100, "s", 9), hello("v", 200, "s", 3)).await;
        assert!(matches!(
            a,
            Err(LinkError::Size {
                ours: 100,
                theirs: 200
            })
        ));
        assert!(matches!(
            b,
            Err(LinkError::Size {
                ours: 200,
                theirs: 100
            })
        ));
    }

    #[tokio::test]
    async fn wrong_secret_refused_in_the_losing_direction_too() {
        // The dialer has the lower id: the connection would be dropped as a duplicate, but
        // the wrong secret is found (and refused) by both ends first, whichever id wins.
        for (da, db) in [(3, 9), (9, 3)] {
            let (a, b) = pair(hello("v", 100, "s3cret", da), hello("v", 100, "other", db)).await;
            for r in [a, b] {
                assert!(
                    matches!(r, Err(LinkError::WrongSecret)),
                    "ids {da}/{db}: {:?}",
                    r.err()
                );
            }
        }
    }

    #[tokio::test]
    async fn losing_direction_tolerates_a_peer_that_closes_after_hello() {
        // An older peer drops the losing connection right after Hello.
        let (x, y) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(2);
        let old_peer = async move {
            let mut f = Framed::new(y, FrameCodec);
            let _ = f.next().await;
            let local = hello("v", 100, "s", 9);
            f.send(Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                volume_name: local.volume_name,
                size_bytes: local.size_bytes,
                role: local.role,
                uuids: local.uuids,
                flags: 0,
                node_id: local.node_id,
                challenge: [7; 32],
            })
            .await
            .unwrap();
            drop(f);
        };
        let ours = hello("v", 100, "s", 3);
        let (a, ()) = tokio::join!(establish(x, &ours, true, t), old_peer);
        assert!(matches!(a, Err(LinkError::WrongDirection)), "{:?}", a.err());
    }

    #[tokio::test]
    async fn losing_direction_dropped_by_both() {
        // The dialer has the lower id: both ends drop the connection.
        let (a, b) = pair(hello("v", 100, "s", 3), hello("v", 100, "s", 9)).await;
        assert!(matches!(a, Err(LinkError::WrongDirection)));
        assert!(matches!(b, Err(LinkError::WrongDirection)));
    }
}
