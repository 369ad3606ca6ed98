//! The flow observer: reads the datapath's event ring on its own OS
//! thread (so neither the API's tokio runtime nor the observer can starve
//! the other), names both sides of every flow from an index copied out of
//! [`NodeState`](crate::state::NodeState), keeps the most recent flows in a
//! bounded buffer and fans new ones out to followers. Nothing is lost
//! without a count: events the datapath could not write (its ring was
//! full), flows a slow follower missed.
//!
//! The observer never holds the node state lock while it decodes: it
//! refreshes its index and the datapath's lost counters every
//! [`ObserverConfig::tick`], with `try_lock`, so a long API call delays a
//! refresh, never the draining of the ring.

mod api;
mod enrich;
mod filter;
mod index;
pub mod render;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use sinew_abi::{DropReason, FlowEvent};
use sinew_proto::observer_v1 as pb;
use tokio::sync::broadcast;

use crate::state::NodeState;

pub use api::ObserverApi;
pub use enrich::{enrich, event_type_name, parse_protocol, protocol_name};
pub use filter::{matches, selects};
pub use index::{ObserverIndex, Peer};

/// Event types, indexed like the datapath's lost counters (EVENT_*).
pub const EVENT_TYPES: [(u8, &str); 3] = [
    (sinew_abi::EVENT_TRACE, "trace"),
    (sinew_abi::EVENT_DROP, "drop"),
    (sinew_abi::EVENT_POLICY, "policy-verdict"),
];
const TYPES: usize = sinew_abi::EVENT_TYPE_MAX as usize;
const PROTOS: [(u8, &str); 4] = [
    (enrich::PROTO_TCP, "tcp"),
    (enrich::PROTO_UDP, "udp"),
    (enrich::PROTO_ICMP, "icmp"),
    (enrich::PROTO_SCTP, "sctp"),
];

#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("cannot start the flow observer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("agent state is poisoned after a panic; restart sinew-agent")]
    Poisoned,
}

#[derive(Clone, Debug)]
pub struct ObserverConfig {
    pub node_name: String,
    /// Flows kept for GetFlows (`--flow-buffer-size`).
    pub buffer_size: usize,
    /// The datapath ring's size, for ServerStatus.
    pub event_ring_bytes: u64,
    /// How often the index and the lost counters are refreshed.
    pub tick: Duration,
}

/// Counters of the observer, shared with the API and metrics. Every field
/// only grows, except `buffered` and `followers`.
#[derive(Debug, Default)]
pub struct ObserverStats {
    /// Flows read, per EVENT_* type (index 0: unknown types).
    seen_by_type: [AtomicU64; TYPES],
    /// Per VERDICT_* (index 0: unknown).
    seen_by_verdict: [AtomicU64; 3],
    /// Per protocol of [`PROTOS`], then "other".
    seen_by_proto: [AtomicU64; PROTOS.len() + 1],
    /// Drop events per drop reason code (codes past the array are counted
    /// by type and verdict only).
    seen_by_reason: [AtomicU64; 32],
    /// Lost in the datapath (ring full) since the observer started, per
    /// EVENT_* type: the exact deltas of `sinew_events_lost`.
    datapath_lost: [AtomicU64; TYPES],
    /// Flows a slow follower missed, summed over followers.
    follower_dropped: AtomicU64,
    /// Ring records too short to decode.
    decode_errors: AtomicU64,
    buffered: AtomicU64,
    capacity: AtomicU64,
    followers: AtomicU64,
}

/// A consistent-enough copy of [`ObserverStats`] (each counter is read
/// once; counters move independently).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserverStatsSnapshot {
    /// ("trace" | "drop" | "policy-verdict", flows read).
    pub flows_by_type: Vec<(&'static str, u64)>,
    /// Flows of a type this agent does not know (a newer datapath).
    pub flows_unknown_type: u64,
    /// ("forwarded" | "dropped", flows read).
    pub flows_by_verdict: Vec<(&'static str, u64)>,
    /// ("tcp" | "udp" | "icmp" | "sctp" | "other", flows read).
    pub flows_by_protocol: Vec<(&'static str, u64)>,
    /// (drop reason label, drop events read), reasons seen at least once.
    pub flows_by_drop_reason: Vec<(&'static str, u64)>,
    /// ("trace" | "drop" | "policy-verdict", events the datapath could not
    /// write since the observer started).
    pub events_lost: Vec<(&'static str, u64)>,
    pub follower_dropped: u64,
    pub decode_errors: u64,
    /// Flows in the buffer now and its capacity.
    pub buffered: u64,
    pub capacity: u64,
    pub followers: u64,
}

impl ObserverStatsSnapshot {
    /// Every flow read, whatever its type.
    pub fn flows_total(&self) -> u64 {
        self.flows_by_type.iter().map(|(_, n)| n).sum::<u64>() + self.flows_unknown_type
    }
    pub fn events_lost_total(&self) -> u64 {
        self.events_lost.iter().map(|(_, n)| n).sum()
    }
}

impl ObserverStats {
    pub fn snapshot(&self) -> ObserverStatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ObserverStatsSnapshot {
            flows_by_type: EVENT_TYPES
                .iter()
                .map(|(t, n)| (*n, get(&self.seen_by_type[usize::from(*t)])))
                .collect(),
            flows_unknown_type: get(&self.seen_by_type[0]),
            flows_by_verdict: vec![
                (
                    "forwarded",
                    get(&self.seen_by_verdict[usize::from(sinew_abi::VERDICT_FORWARDED)]),
                ),
                (
                    "dropped",
                    get(&self.seen_by_verdict[usize::from(sinew_abi::VERDICT_DROPPED)]),
                ),
            ],
            flows_by_protocol: PROTOS
                .iter()
                .enumerate()
                .map(|(i, (_, n))| (*n, get(&self.seen_by_proto[i])))
                .chain([("other", get(&self.seen_by_proto[PROTOS.len()]))])
                .collect(),
            flows_by_drop_reason: DropReason::ALL
                .iter()
                .map(|r| (r.label(), get(&self.seen_by_reason[usize::from(r.code())])))
                .filter(|(_, n)| *n > 0)
                .collect(),
            events_lost: EVENT_TYPES
                .iter()
                .map(|(t, n)| (*n, get(&self.datapath_lost[usize::from(*t)])))
                .collect(),
            follower_dropped: get(&self.follower_dropped),
            decode_errors: get(&self.decode_errors),
            buffered: get(&self.buffered),
            capacity: get(&self.capacity),
            followers: get(&self.followers),
        }
    }

    fn count(&self, ev: &FlowEvent) {
        let bump = |a: &AtomicU64| {
            a.fetch_add(1, Ordering::Relaxed);
        };
        let t = usize::from(ev.r#type);
        bump(&self.seen_by_type[if t < TYPES { t } else { 0 }]);
        bump(&self.seen_by_verdict[usize::from(ev.verdict).min(2)]);
        let p = PROTOS.iter().position(|(p, _)| *p == ev.proto).unwrap_or(PROTOS.len());
        bump(&self.seen_by_proto[p]);
        // Drop events only: a denied policy verdict is the same packet's
        // decision, and its drop event counts it.
        if ev.r#type == sinew_abi::EVENT_DROP {
            if let Some(a) = self.seen_by_reason.get(usize::from(ev.reason)) {
                bump(a);
            }
        }
    }

    pub(crate) fn follower_lagged(&self, n: u64) {
        self.follower_dropped.fetch_add(n, Ordering::Relaxed);
    }
}

struct Buffer {
    flows: VecDeque<Arc<pb::Flow>>,
    tx: broadcast::Sender<Arc<pb::Flow>>,
}

struct Shared {
    cfg: ObserverConfig,
    buffer: Mutex<Buffer>,
    stats: Arc<ObserverStats>,
    started: Instant,
    started_unix_nanos: u64,
    enabled: bool,
}

/// Handle to the observer: cheap to clone, shared by the API.
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Shared>,
}

/// Nanoseconds of a clock, 0 if it cannot be read.
fn clock_ns(id: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(id)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub fn now_unix_nanos() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_REALTIME)
}

impl Observer {
    fn new(cfg: ObserverConfig, enabled: bool) -> Observer {
        let stats = Arc::new(ObserverStats::default());
        stats.capacity.store(cfg.buffer_size as u64, Ordering::Relaxed);
        // Followers may fall this far behind before they miss flows.
        let (tx, _) = broadcast::channel(cfg.buffer_size.clamp(1024, 65536));
        Observer {
            shared: Arc::new(Shared {
                buffer: Mutex::new(Buffer {
                    flows: VecDeque::with_capacity(cfg.buffer_size.min(65536)),
                    tx,
                }),
                cfg,
                stats,
                started: Instant::now(),
                started_unix_nanos: now_unix_nanos(),
                enabled,
            }),
        }
    }

    /// An observer that never sees a flow (the agent runs with
    /// `--events=false`): the API still answers, with zero counts.
    pub fn disabled(cfg: ObserverConfig) -> Observer {
        Self::new(cfg, false)
    }

    /// Starts the consumer thread on `ring`. The datapath's lost counters
    /// are read now as the baseline, so ServerStatus reports what this
    /// agent lost, not what earlier ones did.
    pub fn start(
        ring: RingBuf<MapData>,
        state: Arc<Mutex<NodeState>>,
        cfg: ObserverConfig,
    ) -> Result<Observer, ObserverError> {
        let obs = Self::new(cfg, true);
        let (index, fingerprint, lost) = {
            let s = state.lock().map_err(|_| ObserverError::Poisoned)?;
            (s.observer_index(), s.observer_fingerprint(), s.datapath.events_lost())
        };
        let consumer = Consumer {
            shared: obs.shared.clone(),
            state,
            index,
            fingerprint,
            lost,
            ifnames: HashMap::new(),
            sequence: 0,
            last_refresh: Instant::now(),
        };
        std::thread::Builder::new()
            .name("sinew-observer".into())
            .spawn(move || consumer.run(ring))
            .map_err(ObserverError::Spawn)?;
        Ok(obs)
    }

    pub fn stats(&self) -> Arc<ObserverStats> {
        self.shared.stats.clone()
    }

    pub fn node_name(&self) -> &str {
        &self.shared.cfg.node_name
    }

    pub fn enabled(&self) -> bool {
        self.shared.enabled
    }

    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub fn started_unix_nanos(&self) -> u64 {
        self.shared.started_unix_nanos
    }

    pub fn event_ring_bytes(&self) -> u64 {
        self.shared.cfg.event_ring_bytes
    }

    /// The buffered flows the request selects (oldest first, at most
    /// `number` of the newest when set) and, when following, a receiver of
    /// new flows taken under the same lock, so that no flow is missed or
    /// sent twice between the two.
    pub fn history(
        &self,
        req: &pb::GetFlowsRequest,
    ) -> (Vec<Arc<pb::Flow>>, Option<broadcast::Receiver<Arc<pb::Flow>>>) {
        let b = self.shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<pb::Flow>> = Vec::new();
        let limit = usize::try_from(req.number).unwrap_or(usize::MAX);
        for f in b.flows.iter().rev() {
            if limit != 0 && out.len() >= limit {
                break;
            }
            if filter::selects(req, f) {
                out.push(f.clone());
            }
        }
        out.reverse();
        let rx = req.follow.then(|| b.tx.subscribe());
        (out, rx)
    }

    pub(crate) fn follower_started(&self) {
        self.shared.stats.followers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn follower_stopped(&self) {
        self.shared.stats.followers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds flows to the buffer and sends them to followers.
    fn publish(&self, flows: Vec<pb::Flow>) {
        let mut b = self.shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let cap = self.shared.cfg.buffer_size;
        for f in flows {
            let f = Arc::new(f);
            if cap > 0 {
                if b.flows.len() >= cap {
                    b.flows.pop_front();
                }
                b.flows.push_back(f.clone());
            }
            // An error only means nobody follows.
            let _ = b.tx.send(f);
        }
        self.shared
            .stats
            .buffered
            .store(b.flows.len() as u64, Ordering::Relaxed);
    }
}

/// The state of the consumer thread.
struct Consumer {
    shared: Arc<Shared>,
    state: Arc<Mutex<NodeState>>,
    index: ObserverIndex,
    fingerprint: u64,
    /// The datapath's lost counters at the last read.
    lost: Vec<u64>,
    ifnames: HashMap<u32, String>,
    sequence: u64,
    last_refresh: Instant,
}

/// The least time between two refreshes caused by unknown addresses.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(50);

/// Records decoded per publish: bounds the time the buffer lock is held.
const BATCH: usize = 512;

const POLL_EVERY: Duration = Duration::from_millis(20);

impl Consumer {
    fn run(mut self, mut ring: RingBuf<MapData>) {
        let obs = Observer {
            shared: self.shared.clone(),
        };
        let tick = self.shared.cfg.tick;
        let mut next_refresh = Instant::now() + tick;
        loop {
            // The datapath wakes us only when a quarter of the ring waits
            // (no wakeup per record): poll at least every 20 ms.
            let wait = next_refresh
                .saturating_duration_since(Instant::now())
                .min(tick)
                .min(POLL_EVERY);
            {
                let mut fds = [nix::poll::PollFd::new(ring.as_fd(), nix::poll::PollFlags::POLLIN)];
                let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
                match nix::poll::poll(&mut fds, ms) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot poll the flow event ring; retrying in a second");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            self.drain(&mut ring, &obs);
            if Instant::now() >= next_refresh {
                next_refresh = Instant::now() + if self.refresh() { tick } else { tick / 5 };
            }
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>, obs: &Observer) {
        // Monotonic (bpf_ktime_get_ns) to wall clock, once per drain: the
        // offset only moves when the wall clock is stepped.
        let offset =
            clock_ns(nix::time::ClockId::CLOCK_REALTIME).wrapping_sub(clock_ns(nix::time::ClockId::CLOCK_MONOTONIC));
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let ev = match ring.next() {
                Some(item) => FlowEvent::from_bytes(&item),
                None => break,
            };
            let Some(ev) = ev else {
                self.shared.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            self.shared.stats.count(&ev);
            self.sequence += 1;
            if self.stale(&ev) {
                // A pod that started a moment ago sends at once: refresh
                // now (rate-limited, never waiting for the lock) rather
                // than name it by address forever in the buffer.
                if self.last_refresh.elapsed() >= MIN_REFRESH_GAP {
                    self.refresh_with(true);
                }
            }
            let ifname = self.ifname(ev.ifindex);
            batch.push(enrich::enrich(
                &ev,
                &self.index,
                ev.ts_ns.wrapping_add(offset),
                self.sequence,
                &ifname,
            ));
            if batch.len() >= BATCH {
                obs.publish(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
            }
        }
        if !batch.is_empty() {
            obs.publish(batch);
        }
    }

    /// Whether the event names something the index does not know yet: an
    /// endpoint id, a rule, or an address in a pod CIDR.
    fn stale(&self, ev: &FlowEvent) -> bool {
        let unknown_pod = |a: u32| {
            let ip = std::net::Ipv4Addr::from(u32::from_be(a));
            !self.index.by_ip.contains_key(&ip) && self.index.pod_cidrs.iter().any(|c| c.contains(&ip))
        };
        (ev.ep_id != 0 && !self.index.by_endpoint.contains_key(&ev.ep_id))
            || (ev.rule_id != 0 && self.index.rule(ev.rule_id).is_none())
            || unknown_pod(ev.saddr)
            || unknown_pod(ev.daddr)
    }

    fn ifname(&mut self, ifindex: u32) -> String {
        if let Some(n) = self.index.interfaces.get(&ifindex) {
            return n.clone();
        }
        self.ifnames
            .entry(ifindex)
            .or_insert_with(|| {
                nix::net::if_::if_indextoname(ifindex)
                    .ok()
                    .and_then(|c| c.into_string().ok())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// Reads the lost counters and, if the state changed, rebuilds the
    /// index. False when the state was busy (retry soon).
    fn refresh(&mut self) -> bool {
        self.refresh_with(false)
    }

    /// Rebuilds the index if the node state moved. The periodic refresh
    /// never waits for the state lock; a refresh for an event that names
    /// something unknown does (rate-limited), or the flow would keep an
    /// address instead of a name forever.
    fn refresh_with(&mut self, wait: bool) -> bool {
        let s = if wait {
            match self.state.lock() {
                Ok(s) => s,
                Err(_) => return true,
            }
        } else {
            match self.state.try_lock() {
                Ok(s) => s,
                Err(std::sync::TryLockError::WouldBlock) => return false,
                Err(std::sync::TryLockError::Poisoned(_)) => return true,
            }
        };
        // Only a refresh that got the lock counts for the rate limit: a
        // missed periodic one must not delay the one an unknown name needs.
        self.last_refresh = Instant::now();
        let lost = s.datapath.events_lost();
        let fp = s.observer_fingerprint();
        // The index is a function of what the fingerprint covers: rebuild
        // only when it moved.
        let rebuilt = if fp != self.fingerprint {
            self.index = s.observer_index();
            self.fingerprint = fp;
            true
        } else {
            false
        };
        drop(s);
        if rebuilt {
            self.ifnames.clear();
        }
        for (t, (now, before)) in lost.iter().zip(self.lost.iter()).enumerate() {
            let delta = now.saturating_sub(*before);
            if delta > 0 {
                self.shared.stats.datapath_lost[t.min(TYPES - 1)].fetch_add(delta, Ordering::Relaxed);
                tracing::debug!(
                    event_type = t,
                    lost = delta,
                    "flow events lost: the datapath ring was full"
                );
            }
        }
        self.lost = lost;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observer(buffer_size: usize) -> Observer {
        Observer::disabled(ObserverConfig {
            node_name: "n1".into(),
            buffer_size,
            event_ring_bytes: 4096,
            tick: Duration::from_millis(250),
        })
    }

    fn flow(sequence: u64, port: u32) -> pb::Flow {
        pb::Flow {
            sequence,
            source: Some(pb::Endpoint {
                port,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn buffer_keeps_the_newest_and_history_then_follow_has_no_gap() {
        let obs = observer(3);
        obs.publish((1..=5).map(|s| flow(s, 80)).collect());
        let all = pb::GetFlowsRequest::default();
        let (h, rx) = obs.history(&all);
        assert_eq!(h.iter().map(|f| f.sequence).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(rx.is_none());
        assert_eq!(obs.stats().snapshot().buffered, 3);
        let last = pb::GetFlowsRequest {
            number: 2,
            follow: true,
            filters: vec![pb::FlowFilter {
                port: Some(80),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (h, rx) = obs.history(&last);
        assert_eq!(h.iter().map(|f| f.sequence).collect::<Vec<_>>(), [4, 5]);
        let mut rx = rx.expect("following subscribes");
        obs.publish(vec![flow(6, 443)]);
        assert_eq!(
            rx.try_recv().unwrap().sequence,
            6,
            "followers get every new flow; the server filters"
        );
    }

    #[test]
    fn counts_by_type_verdict_protocol_and_drop_reason() {
        let stats = ObserverStats::default();
        let drop = FlowEvent {
            r#type: sinew_abi::EVENT_DROP,
            verdict: sinew_abi::VERDICT_DROPPED,
            reason: DropReason::Policy.code(),
            proto: enrich::PROTO_UDP,
            ..Default::default()
        };
        let denied_verdict = FlowEvent {
            r#type: sinew_abi::EVENT_POLICY,
            ..drop
        };
        stats.count(&drop);
        stats.count(&denied_verdict);
        stats.count(&FlowEvent {
            r#type: 200,
            proto: 47,
            ..Default::default()
        });
        let s = stats.snapshot();
        assert_eq!(s.flows_total(), 3, "unknown types count too: {s:?}");
        assert_eq!(s.flows_unknown_type, 1);
        assert_eq!(s.flows_by_type, [("trace", 0), ("drop", 1), ("policy-verdict", 1)]);
        assert_eq!(s.flows_by_verdict, [("forwarded", 0), ("dropped", 2)]);
        assert_eq!(s.flows_by_protocol[1], ("udp", 2));
        assert_eq!(s.flows_by_protocol[4], ("other", 1));
        assert_eq!(s.flows_by_drop_reason, [("policy_denied", 1)], "a drop is counted once");
    }
}
