//! IPsec keys per SA (`--encryption ipsec`), derived from the cluster keys
//! ([`sinew_model::ipsec`]).
//!
//! AES-GCM's nonce is the SA's salt plus its 64-bit sequence number (RFC
//! 4106 §3.1 with ESN). Two senders that share a key and salt, or one
//! sender whose counter restarts under the same key, repeat nonces, and a
//! repeated GCM nonce gives away the authentication key. So no SA uses a
//! cluster key as it is: each direction between two nodes gets its own key,
//! HKDF-SHA256 (RFC 5869) of the cluster key with an `info` that binds
//! - the SPI,
//! - the sending node's name and address and its epoch,
//! - the receiving node's name and address.
//!
//! Both ends derive the same key for a direction (the receiver learns the
//! sender's epoch from what the sender publishes); A→B differs from B→A.
//! The SPI on the wire is derived the same way ([`derive_spi`]), so that a
//! node can hold one inbound SA per peer and key.
//!
//! The epoch changes whenever the sender's outbound SAs are created afresh
//! (a node reboot, a new network namespace): a new key goes with the
//! restarted counter. An agent that restarts while its SAs are still in the
//! kernel keeps them and the epoch they were made with ([`choose_epoch`]),
//! so their counters go on and their keys stay.

use std::net::IpAddr;

use ring::hkdf;

/// HKDF salt: fixed and public, separating Sinew's use of the cluster key
/// from any other (RFC 5869 §3.1: a salt need not be secret).
const SALT: &[u8] = b"sinew.io ipsec v1";

/// One end of a direction.
#[derive(Clone, Copy, Debug)]
pub struct End<'a> {
    pub name: &'a str,
    pub addr: IpAddr,
}

/// An output length for ring's HKDF: the cluster key's own (AES key plus
/// 4-byte salt), so a derived key has the cluster key's strength.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn push_str(info: &mut Vec<u8>, s: &str) {
    info.extend_from_slice(&(s.len() as u16).to_be_bytes());
    info.extend_from_slice(s.as_bytes());
}

fn push_addr(info: &mut Vec<u8>, a: IpAddr) {
    let v6 = match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    };
    info.extend_from_slice(&v6.octets());
}

/// `info` labels: what is derived (a key, a wire SPI), so that the two
/// never come from the same HKDF output.
const KEY_LABEL: &[u8] = b"sinew ipsec sa key";
const SPI_LABEL: &[u8] = b"sinew ipsec sa spi";

/// The `info` of a direction: every field length-prefixed or fixed-size,
/// so two different inputs never encode alike.
fn info(spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> Vec<u8> {
    info_for(KEY_LABEL, spi, from, epoch, to)
}

fn info_for(label: &[u8], spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> Vec<u8> {
    let mut info = label.to_vec();
    info.extend_from_slice(&spi.to_be_bytes());
    push_str(&mut info, from.name);
    push_addr(&mut info, from.addr);
    info.extend_from_slice(&epoch.to_be_bytes());
    push_str(&mut info, to.name);
    push_addr(&mut info, to.addr);
    info
}

/// The key of the SA from `from` (whose epoch is `epoch`) to `to` with
/// `spi`, from the cluster key `cluster_key` of that SPI. Same length as
/// the cluster key (20 or 36 bytes: AES key and salt).
pub fn derive_key(cluster_key: &[u8], spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> Vec<u8> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(cluster_key);
    let info = info(spi, from, epoch, to);
    let parts = [info.as_slice()];
    let okm = prk
        .expand(&parts, Len(cluster_key.len()))
        .expect("HKDF-SHA256 gives up to 8160 bytes; keys are 36 at most");
    let mut out = vec![0u8; cluster_key.len()];
    okm.fill(&mut out).expect("the output buffer has the length asked for");
    out
}

/// The SPI on the wire of the SA from `from` (epoch `epoch`) to `to` for
/// the cluster key `spi`. The kernel finds an inbound SA by destination,
/// SPI and protocol only, not by source: if every sender used the cluster
/// key's SPI, a node could hold one inbound SA per key, not one per peer
/// and direction. So each direction gets its own SPI, derived like its key
/// (both ends compute it), never below 256 (RFC 4303 §2.1). Two senders to
/// one node collide with odds of about 2^-32 per pair; the agent's add
/// then fails with EEXIST and that peer stays dropped, never in clear.
pub fn derive_spi(cluster_key: &[u8], spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> u32 {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(cluster_key);
    let info = info_for(SPI_LABEL, spi, from, epoch, to);
    let parts = [info.as_slice()];
    let mut out = [0u8; 4];
    prk.expand(&parts, Len(4))
        .expect("HKDF-SHA256 gives 4 bytes")
        .fill(&mut out)
        .expect("the output buffer has the length asked for");
    let v = u32::from_be_bytes(out);
    if v < sinew_model::ipsec::MIN_SPI {
        v + sinew_model::ipsec::MIN_SPI
    } else {
        v
    }
}

/// A fresh random epoch: never 0 (so that 0 can mean "none published"),
/// and below 2^63 (Kubernetes keeps integers as int64; 63 random bits
/// still make a repeat as unlikely as ever).
pub fn new_epoch() -> u64 {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut b = [0u8; 8];
        rng.fill(&mut b)
            .expect("the system random source failed: the kernel's getrandom must work for IPsec keys");
        let e = u64::from_be_bytes(b) & sinew_model::ipsec::MAX_EPOCH;
        if e != 0 {
            return e;
        }
    }
}

/// The epoch this node sends with: the stored one when the kernel still
/// holds outbound SAs made with it (an agent restart keeps them and their
/// counters), else a new one (the SAs are made afresh: new keys for the new
/// counters). A stored epoch no datastore can hold (2^63 or more, from an
/// earlier version) is replaced too.
pub fn choose_epoch(stored: Option<u64>, kernel_has_outbound_sas: bool) -> u64 {
    match stored {
        Some(e) if kernel_has_outbound_sas && e != 0 && e <= sinew_model::ipsec::MAX_EPOCH => e,
        _ => new_epoch(),
    }
}

// ---------------------------------------------------------------------
// Which SAs and policies a set of peers yields, and how keys rotate.
// ---------------------------------------------------------------------

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use sinew_model::ipsec::IpsecKeys;
use sinew_netlink::xfrm::{Dir, Mode as XfrmMode, Policy, Prefix, Sa, Selector, Template};

/// The reqid of every SA and policy template Sinew makes: what marks them
/// as Sinew's in the kernel (an agent that restarts finds its own).
pub const REQID: u32 = sinew_abi::IPSEC_REQID;
/// Priority of Sinew's policies (lower wins; below iproute2's default so
/// that Sinew's win over a broad one someone added by hand).
pub const PRIORITY: u32 = 1000;
/// What ESP in transport mode with rfc4106(gcm(aes)) adds to a packet at
/// most: SPI and sequence (8), IV (8), padding (up to 3), pad length and
/// next header (2), ICV (16); rounded up.
pub const OVERHEAD: u32 = 40;
/// VXLAN's UDP port (the policies cover it between node addresses).
pub const VXLAN_PORT: u16 = 8472;
const IPPROTO_UDP: u8 = 17;
/// The file in the state directory that keeps this node's epoch.
pub const EPOCH_FILE: &str = "ipsec-epoch";
/// How long a key older than the newest stays installed after the newest
/// one is first seen, by default: every peer has switched to the newest by
/// then (they switch as soon as this node publishes its SPI).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// Another node as IPsec needs it: its name and address, and what it
/// published (epoch, the cluster-key SPIs it receives with).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    pub addr: Ipv4Addr,
    pub epoch: u64,
    pub spis: Vec<u32>,
}

/// The direction of an SA, from this node's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SaDir {
    In,
    Out,
}

/// One SA the plan wants: its identity in the kernel (src, dst, wire SPI),
/// the peer, the direction and the cluster key it is derived from.
#[derive(Clone, PartialEq, Eq)]
pub struct PlannedSa {
    pub peer: String,
    pub dir: SaDir,
    pub cluster_spi: u32,
    pub sa: Sa,
}

impl std::fmt::Debug for PlannedSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {} cluster spi {} {:?}",
            self.dir, self.peer, self.cluster_spi, self.sa
        )
    }
}

/// What a peer gets: its SAs both ways, the SPI it is sent with, its
/// policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub name: String,
    pub addr: Ipv4Addr,
    pub inbound: Vec<PlannedSa>,
    pub outbound: Vec<PlannedSa>,
    /// The cluster SPI traffic to the peer uses: the newest key both have
    /// (the peer publishing it means its inbound SA is in place). None: no
    /// common key, the peer gets nothing (dropped, never in clear).
    pub send_with: Option<u32>,
    /// Out (with the SA of `send_with` as template) and in; empty when
    /// `send_with` is None.
    pub policies: Vec<Policy>,
}

/// Everything the node's IPsec wants for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    pub peers: Vec<PeerPlan>,
    /// The cluster SPIs this node receives with (publishes).
    pub receive_spis: Vec<u32>,
}

/// The selector of what is encrypted from `from` to `to`: VXLAN (UDP to
/// 8472), or everything with `--encrypt-node`.
pub fn selector(from: Ipv4Addr, to: Ipv4Addr, encrypt_node: bool) -> Selector {
    let mut sel = Selector::prefixes(Prefix::host(from.into()), Prefix::host(to.into()));
    if !encrypt_node {
        sel.proto = IPPROTO_UDP;
        sel.dport = VXLAN_PORT;
    }
    sel
}

/// The SA of one direction for the cluster key `cluster_spi`.
fn planned_sa(
    keys: &IpsecKeys,
    cluster_spi: u32,
    from: End<'_>,
    epoch: u64,
    to: End<'_>,
    peer: &str,
    dir: SaDir,
) -> Option<PlannedSa> {
    let key = &keys.get(cluster_spi).ok()?.key;
    Some(PlannedSa {
        peer: peer.to_string(),
        dir,
        cluster_spi,
        sa: Sa {
            src: from.addr,
            dst: to.addr,
            mode: XfrmMode::Transport,
            spi: derive_spi(key, cluster_spi, from, epoch, to),
            reqid: REQID,
            key: derive_key(key, cluster_spi, from, epoch, to),
            if_id: 0,
        },
    })
}

/// The plan for `peers` seen from `local` (its name, address, epoch),
/// with the cluster keys `active` of `keys` (oldest first; see
/// [`Rotation::active`]).
pub fn plan(
    local: (&str, Ipv4Addr, u64),
    peers: &[PeerInfo],
    keys: &IpsecKeys,
    active: &[u32],
    encrypt_node: bool,
) -> Plan {
    let (name, addr, epoch) = local;
    let me = End {
        name,
        addr: addr.into(),
    };
    let mut out = Plan {
        peers: Vec::new(),
        receive_spis: active.iter().copied().filter(|s| keys.get(*s).is_ok()).collect(),
    };
    let mut peers: Vec<&PeerInfo> = peers.iter().filter(|p| p.name != name && p.epoch != 0).collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    for p in peers {
        let them = End {
            name: &p.name,
            addr: p.addr.into(),
        };
        let inbound = active
            .iter()
            .filter_map(|&spi| planned_sa(keys, spi, them, p.epoch, me, &p.name, SaDir::In))
            .collect();
        let common: Vec<u32> = active
            .iter()
            .copied()
            .filter(|s| p.spis.contains(s) && keys.get(*s).is_ok())
            .collect();
        let outbound: Vec<PlannedSa> = common
            .iter()
            .filter_map(|&spi| planned_sa(keys, spi, me, epoch, them, &p.name, SaDir::Out))
            .collect();
        let send_with = outbound.last().map(|s| s.cluster_spi);
        let mut policies = Vec::new();
        if let Some(out_sa) = outbound.last() {
            policies.push(Policy {
                sel: selector(addr, p.addr, encrypt_node),
                dir: Dir::Out,
                priority: PRIORITY,
                tmpl: Template {
                    src: addr.into(),
                    dst: p.addr.into(),
                    mode: XfrmMode::Transport,
                    spi: out_sa.sa.spi,
                    reqid: REQID,
                },
                if_id: 0,
            });
            // In: what the peer sends covered by the selector must have
            // come through one of its SAs (any SPI: during a rotation two
            // are in use); the same in clear is refused.
            policies.push(Policy {
                sel: selector(p.addr, addr, encrypt_node),
                dir: Dir::In,
                priority: PRIORITY,
                tmpl: Template {
                    src: p.addr.into(),
                    dst: addr.into(),
                    mode: XfrmMode::Transport,
                    spi: 0,
                    reqid: REQID,
                },
                if_id: 0,
            });
        }
        out.peers.push(PeerPlan {
            name: p.name.clone(),
            addr: p.addr,
            inbound,
            outbound,
            send_with,
            policies,
        });
    }
    out
}

/// Which cluster keys are in use: the newest always; an older one only
/// within the grace period after a newer one was first seen, so that every
/// peer has switched before it goes.
#[derive(Debug)]
pub struct Rotation {
    grace: Duration,
    /// The newest key's SPI and when this agent first saw it.
    newest: Option<(u32, Instant, SystemTime)>,
    /// When traffic last moved to a newer key (any peer).
    pub last_rotation: Option<SystemTime>,
}

impl Rotation {
    pub fn new(grace: Duration) -> Self {
        Rotation {
            grace,
            newest: None,
            last_rotation: None,
        }
    }

    /// The SPIs of `keys` in use at `now`, oldest first.
    pub fn active(&mut self, keys: &IpsecKeys, now: Instant) -> Vec<u32> {
        let Some(newest) = keys.newest() else {
            self.newest = None;
            return Vec::new();
        };
        match self.newest {
            Some((spi, _, _)) if spi == newest.spi => {}
            _ => self.newest = Some((newest.spi, now, SystemTime::now())),
        }
        let since = self.newest.map_or(now, |(_, t, _)| t);
        if now.duration_since(since) >= self.grace {
            vec![newest.spi]
        } else {
            keys.keys.iter().map(|k| k.spi).collect()
        }
    }

    /// When the newest key was first seen (its age in status).
    pub fn newest_seen(&self) -> Option<SystemTime> {
        self.newest.map(|(_, _, t)| t)
    }

    /// Whether older keys are still kept (a rotation in its grace period).
    pub fn in_grace(&self, now: Instant) -> bool {
        self.newest.is_some_and(|(_, t, _)| now.duration_since(t) < self.grace)
    }
}

/// The epoch stored in the state directory, if any.
pub fn read_epoch(state_dir: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(state_dir.join(EPOCH_FILE))
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

/// Stores the epoch (atomically).
pub fn write_epoch(state_dir: &std::path::Path, epoch: u64) -> std::io::Result<()> {
    sinew_model::write_atomic(&state_dir.join(EPOCH_FILE), format!("{epoch}\n").as_bytes())
}

/// The peers of a snapshot: every other node with an IPv4 address that
/// published an IPsec epoch.
pub fn peers_of(snapshot: &sinew_model::Snapshot, local: &str) -> Vec<PeerInfo> {
    snapshot
        .nodes
        .values()
        .filter(|n| n.name != local)
        .filter_map(|n| {
            let std::net::IpAddr::V4(addr) = n.internal_ip else {
                return None;
            };
            let k = snapshot.node_keys.get(&n.name)?;
            (k.ipsec_epoch != 0).then(|| PeerInfo {
                name: n.name.clone(),
                addr,
                epoch: k.ipsec_epoch,
                spis: k.ipsec_spis.clone(),
            })
        })
        .collect()
}

/// An SA as the kernel identifies it.
type SaId = (std::net::IpAddr, std::net::IpAddr, u32);

fn sa_id(sa: &Sa) -> SaId {
    (sa.src, sa.dst, sa.spi)
}

/// A peer's state as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub node: String,
    pub addr: String,
    /// Encrypted traffic flows (SAs and policies in place).
    pub ready: bool,
    /// Cluster SPI and wire SPI traffic to the peer uses.
    pub out_spi: u32,
    pub out_wire_spi: u32,
    /// Cluster SPIs and wire SPIs the peer may send with.
    pub in_spis: Vec<(u32, u32)>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub replay_drops: u64,
    pub integrity_failed: u64,
}

/// The node's IPsec: its SAs and policies in the kernel, kept to the plan.
pub struct Ipsec {
    pub epoch: u64,
    local_addr: Ipv4Addr,
    state_dir: std::path::PathBuf,
    pub encrypt_node: bool,
    xfrm: sinew_netlink::Xfrm,
    rotation: Rotation,
    /// Sinew's SAs in the kernel now.
    sas: BTreeMap<SaId, Option<(String, SaDir, u32)>>,
    /// Sinew's policies in the kernel now (by selector and direction).
    policies: BTreeMap<(String, u8), Policy>,
    /// What was published last (epoch, SPIs).
    published: Option<(u64, Vec<u32>)>,
    /// The peers whose traffic is encrypted now, and what they send with.
    ready: BTreeMap<String, (Ipv4Addr, u32)>,
    plan: Plan,
}

fn policy_key(sel: &Selector, dir: Dir) -> (String, u8) {
    (format!("{sel} {:?}", sel), dir.raw())
}

impl Ipsec {
    /// Opens XFRM, finds Sinew's SAs and policies an earlier run left, and
    /// chooses the epoch: the stored one while the kernel still holds
    /// outbound SAs from `local_addr`, else a new one (stored).
    pub fn start(
        state_dir: &std::path::Path,
        local_addr: Ipv4Addr,
        encrypt_node: bool,
        grace: Duration,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut xfrm = sinew_netlink::Xfrm::open().context("open NETLINK_XFRM (CONFIG_XFRM_USER)")?;
        let mut sas = BTreeMap::new();
        let mut outbound = false;
        for sa in xfrm.sas().context("list XFRM states")? {
            if sa.reqid == REQID && sa.proto == sinew_netlink::xfrm::IPPROTO_ESP {
                outbound |= sa.src == std::net::IpAddr::V4(local_addr);
                sas.insert((sa.src, sa.dst, sa.spi), None);
            }
        }
        let mut policies = BTreeMap::new();
        for p in xfrm.policies().context("list XFRM policies")? {
            if p.tmpls.iter().any(|t| t.reqid == REQID) {
                if let Some(t) = p.tmpls.first() {
                    let pol = Policy {
                        sel: p.sel,
                        dir: p.dir,
                        priority: p.priority,
                        tmpl: *t,
                        if_id: p.if_id,
                    };
                    policies.insert(policy_key(&p.sel, p.dir), pol);
                }
            }
        }
        let stored = read_epoch(state_dir);
        let epoch = choose_epoch(stored, outbound);
        write_epoch(state_dir, epoch).with_context(|| format!("store the IPsec epoch in {}", state_dir.display()))?;
        tracing::info!(
            epoch,
            kept_sas = sas.len(),
            kept_policies = policies.len(),
            reused = stored == Some(epoch),
            "IPsec (ESP, rfc4106(gcm(aes)), transport mode) between node addresses"
        );
        Ok(Ipsec {
            epoch,
            local_addr,
            state_dir: state_dir.to_path_buf(),
            encrypt_node,
            xfrm,
            rotation: Rotation::new(grace),
            sas,
            policies,
            published: None,
            ready: BTreeMap::new(),
            plan: Plan::default(),
        })
    }

    /// Brings the kernel to the snapshot: inbound SAs first, then what this
    /// node publishes, then outbound SAs and policies, then removes what is
    /// no longer wanted. Returns the addresses of the peers whose traffic
    /// is encrypted now (their ipcache entries get the flag).
    pub fn apply(
        &mut self,
        local: &crate::nodes::LocalNode,
        snapshot: &sinew_model::Snapshot,
        ds: &dyn sinew_model::Datastore,
    ) -> BTreeSet<Ipv4Addr> {
        let empty = IpsecKeys::default();
        let keys = snapshot.ipsec_keys.as_ref().unwrap_or(&empty);
        if keys.keys.is_empty() {
            tracing::warn!(
                "no IPsec cluster keys in the datastore ({}): traffic to other nodes is dropped (no_encryption_key)",
                sinew_model::ipsec::KEYS_FILE
            );
        }
        self.forget_what_the_kernel_lost();
        let active = self.rotation.active(keys, Instant::now());
        let peers = peers_of(snapshot, &local.name);
        let plan = plan(
            (&local.name, local.ip, self.epoch),
            &peers,
            keys,
            &active,
            self.encrypt_node,
        );
        // 1. Inbound SAs: peers may send with a key once it is published.
        let mut receive_ok: BTreeSet<u32> = plan.receive_spis.iter().copied().collect();
        for pp in &plan.peers {
            for sa in &pp.inbound {
                if !self.install_sa(sa) {
                    receive_ok.remove(&sa.cluster_spi);
                }
            }
        }
        // 2. Publish the epoch and the SPIs received with.
        let spis: Vec<u32> = plan
            .receive_spis
            .iter()
            .copied()
            .filter(|s| receive_ok.contains(s))
            .collect();
        let want = (self.epoch, spis);
        if self.published.as_ref() != Some(&want) {
            match sinew_model::retry_conflicts(|| ds.publish_node_ipsec(&local.name, want.0, &want.1)) {
                Ok(()) => {
                    tracing::info!(epoch = want.0, spis = ?want.1, "published this node's IPsec epoch and SPIs");
                    self.published = Some(want);
                }
                Err(e) => tracing::warn!("cannot publish this node's IPsec SPIs, retrying: {e}"),
            }
        }
        // 3. Outbound SAs and policies.
        let mut ready = BTreeMap::new();
        let mut wanted_policies = BTreeSet::new();
        for pp in &plan.peers {
            let mut ok = pp.send_with.is_some();
            for sa in &pp.outbound {
                let installed = self.install_sa(sa);
                if Some(sa.cluster_spi) == pp.send_with {
                    ok &= installed;
                }
            }
            for p in &pp.policies {
                let k = policy_key(&p.sel, p.dir);
                wanted_policies.insert(k.clone());
                // The out policy only once its SA exists.
                if !ok {
                    continue;
                }
                if self.policies.get(&k) != Some(p) {
                    match self.xfrm.update_policy(p) {
                        Ok(()) => {
                            self.policies.insert(k, p.clone());
                        }
                        Err(e) => {
                            tracing::warn!(peer = %pp.name, "cannot install the XFRM policy, retrying: {e}");
                            ok = false;
                        }
                    }
                }
            }
            match (ok, pp.send_with) {
                (true, Some(spi)) => {
                    if let Some((_, before)) = self.ready.get(&pp.name) {
                        if *before != spi {
                            tracing::info!(peer = %pp.name, from = before, to = spi, "IPsec traffic moved to a new key");
                            self.rotation.last_rotation = Some(SystemTime::now());
                        }
                    }
                    ready.insert(pp.name.clone(), (pp.addr, spi));
                }
                (false, _) if self.ready.contains_key(&pp.name) || pp.send_with.is_none() => {
                    tracing::debug!(peer = %pp.name, "IPsec not in place for this peer: its traffic is dropped");
                }
                _ => {}
            }
        }
        // A peer not ready keeps no out policy (its traffic is dropped by
        // the datapath; an out policy with a missing SA would drop too).
        // 4. Remove what is no longer wanted: policies first (they name
        // the SAs), then SAs.
        let stale: Vec<(String, u8)> = self
            .policies
            .keys()
            .filter(|k| !wanted_policies.contains(*k))
            .cloned()
            .collect();
        for k in stale {
            let p = self.policies[&k].clone();
            match self.xfrm.delete_policy(&p.sel, p.dir, p.if_id) {
                Ok(_) => {
                    self.policies.remove(&k);
                }
                Err(e) => tracing::warn!("cannot remove the XFRM policy {} {}: {e}", p.sel, p.dir.name()),
            }
        }
        let wanted_sas: BTreeSet<SaId> = plan
            .peers
            .iter()
            .flat_map(|pp| pp.inbound.iter().chain(&pp.outbound))
            .map(|s| sa_id(&s.sa))
            .collect();
        let stale: Vec<SaId> = self.sas.keys().filter(|k| !wanted_sas.contains(*k)).copied().collect();
        for (src, dst, spi) in stale {
            match self.xfrm.delete_sa(src, dst, spi) {
                Ok(_) => {
                    tracing::info!(%src, %dst, spi = format_args!("{spi:#x}"), "removed an IPsec SA no longer in use");
                    self.sas.remove(&(src, dst, spi));
                }
                Err(e) => tracing::warn!("cannot remove the IPsec SA {src} -> {dst} spi {spi:#x}: {e}"),
            }
        }
        self.ready = ready;
        self.plan = plan;
        self.ready.values().map(|(a, _)| *a).collect()
    }

    /// Forgets the SAs and policies this agent installed that the kernel
    /// no longer has (`ip xfrm state flush`, another program), so that the
    /// next apply puts them back; true when there were any. Until then the
    /// traffic they carried is dropped: by the kernel (a policy without its
    /// SA) or by the uplink guard (no policy: VXLAN in clear), never sent.
    fn forget_what_the_kernel_lost(&mut self) -> bool {
        let mut lost = false;
        match self.xfrm.sas() {
            Ok(list) => {
                let present: BTreeSet<SaId> = list
                    .iter()
                    .filter(|s| s.reqid == REQID && s.proto == sinew_netlink::xfrm::IPPROTO_ESP)
                    .map(|s| (s.src, s.dst, s.spi))
                    .collect();
                let missing: Vec<SaId> = self.sas.keys().filter(|k| !present.contains(*k)).copied().collect();
                let mut outbound_lost = false;
                for (src, dst, spi) in missing {
                    tracing::warn!(%src, %dst, spi = format_args!("{spi:#x}"), "an IPsec SA is gone from the kernel: putting it back");
                    self.sas.remove(&(src, dst, spi));
                    outbound_lost |= src == std::net::IpAddr::V4(self.local_addr);
                    lost = true;
                }
                // An outbound SA made again would count from 1 under the
                // same key: repeated GCM nonces, and the peer's replay
                // window refuses them. A new epoch gives new keys and SPIs
                // (published; the old outbound SAs go as unwanted).
                if outbound_lost {
                    self.epoch = new_epoch();
                    if let Err(e) = write_epoch(&self.state_dir, self.epoch) {
                        tracing::warn!("cannot store the new IPsec epoch: {e}");
                    }
                    tracing::warn!(epoch = self.epoch, "outbound IPsec SAs were lost: new epoch, new keys");
                }
            }
            Err(e) => tracing::warn!("cannot list the XFRM states: {e}"),
        }
        match self.xfrm.policies() {
            Ok(list) => {
                let present: BTreeSet<(String, u8)> = list
                    .iter()
                    .filter(|p| p.tmpls.iter().any(|t| t.reqid == REQID))
                    .map(|p| policy_key(&p.sel, p.dir))
                    .collect();
                let missing: Vec<(String, u8)> = self
                    .policies
                    .keys()
                    .filter(|k| !present.contains(*k))
                    .cloned()
                    .collect();
                for k in missing {
                    tracing::warn!(policy = %k.0, "an IPsec policy is gone from the kernel: putting it back");
                    self.policies.remove(&k);
                    lost = true;
                }
            }
            Err(e) => tracing::warn!("cannot list the XFRM policies: {e}"),
        }
        lost
    }

    /// Adds `sa` unless it is in the kernel already (its key is derived
    /// from what identifies it, so one there is the same). True when it is
    /// in place.
    fn install_sa(&mut self, sa: &PlannedSa) -> bool {
        let id = sa_id(&sa.sa);
        if let Some(Some(_)) = self.sas.get(&id) {
            return true;
        }
        let r = match self.xfrm.add_sa(&sa.sa) {
            Err(e) if e.errno() == Some(nix::errno::Errno::EEXIST) && self.sas.contains_key(&id) => Ok(()),
            r => r,
        };
        match r {
            Ok(()) => {
                self.sas.insert(id, Some((sa.peer.clone(), sa.dir, sa.cluster_spi)));
                true
            }
            Err(e) => {
                tracing::warn!(peer = %sa.peer, "cannot install the IPsec SA ({:?}), retrying: {e}", sa.dir);
                false
            }
        }
    }

    /// The cluster SPIs this node publishes (receives with).
    pub fn published_spis(&self) -> Vec<u32> {
        self.published.as_ref().map(|p| p.1.clone()).unwrap_or_default()
    }

    /// When the newest key was first seen and the last switch to a newer
    /// one.
    pub fn key_times(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        (self.rotation.newest_seen(), self.rotation.last_rotation)
    }

    /// Per peer of the plan: SPIs and the kernel's counters of its SAs.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let mut x = match sinew_netlink::Xfrm::open() {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::warn!("cannot read the IPsec SAs' counters: {e}");
                None
            }
        };
        let mut counters = |sa: &Sa| x.as_mut().and_then(|x| x.get_sa(sa.src, sa.dst, sa.spi).ok().flatten());
        self.plan
            .peers
            .iter()
            .map(|pp| {
                let mut st = PeerStatus {
                    node: pp.name.clone(),
                    addr: pp.addr.to_string(),
                    ready: self.ready.contains_key(&pp.name),
                    ..Default::default()
                };
                if let Some(out) = pp.outbound.iter().find(|s| Some(s.cluster_spi) == pp.send_with) {
                    st.out_spi = out.cluster_spi;
                    st.out_wire_spi = out.sa.spi;
                }
                for sa in &pp.outbound {
                    if let Some(c) = counters(&sa.sa) {
                        st.tx_bytes += c.bytes;
                        st.tx_packets += c.packets;
                    }
                }
                for sa in &pp.inbound {
                    st.in_spis.push((sa.cluster_spi, sa.sa.spi));
                    if let Some(c) = counters(&sa.sa) {
                        st.rx_bytes += c.bytes;
                        st.rx_packets += c.packets;
                        st.replay_drops += u64::from(c.replay_drops);
                        st.integrity_failed += u64::from(c.integrity_failed);
                    }
                }
                st
            })
            .collect()
    }

    /// Whether an apply is due without a new snapshot: an SA or policy of
    /// Sinew's is gone from the kernel (someone flushed them: put back),
    /// older keys are kept (their grace period ends), a peer is not in
    /// place yet, or what this node publishes is not published yet.
    pub fn wants_resync(&mut self) -> bool {
        self.forget_what_the_kernel_lost()
            || self.plan.receive_spis.len() > 1
            || self.plan.peers.iter().any(|p| !self.ready.contains_key(&p.name))
            || self.published.as_ref().map(|p| &p.1) != Some(&self.plan.receive_spis)
    }

    /// Whether a rotation is in its grace period (older keys kept).
    pub fn rotating(&self) -> bool {
        self.rotation.in_grace(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> End<'static> {
        End {
            name: "node1",
            addr: "172.30.0.11".parse().unwrap(),
        }
    }

    fn b() -> End<'static> {
        End {
            name: "node2",
            addr: "172.30.0.12".parse().unwrap(),
        }
    }

    /// RFC 5869 Appendix A.1 (test case 1), through the same ring calls
    /// `derive_key` makes: HKDF-SHA256 is what the RFC says it is.
    #[test]
    fn hkdf_matches_rfc5869_test_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&ikm);
        let parts = [info.as_slice()];
        let mut okm = vec![0u8; 42];
        prk.expand(&parts, Len(42)).unwrap().fill(&mut okm).unwrap();
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn both_ends_agree_and_every_input_changes_the_key() {
        let cluster = [7u8; 36];
        let ab = derive_key(&cluster, 0x100, a(), 42, b());
        assert_eq!(ab.len(), 36);
        assert_ne!(ab, cluster.to_vec(), "the cluster key is never used as it is");
        // The receiver computes the same from what the sender published.
        assert_eq!(derive_key(&cluster, 0x100, a(), 42, b()), ab);
        // A→B differs from B→A (even with the same epoch).
        assert_ne!(derive_key(&cluster, 0x100, b(), 42, a()), ab);
        // A new epoch (the sender's SAs made afresh) changes it.
        assert_ne!(derive_key(&cluster, 0x100, a(), 43, b()), ab);
        // So do the SPI, the cluster key, a name and an address.
        assert_ne!(derive_key(&cluster, 0x101, a(), 42, b()), ab);
        assert_ne!(derive_key(&[8u8; 36], 0x100, a(), 42, b()), ab);
        let renamed = End { name: "node3", ..b() };
        assert_ne!(derive_key(&cluster, 0x100, a(), 42, renamed), ab);
        let moved = End {
            addr: "172.30.0.13".parse().unwrap(),
            ..b()
        };
        assert_ne!(derive_key(&cluster, 0x100, a(), 42, moved), ab);
        // The salt (the last 4 bytes, the nonce's fixed part) differs too.
        assert_ne!(derive_key(&cluster, 0x100, b(), 42, a())[32..], ab[32..]);
        // AES-128 keys stay 20 bytes.
        assert_eq!(derive_key(&[7u8; 20], 0x100, a(), 42, b()).len(), 20);
    }

    #[test]
    fn wire_spis_are_per_direction_and_never_reserved() {
        let cluster = [7u8; 36];
        let ab = derive_spi(&cluster, 0x100, a(), 42, b());
        assert_eq!(derive_spi(&cluster, 0x100, a(), 42, b()), ab, "both ends agree");
        assert!(ab >= 256);
        assert_ne!(derive_spi(&cluster, 0x100, b(), 42, a()), ab, "B→A differs");
        assert_ne!(derive_spi(&cluster, 0x100, a(), 43, b()), ab, "a new epoch");
        assert_ne!(derive_spi(&cluster, 0x101, a(), 42, b()), ab, "another cluster key");
        // Three senders to one node: three inbound SPIs.
        let c = End {
            name: "node3",
            addr: "172.30.0.13".parse().unwrap(),
        };
        assert_ne!(derive_spi(&cluster, 0x100, c, 42, b()), ab);
        // The SPI is not the first bytes of the key (separate labels).
        let key = derive_key(&cluster, 0x100, a(), 42, b());
        assert_ne!(u32::from_be_bytes(key[..4].try_into().unwrap()), ab);
    }

    #[test]
    fn names_cannot_shift_into_each_other() {
        // Length prefixes: ("ab", "c") and ("a", "bc") encode differently.
        let x = |n1, n2| info(1, End { name: n1, ..a() }, 0, End { name: n2, ..b() });
        assert_ne!(x("ab", "c"), x("a", "bc"));
    }

    #[test]
    fn the_epoch_is_kept_only_with_the_sas_it_made() {
        assert_eq!(choose_epoch(Some(5), true), 5, "agent restart: SAs kept, same keys");
        assert_ne!(choose_epoch(Some(5), false), 5, "SAs gone (reboot): a new epoch");
        assert_ne!(choose_epoch(None, true), 0);
        assert_ne!(choose_epoch(Some(0), true), 0);
        assert_ne!(new_epoch(), new_epoch());
        // Every datastore can hold it (Kubernetes: int64).
        assert!((0..64).all(|_| (1..=sinew_model::ipsec::MAX_EPOCH).contains(&new_epoch())));
        let big = sinew_model::ipsec::MAX_EPOCH + 1;
        assert_ne!(
            choose_epoch(Some(big), true),
            big,
            "an epoch no datastore holds is replaced"
        );
    }

    fn keys(spis: &[u32]) -> IpsecKeys {
        IpsecKeys {
            keys: spis
                .iter()
                .map(|&spi| sinew_model::ipsec::IpsecKey {
                    spi,
                    key: vec![spi as u8; 36],
                })
                .collect(),
        }
    }

    fn peer(name: &str, last: u8, epoch: u64, spis: &[u32]) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            addr: Ipv4Addr::new(172, 30, 0, last),
            epoch,
            spis: spis.to_vec(),
        }
    }

    const ME: (&str, Ipv4Addr, u64) = ("node1", Ipv4Addr::new(172, 30, 0, 11), 7);

    #[test]
    fn a_peer_set_yields_sas_both_ways_and_policies_for_vxlan_between_node_addresses() {
        let k = keys(&[256]);
        let peers = [
            peer("node2", 12, 9, &[256]),
            peer("node3", 13, 0, &[256]), // no epoch published yet: not a peer
            peer("node4", 14, 5, &[]),    // no SPI published yet: inbound only
            peer("node1", 11, 7, &[256]), // this node
        ];
        let plan = plan(ME, &peers, &k, &[256], false);
        assert_eq!(plan.receive_spis, vec![256]);
        let names: Vec<&str> = plan.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["node2", "node4"]);

        let p2 = &plan.peers[0];
        assert_eq!(p2.send_with, Some(256));
        let (inb, out) = (&p2.inbound[0].sa, &p2.outbound[0].sa);
        assert_eq!(
            (inb.src, inb.dst),
            ("172.30.0.12".parse().unwrap(), "172.30.0.11".parse().unwrap())
        );
        assert_eq!(
            (out.src, out.dst),
            ("172.30.0.11".parse().unwrap(), "172.30.0.12".parse().unwrap())
        );
        assert!(inb.mode == XfrmMode::Transport && out.mode == XfrmMode::Transport);
        assert_eq!((inb.reqid, out.reqid), (REQID, REQID));
        // The wire SPI and key each side derives: node2's view of the same
        // SAs matches (its outbound is this node's inbound).
        let theirs = plan_for_node2(&k);
        let p1 = &theirs.peers[0];
        assert_eq!(p1.outbound[0].sa, *inb, "node2's outbound = node1's inbound");
        assert_eq!(p1.inbound[0].sa, *out, "node2's inbound = node1's outbound");
        assert_ne!(inb.spi, out.spi);
        assert_ne!(inb.key, out.key);
        assert_ne!(out.key, k.keys[0].key, "never the cluster key itself");

        let [pout, pin] = &p2.policies[..] else {
            panic!("{:?}", p2.policies)
        };
        assert_eq!(pout.dir, Dir::Out);
        assert_eq!(pout.sel, selector(ME.1, Ipv4Addr::new(172, 30, 0, 12), false));
        assert_eq!((pout.sel.proto, pout.sel.dport), (17, VXLAN_PORT));
        assert_eq!(pout.tmpl.spi, out.spi, "the out policy names the SA in use");
        assert_eq!(pin.dir, Dir::In);
        assert_eq!(pin.sel.src.addr, "172.30.0.12".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(pin.tmpl.spi, 0, "any of the peer's SAs (two during a rotation)");

        // node4 published no SPI: it can send to us, we do not send to it.
        let p4 = &plan.peers[1];
        assert_eq!((p4.inbound.len(), p4.outbound.len(), p4.send_with), (1, 0, None));
        assert!(p4.policies.is_empty());

        // --encrypt-node: everything between the node addresses.
        let all = plan_all(&k);
        assert_eq!(
            (all.peers[0].policies[0].sel.proto, all.peers[0].policies[0].sel.dport),
            (0, 0)
        );
    }

    fn plan_for_node2(k: &IpsecKeys) -> Plan {
        plan(
            ("node2", Ipv4Addr::new(172, 30, 0, 12), 9),
            &[peer("node1", 11, 7, &[256])],
            k,
            &[256],
            false,
        )
    }

    fn plan_all(k: &IpsecKeys) -> Plan {
        plan(ME, &[peer("node2", 12, 9, &[256])], k, &[256], true)
    }

    #[test]
    fn a_sender_switches_only_once_the_peer_receives_with_the_new_key() {
        let k = keys(&[256, 300]);
        // The new key is in the datastore: we receive with both at once.
        let before = plan(ME, &[peer("node2", 12, 9, &[256])], &k, &[256, 300], false);
        assert_eq!(before.receive_spis, vec![256, 300]);
        let p = &before.peers[0];
        assert_eq!(p.inbound.len(), 2, "inbound SAs for both keys");
        assert_eq!(p.send_with, Some(256), "the peer has not published 300 yet");
        assert_eq!(p.outbound.len(), 1);
        // The peer publishes 300: traffic moves to it, the old SA stays.
        let after = plan(ME, &[peer("node2", 12, 9, &[256, 300])], &k, &[256, 300], false);
        let p = &after.peers[0];
        assert_eq!(p.send_with, Some(300));
        assert_eq!(p.outbound.len(), 2, "the old outbound SA stays for the grace period");
        assert_eq!(p.policies[0].tmpl.spi, p.outbound[1].sa.spi);
        // Grace over: only the new key anywhere.
        let done = plan(ME, &[peer("node2", 12, 9, &[300])], &k, &[300], false);
        let p = &done.peers[0];
        assert_eq!((p.inbound.len(), p.outbound.len(), p.send_with), (1, 1, Some(300)));
        assert_eq!(p.inbound[0].cluster_spi, 300);
        // A peer that still only receives with a retired key gets nothing
        // (dropped, never in clear).
        let stale = plan(ME, &[peer("node2", 12, 9, &[256])], &k, &[300], false);
        assert_eq!(stale.peers[0].send_with, None);
        assert!(stale.peers[0].policies.is_empty());
        // A key the datastore no longer has is never planned.
        let gone = plan(ME, &[peer("node2", 12, 9, &[256, 999])], &k, &[256, 999], false);
        assert_eq!(gone.peers[0].send_with, Some(256));
        assert_eq!(gone.receive_spis, vec![256]);
    }

    #[test]
    fn a_peer_with_a_new_epoch_gets_new_inbound_sas() {
        let k = keys(&[256]);
        let a = plan(ME, &[peer("node2", 12, 9, &[256])], &k, &[256], false);
        let b = plan(ME, &[peer("node2", 12, 10, &[256])], &k, &[256], false);
        assert_ne!(a.peers[0].inbound[0].sa.spi, b.peers[0].inbound[0].sa.spi);
        assert_ne!(a.peers[0].inbound[0].sa.key, b.peers[0].inbound[0].sa.key);
        assert_eq!(a.peers[0].outbound, b.peers[0].outbound, "our own epoch did not change");
    }

    #[test]
    fn older_keys_stay_for_the_grace_period_after_a_newer_one_appears() {
        let grace = Duration::from_secs(60);
        let mut r = Rotation::new(grace);
        let t0 = Instant::now();
        assert_eq!(r.active(&keys(&[]), t0), Vec::<u32>::new());
        // An agent that starts with two keys keeps both for the grace
        // period (a peer may still send with the older one).
        assert_eq!(r.active(&keys(&[256, 300]), t0), vec![256, 300]);
        assert!(r.in_grace(t0));
        assert_eq!(r.active(&keys(&[256, 300]), t0 + grace), vec![300]);
        assert!(!r.in_grace(t0 + grace));
        // A new key: the grace period starts again from when it is seen.
        let t1 = t0 + grace * 2;
        assert_eq!(r.active(&keys(&[256, 300, 400]), t1), vec![256, 300, 400]);
        assert_eq!(r.active(&keys(&[256, 300, 400]), t1 + grace / 2), vec![256, 300, 400]);
        assert_eq!(r.active(&keys(&[256, 300, 400]), t1 + grace), vec![400]);
        // The old key removed from the datastore: gone at once.
        assert_eq!(r.active(&keys(&[400]), t1 + grace / 2), vec![400]);
        assert!(r.newest_seen().is_some());
    }

    #[test]
    fn the_epoch_survives_in_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_epoch(dir.path()), None);
        write_epoch(dir.path(), 0x1234_5678_9abc).unwrap();
        assert_eq!(read_epoch(dir.path()), Some(0x1234_5678_9abc));
        std::fs::write(dir.path().join(EPOCH_FILE), "garbage").unwrap();
        assert_eq!(read_epoch(dir.path()), None);
    }

    #[test]
    fn peers_are_the_other_nodes_that_published_an_epoch() {
        let mut snap = sinew_model::Snapshot::default();
        for (n, ip) in [
            ("node1", "172.30.0.11"),
            ("node2", "172.30.0.12"),
            ("node3", "172.30.0.13"),
        ] {
            snap.nodes.insert(
                n.into(),
                sinew_model::NodeInfo {
                    name: n.into(),
                    pod_cidrs: vec![],
                    internal_ip: ip.parse().unwrap(),
                    source: String::new(),
                },
            );
            snap.node_keys.insert(
                n.into(),
                sinew_model::NodeKeyInfo {
                    node: n.into(),
                    ipsec_epoch: if n == "node3" { 0 } else { 5 },
                    ipsec_spis: vec![256],
                    ..Default::default()
                },
            );
        }
        let peers = peers_of(&snap, "node1");
        assert_eq!(peers, vec![peer("node2", 12, 5, &[256])]);
    }
}
