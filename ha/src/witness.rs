//! Witness prober: a standalone secondary promotes only when at least one witness IP answers
//! (like Heartbeat's pingd or HA-Lizard's FENCE_HEURISTICS_IPS), so a host cut off from the
//! network does not promote just because it lost the peer.
//!
//! `port == 0`: ICMP echo (RFC 792 for IPv4, RFC 4443 §4.1 for IPv6) over a raw socket (the
//! daemon runs as root). Otherwise a TCP connect to that port: an accepted connection or a
//! refusal (RST) both prove the witness is up.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// RFC 1071 Internet checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: type 8 (IPv4) or 128 (IPv6), code 0, id, seq, payload. The IPv6 checksum
/// is filled in by the kernel for raw ICMPv6 sockets (RFC 3542 §3.1).
pub fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"twinsan-witness");
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Whether `pkt` (as read from the raw socket: with the IPv4 header, without the IPv6 one) is
/// the echo reply to (`id`, `seq`).
pub fn is_echo_reply(v6: bool, pkt: &[u8], id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        pkt
    } else {
        let Some(&vihl) = pkt.first() else {
            return false;
        };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 || pkt.len() < ihl {
            return false;
        }
        &pkt[ihl..]
    };
    icmp.len() >= 8
        && icmp[0] == if v6 { 129 } else { 0 }
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

fn ping_blocking(ip: IpAddr, timeout: Duration, id: u16, seq: u16) -> io::Result<bool> {
    let v6 = ip.is_ipv6();
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))?;
    let dst = SocketAddr::new(ip, 0);
    sock.send_to(&echo_request(v6, id, seq), &dst.into())?;
    let deadline = Instant::now() + timeout;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // SAFETY: recv_from initialised the first n bytes.
                let pkt: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                if from.as_socket().map(|s| s.ip()) == Some(ip) && is_echo_reply(v6, &pkt, id, seq)
                {
                    return Ok(true);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Probes one witness: ICMP echo (`port == 0`) or TCP connect, within `timeout`.
pub async fn probe(ip: IpAddr, port: u16, timeout: Duration, seq: u16) -> bool {
    if port != 0 {
        return match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect(SocketAddr::new(ip, port)),
        )
        .await
        {
            Ok(Ok(_)) => true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => true,
            Ok(Err(e)) => {
                debug!(%ip, port, "witness connect: {e}");
                false
            }
            Err(_) => false,
        };
    }
    let id = (std::process::id() & 0xffff) as u16;
    match tokio::task::spawn_blocking(move || ping_blocking(ip, timeout, id, seq)).await {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            debug!(%ip, "witness ping: {e}");
            false
        }
        Err(e) => {
            debug!(%ip, "witness ping task: {e}");
            false
        }
    }
}

/// Probes every witness each `interval`; reports whether at least one answered, on change.
pub async fn run(
    witnesses: Vec<IpAddr>,
    port: u16,
    interval: Duration,
    timeout: Duration,
    tx: mpsc::Sender<bool>,
    stop: CancellationToken,
) {
    if witnesses.is_empty() {
        return;
    }
    let mut last = None;
    let mut seq: u16 = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        seq = seq.wrapping_add(1);
        let answers =
            futures::future::join_all(witnesses.iter().map(|ip| probe(*ip, port, timeout, seq)))
                .await;
        let up = answers.iter().any(|a| *a);
        if last != Some(up) {
            info!(reachable = up, ?witnesses, "witness state");
            last = Some(up);
            if tx.send(up).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_packets() {
        let p = echo_request(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        // A reply as a raw IPv4 socket delivers it: 20-byte header + ICMP.
        let mut reply = vec![0x45u8];
        reply.extend_from_slice(&[0; 19]);
        let mut icmp = p.clone();
        icmp[0] = 0;
        reply.extend_from_slice(&icmp);
        assert!(is_echo_reply(false, &reply, 0x1234, 7));
        assert!(!is_echo_reply(false, &reply, 0x1234, 8));
        assert!(!is_echo_reply(false, &reply[..22], 0x1234, 7));
        assert!(!is_echo_reply(false, &[], 0, 0));
        let mut v6 = echo_request(true, 1, 2);
        assert!(!is_echo_reply(true, &v6, 1, 2), "a request is not a reply");
        v6[0] = 129;
        assert!(is_echo_reply(true, &v6, 1, 2));
    }

    #[tokio::test]
    async fn tcp_witness_up_refused_and_ping_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(probe(lo, port, Duration::from_millis(500), 1).await);
        drop(l);
        // Refused: the host is up.
        assert!(probe(lo, port, Duration::from_millis(500), 2).await);
        // ICMP needs a raw socket (root); skip when not permitted.
        if Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).is_ok() {
            assert!(probe(lo, 0, Duration::from_millis(500), 3).await);
        }
    }
}
