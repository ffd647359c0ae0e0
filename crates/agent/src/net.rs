//! Instance networking without external tools, routed: the node's link (`ferry0`, a bridge
//! without ports holding the gateway address 10.88.0.1; a dummy link would do, but not every
//! kernel has the dummy driver), one veth pair per instance (`eth0` created directly
//! inside the instance's netns) with a /32 route to the instance through its host end, a
//! file-backed IPAM, and outbound NAT through iptables when the host has it. No bridge: a
//! Linux bridge takes at most 1,024 ports, which capped a node at 1,022 instances. Every
//! neighbour entry is permanent and set by us (the MACs follow from addresses), so no ARP runs.
//! Netlink is spoken raw (RTM_NEWLINK/NEWADDR/NEWROUTE/NEWNEIGH/DELLINK).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink {op}: {source}")]
    Netlink { op: String, source: io::Error },
    #[error("network {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("ipam: no free address in {0}")]
    Exhausted(String),
}

/// The node network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            bridge: "ferry0".into(),
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            prefix: 16,
        }
    }
}

impl NetConfig {
    fn network(&self) -> u32 {
        u32::from(self.gateway) & (u32::MAX << (32 - u32::from(self.prefix)))
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.network()), self.prefix)
    }
}

// --- raw netlink -----------------------------------------------------------------------------

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
/// The gateway is on the link even though no prefix of the link covers it.
const RTNH_F_ONLINK: u8 = 4;
const NLA_F_NESTED: u16 = 0x8000;
const IFF_UP: u32 = 1;

struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
        Msg { buf }
    }

    /// A dump request: no ack; the answer ends with NLMSG_DONE.
    fn dump(ty: u16) -> Msg {
        let mut m = Msg::new(ty, 0);
        m.buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        m
    }

    fn raw(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) -> &mut Self {
        let mut h = [0u8; 16];
        h[0] = libc::AF_UNSPEC as u8;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        h[8..12].copy_from_slice(&flags.to_ne_bytes());
        h[12..16].copy_from_slice(&change.to_ne_bytes());
        self.raw(&h)
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    fn nest_start(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) -> &mut Self {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(&mut self) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        &self.buf
    }
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket we own.
        Ok(Netlink {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends one request and waits for its ack.
    fn request(&self, op: &str, msg: &mut Msg) -> Result<(), NetError> {
        self.exchange(msg, 8192, |dgram| {
            let mut off = 0;
            while off + 16 <= dgram.len() {
                let len = u32::from_ne_bytes(dgram[off..off + 4].try_into().expect("4")) as usize;
                let ty = u16::from_ne_bytes(dgram[off + 4..off + 6].try_into().expect("2"));
                if ty == libc::NLMSG_ERROR as u16 && off + 20 <= dgram.len() {
                    let code = i32::from_ne_bytes(dgram[off + 16..off + 20].try_into().expect("4"));
                    return match code {
                        0 => Ok(true),
                        c => Err(io::Error::from_raw_os_error(-c)),
                    };
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
            Ok(false)
        })
        .map_err(|source| NetError::Netlink {
            op: op.to_string(),
            source,
        })
    }

    /// Sends `msg`, then hands each datagram of the answer (received into a buffer of
    /// `buf_len` bytes) to `answer` until it says it has seen the end.
    fn exchange(
        &self,
        msg: &mut Msg,
        buf_len: usize,
        mut answer: impl FnMut(&[u8]) -> io::Result<bool>,
    ) -> io::Result<()> {
        let data = msg.finish();
        // SAFETY: sending a byte buffer on our socket (kernel is the default destination).
        let r = unsafe { libc::send(self.fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; buf_len];
        loop {
            // SAFETY: receiving into our buffer of the given length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if answer(&buf[..n as usize])? {
                return Ok(());
            }
        }
    }
}

fn ifindex(name: &str) -> Option<i32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i as i32)
}

const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET6_ADDR_GEN_MODE: u16 = 8;
const IN6_ADDR_GEN_MODE_NONE: u8 = 1;

/// Sets a link up with IPv6 address generation off first: instances are IPv4 only, and
/// otherwise each veth end gets a link-local address with duplicate address detection and
/// MLD reports — kernel work per start (the `mld` and `ipv6_addrconf` kworkers were about a
/// tenth of the CPU when launching hundreds of instances). A kernel without IPv6 refuses the
/// attribute; that is fine.
fn link_up_v4(nl: &Netlink, index: i32, what: &str) -> Result<(), NetError> {
    let mut m = Msg::new(RTM_NEWLINK, 0);
    m.ifinfo(index, 0, 0);
    let af = m.nest_start(IFLA_AF_SPEC);
    let v6 = m.nest_start(libc::AF_INET6 as u16);
    m.attr(IFLA_INET6_ADDR_GEN_MODE, &[IN6_ADDR_GEN_MODE_NONE]);
    m.nest_end(v6);
    m.nest_end(af);
    if let Err(e) = nl.request(&format!("IPv6 address generation off on {what}"), &mut m) {
        tracing::debug!(error = %e, "IPv6 address generation left on");
    }
    link_up(nl, index, what)
}

fn link_up(nl: &Netlink, index: i32, what: &str) -> Result<(), NetError> {
    nl.request(
        &format!("set {what} up"),
        Msg::new(RTM_NEWLINK, 0).ifinfo(index, IFF_UP, IFF_UP),
    )
}

fn add_addr(
    nl: &Netlink,
    index: i32,
    ip: Ipv4Addr,
    prefix: u8,
    what: &str,
) -> Result<(), NetError> {
    let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
    let mut h = [0u8; 8];
    h[0] = libc::AF_INET as u8;
    h[1] = prefix;
    h[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    m.raw(&h)
        .attr(IFA_LOCAL, &ip.octets())
        .attr(IFA_ADDRESS, &ip.octets());
    match nl.request(&format!("add {ip}/{prefix} to {what}"), &mut m) {
        Err(NetError::Netlink { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            Ok(())
        }
        r => r,
    }
}

/// Creates the node's link (a bridge without ports, if missing) with the gateway address, makes the rest of
/// the subnet unreachable (an address with no instance fails at once instead of timing out),
/// enables forwarding and outbound NAT (iptables, when installed).
pub fn setup_host(cfg: &NetConfig) -> Result<(), NetError> {
    let nl = Netlink::open().map_err(|source| NetError::Netlink {
        op: "open".into(),
        source,
    })?;
    if ifindex(&cfg.bridge).is_none() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        m.ifinfo(0, 0, 0).attr_str(IFLA_IFNAME, &cfg.bridge);
        let li = m.nest_start(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "bridge");
        m.nest_end(li);
        match nl.request(&format!("create link {}", cfg.bridge), &mut m) {
            Err(NetError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) => {}
            r => r?,
        }
    }
    let idx = ifindex(&cfg.bridge).ok_or_else(|| NetError::Io {
        what: format!("link {}", cfg.bridge),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    add_addr(&nl, idx, cfg.gateway, 32, &cfg.bridge)?;
    link_up(&nl, idx, &cfg.bridge)?;
    let mut m = unreachable_route(cfg, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
    match nl.request(&format!("unreachable route {}", cfg.cidr()), &mut m) {
        // There already (an agent restart), or a node that had a bridge with the /prefix.
        Err(NetError::Netlink { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {}
        r => r?,
    }
    let _ = fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    raise_neigh_limits(1u64 << (32 - u32::from(cfg.prefix)));
    if let Some(ipt) = iptables() {
        // The rule of the bridge this link replaced would masquerade traffic between
        // instances, which now leaves through their veths.
        delete_rule(&ipt, &old_nat_rule(cfg));
        let rule = nat_rule(cfg);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        ensure_rule(&ipt, &rule);
    } else {
        tracing::warn!("iptables not found: instances get no outbound NAT");
    }
    Ok(())
}

/// `ty` (new or delete) of the route that makes the instance subnet unreachable.
fn unreachable_route(cfg: &NetConfig, ty: u16, flags: u16) -> Msg {
    let mut m = Msg::new(ty, flags);
    m.raw(&rtmsg(
        cfg.prefix,
        libc::RT_SCOPE_UNIVERSE,
        libc::RTN_UNREACHABLE,
        0,
    ))
    .attr(RTA_DST, &Ipv4Addr::from(cfg.network()).octets());
    m
}

/// An rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
fn rtmsg(dst_len: u8, scope: u8, kind: u8, flags: u8) -> [u8; 12] {
    [
        libc::AF_INET as u8,
        dst_len,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        scope,
        kind,
        flags,
        0,
        0,
        0,
    ]
}

/// The outbound NAT rule of the instance subnet (iptables arguments without the action):
/// what leaves it for elsewhere.
fn nat_rule(cfg: &NetConfig) -> Vec<String> {
    masquerade(cfg, "-d", &cfg.cidr())
}

/// The NAT rule of the bridged network before (`! -o <bridge>`).
fn old_nat_rule(cfg: &NetConfig) -> Vec<String> {
    masquerade(cfg, "-o", &cfg.bridge)
}

/// Deletes a rule of the nat table (`-t nat` first in `rule`, as [`masquerade`] makes them);
/// one that is not there is fine.
fn delete_rule(ipt: &Path, rule: &[String]) {
    let (table, rest) = rule.split_at(2);
    let _ = std::process::Command::new(ipt)
        .args(table)
        .args(["-w", "-D"])
        .args(rest)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// MASQUERADE what comes from the instance subnet unless `flag value` matches.
fn masquerade(cfg: &NetConfig, flag: &str, value: &str) -> Vec<String> {
    let cidr = cfg.cidr();
    [
        "-t",
        "nat",
        "POSTROUTING",
        "-s",
        &cidr,
        "!",
        flag,
        value,
        "-j",
        "MASQUERADE",
    ]
    .map(str::to_string)
    .to_vec()
}

/// Undoes [`setup_host`]: deletes the link (its address and its unreachable route go with
/// it) and the NAT rule (`ip_forward` stays on). For agents that go for good, such as the test
/// clusters; a node's agent keeps its link across restarts.
pub fn teardown_host(cfg: &NetConfig) -> Result<(), NetError> {
    if let Some(ipt) = iptables() {
        delete_rule(&ipt, &nat_rule(cfg));
    }
    if let Ok(nl) = Netlink::open() {
        let mut m = unreachable_route(cfg, RTM_DELROUTE, 0);
        let _ = nl.request(&format!("delete unreachable route {}", cfg.cidr()), &mut m);
    }
    delete_link(&cfg.bridge)
}

/// The MAC of every host end of this node's veths: stable, locally administered, unicast,
/// from the node link's name. Instances hold it as the gateway's permanent neighbour entry.
fn gateway_mac(name: &str) -> [u8; 6] {
    // FNV-1a: stable across runs and builds.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0x02, 0x46, b[4], b[5], b[6], b[7]]
}

/// An instance's MAC: locally administered, from its IPv4 address (02:42:a:b:c:d).
pub fn instance_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

fn iptables() -> Option<PathBuf> {
    ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `rule` is `[-t table] CHAIN args...`: checks with -C, appends with -A when missing.
fn ensure_rule(ipt: &Path, rule: &[&str]) {
    let (table, rest): (Vec<&str>, &[&str]) = if rule.first() == Some(&"-t") {
        (rule[..2].to_vec(), &rule[2..])
    } else {
        (vec![], rule)
    };
    let run = |flag: &str| {
        std::process::Command::new(ipt)
            .args(&table)
            .arg("-w")
            .arg(flag)
            .args(rest)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !run("-C") && !run("-A") {
        tracing::warn!(?rule, "iptables rule could not be added");
    }
}

fn iptables_run(flag: &str, rest: &[&str]) {
    if let Some(ipt) = iptables() {
        let _ = std::process::Command::new(ipt)
            .arg("-w")
            .arg(flag)
            .args(rest)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The host end's name for an instance (<= 15 bytes, stable).
pub fn host_veth_name(instance: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(instance.as_bytes());
    format!("fv{}", &hex::encode(h)[..12])
}

/// One instance's network, as set up.
#[derive(Debug, Clone)]
pub struct InstanceNet {
    pub ip: Ipv4Addr,
    pub host_veth: String,
    /// Interface index of the host end (the key of its counters in [`link_counters`]).
    pub host_index: i32,
    pub no_outbound: bool,
}

/// Creates the veth pair with `eth0` inside the netns of `pid`, addresses it and routes it.
pub fn setup_instance(
    cfg: &NetConfig,
    instance: &str,
    pid: i32,
    ip: Ipv4Addr,
    outbound: bool,
) -> Result<InstanceNet, NetError> {
    let nl = Netlink::open().map_err(|source| NetError::Netlink {
        op: "open".into(),
        source,
    })?;
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = fs::File::open(&ns_path).map_err(|source| NetError::Io {
        what: ns_path.clone(),
        source,
    })?;
    let host = host_veth_name(instance);
    // A leftover of an earlier life of this instance id (agent crash) would block the name.
    delete_link(&host)?;
    let gw_mac = gateway_mac(&cfg.bridge);
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
    m.ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, &host)
        .attr(IFLA_ADDRESS, &gw_mac);
    let li = m.nest_start(IFLA_LINKINFO);
    m.attr_str(IFLA_INFO_KIND, "veth");
    let data = m.nest_start(IFLA_INFO_DATA);
    let peer = m.nest_start(VETH_INFO_PEER);
    // eth0's MAC follows from its address (as Docker does): when an address is leased again,
    // the host's neighbour entry for it is still right.
    m.ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, "eth0")
        .attr(IFLA_ADDRESS, &instance_mac(ip))
        .attr(IFLA_NET_NS_PID, &(pid as u32).to_ne_bytes());
    m.nest_end(peer);
    m.nest_end(data);
    m.nest_end(li);
    nl.request(&format!("create veth {host}"), &mut m)?;
    let hidx = ifindex(&host).ok_or_else(|| NetError::Io {
        what: format!("veth {host}"),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    // The host reaches the instance through its veth, from the gateway address, and knows its
    // MAC: a permanent neighbour entry instead of ARP (no round trip before the first probe,
    // no lost reply retried a second later, nothing against the ARP table's limits). Both go
    // with the veth.
    let routed = link_up_v4(&nl, hidx, &host)
        .and_then(|()| {
            let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
            m.raw(&rtmsg(32, libc::RT_SCOPE_LINK, libc::RTN_UNICAST, 0))
                .attr(RTA_DST, &ip.octets())
                .attr(RTA_OIF, &(hidx as u32).to_ne_bytes())
                .attr(RTA_PREFSRC, &cfg.gateway.octets());
            nl.request(&format!("route to {ip}"), &mut m)
        })
        .and_then(|()| neigh(&nl, hidx, ip, Some(instance_mac(ip))));
    if let Err(e) = routed {
        let _ = delete_link(&host);
        return Err(e);
    }

    // Inside the netns: a thread of our own joins it (network namespaces are per thread).
    let gw = cfg.gateway;
    let inside = std::thread::spawn(move || -> Result<(), NetError> {
        crate::sys::setns(ns.as_raw_fd(), libc::CLONE_NEWNET).map_err(|e| NetError::Io {
            what: "setns into instance netns".into(),
            source: io::Error::from_raw_os_error(e),
        })?;
        let nl = Netlink::open().map_err(|source| NetError::Netlink {
            op: "open in netns".into(),
            source,
        })?;
        let lo = ifindex("lo").unwrap_or(1);
        link_up(&nl, lo, "lo")?;
        let eth = ifindex("eth0").ok_or_else(|| NetError::Io {
            what: "eth0 in netns".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        // Its own address alone: everything else, other instances included, goes through the
        // gateway, whose MAC it knows.
        add_addr(&nl, eth, ip, 32, "eth0")?;
        link_up_v4(&nl, eth, "eth0")?;
        neigh(&nl, eth, gw, Some(gw_mac))?;
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
        m.raw(&rtmsg(
            0,
            libc::RT_SCOPE_UNIVERSE,
            libc::RTN_UNICAST,
            RTNH_F_ONLINK,
        ))
        .attr(RTA_GATEWAY, &gw.octets())
        .attr(RTA_OIF, &(eth as u32).to_ne_bytes());
        nl.request("add default route", &mut m)
    });
    let r = inside.join().unwrap_or_else(|_| {
        Err(NetError::Io {
            what: "netns thread panicked".into(),
            source: io::Error::other("panic"),
        })
    });
    if let Err(e) = r {
        let _ = delete_link(&host);
        return Err(e);
    }
    if !outbound {
        let ips = ip.to_string();
        iptables_run("-I", &["FORWARD", "-s", &ips, "-j", "DROP"]);
    }
    Ok(InstanceNet {
        ip,
        host_veth: host,
        host_index: hidx,
        no_outbound: !outbound,
    })
}

/// Raises the host's IPv4 neighbour (ARP) table limits to fit one entry per address of the
/// instance subnet. The kernel's defaults (GC from 512 entries, a hard limit of 1,024) are
/// below what one node holds: the host keeps an entry for every instance it has talked to
/// (readiness probes, the gateway), and past the hard limit a new instance's entry is refused
/// ("neighbour table overflow") and its probe hangs until GC frees one. The launch-rate bench
/// saw start→ready p99 of 4–21 s near 1,000 instances from this. Never lowers a limit.
fn raise_neigh_limits(addresses: u64) {
    let want = [
        ("gc_thresh1", 1024u64.min(addresses)),
        ("gc_thresh2", addresses),
        ("gc_thresh3", addresses.saturating_mul(2)),
    ];
    // thresh3 first, so each write keeps thresh1 <= thresh2 <= thresh3.
    for (name, value) in want.iter().rev() {
        let path = format!("/proc/sys/net/ipv4/neigh/default/{name}");
        let cur = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if cur.is_some_and(|c| c < *value)
            && let Err(e) = fs::write(&path, value.to_string())
        {
            tracing::warn!(%path, error = %e, "raising the ARP table limit");
        }
    }
}

/// Deletes a link by name (missing is fine).
pub fn delete_link(name: &str) -> Result<(), NetError> {
    let Some(idx) = ifindex(name) else {
        return Ok(());
    };
    let nl = Netlink::open().map_err(|source| NetError::Netlink {
        op: "open".into(),
        source,
    })?;
    match nl.request(
        &format!("delete {name}"),
        Msg::new(RTM_DELLINK, 0).ifinfo(idx, 0, 0),
    ) {
        Err(NetError::Netlink { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            Ok(())
        }
        r => r,
    }
}

/// Adds (`mac` given) or deletes a permanent IPv4 neighbour entry on link `index`.
fn neigh(nl: &Netlink, index: i32, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> Result<(), NetError> {
    let (ty, flags) = match mac {
        Some(_) => (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE),
        None => (RTM_DELNEIGH, 0),
    };
    let mut m = Msg::new(ty, flags);
    // ndmsg: family, pad, pad (2), ifindex (4), state (2), flags, type.
    let mut h = [0u8; 12];
    h[0] = libc::AF_INET as u8;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
    m.raw(&h).attr(NDA_DST, &ip.octets());
    if let Some(mac) = mac {
        m.attr(NDA_LLADDR, &mac);
    }
    nl.request(&format!("neighbour entry for {ip}"), &mut m)
}

/// Removes the instance's veth (if the netns teardown has not already; its route and the
/// host's neighbour entry go with it) and its rules.
pub fn teardown_instance(net: &InstanceNet) -> Result<(), NetError> {
    if net.no_outbound {
        let ips = net.ip.to_string();
        iptables_run("-D", &["FORWARD", "-s", &ips, "-j", "DROP"]);
    }
    delete_link(&net.host_veth)
}

const RTM_NEWSTATS: u16 = 92;
const RTM_GETSTATS: u16 = 94;
const IFLA_STATS_LINK_64: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;

/// Bytes through one link, from the link's side: `rx` came in, `tx` went out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkBytes {
    pub rx: u64,
    pub tx: u64,
}

/// Byte counters of every link in the calling thread's network namespace, by interface
/// index: one RTM_GETSTATS dump asking for the 64-bit link statistics alone (~230 bytes per
/// link). It replaces two sysfs files opened per instance every second, whose path walks
/// perf put among the largest kernel costs of the agent's runtime threads at ~3,000
/// instances (docs/benchmarks.md).
pub fn link_counters() -> Result<HashMap<i32, LinkBytes>, NetError> {
    let nl_err = |source: io::Error| NetError::Netlink {
        op: "dump link statistics".into(),
        source,
    };
    let nl = Netlink::open().map_err(nl_err)?;
    let mut m = Msg::dump(RTM_GETSTATS);
    // struct if_stats_msg: family, pad, pad, ifindex 0 (all), filter mask.
    let mut h = [0u8; 12];
    h[8..12].copy_from_slice(&(1u32 << (IFLA_STATS_LINK_64 - 1)).to_ne_bytes());
    m.raw(&h);
    let mut out = HashMap::new();
    nl.exchange(&mut m, 64 * 1024, |dgram| parse_stats(dgram, &mut out))
        .map_err(nl_err)?;
    Ok(out)
}

/// Adds the counters in one datagram of a stats dump to `out`; true once it held NLMSG_DONE.
fn parse_stats(buf: &[u8], out: &mut HashMap<i32, LinkBytes>) -> io::Result<bool> {
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4"));
    let u64_at = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8"));
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32_at(buf, off) as usize;
        if len < 16 || off + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let msg = &buf[off..off + len];
        match u16_at(msg, 4) {
            t if t == libc::NLMSG_DONE as u16 => return Ok(true),
            t if t == libc::NLMSG_ERROR as u16 && len >= 20 => {
                let code = u32_at(msg, 16) as i32;
                return Err(io::Error::from_raw_os_error(-code));
            }
            RTM_NEWSTATS if len >= 28 => {
                let index = u32_at(msg, 20) as i32;
                let mut a = 28;
                while a + 4 <= len {
                    let alen = u16_at(msg, a) as usize;
                    if alen < 4 || a + alen > len {
                        break;
                    }
                    // struct rtnl_link_stats64 starts rx_packets, tx_packets, rx_bytes, tx_bytes.
                    if u16_at(msg, a + 2) & 0x3fff == IFLA_STATS_LINK_64 && alen >= 4 + 32 {
                        out.insert(
                            index,
                            LinkBytes {
                                rx: u64_at(msg, a + 4 + 16),
                                tx: u64_at(msg, a + 4 + 24),
                            },
                        );
                    }
                    a += (alen + 3) & !3;
                }
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// File-backed address allocation: one file per leased address under `dir`, and `last`, the
/// address leased last (read once, then kept in memory and rewritten by rename).
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    cfg: NetConfig,
    /// Offset of the address leased last; `None` until read from `last`. Allocations hold it,
    /// so concurrent starts go round-robin: before, one could read `last` while another
    /// rewrote it (empty between truncate and write), start over at the bottom and re-lease an
    /// address freed a moment ago.
    cursor: std::sync::Arc<std::sync::Mutex<Option<u32>>>,
}

impl Ipam {
    pub fn new(dir: impl Into<PathBuf>, cfg: NetConfig) -> Ipam {
        Ipam {
            dir: dir.into(),
            cfg,
            cursor: Default::default(),
        }
    }

    /// Leases a free address for `owner`, continuing after the last one leased (so addresses
    /// are not reused at once).
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr, NetError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| NetError::Io { what, source }
        };
        fs::create_dir_all(&self.dir).map_err(io("ipam dir"))?;
        let net = self.cfg.network();
        let size = 1u32 << (32 - u32::from(self.cfg.prefix));
        let gw = u32::from(self.cfg.gateway);
        let last_file = self.dir.join("last");
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let last = *cursor.get_or_insert_with(|| {
            fs::read_to_string(&last_file)
                .ok()
                .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
                .map_or(0, |ip| u32::from(ip).wrapping_sub(net))
        });
        for step in 1..size {
            let off = (last + step) % size;
            if off == 0 || off == size - 1 || net + off == gw {
                continue;
            }
            let ip = Ipv4Addr::from(net + off);
            let f = self.dir.join(ip.to_string());
            match fs::OpenOptions::new().write(true).create_new(true).open(&f) {
                Ok(mut file) => {
                    use io::Write;
                    file.write_all(owner.as_bytes()).map_err(io("ipam lease"))?;
                    *cursor = Some(off);
                    // A hint for the next run of the agent: no fsync, but never seen half-written.
                    let tmp = self.dir.join(".last.tmp");
                    if fs::write(&tmp, ip.to_string()).is_ok() {
                        let _ = fs::rename(&tmp, &last_file);
                    }
                    return Ok(ip);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("ipam lease")(e)),
            }
        }
        Err(NetError::Exhausted(self.cfg.cidr()))
    }

    pub fn release(&self, ip: Ipv4Addr) {
        let _ = fs::remove_file(self.dir.join(ip.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_counters_agree_with_sysfs() {
        // Traffic on loopback between two sysfs reads and the dump in between.
        let sysfs = |f: &str| -> u64 {
            fs::read_to_string(format!("/sys/class/net/lo/statistics/{f}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        io::Write::write_all(&mut c, &[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        io::Read::read_exact(&mut s, &mut got).unwrap();
        let before = (sysfs("rx_bytes"), sysfs("tx_bytes"));
        let all = link_counters().unwrap();
        let after = (sysfs("rx_bytes"), sysfs("tx_bytes"));
        let lo = all[&ifindex("lo").unwrap()];
        assert!(before.0 >= 100_000, "{before:?}");
        assert!(
            (before.0..=after.0).contains(&lo.rx),
            "{before:?} {lo:?} {after:?}"
        );
        assert!(
            (before.1..=after.1).contains(&lo.tx),
            "{before:?} {lo:?} {after:?}"
        );
    }

    #[test]
    fn stats_dump_parsing_refuses_truncation_and_reads_done() {
        let mut out = HashMap::new();
        // A message claiming 64 bytes in a 20-byte datagram.
        let mut m = vec![0u8; 20];
        m[0..4].copy_from_slice(&64u32.to_ne_bytes());
        m[4..6].copy_from_slice(&RTM_NEWSTATS.to_ne_bytes());
        assert!(parse_stats(&m, &mut out).is_err());
        // One link's statistics, then NLMSG_DONE.
        let mut m = Msg::new(RTM_NEWSTATS, 0);
        let mut h = [0u8; 12];
        h[4..8].copy_from_slice(&9u32.to_ne_bytes());
        m.raw(&h);
        let mut stats = [0u8; 192];
        stats[16..24].copy_from_slice(&1234u64.to_ne_bytes());
        stats[24..32].copy_from_slice(&5678u64.to_ne_bytes());
        m.attr(IFLA_STATS_LINK_64, &stats);
        let mut dgram = m.finish().to_vec();
        assert!(!parse_stats(&dgram, &mut out).unwrap());
        assert_eq!(out[&9], LinkBytes { rx: 1234, tx: 5678 });
        dgram.extend_from_slice(Msg::new(libc::NLMSG_DONE as u16, 0).finish());
        assert!(parse_stats(&dgram, &mut out).unwrap());
    }

    #[test]
    fn nat_covers_what_leaves_the_subnet_and_drops_the_bridge_rule() {
        let cfg = NetConfig::default();
        assert_eq!(
            nat_rule(&cfg).join(" "),
            "-t nat POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -j MASQUERADE"
        );
        assert_eq!(
            old_nat_rule(&cfg).join(" "),
            "-t nat POSTROUTING -s 10.88.0.0/16 ! -o ferry0 -j MASQUERADE"
        );
    }

    #[test]
    fn gateway_mac_is_stable_local_unicast() {
        let a = gateway_mac("ferry0");
        assert_eq!(a, gateway_mac("ferry0"));
        assert_ne!(a, gateway_mac("ferry1"));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
        let m = instance_mac(Ipv4Addr::new(10, 88, 0, 7));
        assert_eq!(m, [0x02, 0x42, 10, 88, 0, 7]);
        assert_ne!(a[..2], m[..2], "gateway and instance MACs never meet");
    }

    #[test]
    fn ipam_leases_distinct_addresses_and_skips_gateway() {
        let t = tempfile::tempdir().unwrap();
        let cfg = NetConfig {
            bridge: "x".into(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            prefix: 29,
        };
        let ipam = Ipam::new(t.path(), cfg);
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(ipam.allocate(&format!("i{i}")).unwrap());
        }
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 0, 7)));
        assert!(ipam.allocate("full").is_err());
        ipam.release(got[2]);
        assert_eq!(ipam.allocate("again").unwrap(), got[2]);
    }

    #[test]
    fn concurrent_leases_go_round_robin_and_survive_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let cfg = NetConfig {
            bridge: "x".into(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            prefix: 24,
        };
        let ipam = Ipam::new(t.path(), cfg.clone());
        let first: Vec<_> = (0..4)
            .map(|i| ipam.allocate(&format!("a{i}")).unwrap())
            .collect();
        for ip in &first {
            ipam.release(*ip);
        }
        // 16 threads at once: none may start over at the bottom and take a freed address.
        let got: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|i| {
                    let ipam = ipam.clone();
                    s.spawn(move || ipam.allocate(&format!("b{i}")).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = got.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 16, "distinct: {got:?}");
        assert!(
            got.iter().all(|ip| !first.contains(ip)),
            "{first:?} re-leased: {got:?}"
        );
        // A new agent on the same dir continues after the last lease.
        let again = Ipam::new(t.path(), cfg).allocate("c").unwrap();
        assert_eq!(
            again,
            Ipv4Addr::from(u32::from(*sorted.last().unwrap()) + 1)
        );
    }

    #[test]
    fn veth_names_fit() {
        assert!(host_veth_name("some-very-long-instance-id-abcdef").len() <= 15);
    }
}
