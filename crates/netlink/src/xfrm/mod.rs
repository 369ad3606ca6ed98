//! XFRM (NETLINK_XFRM): IPsec security associations (states) and policies,
//! as `ip xfrm state` / `ip xfrm policy` make them, for ESP in tunnel or
//! transport mode with one AEAD (rfc4106(gcm(aes))) and an XFRM interface
//! id (`if_id`) that ties states and policies to one `xfrm` link.
//!
//! Every request is a fixed uapi struct (linux/xfrm.h) followed by
//! attributes. The structs are written byte by byte at the offsets the
//! header gives on Linux (the tests pin them); addresses are
//! `xfrm_address_t` (16 bytes, an IPv4 address in the first 4), SPIs and
//! ports are big-endian, everything else host order.

use std::fs::File;
use std::net::IpAddr;

use nix::errno::Errno;

use crate::message::{
    attrs, read_u16, read_u32, read_u64, MsgBuilder, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use crate::rtnl::{family, parse_ip, AF_INET, AF_INET6};
use crate::socket::{NetlinkError, Protocol, Socket};

// linux/xfrm.h. ABI.
pub const XFRM_MSG_NEWSA: u16 = 0x10;
pub const XFRM_MSG_DELSA: u16 = 0x11;
pub const XFRM_MSG_GETSA: u16 = 0x12;
pub const XFRM_MSG_NEWPOLICY: u16 = 0x13;
pub const XFRM_MSG_DELPOLICY: u16 = 0x14;
pub const XFRM_MSG_GETPOLICY: u16 = 0x15;
pub const XFRM_MSG_UPDPOLICY: u16 = 0x19;
pub const XFRM_MSG_UPDSA: u16 = 0x1a;
pub const XFRMA_TMPL: u16 = 5;
pub const XFRMA_SRCADDR: u16 = 13;
pub const XFRMA_ALG_AEAD: u16 = 18;
pub const XFRMA_REPLAY_ESN_VAL: u16 = 23;
pub const XFRMA_IF_ID: u16 = 31;
pub const XFRM_POLICY_IN: u8 = 0;
pub const XFRM_POLICY_OUT: u8 = 1;
pub const XFRM_POLICY_FWD: u8 = 2;
pub const XFRM_POLICY_ALLOW: u8 = 0;
pub const XFRM_MODE_TRANSPORT: u8 = 0;
pub const XFRM_MODE_TUNNEL: u8 = 1;
pub const XFRM_STATE_ESN: u8 = 128;
/// No limit, in a `xfrm_lifetime_cfg` (XFRM_INF).
pub const XFRM_INF: u64 = u64::MAX;
/// IPPROTO_ESP (linux/in.h).
pub const IPPROTO_ESP: u8 = 50;

pub const SELECTOR_LEN: usize = 56;
pub const ID_LEN: usize = 24;
pub const LIFETIME_CFG_LEN: usize = 64;
pub const USERSA_INFO_LEN: usize = 224;
pub const USERSA_ID_LEN: usize = 24;
pub const USERPOLICY_INFO_LEN: usize = 168;
pub const USERPOLICY_ID_LEN: usize = 64;
pub const USER_TMPL_LEN: usize = 64;
pub const ALGO_AEAD_LEN: usize = 72;
pub const REPLAY_ESN_LEN: usize = 24;

/// The AEAD every Sinew SA uses: AES-GCM for ESP (RFC 4106), whose key
/// material is the AES key followed by a 4-byte salt.
pub const AEAD_GCM_AES: &str = "rfc4106(gcm(aes))";
/// The ICV (tag) length in bits: 16 bytes, the full GCM tag.
pub const GCM_ICV_BITS: u32 = 128;
/// The anti-replay window of Sinew's SAs (packets), with 64-bit sequence
/// numbers (ESN) so that a long-lived SA never wraps its counter.
pub const REPLAY_WINDOW: u32 = 128;

/// An address prefix: `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Self {
        Prefix { addr, len }
    }

    /// The whole address space of `addr`'s family.
    pub fn any_like(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Prefix::new(IpAddr::from([0u8; 4]), 0),
            IpAddr::V6(_) => Prefix::new(IpAddr::from([0u8; 16]), 0),
        }
    }

    /// The host prefix of `addr`.
    pub fn host(addr: IpAddr) -> Self {
        Prefix::new(addr, if addr.is_ipv4() { 32 } else { 128 })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What a policy matches: source and destination prefixes, an IP
/// protocol (0: any) and a destination port of it (0: any). Both prefixes
/// are of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    pub src: Prefix,
    pub dst: Prefix,
    pub proto: u8,
    pub dport: u16,
}

impl Selector {
    /// Any protocol, any port.
    pub fn prefixes(src: Prefix, dst: Prefix) -> Self {
        Selector {
            src,
            dst,
            proto: 0,
            dport: 0,
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)?;
        if self.proto != 0 {
            write!(f, " proto {}", self.proto)?;
        }
        if self.dport != 0 {
            write!(f, " dport {}", self.dport)?;
        }
        Ok(())
    }
}

/// How an SA wraps packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A new outer IP header between the SA's addresses (RFC 4303 §3.1.2).
    #[default]
    Tunnel,
    /// The ESP header after the packet's own IP header: for traffic whose
    /// addresses are the SA's (RFC 4303 §3.1.1).
    Transport,
}

impl Mode {
    pub fn raw(self) -> u8 {
        match self {
            Mode::Tunnel => XFRM_MODE_TUNNEL,
            Mode::Transport => XFRM_MODE_TRANSPORT,
        }
    }
}

/// An ESP state with rfc4106(gcm(aes)). `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Sa {
    /// The outer (tunnel) source and destination, or in transport mode the
    /// packets' own: the node addresses.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub mode: Mode,
    /// The SPI (host order here, big-endian on the wire). Not 0.
    pub spi: u32,
    /// The request id policies' templates may ask for (0: any).
    pub reqid: u32,
    /// AES key followed by the 4-byte salt: 20 (AES-128) or 36 (AES-256)
    /// bytes.
    pub key: Vec<u8>,
    /// The XFRM interface id (0: none).
    pub if_id: u32,
}

impl std::fmt::Debug for Sa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sa")
            .field("src", &self.src)
            .field("dst", &self.dst)
            .field("mode", &self.mode)
            .field("spi", &format_args!("{:#x}", self.spi))
            .field("reqid", &self.reqid)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field("if_id", &self.if_id)
            .finish()
    }
}

/// An SA as a dump or a get reports it, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub proto: u8,
    pub reqid: u32,
    pub mode: u8,
    pub if_id: u32,
    /// The AEAD's name, when it has one.
    pub aead: Option<String>,
    /// Bytes and packets through this SA (xfrm_lifetime_cur).
    pub bytes: u64,
    pub packets: u64,
    /// When it was added (seconds since the epoch).
    pub add_time: u64,
    /// Packets dropped by the replay check and by the integrity check
    /// (xfrm_stats).
    pub replay_drops: u32,
    pub integrity_failed: u32,
}

/// The ESP template of a policy: packets it matches must go through (out)
/// or have come through (in, fwd) an SA from `src` to `dst` in `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub mode: Mode,
    /// 0: any SPI.
    pub spi: u32,
    /// 0: any request id.
    pub reqid: u32,
}

/// Direction of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    In,
    Out,
    Fwd,
}

impl Dir {
    pub fn raw(self) -> u8 {
        match self {
            Dir::In => XFRM_POLICY_IN,
            Dir::Out => XFRM_POLICY_OUT,
            Dir::Fwd => XFRM_POLICY_FWD,
        }
    }

    pub fn from_raw(v: u8) -> Option<Dir> {
        match v {
            XFRM_POLICY_IN => Some(Dir::In),
            XFRM_POLICY_OUT => Some(Dir::Out),
            XFRM_POLICY_FWD => Some(Dir::Fwd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
            Dir::Fwd => "fwd",
        }
    }
}

/// An allow policy with one ESP tunnel template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub sel: Selector,
    pub dir: Dir,
    pub priority: u32,
    pub tmpl: Template,
    /// The XFRM interface id (0: none).
    pub if_id: u32,
}

/// A policy as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    pub sel: Selector,
    pub dir: Dir,
    pub priority: u32,
    pub index: u32,
    pub action: u8,
    pub if_id: u32,
    pub tmpls: Vec<Template>,
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// `xfrm_address_t`: 16 bytes, an IPv4 address in the first four.
fn xfrm_address(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v) => a[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => a = v.octets(),
    }
    a
}

fn parse_xfrm_address(fam: u8, b: &[u8]) -> Option<IpAddr> {
    match fam {
        AF_INET => parse_ip(AF_INET, b.get(..4)?),
        AF_INET6 => parse_ip(AF_INET6, b.get(..16)?),
        _ => None,
    }
}

/// `struct xfrm_selector` (56 bytes).
pub fn selector(sel: &Selector) -> [u8; SELECTOR_LEN] {
    let mut b = [0u8; SELECTOR_LEN];
    put(&mut b, 0, &xfrm_address(sel.dst.addr));
    put(&mut b, 16, &xfrm_address(sel.src.addr));
    // dport, dport_mask (both big-endian), sport, sport_mask: 0 is any.
    if sel.dport != 0 {
        put(&mut b, 32, &sel.dport.to_be_bytes());
        put(&mut b, 34, &u16::MAX.to_be_bytes());
    }
    put(&mut b, 40, &u16::from(family(sel.dst.addr)).to_ne_bytes());
    b[42] = sel.dst.len;
    b[43] = sel.src.len;
    b[44] = sel.proto;
    // ifindex 0, user 0.
    b
}

fn parse_selector(b: &[u8]) -> Option<Selector> {
    let fam = read_u16(b, 40)? as u8;
    let (fam, dst, src) = if fam == 0 {
        // A selector of no family (the kernel's "any"): say IPv4 any.
        (AF_INET, IpAddr::from([0u8; 4]), IpAddr::from([0u8; 4]))
    } else {
        (
            fam,
            parse_xfrm_address(fam, b.get(0..16)?)?,
            parse_xfrm_address(fam, b.get(16..32)?)?,
        )
    };
    let _ = fam;
    let dport = u16::from_be_bytes(b.get(32..34)?.try_into().ok()?);
    let mask = u16::from_be_bytes(b.get(34..36)?.try_into().ok()?);
    Some(Selector {
        dst: Prefix::new(dst, *b.get(42)?),
        src: Prefix::new(src, *b.get(43)?),
        proto: *b.get(44)?,
        dport: dport & mask,
    })
}

/// `struct xfrm_id` (24 bytes): destination, SPI (big-endian), protocol.
fn xfrm_id(dst: IpAddr, spi: u32, proto: u8) -> [u8; ID_LEN] {
    let mut b = [0u8; ID_LEN];
    put(&mut b, 0, &xfrm_address(dst));
    put(&mut b, 16, &spi.to_be_bytes());
    b[20] = proto;
    b
}

/// `struct xfrm_lifetime_cfg` (64 bytes) with no limits: byte and packet
/// limits XFRM_INF, no expiry times.
fn lifetime_unlimited() -> [u8; LIFETIME_CFG_LEN] {
    let mut b = [0u8; LIFETIME_CFG_LEN];
    for at in [0, 8, 16, 24] {
        put(&mut b, at, &XFRM_INF.to_ne_bytes());
    }
    b
}

/// `struct xfrm_usersa_info` (224 bytes) for `sa`: ESP, its mode, ESN
/// (its replay window then travels in XFRMA_REPLAY_ESN_VAL and this one's
/// is 0), selector left empty (the policies choose traffic).
pub fn usersa_info(sa: &Sa) -> [u8; USERSA_INFO_LEN] {
    let mut b = [0u8; USERSA_INFO_LEN];
    // sel (0..56): zero, but of the SA's family.
    put(&mut b, 40, &u16::from(family(sa.dst)).to_ne_bytes());
    put(&mut b, 56, &xfrm_id(sa.dst, sa.spi, IPPROTO_ESP));
    put(&mut b, 80, &xfrm_address(sa.src));
    put(&mut b, 96, &lifetime_unlimited());
    // curlft (160..192), stats (192..204), seq (204): 0.
    put(&mut b, 208, &sa.reqid.to_ne_bytes());
    put(&mut b, 212, &u16::from(family(sa.dst)).to_ne_bytes());
    b[214] = sa.mode.raw();
    b[215] = 0; // replay_window: in the ESN attribute
    b[216] = XFRM_STATE_ESN;
    b
}

/// `struct xfrm_algo_aead` followed by the key: name (64 bytes, NUL
/// padded), key length in bits, ICV length in bits, key.
pub fn algo_aead(name: &str, key: &[u8], icv_bits: u32) -> Vec<u8> {
    let mut b = vec![0u8; ALGO_AEAD_LEN];
    let n = name.as_bytes();
    b[..n.len().min(63)].copy_from_slice(&n[..n.len().min(63)]);
    put(&mut b, 64, &((key.len() * 8) as u32).to_ne_bytes());
    put(&mut b, 68, &icv_bits.to_ne_bytes());
    b.extend_from_slice(key);
    b
}

/// `struct xfrm_replay_state_esn` with its bitmap: bmp_len (u32 words),
/// oseq, seq, oseq_hi, seq_hi (all 0 for a new SA), replay_window, bmp.
pub fn replay_esn(window: u32) -> Vec<u8> {
    let words = window.div_ceil(32);
    let mut b = vec![0u8; REPLAY_ESN_LEN + 4 * words as usize];
    put(&mut b, 0, &words.to_ne_bytes());
    put(&mut b, 20, &window.to_ne_bytes());
    b
}

/// `struct xfrm_usersa_id` (24 bytes): destination, SPI, family, protocol.
pub fn usersa_id(dst: IpAddr, spi: u32) -> [u8; USERSA_ID_LEN] {
    let mut b = [0u8; USERSA_ID_LEN];
    put(&mut b, 0, &xfrm_address(dst));
    put(&mut b, 16, &spi.to_be_bytes());
    put(&mut b, 20, &u16::from(family(dst)).to_ne_bytes());
    b[22] = IPPROTO_ESP;
    b
}

/// `struct xfrm_user_tmpl` (64 bytes): ESP in `t.mode` from `t.src` to
/// `t.dst`, every algorithm allowed (as iproute2 sends it).
pub fn user_tmpl(t: &Template) -> [u8; USER_TMPL_LEN] {
    let mut b = [0u8; USER_TMPL_LEN];
    put(&mut b, 0, &xfrm_id(t.dst, t.spi, IPPROTO_ESP));
    put(&mut b, 24, &u16::from(family(t.dst)).to_ne_bytes());
    put(&mut b, 28, &xfrm_address(t.src));
    put(&mut b, 44, &t.reqid.to_ne_bytes());
    b[48] = t.mode.raw();
    // share 0, optional 0.
    for at in [52, 56, 60] {
        put(&mut b, at, &u32::MAX.to_ne_bytes());
    }
    b
}

/// `struct xfrm_userpolicy_info` (168 bytes): selector, no lifetime
/// limits, priority, direction, allow.
pub fn userpolicy_info(p: &Policy) -> [u8; USERPOLICY_INFO_LEN] {
    let mut b = [0u8; USERPOLICY_INFO_LEN];
    put(&mut b, 0, &selector(&p.sel));
    put(&mut b, 56, &lifetime_unlimited());
    put(&mut b, 152, &p.priority.to_ne_bytes());
    // index 0: the kernel picks one.
    b[160] = p.dir.raw();
    b[161] = XFRM_POLICY_ALLOW;
    b
}

/// `struct xfrm_userpolicy_id` (64 bytes): selector, index 0, direction.
pub fn userpolicy_id(sel: &Selector, dir: Dir) -> [u8; USERPOLICY_ID_LEN] {
    let mut b = [0u8; USERPOLICY_ID_LEN];
    put(&mut b, 0, &selector(sel));
    b[60] = dir.raw();
    b
}

/// XFRM_MSG_NEWSA (or UPDSA when `update`) for `sa`.
pub fn sa_msg(sa: &Sa, update: bool) -> MsgBuilder {
    let mut m = if update {
        MsgBuilder::new(XFRM_MSG_UPDSA, NLM_F_REQUEST)
    } else {
        MsgBuilder::new(XFRM_MSG_NEWSA, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL)
    };
    m.bytes(&usersa_info(sa));
    m.attr(XFRMA_ALG_AEAD, &algo_aead(AEAD_GCM_AES, &sa.key, GCM_ICV_BITS));
    m.attr(XFRMA_REPLAY_ESN_VAL, &replay_esn(REPLAY_WINDOW));
    if sa.if_id != 0 {
        m.attr_u32(XFRMA_IF_ID, sa.if_id);
    }
    m
}

/// XFRM_MSG_NEWPOLICY (or UPDPOLICY when `update`) for `p`.
pub fn policy_msg(p: &Policy, update: bool) -> MsgBuilder {
    let mut m = if update {
        MsgBuilder::new(XFRM_MSG_UPDPOLICY, NLM_F_REQUEST)
    } else {
        MsgBuilder::new(XFRM_MSG_NEWPOLICY, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL)
    };
    m.bytes(&userpolicy_info(p));
    m.attr(XFRMA_TMPL, &user_tmpl(&p.tmpl));
    if p.if_id != 0 {
        m.attr_u32(XFRMA_IF_ID, p.if_id);
    }
    m
}

/// An SA from an XFRM_MSG_NEWSA payload (dump or get reply).
pub fn parse_sa(payload: &[u8]) -> Option<SaInfo> {
    let fam = read_u16(payload, 212)? as u8;
    let mut sa = SaInfo {
        dst: parse_xfrm_address(fam, payload.get(56..72)?)?,
        spi: u32::from_be_bytes(payload.get(72..76)?.try_into().ok()?),
        proto: *payload.get(76)?,
        src: parse_xfrm_address(fam, payload.get(80..96)?)?,
        bytes: read_u64(payload, 160)?,
        packets: read_u64(payload, 168)?,
        add_time: read_u64(payload, 176)?,
        replay_drops: read_u32(payload, 196)?,
        integrity_failed: read_u32(payload, 200)?,
        reqid: read_u32(payload, 208)?,
        mode: *payload.get(214)?,
        if_id: 0,
        aead: None,
    };
    for (ty, data) in attrs(payload.get(USERSA_INFO_LEN..)?) {
        match ty {
            XFRMA_IF_ID => sa.if_id = read_u32(data, 0)?,
            XFRMA_ALG_AEAD => sa.aead = Some(crate::message::read_cstr(data.get(..64)?)),
            _ => {}
        }
    }
    Some(sa)
}

fn parse_tmpl(b: &[u8]) -> Option<Template> {
    let fam = read_u16(b, 24)? as u8;
    Some(Template {
        dst: parse_xfrm_address(fam, b.get(0..16)?)?,
        spi: u32::from_be_bytes(b.get(16..20)?.try_into().ok()?),
        src: parse_xfrm_address(fam, b.get(28..44)?)?,
        reqid: read_u32(b, 44)?,
        mode: if *b.get(48)? == XFRM_MODE_TRANSPORT {
            Mode::Transport
        } else {
            Mode::Tunnel
        },
    })
}

/// A policy from an XFRM_MSG_NEWPOLICY payload (dump reply).
pub fn parse_policy(payload: &[u8]) -> Option<PolicyInfo> {
    let mut p = PolicyInfo {
        sel: parse_selector(payload.get(..SELECTOR_LEN)?)?,
        priority: read_u32(payload, 152)?,
        index: read_u32(payload, 156)?,
        dir: Dir::from_raw(*payload.get(160)?)?,
        action: *payload.get(161)?,
        if_id: 0,
        tmpls: Vec::new(),
    };
    for (ty, data) in attrs(payload.get(USERPOLICY_INFO_LEN..)?) {
        match ty {
            XFRMA_IF_ID => p.if_id = read_u32(data, 0)?,
            XFRMA_TMPL => {
                for t in data.chunks_exact(USER_TMPL_LEN) {
                    p.tmpls.push(parse_tmpl(t)?);
                }
            }
            _ => {}
        }
    }
    Some(p)
}

/// A blocking NETLINK_XFRM socket in one network namespace.
pub struct Xfrm {
    sock: Socket,
}

impl Xfrm {
    /// A socket in the calling thread's network namespace. A kernel without
    /// XFRM_USER refuses it (EPROTONOSUPPORT).
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: Socket::open(Protocol::Xfrm)?,
        })
    }

    /// A socket in the network namespace `netns` (`path` names it in errors).
    pub fn open_in(netns: &File, path: &str) -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: Socket::open_in(Protocol::Xfrm, netns, path)?,
        })
    }

    /// Adds `sa`; EEXIST when one with its destination and SPI exists. A
    /// kernel without ESP answers EPROTONOSUPPORT, one without the AEAD
    /// ENOSYS. The key is never part of an error.
    pub fn add_sa(&mut self, sa: &Sa) -> Result<(), NetlinkError> {
        self.sock.request_ack(
            sa_msg(sa, false),
            &format!("add ESP SA {} -> {} spi {:#x}", sa.src, sa.dst, sa.spi),
        )
    }

    /// Adds or replaces `sa` (XFRM_MSG_UPDSA; the kernel only updates an SA
    /// that exists, so this is for changing one in place, not its key).
    pub fn update_sa(&mut self, sa: &Sa) -> Result<(), NetlinkError> {
        self.sock.request_ack(
            sa_msg(sa, true),
            &format!("update ESP SA {} -> {} spi {:#x}", sa.src, sa.dst, sa.spi),
        )
    }

    /// Deletes the ESP SA to `dst` with `spi` (from `src`); false when there
    /// was none.
    pub fn delete_sa(&mut self, src: IpAddr, dst: IpAddr, spi: u32) -> Result<bool, NetlinkError> {
        let mut m = MsgBuilder::new(XFRM_MSG_DELSA, NLM_F_REQUEST);
        m.bytes(&usersa_id(dst, spi));
        m.attr(XFRMA_SRCADDR, &xfrm_address(src));
        match self
            .sock
            .request_ack(m, &format!("delete ESP SA {src} -> {dst} spi {spi:#x}"))
        {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The ESP SA to `dst` with `spi`, with its counters; None when there
    /// is none.
    pub fn get_sa(&mut self, src: IpAddr, dst: IpAddr, spi: u32) -> Result<Option<SaInfo>, NetlinkError> {
        let mut m = MsgBuilder::new(XFRM_MSG_GETSA, NLM_F_REQUEST);
        m.bytes(&usersa_id(dst, spi));
        m.attr(XFRMA_SRCADDR, &xfrm_address(src));
        match self.sock.request_one(
            m,
            XFRM_MSG_NEWSA,
            &format!("get ESP SA {src} -> {dst} spi {spi:#x}"),
            parse_sa,
        ) {
            Ok(sa) => Ok(Some(sa)),
            Err(e) if e.errno() == Some(Errno::ESRCH) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every SA of the namespace.
    pub fn sas(&mut self) -> Result<Vec<SaInfo>, NetlinkError> {
        let mut m = MsgBuilder::new(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP);
        // The dump takes an (ignored) xfrm_usersa_id header.
        m.bytes(&[0u8; USERSA_ID_LEN]);
        let mut out = Vec::new();
        self.sock
            .dump(m, XFRM_MSG_NEWSA, "list XFRM states", |p| out.extend(parse_sa(p)))?;
        Ok(out)
    }

    /// Adds `p`; EEXIST when a policy with its selector, direction and
    /// if_id exists.
    pub fn add_policy(&mut self, p: &Policy) -> Result<(), NetlinkError> {
        self.sock.request_ack(
            policy_msg(p, false),
            &format!("add XFRM policy {} dir {}", p.sel, p.dir.name()),
        )
    }

    /// Adds or replaces `p` (XFRM_MSG_UPDPOLICY: the same selector,
    /// direction and if_id get the new template in place).
    pub fn update_policy(&mut self, p: &Policy) -> Result<(), NetlinkError> {
        self.sock.request_ack(
            policy_msg(p, true),
            &format!("update XFRM policy {} dir {}", p.sel, p.dir.name()),
        )
    }

    /// Deletes the policy with `sel`, `dir` and `if_id`; false when there
    /// was none.
    pub fn delete_policy(&mut self, sel: &Selector, dir: Dir, if_id: u32) -> Result<bool, NetlinkError> {
        let mut m = MsgBuilder::new(XFRM_MSG_DELPOLICY, NLM_F_REQUEST);
        m.bytes(&userpolicy_id(sel, dir));
        if if_id != 0 {
            m.attr_u32(XFRMA_IF_ID, if_id);
        }
        match self
            .sock
            .request_ack(m, &format!("delete XFRM policy {sel} dir {}", dir.name()))
        {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every policy of the namespace (main type).
    pub fn policies(&mut self) -> Result<Vec<PolicyInfo>, NetlinkError> {
        let mut m = MsgBuilder::new(XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP);
        m.bytes(&[0u8; USERPOLICY_ID_LEN]);
        let mut out = Vec::new();
        self.sock.dump(m, XFRM_MSG_NEWPOLICY, "list XFRM policies", |p| {
            out.extend(parse_policy(p))
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
