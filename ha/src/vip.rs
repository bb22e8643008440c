//! The floating IP (VIP): add/remove via rtnetlink, announce, and check that nobody else has it.
//!
//! * IPv4 VIPs carry the label `<ifname>:<label>` (default label `twinsan`), so a VIP left behind by a crash is recognisable at
//!   start ([`VipManager::list_labelled`]). IPv6 has no address labels; IPv6 VIPs are found by their
//!   configured address ([`VipManager::cleanup`] removes both kinds).
//! * IPv6 VIPs are added with `IFA_F_NODAD`: the duplicate check is done by us before adding
//!   (waiting for the kernel's DAD would add a second of I/O pause to every switch).
//! * Duplicate detection is ARP (RFC 5227 probe: sender IP 0.0.0.0) or, for IPv6, a DAD neighbour
//!   solicitation (source ::): unlike ICMP ping, a host firewall does not hide a holder.
//! * Announcements are gratuitous ARP requests (sender = target = VIP, broadcast) or unsolicited
//!   neighbour advertisements with the override flag to ff02::1.
//!
//! Sockets (netlink and raw) belong to the network namespace of the thread that creates them:
//! create the [`VipManager`] and call the raw functions from a thread in the right namespace.

use std::io;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use nix::errno::Errno;
use nix::ifaddrs::getifaddrs;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, CacheInfo};
use rtnetlink::packet_route::link::LinkAttribute;
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};
use tracing::{debug, info, warn};

/// Default label marking our IPv4 VIPs (`<ifname>:twinsan`).
pub const DEFAULT_LABEL: &str = "twinsan";

/// VIP errors.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// Netlink request failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// Socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The interface does not exist.
    #[error("no interface named {0}")]
    NoInterface(String),
    /// The label is too long.
    #[error("address label {0} is longer than 15 characters")]
    Label(String),
}

/// One floating address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length (e.g. 24 or 64).
    pub prefix_len: u8,
    /// Interface (e.g. `bond1`, `xenbr1`).
    pub ifname: String,
    /// IPv4 label suffix: the address is labelled `<ifname>:<label>`.
    pub label: String,
}

/// The IPv4 label `<ifname>:<label>`; the kernel allows 15 characters (IFNAMSIZ - 1).
pub fn vip_label(ifname: &str, label: &str) -> Result<String, VipError> {
    let l = format!("{ifname}:{label}");
    if l.len() <= 15 {
        Ok(l)
    } else {
        Err(VipError::Label(l))
    }
}

fn is_our_label(full: &str, label: &str) -> bool {
    full.strip_suffix(label)
        .is_some_and(|head| head.ends_with(':'))
}

/// rtnetlink address management for VIPs.
pub struct VipManager {
    handle: rtnetlink::Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for VipManager {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn nl(e: rtnetlink::Error) -> VipError {
    VipError::Netlink(e.to_string())
}

fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn msg_addr(m: &AddressMessage) -> Option<IpAddr> {
    // IPv4 point-to-point aside, IFA_LOCAL is the interface's own address; IPv6 only has ADDRESS.
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => addr = Some(*ip),
            _ => {}
        }
    }
    addr
}

fn msg_label(m: &AddressMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Label(l) => Some(l.as_str()),
        _ => None,
    })
}

impl VipManager {
    /// Opens a netlink socket in the current thread's network namespace and drives it on the
    /// current tokio runtime.
    pub fn new() -> Result<Self, VipError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let conn = tokio::spawn(conn);
        Ok(VipManager { handle, conn })
    }

    /// Interface index by name.
    pub async fn ifindex(&self, ifname: &str) -> Result<u32, VipError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(l.header.index),
            Ok(None) => Err(VipError::NoInterface(ifname.into())),
            Err(e) if netlink_errno(&e) == Some(Errno::ENODEV as i32) => {
                Err(VipError::NoInterface(ifname.into()))
            }
            Err(e) => Err(nl(e)),
        }
    }

    /// MAC address of an interface.
    pub async fn mac(&self, ifname: &str) -> Result<[u8; 6], VipError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute();
        let l = links
            .try_next()
            .await
            .map_err(nl)?
            .ok_or_else(|| VipError::NoInterface(ifname.into()))?;
        l.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) if b.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(b);
                    Some(m)
                }
                _ => None,
            })
            .ok_or_else(|| VipError::Netlink(format!("{ifname} has no Ethernet address")))
    }

    async fn addresses(&self, index: u32) -> Result<Vec<AddressMessage>, VipError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl)
    }

    /// Whether the VIP is configured on its interface.
    pub async fn is_local(&self, vip: &Vip) -> Result<bool, VipError> {
        let idx = self.ifindex(&vip.ifname).await?;
        Ok(self
            .addresses(idx)
            .await?
            .iter()
            .any(|m| msg_addr(m) == Some(vip.addr)))
    }

    /// Adds the VIP (labelled if IPv4, without kernel DAD if IPv6). Already present is fine.
    pub async fn add(&self, vip: &Vip) -> Result<(), VipError> {
        self.add_for(vip, None).await
    }

    /// Adds the VIP, or refreshes it, with a limited lifetime: the kernel removes the address
    /// by itself when `lifetime` passes without a refresh (`valid_lft`, as `ip addr add ...
    /// valid_lft N` does; IPv4 address lifetimes exist since Linux 3.9). A daemon that refreshes
    /// it while alive thus cannot leave it behind when it is killed. `None` = permanent.
    pub async fn add_for(&self, vip: &Vip, lifetime: Option<Duration>) -> Result<(), VipError> {
        let idx = self.ifindex(&vip.ifname).await?;
        let mut req = self.handle.address().add(idx, vip.addr, vip.prefix_len);
        if let Some(l) = lifetime {
            let secs = l.as_secs().clamp(1, u32::MAX as u64 - 1) as u32;
            req = req.replace();
            let mut info = CacheInfo::default();
            info.ifa_preferred = secs;
            info.ifa_valid = secs;
            req.message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(info));
        }
        match vip.addr {
            IpAddr::V4(_) => req
                .message_mut()
                .attributes
                .push(AddressAttribute::Label(vip_label(&vip.ifname, &vip.label)?)),
            IpAddr::V6(_) => req
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad)),
        }
        match req.execute().await {
            Ok(()) => {
                debug!(addr = %vip.addr, ifname = %vip.ifname, ?lifetime, "VIP added or refreshed");
                Ok(())
            }
            Err(e) if netlink_errno(&e) == Some(Errno::EEXIST as i32) => {
                debug!(addr = %vip.addr, "VIP already present");
                Ok(())
            }
            Err(e) => Err(nl(e)),
        }
    }

    /// Removes the VIP; returns whether it was there.
    pub async fn remove(&self, vip: &Vip) -> Result<bool, VipError> {
        let idx = self.ifindex(&vip.ifname).await?;
        let mut removed = false;
        for m in self.addresses(idx).await? {
            if msg_addr(&m) == Some(vip.addr) {
                match self.handle.address().del(m).execute().await {
                    Ok(()) => removed = true,
                    Err(e) if netlink_errno(&e) == Some(Errno::EADDRNOTAVAIL as i32) => {}
                    Err(e) => return Err(nl(e)),
                }
            }
        }
        if removed {
            info!(addr = %vip.addr, ifname = %vip.ifname, "VIP removed");
        }
        Ok(removed)
    }

    /// IPv4 addresses on `ifname` carrying the label `<ifname>:<label>`.
    pub async fn list_labelled(
        &self,
        ifname: &str,
        label: &str,
    ) -> Result<Vec<(IpAddr, u8)>, VipError> {
        let idx = self.ifindex(ifname).await?;
        Ok(self
            .addresses(idx)
            .await?
            .iter()
            .filter(|m| msg_label(m).is_some_and(|l| is_our_label(l, label)))
            .filter_map(|m| Some((msg_addr(m)?, m.header.prefix_len)))
            .collect())
    }

    /// Start-up cleanup after a crash: removes every labelled address on the VIP's interface and
    /// the configured VIP itself. Returns what was removed.
    pub async fn cleanup(&self, vip: &Vip) -> Result<Vec<IpAddr>, VipError> {
        let mut gone = Vec::new();
        for (addr, prefix_len) in self.list_labelled(&vip.ifname, &vip.label).await? {
            let v = Vip {
                addr,
                prefix_len,
                ..vip.clone()
            };
            if self.remove(&v).await? {
                warn!(%addr, "removed a VIP left behind");
                gone.push(addr);
            }
        }
        if self.remove(vip).await? {
            warn!(addr = %vip.addr, "removed a VIP left behind");
            gone.push(vip.addr);
        }
        Ok(gone)
    }
}

// ---------------------------------------------------------------- packets

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];

/// An ARP request over Ethernet/IPv4 (28 bytes).
pub fn arp_request(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&sha);
    p[14..18].copy_from_slice(&spa.octets());
    // Target hardware address stays zero (RFC 5227).
    p[24..28].copy_from_slice(&tpa.octets());
    p
}

/// A parsed ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// 1 = request, 2 = reply.
    pub op: u16,
    /// Sender MAC.
    pub sha: [u8; 6],
    /// Sender IP.
    pub spa: Ipv4Addr,
    /// Target IP.
    pub tpa: Ipv4Addr,
}

/// Parses an Ethernet/IPv4 ARP packet (without the Ethernet header).
pub fn parse_arp(p: &[u8]) -> Option<Arp> {
    if p.len() < 28 || p[0..2] != [0, 1] || p[2..4] != [8, 0] || p[4] != 6 || p[5] != 4 {
        return None;
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&p[8..14]);
    Some(Arp {
        op: u16::from_be_bytes([p[6], p[7]]),
        sha,
        spa: Ipv4Addr::new(p[14], p[15], p[16], p[17]),
        tpa: Ipv4Addr::new(p[24], p[25], p[26], p[27]),
    })
}

/// RFC 5227 conflict: another MAC claims the address, or probes for it too.
pub fn arp_conflicts(a: &Arp, vip: Ipv4Addr, my_mac: [u8; 6]) -> bool {
    a.sha != my_mac && (a.spa == vip || (a.spa.is_unspecified() && a.tpa == vip && a.op == 1))
}

fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

fn multicast_mac(a: Ipv6Addr) -> [u8; 6] {
    let o = a.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A full Ethernet frame carrying an IPv6 ICMPv6 message with hop limit 255.
fn ipv6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut icmp: Vec<u8>,
) -> Vec<u8> {
    let ck = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(58);
    f.push(255);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Unsolicited neighbour advertisement (override flag) for `target`, to all nodes.
pub fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    ipv6_frame(mac, multicast_mac(all_nodes), target, all_nodes, icmp)
}

/// DAD neighbour solicitation (source ::, no source link-layer option) for `target`.
pub fn dad_solicitation(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    let dst = solicited_node(target);
    ipv6_frame(mac, multicast_mac(dst), Ipv6Addr::UNSPECIFIED, dst, icmp)
}

/// If `frame` (Ethernet) is a neighbour advertisement for `target` from another MAC, or another
/// host's DAD solicitation for it, it is a conflict.
pub fn nd_conflicts(frame: &[u8], target: Ipv6Addr, my_mac: [u8; 6]) -> bool {
    if frame.len() < 14 + 40 + 24
        || frame[6..12] == my_mac
        || frame[12..14] != ETH_P_IPV6.to_be_bytes()
    {
        return false;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 6 || ip[6] != 58 {
        return false;
    }
    let icmp = &ip[40..];
    let t = match <[u8; 16]>::try_from(&icmp[8..24]) {
        Ok(t) => Ipv6Addr::from(t),
        Err(_) => return false,
    };
    let src_unspecified = ip[8..24].iter().all(|b| *b == 0);
    t == target && (icmp[0] == 136 || (icmp[0] == 135 && src_unspecified))
}

// ---------------------------------------------------------------- raw sockets

struct PacketSocket {
    sock: Socket,
    ifindex: i32,
}

fn ifindex_of(ifname: &str) -> io::Result<i32> {
    let idx = nix::net::if_::if_nametoindex(ifname)?;
    i32::try_from(idx).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The packet(7) link-layer address `sockaddr_ll` for `bind`/`sendto`. Raw on purpose: neither
/// socket2 nor nix has a safe constructor for AF_PACKET addresses, so this one conversion stays
/// unsafe.
fn link_addr(ifindex: i32, proto: u16, dst: [u8; 6]) -> SockAddr {
    let mut sll_addr = [0u8; 8];
    sll_addr[..6].copy_from_slice(&dst);
    let sa = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: proto.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr,
    };
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: sockaddr_storage is larger than sockaddr_ll and aligned for every address type.
    unsafe { *storage.view_as::<libc::sockaddr_ll>() = sa };
    // SAFETY: the storage holds an initialised sockaddr_ll of exactly this length.
    unsafe {
        SockAddr::new(
            storage,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    }
}

impl PacketSocket {
    /// `raw`: frames include the Ethernet header (SOCK_RAW) or not (SOCK_DGRAM).
    fn open(ifname: &str, proto: u16, raw: bool) -> io::Result<Self> {
        let ifindex = ifindex_of(ifname)?;
        let ty = if raw { Type::RAW } else { Type::DGRAM };
        // packet(7): the protocol is in network byte order. socket2 sets SOCK_CLOEXEC itself.
        let sock = Socket::new(
            Domain::PACKET,
            ty,
            Some(Protocol::from(i32::from(proto.to_be()))),
        )?;
        sock.set_nonblocking(true)?;
        sock.bind(&link_addr(ifindex, proto, [0; 6]))?;
        Ok(PacketSocket { sock, ifindex })
    }

    fn send(&self, proto: u16, dst: [u8; 6], data: &[u8]) -> io::Result<()> {
        self.sock
            .send_to(data, &link_addr(self.ifindex, proto, dst))?;
        Ok(())
    }

    /// Receives until `deadline`, returning true as soon as `hit` matches a packet.
    fn wait_for(&self, deadline: Instant, mut hit: impl FnMut(&[u8]) -> bool) -> io::Result<bool> {
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            match poll(&mut pfd, timeout) {
                Err(Errno::EINTR) | Ok(0) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            // Drain everything queued.
            loop {
                let n = match (&self.sock).read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                if hit(&buf[..n]) {
                    return Ok(true);
                }
            }
        }
    }
}

/// The interface's hardware address: its AF_PACKET entry in getifaddrs(3), the address
/// SIOCGIFHWADDR reports.
fn mac_of(ifname: &str) -> io::Result<[u8; 6]> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for ifa in getifaddrs()? {
        if ifa.interface_name != ifname {
            continue;
        }
        if let Some(link) = ifa.address.as_ref().and_then(|a| a.as_link_addr()) {
            return Ok(link.addr().unwrap_or([0; 6]));
        }
    }
    Err(Errno::ENODEV.into())
}

/// Sends `count` gratuitous ARPs (IPv4) or unsolicited neighbour advertisements (IPv6), spaced by
/// `interval`, so switches and initiators learn the VIP's new owner at once.
pub async fn announce(vip: &Vip, count: u32, interval: Duration) -> io::Result<()> {
    let mac = mac_of(&vip.ifname)?;
    let (sock, proto, dst, pkt) = match vip.addr {
        IpAddr::V4(a) => (
            PacketSocket::open(&vip.ifname, ETH_P_ARP, false)?,
            ETH_P_ARP,
            BROADCAST,
            arp_request(mac, a, a).to_vec(),
        ),
        IpAddr::V6(a) => {
            let f = unsolicited_na(mac, a);
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&f[0..6]);
            (
                PacketSocket::open(&vip.ifname, ETH_P_IPV6, true)?,
                ETH_P_IPV6,
                dst,
                f,
            )
        }
    };
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        sock.send(proto, dst, &pkt)?;
    }
    debug!(addr = %vip.addr, count, "VIP announced");
    Ok(())
}

/// Duplicate detection: true if another host answers for the VIP within `wait` (RFC 5227 ARP
/// probe, or IPv6 DAD solicitation). The sockets are opened on the calling thread (its network
/// namespace); the wait runs on the blocking pool.
pub async fn probe(vip: &Vip, wait: Duration) -> io::Result<bool> {
    let mac = mac_of(&vip.ifname)?;
    let deadline = Instant::now() + wait;
    let in_use = match vip.addr {
        IpAddr::V4(a) => {
            let sock = PacketSocket::open(&vip.ifname, ETH_P_ARP, false)?;
            sock.send(
                ETH_P_ARP,
                BROADCAST,
                &arp_request(mac, Ipv4Addr::UNSPECIFIED, a),
            )?;
            tokio::task::spawn_blocking(move || {
                sock.wait_for(deadline, |p| {
                    parse_arp(p).is_some_and(|arp| arp_conflicts(&arp, a, mac))
                })
            })
            .await
            .map_err(io::Error::other)??
        }
        IpAddr::V6(a) => {
            let sock = PacketSocket::open(&vip.ifname, ETH_P_IPV6, true)?;
            let f = dad_solicitation(mac, a);
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&f[0..6]);
            sock.send(ETH_P_IPV6, dst, &f)?;
            tokio::task::spawn_blocking(move || {
                sock.wait_for(deadline, |fr| nd_conflicts(fr, a, mac))
            })
            .await
            .map_err(io::Error::other)??
        }
    };
    info!(addr = %vip.addr, in_use, "VIP duplicate probe");
    Ok(in_use)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn labels() {
        assert_eq!(vip_label("bond1", "tsan").unwrap(), "bond1:tsan");
        assert_eq!(
            vip_label("xenbr1", DEFAULT_LABEL).unwrap(),
            "xenbr1:twinsan"
        );
        assert!(vip_label("xenbr10xyzw", "twinsan").is_err());
        assert!(is_our_label("bond1:tsan", "tsan"));
        assert!(!is_our_label("bond1", "tsan"));
        assert!(!is_our_label("bond1:xtsan", "tsan"));
    }

    #[test]
    fn arp_build_and_parse() {
        let vip = Ipv4Addr::new(192, 0, 2, 10);
        let g = arp_request(MAC, vip, vip);
        let a = parse_arp(&g).unwrap();
        assert_eq!((a.op, a.sha, a.spa, a.tpa), (1, MAC, vip, vip));
        let probe = parse_arp(&arp_request(MAC, Ipv4Addr::UNSPECIFIED, vip)).unwrap();
        // Our own packets never conflict.
        assert!(!arp_conflicts(&a, vip, MAC));
        let other = [2, 0, 0, 0, 0, 2];
        assert!(arp_conflicts(&Arp { sha: other, ..a }, vip, MAC));
        assert!(arp_conflicts(
            &Arp {
                sha: other,
                ..probe
            },
            vip,
            MAC
        ));
        let unrelated = Arp {
            op: 2,
            sha: other,
            spa: Ipv4Addr::new(192, 0, 2, 9),
            tpa: vip,
        };
        assert!(!arp_conflicts(&unrelated, vip, MAC));
        assert!(parse_arp(&g[..27]).is_none());
        assert!(parse_arp(&[0u8; 28]).is_none());
    }

    #[test]
    fn nd_packets() {
        let t: Ipv6Addr = "2001:db8::10".parse().unwrap();
        assert_eq!(
            solicited_node(t),
            "ff02::1:ff00:10".parse::<Ipv6Addr>().unwrap()
        );
        let na = unsolicited_na(MAC, t);
        assert_eq!(&na[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(na[14 + 7], 255, "hop limit");
        assert_eq!(na[14 + 40], 136);
        assert_eq!(na[14 + 40 + 4] & 0x20, 0x20, "override flag");
        // The checksum verifies to zero over the pseudo header.
        let icmp = &na[54..];
        assert_eq!(icmpv6_checksum(t, "ff02::1".parse().unwrap(), icmp), 0);
        let ns = dad_solicitation(MAC, t);
        assert_eq!(&ns[0..6], &[0x33, 0x33, 0xff, 0, 0, 0x10]);
        // Own frames never conflict; another host's NA or DAD NS does.
        assert!(!nd_conflicts(&na, t, MAC));
        let other = [2, 0, 0, 0, 0, 2];
        assert!(nd_conflicts(&unsolicited_na(other, t), t, MAC));
        assert!(nd_conflicts(&dad_solicitation(other, t), t, MAC));
        assert!(!nd_conflicts(
            &unsolicited_na(other, "2001:db8::11".parse().unwrap()),
            t,
            MAC
        ));
        assert!(!nd_conflicts(&na[..60], t, other));
        assert!(!nd_conflicts(&[0u8; 100], t, MAC));
    }

    // ------------------------------------------------ network namespace tests

    use std::process::Command;

    /// Gives namespace `ns` a stale neighbour entry for the test VIP pointing at a wrong
    /// MAC, which an unsolicited NA with the override flag must replace.
    fn stale_neighbour(ns: &str) {
        ip(&[
            "-n",
            ns,
            "neigh",
            "add",
            "2001:db8::100",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "vb",
            "nud",
            "stale",
        ])
        .unwrap();
    }

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Two namespaces joined by a veth pair (`va` in A, `vb` in B); deleted on drop.
    struct Pair {
        a: String,
        b: String,
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.a]);
            let _ = ip(&["netns", "del", &self.b]);
        }
    }

    fn pair(tag: &str) -> Result<Pair, String> {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = format!("twinsan-ha-test-{}-{n:x}-{tag}", std::process::id());
        let p = Pair {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
        };
        ip(&["netns", "add", &p.a])?;
        ip(&["netns", "add", &p.b])?;
        for ns in [&p.a, &p.b] {
            // No kernel DAD in the way; learn neighbours from gratuitous ARP / unsolicited NA so
            // the tests can see the announcements arrive.
            let _ = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.default.accept_dad=0",
                ])
                .arg("net.ipv4.conf.default.arp_accept=1")
                .status();
        }
        ip(&[
            "-n", &p.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &p.b,
        ])?;
        ip(&["-n", &p.a, "link", "set", "va", "up"])?;
        ip(&["-n", &p.b, "link", "set", "vb", "up"])?;
        ip(&["-n", &p.a, "addr", "add", "192.0.2.1/24", "dev", "va"])?;
        ip(&["-n", &p.b, "addr", "add", "192.0.2.2/24", "dev", "vb"])?;
        Ok(p)
    }

    /// Runs `f` on a fresh thread inside namespace `ns` with its own tokio runtime.
    fn in_ns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // setns(2) with CLONE_NEWNET moves only this thread into the namespace.
            let r = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
            assert!(r.is_ok(), "setns: {r:?}");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(f())
        })
        .join()
        .expect("namespace thread panicked")
    }

    fn pair_or_skip(tag: &str) -> Option<Pair> {
        match pair(tag) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("skipping: cannot create network namespaces ({e})");
                None
            }
        }
    }

    fn neigh(ns: &str, addr: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "neigh", "show", addr])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn ipv4_vip_add_probe_announce_cleanup() {
        let Some(p) = pair_or_skip("v4") else { return };
        let vip = Vip {
            addr: "192.0.2.100".parse().unwrap(),
            prefix_len: 24,
            ifname: "va".into(),
            label: "tsan".into(),
        };
        let vip_b = Vip {
            ifname: "vb".into(),
            ..vip.clone()
        };

        // Nobody has it: B's probe says free.
        let vb = vip_b.clone();
        let t0 = Instant::now();
        assert!(!in_ns(&p.b, move || Box::pin(async move {
            probe(&vb, Duration::from_millis(300)).await.unwrap()
        })));
        assert!(t0.elapsed() >= Duration::from_millis(250));

        // A adds it (twice: idempotent), labelled, and announces it.
        // B has a stale entry pointing elsewhere: the override flag must replace it.
        stale_neighbour(&p.b);
        let va = vip.clone();
        let mac_a = in_ns(&p.a, move || {
            Box::pin(async move {
                let m = VipManager::new().unwrap();
                assert!(!m.is_local(&va).await.unwrap());
                m.add(&va).await.unwrap();
                m.add(&va).await.unwrap();
                assert!(m.is_local(&va).await.unwrap());
                assert_eq!(
                    m.list_labelled("va", "tsan").await.unwrap(),
                    vec![(va.addr, 24)]
                );
                announce(&va, 3, Duration::from_millis(20)).await.unwrap();
                m.mac("va").await.unwrap()
            })
        });
        let out = Command::new("ip")
            .args(["-n", &p.a, "-4", "addr", "show", "dev", "va"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("va:tsan"));

        // B learned A's MAC for the VIP from the gratuitous ARP (its neighbour table).
        let mac_txt = mac_a
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let n = neigh(&p.b, "192.0.2.100");
        assert!(n.contains(&mac_txt), "neigh: {n}");

        // Now B's probe finds it in use (A's kernel answers the RFC 5227 probe).
        let vb = vip_b.clone();
        assert!(in_ns(&p.b, move || Box::pin(async move {
            probe(&vb, Duration::from_millis(500)).await.unwrap()
        })));

        // Crash leftovers are cleaned up; remove is idempotent.
        let va = vip.clone();
        in_ns(&p.a, move || {
            Box::pin(async move {
                let m = VipManager::new().unwrap();
                // A second labelled address, as if left by an older configuration.
                let old = Vip {
                    addr: "192.0.2.101".parse().unwrap(),
                    ..va.clone()
                };
                m.add(&old).await.unwrap();
                let mut gone = m.cleanup(&va).await.unwrap();
                gone.sort();
                assert_eq!(gone, vec![va.addr, old.addr]);
                assert!(!m.remove(&va).await.unwrap());
                assert!(m.list_labelled("va", "tsan").await.unwrap().is_empty());
                assert!(matches!(
                    m.ifindex("nope0").await,
                    Err(VipError::NoInterface(_))
                ));
            })
        });

        // Free again.
        let vb = vip_b.clone();
        assert!(!in_ns(&p.b, move || Box::pin(async move {
            probe(&vb, Duration::from_millis(300)).await.unwrap()
        })));

        // A VIP with a lifetime disappears by itself when nobody refreshes it (killed daemon).
        let va = vip.clone();
        in_ns(&p.a, move || {
            Box::pin(async move {
                let m = VipManager::new().unwrap();
                m.add_for(&va, Some(Duration::from_secs(1))).await.unwrap();
                m.add_for(&va, Some(Duration::from_secs(1))).await.unwrap();
                assert!(m.is_local(&va).await.unwrap());
                let t0 = Instant::now();
                while m.is_local(&va).await.unwrap() {
                    assert!(t0.elapsed() < Duration::from_secs(5), "VIP did not expire");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
    }

    #[test]
    fn ipv6_vip_add_probe_announce() {
        let Some(p) = pair_or_skip("v6") else { return };
        let vip = Vip {
            addr: "2001:db8::100".parse().unwrap(),
            prefix_len: 64,
            ifname: "va".into(),
            label: "tsan".into(),
        };
        let vip_b = Vip {
            ifname: "vb".into(),
            ..vip.clone()
        };
        let vb = vip_b.clone();
        assert!(!in_ns(&p.b, move || Box::pin(async move {
            probe(&vb, Duration::from_millis(300)).await.unwrap()
        })));
        // B has a stale entry pointing elsewhere: the override flag must replace it.
        stale_neighbour(&p.b);
        let va = vip.clone();
        let mac_a = in_ns(&p.a, move || {
            Box::pin(async move {
                let m = VipManager::new().unwrap();
                m.add(&va).await.unwrap();
                m.add(&va).await.unwrap();
                assert!(m.is_local(&va).await.unwrap());
                announce(&va, 2, Duration::from_millis(20)).await.unwrap();
                m.mac("va").await.unwrap()
            })
        });
        let mac_txt = mac_a
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let n = neigh(&p.b, "2001:db8::100");
        assert!(n.contains(&mac_txt), "unsolicited NA not learned: {n}");
        let out = Command::new("ip")
            .args(["-n", &p.a, "-6", "addr", "show", "dev", "va"])
            .output()
            .unwrap();
        let txt = String::from_utf8_lossy(&out.stdout);
        assert!(txt.contains("2001:db8::100/64"), "{txt}");
        assert!(!txt.contains("tentative"), "{txt}");
        let vb = vip_b.clone();
        assert!(in_ns(&p.b, move || Box::pin(async move {
            probe(&vb, Duration::from_millis(500)).await.unwrap()
        })));
        let va = vip.clone();
        in_ns(&p.a, move || {
            Box::pin(async move {
                let m = VipManager::new().unwrap();
                assert_eq!(m.cleanup(&va).await.unwrap(), vec![va.addr]);
                assert!(!m.is_local(&va).await.unwrap());
            })
        });
    }
}
