//! The flow observer: reads the datapath's event ring on its own OS
//! thread (so neither the API's tokio runtime nor the observer can starve
//! the other), names both sides of every flow from an index copied out of
//! [`NodeState`](crate::state::NodeState), keeps the most recent flows in a
//! bounded buffer and fans new ones out to followers. Nothing is lost
//! without a count: events the datapath could not write (its ring was
//! full), flows a slow follower missed.
//!
//! The same thread runs the datapath's flow flush every
//! [`ObserverConfig::flush_every`], so that the last packets of a flow
//! are reported although no later packet comes (see `bpf/bpf_flush.c`).
//!
//! The observer never holds the node state lock while it decodes: it
//! refreshes its index and the datapath's lost counters every
//! [`ObserverConfig::tick`], with `try_lock`, so a long API call delays a
//! refresh, never the draining of the ring.

mod api;
mod enrich;
mod index;

use sinew_flows::filter;
/// Rendering lives in `sinew-flows`, shared with the CLI.
pub use sinew_flows::render;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use sinew_abi::{DropReason, FlowEvent};
use sinew_proto::observer_v1 as pb;
use tokio::sync::watch;

use crate::datapath::FlowFlusher;
use crate::state::NodeState;

pub use api::ObserverApi;
pub use enrich::enrich;
pub use index::{Isolation, Names, ObserverIndex, Peer};
pub use sinew_flows::{
    check_label, check_namespace, check_pod, event_type_name, matches, now_unix_nanos, parse_protocol, protocol_name,
    selects, FilterError,
};

/// Event types, indexed like the datapath's lost counters (EVENT_*).
pub const EVENT_TYPES: [(u8, &str); 3] = [
    (sinew_abi::EVENT_TRACE, "trace"),
    (sinew_abi::EVENT_DROP, "drop"),
    (sinew_abi::EVENT_POLICY, "policy-verdict"),
];
const TYPES: usize = sinew_abi::EVENT_TYPE_MAX as usize;
const PROTOS: [(u8, &str); 4] = [
    (sinew_flows::PROTO_TCP, "tcp"),
    (sinew_flows::PROTO_UDP, "udp"),
    (sinew_flows::PROTO_ICMP, "icmp"),
    (sinew_flows::PROTO_SCTP, "sctp"),
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
    /// How often the datapath's flow aggregates are flushed: a fraction
    /// of the report interval, so that an idle flow's last counts come
    /// about one interval after its last packet.
    pub flush_every: Duration,
}

impl ObserverConfig {
    /// The flush period for a report interval: a quarter of it, between
    /// 20 ms and the refresh tick.
    pub fn flush_period(report_interval: Duration, tick: Duration) -> Duration {
        (report_interval / 4).clamp(Duration::from_millis(20), tick.max(Duration::from_millis(20)))
    }
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
    /// Trace reports the flow flush wrote (they are read and counted as
    /// flows like any other), and flush runs that failed.
    flush_reports: AtomicU64,
    flush_errors: AtomicU64,
    buffered: AtomicU64,
    capacity: AtomicU64,
    followers: AtomicU64,
    /// L7 requests the proxy reported, and events it could not send.
    l7_seen: AtomicU64,
    l7_lost: AtomicU64,
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
    /// Trace reports written by the flow flush, and failed flush runs.
    pub flush_reports: u64,
    pub flush_errors: u64,
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
                .chain([("l7", get(&self.l7_seen))])
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
                .chain([("l7", get(&self.l7_lost))])
                .collect(),
            follower_dropped: get(&self.follower_dropped),
            decode_errors: get(&self.decode_errors),
            flush_reports: get(&self.flush_reports),
            flush_errors: get(&self.flush_errors),
            buffered: get(&self.buffered),
            capacity: get(&self.capacity),
            followers: get(&self.followers),
        }
    }

    /// Decodes one ring record and counts it; `None`, counted as a
    /// decode error, when it is too short (a newer or broken producer).
    /// The record's bytes come from the datapath: whatever they are, this
    /// must not panic (the `flow_record` fuzz target runs it, then
    /// [`Observer::flow`], on arbitrary bytes).
    pub fn decode(&self, record: &[u8]) -> Option<FlowEvent> {
        let Some(ev) = FlowEvent::from_bytes(record) else {
            self.decode_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.count(&ev);
        Some(ev)
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

/// One flow as read from the ring, stored raw: naming it costs nothing
/// until somebody reads it (`sinew observe`), so a busy node pays for the
/// copy and the counters, not for strings and label maps per packet.
#[derive(Clone, Debug)]
pub struct Record {
    pub ev: FlowEvent,
    /// Set for a request the L7 proxy judged (then `ev` is empty): its
    /// batch, kept as the proxy packed it, and its place there.
    pub l7: Option<(Arc<sinew_proto::proxy_v1::FlowEvents>, u32)>,
    pub time_unix_nanos: u64,
    pub sequence: u64,
    /// The index current when the event was read (see [`Names`]).
    pub index: Arc<ObserverIndex>,
}

/// The recent records, oldest first. Followers read it by sequence number,
/// so the newest `max(buffer_size, FOLLOW_WINDOW)` records are kept even
/// when history is smaller.
struct Buffer {
    records: VecDeque<Record>,
    /// The sequence number the next record will have (records are
    /// numbered from 1 without gaps).
    next_sequence: u64,
}

/// Records a follower may fall behind before it misses some.
const FOLLOW_WINDOW: usize = 4096;

struct Shared {
    cfg: ObserverConfig,
    buffer: Mutex<Buffer>,
    /// The newest index, for names a record's own index lacks.
    current: RwLock<Arc<ObserverIndex>>,
    /// The sequence of the newest record: followers wait on it.
    newest: watch::Sender<u64>,
    /// Interface names that no index knows (uplink, tunnel device).
    ifnames: Mutex<HashMap<u32, String>>,
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

/// What a follower gets from [`Observer::read_from`].
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// Records that left the buffer before the follower read them.
    pub missed: u64,
    /// The sequence to ask for next.
    pub next: u64,
}

impl Observer {
    fn new(cfg: ObserverConfig, enabled: bool, index: ObserverIndex) -> Observer {
        let stats = Arc::new(ObserverStats::default());
        stats.capacity.store(cfg.buffer_size as u64, Ordering::Relaxed);
        let keep = cfg.buffer_size.max(FOLLOW_WINDOW);
        Observer {
            shared: Arc::new(Shared {
                buffer: Mutex::new(Buffer {
                    records: VecDeque::with_capacity(keep.min(65536)),
                    next_sequence: 1,
                }),
                current: RwLock::new(Arc::new(index)),
                newest: watch::channel(0).0,
                ifnames: Mutex::new(HashMap::new()),
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
        Self::new(cfg, false, ObserverIndex::default())
    }

    /// Starts the consumer thread on `ring`. The datapath's lost counters
    /// are read now as the baseline, so ServerStatus reports what this
    /// agent lost, not what earlier ones did.
    pub fn start(
        ring: RingBuf<MapData>,
        flusher: Option<FlowFlusher>,
        state: Arc<Mutex<NodeState>>,
        cfg: ObserverConfig,
    ) -> Result<Observer, ObserverError> {
        let (index, fingerprint, lost) = {
            let s = state.lock().map_err(|_| ObserverError::Poisoned)?;
            (s.observer_index(), s.observer_fingerprint(), s.datapath.events_lost())
        };
        let obs = Self::new(cfg, true, index);
        let consumer = Consumer {
            index: obs.current_index(),
            shared: obs.shared.clone(),
            state,
            fingerprint,
            lost,
            last_refresh: Instant::now(),
            flusher,
            flush_failing_since: None,
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

    pub(crate) fn current_index(&self) -> Arc<ObserverIndex> {
        self.shared.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_current_index(&self, idx: Arc<ObserverIndex>) {
        *self.shared.current.write().unwrap_or_else(|e| e.into_inner()) = idx;
    }

    /// The API's view of a stored record, named with its own index and,
    /// for what that lacks, the newest one.
    pub fn flow(&self, r: &Record, now: &ObserverIndex) -> pb::Flow {
        let names = Names { then: &r.index, now };
        if let Some(l7) = r.l7.as_ref().and_then(|(batch, i)| batch.flow(*i as usize)) {
            return enrich::enrich_l7(&l7, names, r.sequence);
        }
        let ifname = match names.interface(r.ev.ifindex) {
            Some(n) => n.to_string(),
            None => self.interface_name(r.ev.ifindex),
        };
        enrich::enrich(&r.ev, names, r.time_unix_nanos, r.sequence, &ifname)
    }

    fn interface_name(&self, ifindex: u32) -> String {
        if ifindex == 0 {
            return String::new();
        }
        let mut names = self.shared.ifnames.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() > 4096 {
            // Devices come and go; the cache only saves a syscall.
            names.clear();
        }
        names
            .entry(ifindex)
            .or_insert_with(|| {
                nix::net::if_::if_indextoname(ifindex)
                    .ok()
                    .and_then(|c| c.into_string().ok())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// The buffered flows the request selects (oldest first, at most
    /// `number` of the newest when set), and the sequence a follower
    /// continues from, so that no flow is missed or sent twice between
    /// history and follow. Records are copied under the lock and named
    /// after it.
    pub fn history(&self, req: &pb::GetFlowsRequest) -> (Vec<pb::Flow>, u64) {
        let (records, next) = {
            let b = self.shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
            let keep = self.shared.cfg.buffer_size.min(b.records.len());
            let skip = b.records.len() - keep;
            (
                b.records.iter().skip(skip).cloned().collect::<Vec<_>>(),
                b.next_sequence,
            )
        };
        let now = self.current_index();
        let limit = usize::try_from(req.number).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for r in records.iter().rev() {
            if limit != 0 && out.len() >= limit {
                break;
            }
            // The time range is known before naming.
            if req.since_unix_nanos != 0 && r.time_unix_nanos < req.since_unix_nanos {
                continue;
            }
            let f = self.flow(r, &now);
            if filter::selects(req, &f) {
                out.push(f);
            }
        }
        out.reverse();
        (out, next)
    }

    /// Up to `max` records from sequence `from` on; `missed` counts the
    /// ones that already left the buffer.
    pub fn read_from(&self, from: u64, max: usize) -> Batch {
        let b = self.shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let first = b.next_sequence - b.records.len() as u64;
        let start = from.max(first);
        let skip = usize::try_from(start - first).unwrap_or(usize::MAX);
        let records: Vec<Record> = b.records.iter().skip(skip).take(max).cloned().collect();
        Batch {
            missed: start - from.min(start),
            next: start + records.len() as u64,
            records,
        }
    }

    /// Waits until a record with sequence `seq` or later exists.
    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.shared.newest.subscribe();
        // An error means the observer is gone: nothing will come.
        let _ = rx.wait_for(|newest| *newest >= seq).await;
    }

    pub(crate) fn follower_started(&self) {
        self.shared.stats.followers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn follower_stopped(&self) {
        self.shared.stats.followers.fetch_sub(1, Ordering::Relaxed);
    }

    /// What the L7 proxy's control stream hands its flow events to.
    pub fn l7_sink(&self) -> crate::proxy::control::FlowSink {
        let obs = self.clone();
        Arc::new(move |batch| obs.publish_l7(batch))
    }

    /// Stores the requests the L7 proxy judged, as flows like the
    /// datapath's (same buffer, same sequence numbers, same followers),
    /// and counts the events it could not send. The batch is kept as it
    /// came, shared by its records: an event's strings are made only when
    /// somebody reads it.
    pub fn publish_l7(&self, batch: sinew_proto::proxy_v1::FlowEvents) {
        let stats = &self.shared.stats;
        let lost = batch.lost;
        stats.l7_lost.fetch_add(lost, Ordering::Relaxed);
        if lost > 0 {
            tracing::debug!(lost, "L7 flow events lost: the proxy's queue was full");
        }
        stats.l7_seen.fetch_add(batch.flows.len() as u64, Ordering::Relaxed);
        let index = self.current_index();
        let batch = Arc::new(batch);
        let records = batch
            .flows
            .iter()
            .enumerate()
            .map(|(i, f)| Record {
                ev: FlowEvent::default(),
                time_unix_nanos: f.time_unix_nanos,
                l7: Some((batch.clone(), i as u32)),
                sequence: 0,
                index: index.clone(),
            })
            .collect();
        self.publish(records);
    }

    /// Appends records, numbering them in order (the datapath's consumer
    /// thread and the proxy's stream both publish), and wakes followers.
    fn publish(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let keep = self.shared.cfg.buffer_size.max(FOLLOW_WINDOW);
        let last;
        {
            let mut b = self.shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
            for mut r in records {
                r.sequence = b.next_sequence;
                if b.records.len() >= keep {
                    b.records.pop_front();
                }
                b.records.push_back(r);
                b.next_sequence += 1;
            }
            last = b.next_sequence - 1;
            self.shared.stats.buffered.store(
                b.records.len().min(self.shared.cfg.buffer_size) as u64,
                Ordering::Relaxed,
            );
        }
        self.shared.newest.send_replace(last);
    }
}

/// The state of the consumer thread.
struct Consumer {
    shared: Arc<Shared>,
    state: Arc<Mutex<NodeState>>,
    index: Arc<ObserverIndex>,
    fingerprint: u64,
    /// The datapath's lost counters at the last read.
    lost: Vec<u64>,
    last_refresh: Instant,
    /// The flow flush; `None` when the datapath has none.
    flusher: Option<FlowFlusher>,
    /// When the flush last started failing and was last logged about.
    flush_failing_since: Option<Instant>,
}

/// The least time between two refreshes caused by unknown addresses.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(50);

/// Records read per publish: bounds the time the buffer lock is held.
const BATCH: usize = 512;

const POLL_EVERY: Duration = Duration::from_millis(20);

/// Runs of the flow flush per flush at most, each after a drain: a full
/// flow table (65,536 entries) all due at once takes 10 with a 1 MiB ring
/// (half of it, 6,553 reports, per run).
const FLUSH_PASSES: usize = 64;

impl Consumer {
    fn run(mut self, mut ring: RingBuf<MapData>) {
        let obs = Observer {
            shared: self.shared.clone(),
        };
        let tick = self.shared.cfg.tick;
        let flush_every = self.shared.cfg.flush_every;
        let mut next_refresh = Instant::now() + tick;
        let mut next_flush = Instant::now() + flush_every;
        loop {
            // The datapath wakes us only when a quarter of the ring waits
            // (no wakeup per record): poll at least every 20 ms.
            let wait = next_refresh
                .min(next_flush)
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
            if Instant::now() >= next_flush {
                self.flush(&mut ring, &obs);
                next_flush = Instant::now() + flush_every;
            }
            self.drain(&mut ring, &obs);
            if Instant::now() >= next_refresh {
                next_refresh = Instant::now() + if self.refresh(&obs) { tick } else { tick / 5 };
            }
        }
    }

    /// Runs the datapath's flow flush: its reports land in the ring and
    /// are read by the next drain like any other event. A flush that
    /// stops because half the ring waits is run again after a drain, up
    /// to [`FLUSH_PASSES`] times; flows still due then wait for the next
    /// flush (their counts keep accumulating).
    fn flush(&mut self, ring: &mut RingBuf<MapData>, obs: &Observer) {
        let Some(f) = self.flusher.take() else { return };
        for _ in 0..FLUSH_PASSES {
            if !self.flush_once(&f) {
                break;
            }
            self.drain(ring, obs);
        }
        self.flusher = Some(f);
    }

    /// One run of the flush; true when it stopped with flows still due.
    fn flush_once(&mut self, f: &FlowFlusher) -> bool {
        match f.run() {
            Ok(done) => {
                self.shared
                    .stats
                    .flush_reports
                    .fetch_add(u64::from(done.reports), Ordering::Relaxed);
                if self.flush_failing_since.take().is_some() {
                    tracing::info!("the flow flush works again");
                }
                done.more
            }
            Err(e) => {
                self.shared.stats.flush_errors.fetch_add(1, Ordering::Relaxed);
                let log = self
                    .flush_failing_since
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if log {
                    tracing::warn!(
                        error = %e,
                        "cannot flush the flow counters: the last packets of idle flows are not reported until the flush works; the kernel needs bpf_for_each_map_elem (Linux 5.13 or later)"
                    );
                    self.flush_failing_since = Some(Instant::now());
                }
                false
            }
        }
    }

    /// Reads every waiting record: counts it and stores it raw.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, obs: &Observer) {
        // Monotonic (bpf_ktime_get_ns) to wall clock, once per drain: the
        // offset only moves when the wall clock is stepped.
        let offset =
            clock_ns(nix::time::ClockId::CLOCK_REALTIME).wrapping_sub(clock_ns(nix::time::ClockId::CLOCK_MONOTONIC));
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let ev = match ring.next() {
                Some(item) => self.shared.stats.decode(&item),
                None => break,
            };
            let Some(ev) = ev else { continue };
            if self.stale(&ev) && self.last_refresh.elapsed() >= MIN_REFRESH_GAP {
                // A pod that started a moment ago sends at once: refresh
                // now (rate-limited) so that the record carries its name
                // even if the pod is gone by the time somebody reads it.
                self.refresh_with(obs, true);
            }
            batch.push(Record {
                ev,
                l7: None,
                time_unix_nanos: ev.ts_ns.wrapping_add(offset),
                sequence: 0,
                index: self.index.clone(),
            });
            if batch.len() >= BATCH {
                obs.publish(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
            }
        }
        obs.publish(batch);
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

    /// Reads the lost counters and, if the state changed, rebuilds the
    /// index. False when the state was busy (retry soon).
    fn refresh(&mut self, obs: &Observer) -> bool {
        self.refresh_with(obs, false)
    }

    /// Rebuilds the index if the node state moved. The periodic refresh
    /// never waits for the state lock; a refresh for an event that names
    /// something unknown does (rate-limited), or the flow would keep an
    /// address instead of a name forever.
    fn refresh_with(&mut self, obs: &Observer, wait: bool) -> bool {
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
        if fp != self.fingerprint {
            self.index = Arc::new(s.observer_index());
            self.fingerprint = fp;
            drop(s);
            obs.set_current_index(self.index.clone());
        } else {
            drop(s);
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
            flush_every: Duration::from_millis(250),
        })
    }

    fn record(sequence: u64, dport: u16, index: &Arc<ObserverIndex>) -> Record {
        Record {
            ev: FlowEvent {
                daddr: u32::from_ne_bytes([10, 0, 1, 5]),
                dport: dport.to_be(),
                proto: sinew_flows::PROTO_TCP,
                ..Default::default()
            },
            l7: None,
            time_unix_nanos: sequence,
            sequence,
            index: index.clone(),
        }
    }

    fn sequences(flows: &[pb::Flow]) -> Vec<u64> {
        flows.iter().map(|f| f.sequence).collect()
    }

    #[test]
    fn buffer_keeps_the_newest_and_history_then_follow_has_no_gap() {
        let obs = observer(3);
        let idx = Arc::new(ObserverIndex::default());
        obs.publish((1..=5).map(|s| record(s, 80, &idx)).collect());
        let all = pb::GetFlowsRequest::default();
        let (h, next) = obs.history(&all);
        assert_eq!(sequences(&h), [3, 4, 5]);
        assert_eq!(next, 6);
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
        let (h, next) = obs.history(&last);
        assert_eq!(sequences(&h), [4, 5]);
        obs.publish(vec![record(6, 443, &idx)]);
        let b = obs.read_from(next, 10);
        assert_eq!(b.records.iter().map(|r| r.sequence).collect::<Vec<_>>(), [6]);
        assert_eq!((b.missed, b.next), (0, 7));
        let b = obs.read_from(b.next, 10);
        assert!(b.records.is_empty() && b.missed == 0 && b.next == 7, "{b:?}");
        let since = pb::GetFlowsRequest {
            since_unix_nanos: 5,
            ..Default::default()
        };
        assert_eq!(sequences(&obs.history(&since).0), [5, 6]);
    }

    #[test]
    fn a_follower_that_falls_behind_is_told_how_many_it_missed() {
        let obs = observer(3);
        let idx = Arc::new(ObserverIndex::default());
        let n = FOLLOW_WINDOW as u64 + 10;
        obs.publish((1..=n).map(|s| record(s, 80, &idx)).collect());
        let b = obs.read_from(1, 5);
        assert_eq!(b.missed, 10);
        assert_eq!(
            b.records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [11, 12, 13, 14, 15]
        );
        assert_eq!(b.next, 16);
        assert_eq!(
            obs.history(&pb::GetFlowsRequest::default()).0.len(),
            3,
            "history stays at its size"
        );
    }

    #[test]
    fn a_record_is_named_by_its_own_index_then_by_the_newest() {
        let obs = observer(8);
        let peer = |pod: &str| Peer {
            namespace: "a".into(),
            pod: pod.into(),
            identity: 300,
            ..Default::default()
        };
        let ip = std::net::Ipv4Addr::new(10, 0, 1, 5);
        let empty = Arc::new(ObserverIndex::default());
        let mut old = ObserverIndex::default();
        old.by_ip.insert(ip, peer("web-old"));
        let old = Arc::new(old);
        obs.publish(vec![record(1, 80, &empty), record(2, 80, &old)]);
        // The pod was unknown when flow 1 was read, and has been replaced
        // by the time anyone reads flow 2.
        let mut now = ObserverIndex::default();
        now.by_ip.insert(ip, peer("web-new"));
        obs.set_current_index(Arc::new(now));
        let (h, _) = obs.history(&pb::GetFlowsRequest::default());
        let names: Vec<&str> = h
            .iter()
            .map(|f| f.destination.as_ref().unwrap().pod_name.as_str())
            .collect();
        assert_eq!(names, ["web-new", "web-old"]);
    }

    #[test]
    fn a_short_record_is_a_decode_error_and_not_a_flow() {
        let stats = ObserverStats::default();
        let size = std::mem::size_of::<FlowEvent>();
        assert_eq!(stats.decode(&vec![0; size - 1]), None);
        // Longer than the layout (a newer producer): the known prefix.
        assert_eq!(stats.decode(&vec![0; size + 8]), Some(FlowEvent::default()));
        let s = stats.snapshot();
        assert_eq!((s.decode_errors, s.flows_total(), s.flows_unknown_type), (1, 1, 1));
    }

    #[test]
    fn counts_by_type_verdict_protocol_and_drop_reason() {
        let stats = ObserverStats::default();
        let drop = FlowEvent {
            r#type: sinew_abi::EVENT_DROP,
            verdict: sinew_abi::VERDICT_DROPPED,
            reason: DropReason::Policy.code(),
            proto: sinew_flows::PROTO_UDP,
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
        assert_eq!(
            s.flows_by_type,
            [("trace", 0), ("drop", 1), ("policy-verdict", 1), ("l7", 0)]
        );
        assert_eq!(s.flows_by_verdict, [("forwarded", 0), ("dropped", 2)]);
        assert_eq!(s.flows_by_protocol[1], ("udp", 2));
        assert_eq!(s.flows_by_protocol[4], ("other", 1));
        assert_eq!(s.flows_by_drop_reason, [("policy_denied", 1)], "a drop is counted once");
    }
}
