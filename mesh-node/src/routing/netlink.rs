//! Just enough rtnetlink for [`super`]: add and delete policy-routing rules (`ip rule`), install
//! (and remove) one `local` default route in a table, and ask which interface routes to an
//! address; and for pod discovery (`kernel_sync`), which interfaces lead into which pod's
//! network namespace. Messages
//! are built by hand (the uapi structs are 12 bytes each) so the daemon needs no `ip` binary and
//! no netlink crate; constants are from `linux/rtnetlink.h` and `linux/fib_rules.h`.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

// fib_rules.h attributes.
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_GOTO: u16 = 4;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_IP_PROTO: u16 = 22;
const FRA_DPORT_RANGE: u16 = 24;
const FR_ACT_TO_TBL: u8 = 1;
const FR_ACT_GOTO: u8 = 2;
const FR_ACT_NOP: u8 = 3;

// rtnetlink.h attributes and values.
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTPROT_STATIC: u8 = 4;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
// net_namespace.h: RTM_GETNSID by process, answered with the namespace's id as seen from ours.
const NETNSA_NSID: u16 = 1;
const NETNSA_PID: u16 = 2;
/// The loopback device has this index in every network namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

const HEADER: usize = 16;
// socket.h / in.h values as the one-byte fields carry them.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// `lookup TABLE`.
    Lookup(u32),
    /// `goto PRIORITY`: go on from the rule at that priority, skipping those before it.
    Goto(u32),
    /// `nop`: go on with the next rule (a target for `goto`).
    Nop,
}

impl Action {
    const fn code(self) -> u8 {
        match self {
            Self::Lookup(_) => FR_ACT_TO_TBL,
            Self::Goto(_) => FR_ACT_GOTO,
            Self::Nop => FR_ACT_NOP,
        }
    }
}

/// One policy-routing rule: `ip rule add [from A] [to A] [iif DEV] [ipproto tcp] [dport P]
/// priority PRIO lookup TABLE|goto PRIO|nop`. Addresses are host routes (/32 or /128).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub priority: u32,
    pub action: Action,
    pub from: Option<IpAddr>,
    pub to: Option<IpAddr>,
    pub iif: Option<String>,
    /// Destination port range (inclusive); implies TCP.
    pub tcp_dport: Option<(u16, u16)>,
    pub tcp: bool,
    /// IPv6 when neither `from` nor `to` says the family.
    pub v6: bool,
}

impl Rule {
    fn family(&self) -> u8 {
        self.from.or(self.to).map_or(if self.v6 { AF_INET6 } else { AF_INET }, family)
    }

    /// A rule matching everything of `of`'s family (only the family of `of` is used).
    pub fn any(of: IpAddr, priority: u32, action: Action) -> Self {
        Self { priority, action, from: None, to: None, iif: None, tcp_dport: None, tcp: false, v6: of.is_ipv6() }
    }
}

/// The address family byte of `addr`'s kind.
fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv6() { AF_INET6 } else { AF_INET }
}

impl std::fmt::Display for Rule {
    /// As `ip rule` prints it, so log lines can be compared with `ip rule show`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.priority)?;
        match self.from {
            Some(a) => write!(f, " from {a}")?,
            None => write!(f, " from all")?,
        }
        if let Some(a) = self.to {
            write!(f, " to {a}")?;
        }
        if let Some(d) = &self.iif {
            write!(f, " iif {d}")?;
        }
        if self.tcp || self.tcp_dport.is_some() {
            write!(f, " ipproto tcp")?;
        }
        match self.tcp_dport {
            Some((a, b)) if a == b => write!(f, " dport {a}")?,
            Some((a, b)) => write!(f, " dport {a}-{b}")?,
            None => {}
        }
        match self.action {
            Action::Lookup(table) => write!(f, " lookup {table}"),
            Action::Goto(priority) => write!(f, " goto {priority}"),
            Action::Nop => write!(f, " nop"),
        }
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn prefix_len(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

/// A request under construction: `nlmsghdr`, a fixed family header, then attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, family_header: &[u8]) -> Self {
        let mut b = vec![0u8; HEADER];
        b[4..6].copy_from_slice(&kind.to_ne_bytes());
        b[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(family_header);
        Self(b)
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + data.len()).expect("attributes here are tiny");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).expect("small");
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.0
    }
}

/// `struct fib_rule_hdr`.
fn rule_header(rule: &Rule) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = rule.family();
    h[1] = rule.to.map_or(0, prefix_len);
    h[2] = rule.from.map_or(0, prefix_len);
    h[7] = rule.action.code();
    h
}

fn rule_msg(kind: u16, flags: u16, rule: &Rule) -> Msg {
    let mut m = Msg::new(kind, flags, &rule_header(rule));
    m.attr(FRA_PRIORITY, &rule.priority.to_ne_bytes());
    match rule.action {
        Action::Lookup(table) => drop(m.attr(FRA_TABLE, &table.to_ne_bytes())),
        // The kernel refuses a goto without its target, even to delete one.
        Action::Goto(priority) => drop(m.attr(FRA_GOTO, &priority.to_ne_bytes())),
        Action::Nop => {}
    }
    if let Some(a) = rule.from {
        m.attr(FRA_SRC, &octets(a));
    }
    if let Some(a) = rule.to {
        m.attr(FRA_DST, &octets(a));
    }
    if let Some(d) = &rule.iif {
        let mut name = d.as_bytes().to_vec();
        name.push(0);
        m.attr(FRA_IIFNAME, &name);
    }
    if rule.tcp || rule.tcp_dport.is_some() {
        m.attr(FRA_IP_PROTO, &[IPPROTO_TCP]);
    }
    if let Some((start, end)) = rule.tcp_dport {
        // struct fib_rule_port_range { __u16 start; __u16 end; } in host order.
        let mut range = start.to_ne_bytes().to_vec();
        range.extend_from_slice(&end.to_ne_bytes());
        m.attr(FRA_DPORT_RANGE, &range);
    }
    m
}

/// The rule a `RTM_NEWRULE` message body (as a dump answers) describes, if it is one this module
/// can write: an action of [`Action`], host-route addresses, TCP or no protocol match.
fn parse_rule(body: &[u8]) -> Option<Rule> {
    let h = body.get(..12)?;
    let v6 = match h[0] {
        AF_INET => false,
        AF_INET6 => true,
        _ => return None,
    };
    let (dst_len, src_len, header_table, action) = (h[1], h[2], h[4], h[7]);
    let (mut table, mut goto) = (u32::from(header_table), None);
    let mut rule = Rule { priority: 0, action: Action::Nop, from: None, to: None, iif: None, tcp_dport: None, tcp: false, v6 };
    let addr = |v: &[u8]| -> Option<IpAddr> {
        match v.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
            _ => None,
        }
    };
    for (k, v) in attributes(body.get(12..)?) {
        match k {
            FRA_PRIORITY => rule.priority = ne_u32(v)?,
            FRA_TABLE => table = ne_u32(v)?,
            FRA_GOTO => goto = Some(ne_u32(v)?),
            FRA_DST => rule.to = Some(addr(v)?),
            FRA_SRC => rule.from = Some(addr(v)?),
            FRA_IIFNAME => rule.iif = Some(c_string(v)),
            FRA_IP_PROTO => rule.tcp = *v.first()? == IPPROTO_TCP,
            FRA_DPORT_RANGE => {
                let port = |i: usize| v.get(i..i + 2).and_then(|b| b.try_into().ok()).map(u16::from_ne_bytes);
                rule.tcp_dport = Some((port(0)?, port(2)?));
            }
            _ => {}
        }
    }
    // Only host routes: a rule matching a prefix is not one of ours.
    let host = |a: Option<IpAddr>, len: u8| a.is_none_or(|a| prefix_len(a) == len);
    if !host(rule.to, dst_len) || !host(rule.from, src_len) {
        return None;
    }
    rule.action = match action {
        FR_ACT_TO_TBL => Action::Lookup(table),
        FR_ACT_GOTO => Action::Goto(goto?),
        FR_ACT_NOP => Action::Nop,
        _ => return None,
    };
    Some(rule)
}

/// An interface of this namespace whose peer lives in another one (a pod's host-side veth):
/// `peer_netnsid` is that namespace's id as this namespace knows it; `bridge_mac` the MAC of
/// the bridge it is a port of, if it is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLink {
    pub name: String,
    pub peer_netnsid: i32,
    pub bridge_mac: Option<[u8; 6]>,
}

/// The MAC of the bridge `link` is a port of (a master of another kind, a VRF or a bond, is
/// not one).
fn bridge_of(links: &[Link], link: &Link) -> Option<[u8; 6]> {
    let master = links.iter().find(|l| Some(l.index) == link.master)?;
    master.kind.as_deref().filter(|k| *k == "bridge").and(master.mac)
}

/// One interface of a link dump.
struct Link {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
    master: Option<u32>,
    peer_netnsid: Option<i32>,
    /// `IFLA_INFO_KIND`: "bridge", "veth", ...
    kind: Option<String>,
}

/// A `NETLINK_ROUTE` socket of the daemon's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: AtomicU32,
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        Ok(Self { fd, seq: AtomicU32::new(1) })
    }

    pub fn add_rule(&self, rule: &Rule) -> io::Result<()> {
        self.request(rule_msg(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, rule)).map(drop)
    }

    pub fn del_rule(&self, rule: &Rule) -> io::Result<()> {
        self.request(rule_msg(RTM_DELRULE, 0, rule)).map(drop)
    }

    /// Every rule of `of`'s family that [`parse_rule`] understands (`ip rule show`).
    pub fn rules(&self, of: IpAddr) -> io::Result<Vec<Rule>> {
        let mut header = [0u8; 12];
        header[0] = family(of);
        let mut m = Msg::new(RTM_GETRULE, NLM_F_DUMP, &header);
        m.0[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        let replies = self.request(m)?;
        Ok(replies.iter().filter(|(kind, _)| *kind == RTM_NEWRULE).filter_map(|(_, body)| parse_rule(body)).collect())
    }

    /// Deletes every rule of `of`'s family with this priority and action (e.g. left by an earlier
    /// run); returns how many there were.
    pub fn flush_rules(&self, of: IpAddr, priority: u32, action: Action) -> io::Result<usize> {
        let mut n = 0;
        loop {
            match self.request(rule_msg(RTM_DELRULE, 0, &Rule::any(of, priority, action))) {
                Ok(_) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }

    /// `ip route replace local <any> dev lo table TABLE`: everything looked up in `table` is
    /// delivered to this host's sockets.
    pub fn local_default_route(&self, of: IpAddr, table: u32) -> io::Result<()> {
        let mut h = [0u8; 12];
        h[0] = family(of);
        h[5] = RTPROT_STATIC;
        h[6] = RT_SCOPE_HOST;
        h[7] = RTN_LOCAL;
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &h);
        m.attr(RTA_TABLE, &table.to_ne_bytes()).attr(RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
        self.request(m).map(drop)
    }

    /// `ip route del local <any> dev lo table TABLE` (uninstall); absent is fine.
    pub fn delete_local_default_route(&self, of: IpAddr, table: u32) -> io::Result<()> {
        let mut h = [0u8; 12];
        h[0] = family(of);
        h[6] = RT_SCOPE_HOST;
        h[7] = RTN_LOCAL;
        let mut m = Msg::new(RTM_DELROUTE, 0, &h);
        m.attr(RTA_TABLE, &table.to_ne_bytes()).attr(RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
        match self.request(m) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT | libc::EAFNOSUPPORT)) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Every interface whose peer is in another network namespace (`ip -d link` shows it as
    /// `link-netnsid N`). Dumping links also makes the kernel assign those ids.
    pub fn peer_links(&self) -> io::Result<Vec<PeerLink>> {
        let links = self.links()?;
        Ok(links
            .iter()
            .filter_map(|l| Some(PeerLink { name: l.name.clone(), peer_netnsid: l.peer_netnsid?, bridge_mac: bridge_of(&links, l) }))
            .collect())
    }

    fn links(&self) -> io::Result<Vec<Link>> {
        let mut m = Msg::new(RTM_GETLINK, NLM_F_DUMP, &[0u8; 16]);
        m.0[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        let replies = self.request(m)?;
        Ok(replies
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWLINK)
            .filter_map(|(_, body)| {
                // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change.
                let index = ne_u32(body.get(4..8)?)?;
                let mut link = Link { index, name: String::new(), mac: None, master: None, peer_netnsid: None, kind: None };
                for (k, v) in attributes(body.get(16..)?) {
                    match k {
                        IFLA_IFNAME => link.name = c_string(v),
                        IFLA_ADDRESS => link.mac = v.try_into().ok(),
                        IFLA_MASTER => link.master = Some(ne_u32(v)?),
                        IFLA_LINK_NETNSID => link.peer_netnsid = Some(ne_u32(v)?.cast_signed()),
                        IFLA_LINKINFO => link.kind = attributes(v).find(|(k, _)| *k == IFLA_INFO_KIND).map(|(_, v)| c_string(v)),
                        _ => {}
                    }
                }
                Some(link)
            })
            .collect())
    }

    /// The id this namespace gives the network namespace process `pid` is in, if it has one
    /// (needs no access to the process beyond seeing its PID: no ptrace, unlike
    /// `/proc/<pid>/ns/net`).
    pub fn netnsid_of_pid(&self, pid: u32) -> io::Result<Option<i32>> {
        // struct rtgenmsg { family } padded to 4 bytes.
        let mut m = Msg::new(RTM_GETNSID, 0, &[0u8; 4]);
        m.attr(NETNSA_PID, &pid.to_ne_bytes());
        let replies = self.request(m)?;
        Ok(replies
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWNSID)
            .find_map(|(_, body)| attributes(body.get(4..)?).find(|(k, _)| *k == NETNSA_NSID).and_then(|(_, v)| ne_u32(v)).map(u32::cast_signed))
            .filter(|id| *id >= 0))
    }

    /// The interface this host routes `addr` through (`ip route get`).
    pub fn route_interface(&self, addr: IpAddr) -> io::Result<String> {
        let mut h = [0u8; 12];
        h[0] = family(addr);
        h[1] = prefix_len(addr);
        h[6] = RT_SCOPE_UNIVERSE;
        let mut m = Msg::new(RTM_GETROUTE, 0, &h);
        m.attr(RTA_DST, &octets(addr));
        let replies = self.request(m)?;
        let oif = replies
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWROUTE)
            .find_map(|(_, body)| attributes(body.get(12..)?).find(|(k, _)| *k == RTA_OIF).map(|(_, v)| v.to_vec()))
            .and_then(|v| ne_u32(&v))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no route to {addr}")))?;
        self.interface_name(oif)
    }

    /// The name of interface `index` in the socket's namespace (not the caller's: the daemon's
    /// tests drive a node namespace from the host).
    fn interface_name(&self, index: u32) -> io::Result<String> {
        // struct ifinfomsg { family, pad, type: u16, index: i32, flags: u32, change: u32 }
        let mut h = [0u8; 16];
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        let replies = self.request(Msg::new(RTM_GETLINK, 0, &h))?;
        replies
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWLINK)
            .find_map(|(_, body)| attributes(body.get(16..)?).find(|(k, _)| *k == IFLA_IFNAME).map(|(_, v)| v.to_vec()))
            .map(|v| c_string(&v))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface with index {index}")))
    }

    /// Sends one request and reads until its acknowledgement; returns the other messages that
    /// answered it (type, payload).
    fn request(&self, msg: Msg) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let buf = msg.finish(seq);
        send(self.fd.as_raw_fd(), &buf, MsgFlags::empty())?;
        let mut replies = Vec::new();
        let mut rx = vec![0u8; 32 << 10];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut rx, MsgFlags::empty())?;
            let mut rest = &rx[..n];
            while rest.len() >= HEADER {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
                let got_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < HEADER || len > rest.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let body = &rest[HEADER..len];
                if got_seq == seq {
                    // The end of a dump (dumps are not acknowledged).
                    if kind == NLMSG_DONE {
                        return Ok(replies);
                    }
                    if kind == NLMSG_ERROR {
                        let code = i32::from_ne_bytes(body.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                        return if code == 0 { Ok(replies) } else { Err(io::Error::from_raw_os_error(-code)) };
                    }
                    replies.push((kind, body.to_vec()));
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
}

/// A 4-byte attribute (u32 or i32 on the wire) in host order.
fn ne_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated string attribute (interface names, kinds).
fn c_string(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

/// Attributes (type, value) of a message body after its family header.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_message_carries_every_match_as_ip_rule_would() {
        let rule = Rule {
            priority: 15008,
            action: Action::Lookup(15008),
            from: None,
            to: Some("198.18.2.11".parse().expect("ip")),
            iif: None,
            tcp_dport: Some((15008, 15008)),
            tcp: true,
            v6: false,
        };
        assert_eq!(rule.to_string(), "15008: from all to 198.18.2.11 ipproto tcp dport 15008 lookup 15008");
        let buf = rule_msg(RTM_NEWRULE, NLM_F_CREATE, &rule).finish(7);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().expect("len")) as usize, buf.len());
        assert_eq!(buf[HEADER], AF_INET);
        assert_eq!(buf[HEADER + 1], 32, "dst_len");
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&buf[HEADER + 12..]).map(|(k, v)| (k, v.to_vec())).collect();
        let get = |k| attrs.iter().find(|(kind, _)| *kind == k).map(|(_, v)| v.clone()).expect("attribute");
        assert_eq!(get(FRA_DST), vec![198, 18, 2, 11]);
        assert_eq!(get(FRA_IP_PROTO), vec![6]);
        assert_eq!(get(FRA_DPORT_RANGE), [15008u16.to_ne_bytes(), 15008u16.to_ne_bytes()].concat());
        assert_eq!(get(FRA_PRIORITY), 15008u32.to_ne_bytes().to_vec());
        assert!(attrs.iter().all(|(k, _)| *k != FRA_SRC && *k != FRA_IIFNAME));
    }

    #[test]
    fn ipv6_source_rule_with_interface() {
        let rule = Rule {
            priority: 15009,
            action: Action::Lookup(15008),
            from: Some("fd6d:6573:6800:2::b".parse().expect("ip")),
            to: None,
            iif: Some("br0".into()),
            tcp_dport: Some((61000, 65534)),
            tcp: true,
            v6: false,
        };
        let buf = rule_msg(RTM_NEWRULE, 0, &rule).finish(1);
        assert_eq!(buf[HEADER], AF_INET6);
        assert_eq!((buf[HEADER + 1], buf[HEADER + 2]), (0, 128));
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&buf[HEADER + 12..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert!(attrs.contains(&(FRA_IIFNAME, b"br0\0".to_vec())));
        assert!(attrs.contains(&(FRA_DPORT_RANGE, [61000u16.to_ne_bytes(), 65534u16.to_ne_bytes()].concat())));
        assert_eq!(rule.to_string(), "15009: from fd6d:6573:6800:2::b iif br0 ipproto tcp dport 61000-65534 lookup 15008");
    }

    #[test]
    fn rules_read_back_as_they_were_written() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let rules = [
            Rule { priority: 15008, action: Action::Lookup(15008), from: None, to: Some(ip("198.18.2.11")), iif: None, tcp_dport: Some((15008, 15008)), tcp: true, v6: false },
            Rule { priority: 15009, action: Action::Lookup(15008), from: Some(ip("fd6d:6573:6800:2::b")), to: None, iif: Some("p1".into()), tcp_dport: Some((61000, 65534)), tcp: true, v6: true },
            Rule { to: Some(ip("198.18.2.11")), tcp: true, ..Rule::any(ip("0.0.0.0"), 15011, Action::Lookup(15008)) },
            Rule { iif: Some("lo".into()), ..Rule::any(ip("::"), 15010, Action::Goto(15012)) },
            Rule::any(ip("0.0.0.0"), 15012, Action::Nop),
        ];
        for rule in rules {
            let buf = rule_msg(RTM_NEWRULE, 0, &rule).finish(1);
            assert_eq!(parse_rule(&buf[HEADER..]), Some(rule.clone()), "{rule}");
        }
        // A prefix rule is not one of ours.
        let mut buf = rule_msg(RTM_NEWRULE, 0, &Rule { to: Some(ip("198.18.2.0")), ..Rule::any(ip("0.0.0.0"), 15011, Action::Lookup(15008)) }).finish(1);
        buf[HEADER + 1] = 24;
        assert_eq!(parse_rule(&buf[HEADER..]), None);
    }

    #[test]
    fn goto_and_nop_rules_carry_their_action_and_target() {
        let skip = Rule { iif: Some("lo".into()), ..Rule::any("0.0.0.0".parse().expect("ip"), 15010, Action::Goto(15012)) };
        assert_eq!(skip.to_string(), "15010: from all iif lo goto 15012");
        let buf = rule_msg(RTM_NEWRULE, 0, &skip).finish(1);
        assert_eq!((buf[HEADER], buf[HEADER + 7]), (AF_INET, FR_ACT_GOTO));
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&buf[HEADER + 12..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert!(attrs.contains(&(FRA_GOTO, 15012u32.to_ne_bytes().to_vec())));
        assert!(attrs.iter().all(|(k, _)| *k != FRA_TABLE), "a goto has no table");
        let nop = Rule::any("::".parse().expect("ip"), 15012, Action::Nop);
        assert_eq!(nop.to_string(), "15012: from all nop");
        let buf = rule_msg(RTM_NEWRULE, 0, &nop).finish(1);
        assert_eq!((buf[HEADER], buf[HEADER + 2], buf[HEADER + 7]), (AF_INET6, 0, FR_ACT_NOP));
        let attrs: Vec<u16> = attributes(&buf[HEADER + 12..]).map(|(k, _)| k).collect();
        assert_eq!(attrs, vec![FRA_PRIORITY], "nothing but the priority");
    }
}
