//! The userspace WireGuard device: boringtun's protocol state machine
//! (`noise::Tunn`, one per peer) between a multi-queue TUN device and one
//! UDP socket.
//!
//! Threads, all plain OS threads (the data path never runs on the agent's
//! runtime):
//! - one per TUN queue: read a batch of packets, route each to its peer by
//!   allowed IPs, encrypt, send the batch with one `sendmmsg`;
//! - one for the socket: receive a batch with one `recvmmsg`, find the peer
//!   (by receiver index, or by source address for a handshake initiation),
//!   decrypt, check the inner source against the peer's allowed IPs, write
//!   into the TUN device;
//! - one timer thread: handshakes, keepalives, rekeying (every 100 ms).
//!
//! Buffers are allocated once per thread; a packet costs no allocation.
//! The peer table is swapped whole on a change (readers take an `Arc` per
//! batch), and a peer whose key and endpoint did not change keeps its
//! `Tunn`, so its session survives updates.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::{Packet, Tunn, TunnResult};

use crate::keys::{PrivateKey, PublicKey};
use crate::tun;
use crate::{PeerConfig, PeerStatus};

/// Packets per read or send batch.
const BATCH: usize = 32;
/// Large enough for any packet the device's MTU lets through, plus the
/// WireGuard header and tag.
const BUF: usize = 65535 + 64;
/// TUN packets are at most the device MTU; the encrypt buffers need less.
const TUN_BUF: usize = 9000 + 64;

#[derive(Clone, Debug)]
pub struct Config {
    pub ifname: String,
    pub listen_port: u16,
    /// TUN queues, each with its encrypting thread.
    pub queues: usize,
}

/// Counters of packets the device did not pass, by why.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sent into the device for an address no peer allows.
    pub no_peer: AtomicU64,
    /// Received from an address or index no peer has.
    pub unknown_sender: AtomicU64,
    /// Failed to decrypt or authenticate (boringtun's error).
    pub decrypt_errors: AtomicU64,
    /// Decrypted, but the inner source is not in the peer's allowed IPs.
    pub disallowed_source: AtomicU64,
}

struct Peer {
    cfg: PeerConfig,
    /// The peer's index (the high 24 bits of our session indexes).
    index: u32,
    tunn: Mutex<Tunn>,
}

impl Peer {
    fn allows(&self, ip: Ipv4Addr) -> bool {
        self.cfg.allowed_ips.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Default)]
struct Table {
    peers: Vec<Arc<Peer>>,
    by_addr: HashMap<Ipv4Addr, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// (network, mask, peer), longest prefix first.
    routes: Vec<(u32, u32, Arc<Peer>)>,
}

impl Table {
    fn build(peers: Vec<Arc<Peer>>) -> Self {
        let mut t = Table::default();
        let mut routes: Vec<(u8, u32, u32, Arc<Peer>)> = Vec::new();
        for p in &peers {
            t.by_addr.insert(*p.cfg.endpoint.ip(), p.clone());
            t.by_index.insert(p.index, p.clone());
            for n in &p.cfg.allowed_ips {
                let mask = if n.prefix_len() == 0 {
                    0
                } else {
                    u32::MAX << (32 - n.prefix_len())
                };
                routes.push((n.prefix_len(), u32::from(n.network()) & mask, mask, p.clone()));
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.0));
        t.routes = routes.into_iter().map(|(_, n, m, p)| (n, m, p)).collect();
        t.peers = peers;
        t
    }

    fn route(&self, dst: Ipv4Addr) -> Option<&Arc<Peer>> {
        let d = u32::from(dst);
        self.routes.iter().find(|(n, m, _)| d & m == *n).map(|(_, _, p)| p)
    }
}

struct Shared {
    private: PrivateKey,
    table: RwLock<Arc<Table>>,
    next_index: AtomicU32,
    stop: AtomicBool,
    sock: UdpSocket,
    counters: Counters,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }
}

/// A running userspace device. Dropping it stops its threads and removes
/// the TUN device.
pub struct Userspace {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    ifname: String,
}

impl Userspace {
    /// Creates the TUN device and the socket and starts the threads. The
    /// caller sets the device's MTU and brings it up (the device exists
    /// when this returns).
    pub fn start(cfg: &Config, private: PrivateKey) -> io::Result<Self> {
        let queues = tun::open(&cfg.ifname, cfg.queues)?;
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.listen_port))
            .map_err(|e| io::Error::new(e.kind(), format!("bind UDP port {}: {e}", cfg.listen_port)))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        set_buffers(&sock);
        let shared = Arc::new(Shared {
            private,
            table: RwLock::new(Arc::new(Table::default())),
            next_index: AtomicU32::new(1),
            stop: AtomicBool::new(false),
            sock,
            counters: Counters::default(),
        });
        let writer = Arc::new(queues[0].try_clone()?);
        let mut threads = Vec::new();
        for (i, q) in queues.into_iter().enumerate() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wg-tun{i}"))
                    .spawn(move || encrypt_loop(&s, &q))?,
            );
        }
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("wg-udp".into())
                .spawn(move || decrypt_loop(&s, &writer))?,
        );
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("wg-timers".into())
                .spawn(move || timer_loop(&s))?,
        );
        Ok(Userspace {
            shared,
            threads,
            ifname: cfg.ifname.clone(),
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn public_key(&self) -> PublicKey {
        self.shared.private.public()
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Replaces the peers. A peer whose public key and endpoint are
    /// unchanged keeps its session.
    pub fn set_peers(&self, peers: &[PeerConfig]) {
        let old = self.shared.table();
        let mut next = Vec::with_capacity(peers.len());
        for cfg in peers {
            let kept = old
                .peers
                .iter()
                .find(|p| p.cfg.public_key == cfg.public_key && p.cfg.endpoint == cfg.endpoint);
            let peer = match kept {
                Some(p) if p.cfg == *cfg => p.clone(),
                Some(p) => {
                    // Same peer, other allowed IPs: the session stays.
                    let tunn = std::mem::replace(
                        &mut *p.tunn.lock().unwrap_or_else(|e| e.into_inner()),
                        self.new_tunn(cfg, p.index),
                    );
                    Arc::new(Peer {
                        cfg: cfg.clone(),
                        index: p.index,
                        tunn: Mutex::new(tunn),
                    })
                }
                None => {
                    let index = self.shared.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                    Arc::new(Peer {
                        cfg: cfg.clone(),
                        index,
                        tunn: Mutex::new(self.new_tunn(cfg, index)),
                    })
                }
            };
            next.push(peer);
        }
        if let Ok(mut t) = self.shared.table.write() {
            *t = Arc::new(Table::build(next));
        }
    }

    fn new_tunn(&self, cfg: &PeerConfig, index: u32) -> Tunn {
        Tunn::new(
            self.shared.private.secret(),
            boringtun::x25519::PublicKey::from(cfg.public_key.0),
            None,
            None,
            index,
            None,
        )
    }

    /// Each peer's handshake age and byte counts.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.shared
            .table()
            .peers
            .iter()
            .map(|p| {
                let t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
                let (since, tx, rx, _, _) = t.stats();
                PeerStatus {
                    public_key: p.cfg.public_key,
                    endpoint: p.cfg.endpoint,
                    allowed_ips: p.cfg.allowed_ips.clone(),
                    last_handshake: since,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect()
    }
}

impl Drop for Userspace {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set_buffers(sock: &UdpSocket) {
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a valid c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Points the first `n` message headers of a `sendmmsg`/`recvmmsg` batch
/// at buffer i (its first `lens[i]` bytes, or all of it without `lens`)
/// and address i. The headers hold raw pointers into `bufs`, `addrs` and
/// `iov`: use them before any of those moves.
fn point_headers(
    bufs: &mut [Box<[u8]>],
    lens: Option<&[usize; BATCH]>,
    addrs: &mut [libc::sockaddr_in; BATCH],
    n: usize,
    iov: &mut [MaybeUninit<libc::iovec>; BATCH],
    msgs: &mut [MaybeUninit<libc::mmsghdr>; BATCH],
) {
    for i in 0..n {
        iov[i].write(libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: lens.map_or(bufs[i].len(), |l| l[i]),
        });
        // SAFETY: mmsghdr is plain data; zero is a valid value.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        m.msg_hdr.msg_iov = iov[i].as_mut_ptr();
        m.msg_hdr.msg_iovlen = 1;
        msgs[i].write(m);
    }
}

/// Datagrams waiting to go out with one `sendmmsg`.
struct SendBatch {
    bufs: Vec<Box<[u8]>>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_in; BATCH],
    n: usize,
}

impl SendBatch {
    fn new(size: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0u8; size].into_boxed_slice()).collect(),
            lens: [0; BATCH],
            addrs: [sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
            n: 0,
        }
    }

    fn flush(&mut self, sock: &UdpSocket) {
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        let mut msgs: [MaybeUninit<libc::mmsghdr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        point_headers(
            &mut self.bufs,
            Some(&self.lens),
            &mut self.addrs,
            self.n,
            &mut iov,
            &mut msgs,
        );
        let mut sent = 0;
        while sent < self.n {
            // SAFETY: entries sent..n were initialised above and point at
            // buffers and addresses that outlive the call.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[sent].as_mut_ptr(),
                    (self.n - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                // A full socket buffer or an unreachable peer: the rest of
                // this batch is lost, as a full link would lose it.
                break;
            }
            sent += r as usize;
        }
        self.n = 0;
    }
}

fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    (pkt.len() >= 20 && pkt[0] >> 4 == 4).then(|| Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
}

fn encrypt_loop(s: &Shared, q: &File) {
    let fd = q.as_raw_fd();
    let mut inb: Vec<Box<[u8]>> = (0..BATCH).map(|_| vec![0u8; TUN_BUF].into_boxed_slice()).collect();
    let mut lens = [0usize; BATCH];
    let mut out = SendBatch::new(TUN_BUF + 64);
    while !s.stop.load(Ordering::Relaxed) {
        if !tun::wait_readable(fd, 200) {
            continue;
        }
        let mut n = 0;
        while n < BATCH {
            match tun::read(fd, &mut inb[n]) {
                Some(len) => {
                    lens[n] = len;
                    n += 1;
                }
                None => break,
            }
        }
        let table = s.table();
        let mut i = 0;
        while i < n {
            let Some(peer) = ipv4_dst(&inb[i][..lens[i]]).and_then(|d| table.route(d)) else {
                s.counters.no_peer.fetch_add(1, Ordering::Relaxed);
                i += 1;
                continue;
            };
            // One lock for the run of packets to the same peer.
            let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let slot = out.n;
                if let TunnResult::WriteToNetwork(p) = t.encapsulate(&inb[i][..lens[i]], &mut out.bufs[slot]) {
                    out.lens[slot] = p.len();
                    out.addrs[slot] = sockaddr(peer.cfg.endpoint);
                    out.n += 1;
                }
                i += 1;
                if i >= n {
                    break;
                }
                match ipv4_dst(&inb[i][..lens[i]]).and_then(|d| table.route(d)) {
                    Some(p) if Arc::ptr_eq(p, peer) => {}
                    _ => break,
                }
            }
        }
        out.flush(&s.sock);
    }
}

/// Received datagrams, filled by one `recvmmsg`.
struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    addrs: [libc::sockaddr_in; BATCH],
    lens: [usize; BATCH],
}

impl RecvBatch {
    fn recv(&mut self, sock: &UdpSocket) -> usize {
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        let mut msgs: [MaybeUninit<libc::mmsghdr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        point_headers(&mut self.bufs, None, &mut self.addrs, BATCH, &mut iov, &mut msgs);
        // Block for the first datagram (up to the socket's read timeout),
        // then take whatever else is already there.
        // SAFETY: BATCH initialised entries pointing at live buffers.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs[0].as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        for (i, m) in msgs.iter().take(r as usize).enumerate() {
            // SAFETY: initialised above; the kernel set msg_len.
            self.lens[i] = unsafe { m.assume_init_ref() }.msg_len as usize;
        }
        r as usize
    }
}

fn addr_of(a: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(a.sin_port),
    )
}

fn decrypt_loop(s: &Shared, tun_w: &File) {
    let fd = tun_w.as_raw_fd();
    let mut rb = RecvBatch {
        bufs: (0..BATCH).map(|_| vec![0u8; BUF].into_boxed_slice()).collect(),
        addrs: [sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
        lens: [0; BATCH],
    };
    let mut out = vec![0u8; BUF];
    let mut replies = SendBatch::new(256);
    while !s.stop.load(Ordering::Relaxed) {
        let n = rb.recv(&s.sock);
        if n == 0 {
            continue;
        }
        let table = s.table();
        for i in 0..n {
            let from = addr_of(&rb.addrs[i]);
            let dgram = &rb.bufs[i][..rb.lens[i]];
            let peer = match Tunn::parse_incoming_packet(dgram) {
                Ok(Packet::HandshakeInit(_)) => table.by_addr.get(from.ip()),
                Ok(Packet::HandshakeResponse(p)) => table.by_index.get(&(p.receiver_idx >> 8)),
                Ok(Packet::PacketCookieReply(p)) => table.by_index.get(&(p.receiver_idx >> 8)),
                Ok(Packet::PacketData(p)) => table.by_index.get(&(p.receiver_idx >> 8)),
                Err(_) => None,
            };
            let Some(peer) = peer else {
                s.counters.unknown_sender.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            match t.decapsulate(Some(std::net::IpAddr::V4(*from.ip())), dgram, &mut out) {
                TunnResult::WriteToNetwork(p) => {
                    queue(&mut replies, p, peer.cfg.endpoint, &s.sock);
                    // Packets queued during the handshake go now.
                    while let TunnResult::WriteToNetwork(p) = t.decapsulate(None, &[], &mut out) {
                        queue(&mut replies, p, peer.cfg.endpoint, &s.sock);
                    }
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    if peer.allows(src) {
                        tun::write(fd, p);
                    } else {
                        s.counters.disallowed_source.fetch_add(1, Ordering::Relaxed);
                    }
                }
                TunnResult::WriteToTunnelV6(..) => {
                    s.counters.disallowed_source.fetch_add(1, Ordering::Relaxed);
                }
                TunnResult::Err(_) => {
                    s.counters.decrypt_errors.fetch_add(1, Ordering::Relaxed);
                }
                TunnResult::Done => {}
            }
        }
        replies.flush(&s.sock);
    }
}

fn queue(b: &mut SendBatch, p: &[u8], to: SocketAddrV4, sock: &UdpSocket) {
    if b.n == BATCH {
        b.flush(sock);
    }
    if p.len() > b.bufs[b.n].len() {
        // Only handshake and cookie messages come here, never this large.
        return;
    }
    b.bufs[b.n][..p.len()].copy_from_slice(p);
    b.lens[b.n] = p.len();
    b.addrs[b.n] = sockaddr(to);
    b.n += 1;
}

fn timer_loop(s: &Shared) {
    let mut buf = vec![0u8; 256];
    let mut last = Instant::now();
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100).saturating_sub(last.elapsed()));
        last = Instant::now();
        for p in &s.table().peers {
            let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
            if let TunnResult::WriteToNetwork(pkt) = t.update_timers(&mut buf) {
                let _ = s.sock.send_to(pkt, p.cfg.endpoint);
            }
        }
    }
}
