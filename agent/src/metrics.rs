//! The Prometheus endpoint: `GET /metrics` on `--metrics-addr`, in the
//! OpenMetrics text format, every name prefixed `sinew_`.
//!
//! Nothing is polled. Each scrape takes one [`Sample`] (the datapath's
//! per-CPU counters, table sizes, BPF program statistics, the observer's
//! flow counts, the agent's own memory) and renders it; counters are the
//! kernel's and the observer's own totals, so a scrape never resets or
//! loses anything. Collecting is a few dozen map syscalls plus one walk of
//! the conntrack table, under the node state's lock, on a blocking thread.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sinew_abi::{DropReason, MetricsValue};

use crate::state::NodeState;

/// The default port (the one Cilium's agent does not use, so both can run
/// while migrating).
pub const DEFAULT_ADDR: &str = "0.0.0.0:9962";
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const BPF_STATS_SYSCTL: &str = "kernel.bpf_stats_enabled";
/// Every program the agent loads; the statistics are per loaded instance.
const PROGRAMS: [&str; 6] = [
    "from_container",
    "to_container",
    "from_netdev",
    "to_netdev",
    "from_overlay",
    "to_overlay",
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}; pass --metrics-addr with a free address, or `off`")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--metrics-addr {value:?}: expected HOST:PORT (e.g. 0.0.0.0:9962) or `off`")]
    Addr { value: String },
}

/// Parses `--metrics-addr`: `off` disables the endpoint.
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, MetricsError> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| MetricsError::Addr { value: s.to_string() })
}

/// Turns on the kernel's per-program run count and run time accounting.
/// It costs two clock reads per program run, on every program of the
/// node, so `--bpf-stats false` leaves the sysctl alone.
pub fn enable_bpf_stats() {
    if let Err(e) = crate::netutil::sysctl(BPF_STATS_SYSCTL, "1") {
        tracing::warn!(error = %e, "cannot enable BPF program statistics; sinew_bpf_program_* stay at 0");
    }
}

/// Flow counts as the observer reports them, in the shape this module
/// renders; the daemon adapts the observer's snapshot to it. Each list is
/// (label value, flows read since the observer started).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowCounts {
    pub by_verdict: Vec<(String, u64)>,
    pub by_protocol: Vec<(String, u64)>,
    pub by_type: Vec<(String, u64)>,
    pub by_drop_reason: Vec<(String, u64)>,
    /// Flows a slow follower (`sinew observe -f`) missed.
    pub follower_dropped: u64,
    /// Ring records too short to decode.
    pub decode_errors: u64,
    /// Trace reports the flow flush wrote (idle flows' last counts), and
    /// flush runs that failed.
    pub flush_reports: u64,
    pub flush_errors: u64,
    /// Flows held for GetFlows now, and how many fit.
    pub buffered: u64,
    pub capacity: u64,
}

/// Where flow counts come from: the observer, when the agent has one.
pub type FlowSource = Arc<dyn Fn() -> FlowCounts + Send + Sync>;

/// Flow counts from the observer's counters, read at each scrape.
pub fn observer_flows(stats: Arc<crate::observer::ObserverStats>) -> FlowSource {
    Arc::new(move || {
        let snap = stats.snapshot();
        let owned = |v: Vec<(&'static str, u64)>| v.into_iter().map(|(l, n)| (l.to_string(), n)).collect();
        FlowCounts {
            by_verdict: owned(snap.flows_by_verdict),
            by_protocol: owned(snap.flows_by_protocol),
            by_type: owned(snap.flows_by_type),
            by_drop_reason: owned(snap.flows_by_drop_reason),
            follower_dropped: snap.follower_dropped,
            decode_errors: snap.decode_errors,
            flush_reports: snap.flush_reports,
            flush_errors: snap.flush_errors,
            buffered: snap.buffered,
            capacity: snap.capacity,
        }
    })
}

/// One BPF program's kernel statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramStat {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Everything one scrape reports.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// (metrics map index = reason * 2 + direction, summed counters).
    pub datapath: Vec<(u32, MetricsValue)>,
    /// Ring buffer records the datapath could not write, per event type.
    pub events_lost: Vec<u64>,
    pub policy_entries: u64,
    pub policy_capacity: u64,
    pub policy_refused: u64,
    pub policy_failed_endpoints: u64,
    pub ct_entries: u64,
    pub ct_capacity: u64,
    pub endpoints: u64,
    pub identities_cluster: u64,
    pub identities_local: u64,
    pub programs: Vec<ProgramStat>,
    pub bpf_stats_enabled: bool,
    pub rss_bytes: Option<u64>,
    pub uptime_seconds: f64,
    pub flows: Option<FlowCounts>,
    /// Service frontends in force, their backends taking new connections,
    /// and service map writes since start.
    pub service_frontends: u64,
    pub service_backends: u64,
    pub service_map_writes: u64,
    /// Invalid datastore documents by kind (every kind, zeros included).
    pub datastore_invalid: Vec<(String, u64)>,
    /// Invalid datastore file versions read since start.
    pub datastore_rejected_updates: u64,
    /// Stages whose apply to the datapath is failing now, and failed
    /// applies since start.
    pub reconcile_failing: u64,
    pub reconcile_failures: u64,
    /// Encryption between nodes, when on.
    pub encryption: Option<crate::encryption::Status>,
}

/// The kinds `sinew_datastore_invalid_documents` always reports; "unknown"
/// is a file that neither parses nor held anything in force.
const DATASTORE_KINDS: [&str; 11] = [
    "Node",
    "Pod",
    "Namespace",
    "SinewIdentity",
    "SinewEndpoint",
    "NetworkPolicy",
    "SinewNetworkPolicy",
    "SinewClusterwideNetworkPolicy",
    "Service",
    "EndpointSlice",
    "unknown",
];

fn invalid_by_kind(snap: &sinew_model::Snapshot) -> Vec<(String, u64)> {
    let mut by_kind = snap.invalid_by_kind();
    let mut out: Vec<(String, u64)> = DATASTORE_KINDS
        .iter()
        .map(|k| (k.to_string(), by_kind.remove(*k).unwrap_or(0)))
        .collect();
    out.extend(by_kind);
    out
}

/// The label of an event type index of `sinew_events_lost`.
fn event_type_label(t: usize) -> &'static str {
    match u8::try_from(t).unwrap_or(0) {
        sinew_abi::EVENT_TRACE => "trace",
        sinew_abi::EVENT_DROP => "drop",
        sinew_abi::EVENT_POLICY => "policy",
        _ => "unknown",
    }
}

fn direction_label(index: u32) -> &'static str {
    if index % 2 == sinew_abi::Direction::Ingress as u32 {
        "ingress"
    } else {
        "egress"
    }
}

/// The agent's resident set size, from /proc/self/status.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line.split_whitespace().skip(1);
    let kb: u64 = it.next()?.parse().ok()?;
    Some(kb * 1024)
}

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

impl Sample {
    /// Reads the datapath and the agent state; the caller holds the lock.
    pub fn collect(s: &NodeState) -> Sample {
        let dp = &s.datapath;
        let cfg = dp.config();
        let programs = PROGRAMS
            .iter()
            .filter_map(|&name| {
                let info = dp.program(name)?.info().ok()?;
                Some(ProgramStat {
                    name,
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect();
        let local: std::collections::BTreeSet<u32> = s.registry.iter().map(|e| e.identity).collect();
        Sample {
            datapath: dp.metrics(),
            events_lost: dp.events_lost(),
            policy_entries: s.policy.entry_count() as u64,
            policy_capacity: u64::from(cfg.policy_map_size),
            policy_refused: s.policy.overflows,
            policy_failed_endpoints: s.policy.failed.len() as u64,
            ct_entries: dp.ct_len() as u64,
            ct_capacity: u64::from(cfg.ct_map_size),
            endpoints: s.registry.iter().count() as u64,
            identities_cluster: s.snapshot.identities.len() as u64,
            identities_local: local.len() as u64,
            programs,
            bpf_stats_enabled: bpf_stats_enabled(),
            rss_bytes: rss_bytes(),
            uptime_seconds: s.started.elapsed().as_secs_f64(),
            flows: None,
            service_frontends: s.services.in_force.len() as u64,
            service_backends: s.services.in_force.values().map(|f| f.usable().count() as u64).sum(),
            service_map_writes: s.services.map_writes,
            datastore_invalid: invalid_by_kind(&s.snapshot),
            datastore_rejected_updates: s.snapshot.rejected_updates,
            reconcile_failing: u64::from(s.health.is_failing()),
            reconcile_failures: s.health.failures,
            encryption: s.encryption.as_ref().map(|e| e.status(&s.snapshot, &s.local.name)),
        }
    }

    /// The OpenMetrics text of this sample.
    pub fn render(self) -> String {
        let mut registry = Registry::with_prefix("sinew");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Encryption between nodes: mode and implementation, the key's age, and
/// per peer its handshake age and bytes (`sinew encryption status`).
fn encode_encryption(enc: &mut DescriptorEncoder<'_>, e: &crate::encryption::Status) -> Result<(), std::fmt::Error> {
    family(
        enc,
        "encryption_info",
        "Encryption between nodes in force: mode and implementation (kernel or userspace)",
        MetricType::Gauge,
        [(
            vec![
                ("mode", e.mode.name().to_string()),
                ("implementation", e.implementation.to_string()),
            ],
            1u64,
        )],
    )?;
    gauge(
        enc,
        "encryption_key_age_seconds",
        "Age of this node's key (IPsec: since this agent first saw the newest cluster key)",
        e.key_age(),
    )?;
    if let Some(i) = &e.ipsec {
        return encode_ipsec(enc, e, i);
    }
    gauge(
        enc,
        "encryption_peers",
        "Other nodes that are peers (published a valid key)",
        e.peers.len() as u64,
    )?;
    gauge(
        enc,
        "encryption_nodes_without_key",
        "Other nodes without a published key: traffic to them is dropped (no_encryption_key)",
        e.nodes_without_key.len() as u64,
    )?;
    let peer = |n: &str, p: &sinew_wireguard::PeerStatus| -> Labels {
        vec![("node", n.to_string()), ("endpoint", p.endpoint.to_string())]
    };
    family(
        enc,
        "encryption_peer_rx_bytes",
        "Bytes received from the peer, WireGuard overhead included",
        MetricType::Counter,
        e.peers.iter().map(|(n, p)| (peer(n, p), p.rx_bytes)),
    )?;
    family(
        enc,
        "encryption_peer_tx_bytes",
        "Bytes sent to the peer, WireGuard overhead included",
        MetricType::Counter,
        e.peers.iter().map(|(n, p)| (peer(n, p), p.tx_bytes)),
    )?;
    family(
        enc,
        "encryption_peer_last_handshake_seconds",
        "Age of the peer's current session (absent before the first handshake)",
        MetricType::Gauge,
        e.peers
            .iter()
            .filter_map(|(n, p)| p.last_handshake.map(|d| (peer(n, p), d.as_secs()))),
    )?;
    family(
        enc,
        "encryption_device_drops",
        "Packets the WireGuard device did not pass, by reason",
        MetricType::Counter,
        [
            ("no_peer", e.no_peer_drops),
            ("decrypt_error", e.decrypt_errors),
            ("disallowed_source", e.disallowed_source),
            ("unknown_sender", e.unknown_sender),
        ]
        .map(|(r, v)| (vec![("reason", r.to_string())], v)),
    )
}

/// IPsec: peers in place, per peer the SPI in use and its SAs' bytes and
/// packets, the SAs' drops, the last rotation.
fn encode_ipsec(
    enc: &mut DescriptorEncoder<'_>,
    e: &crate::encryption::Status,
    i: &crate::encryption::IpsecStatus,
) -> Result<(), std::fmt::Error> {
    gauge(
        enc,
        "encryption_peers",
        "Other nodes whose SAs and policies are in place (their traffic is encrypted)",
        i.peers.iter().filter(|p| p.ready).count() as u64,
    )?;
    gauge(
        enc,
        "encryption_nodes_without_key",
        "Other nodes without SAs in place: traffic to them is dropped (no_encryption_key)",
        e.nodes_without_key.len() as u64,
    )?;
    let peer =
        |p: &crate::ipsec::PeerStatus| -> Labels { vec![("node", p.node.clone()), ("endpoint", p.addr.clone())] };
    family(
        enc,
        "encryption_peer_rx_bytes",
        "Bytes received from the peer through its inbound SAs",
        MetricType::Counter,
        i.peers.iter().map(|p| (peer(p), p.rx_bytes)),
    )?;
    family(
        enc,
        "encryption_peer_tx_bytes",
        "Bytes sent to the peer through its outbound SAs",
        MetricType::Counter,
        i.peers.iter().map(|p| (peer(p), p.tx_bytes)),
    )?;
    family(
        enc,
        "encryption_ipsec_peer_spi",
        "The cluster-key SPI traffic to the peer uses (absent: none, dropped)",
        MetricType::Gauge,
        i.peers
            .iter()
            .filter(|p| p.ready)
            .map(|p| (peer(p), u64::from(p.out_spi))),
    )?;
    gauge(
        enc,
        "encryption_ipsec_epoch",
        "The epoch of this node's outbound SAs",
        i.epoch,
    )?;
    if let Some(age) = i.last_rotation.and_then(|t| t.elapsed().ok()) {
        gauge(
            enc,
            "encryption_last_rotation_seconds",
            "Time since traffic last moved to a newer cluster key",
            age.as_secs(),
        )?;
    }
    family(
        enc,
        "encryption_device_drops",
        "Packets the kernel's SAs did not pass, by reason",
        MetricType::Counter,
        [("integrity_failed", e.decrypt_errors), ("replay", e.unknown_sender)]
            .map(|(r, v)| (vec![("reason", r.to_string())], v)),
    )
}

/// Writes one metric family: `labels` pairs each label set with a value.
fn family<L, V>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: Copy + prometheus_client::encoding::EncodeCounterValue + prometheus_client::encoding::EncodeGaugeValue,
{
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in rows {
        let fam = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => ConstCounter::new(v).encode(fam)?,
            _ => ConstGauge::new(v).encode(fam)?,
        }
    }
    Ok(())
}

fn gauge<V>(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: V) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter<V>(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: V) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeCounterValue,
{
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

type Labels = Vec<(&'static str, String)>;

impl Collector for Sample {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Drops: every reason and direction, zeros included, so a rate()
        // over a reason that has never happened is 0 and not absent.
        let by_index: std::collections::BTreeMap<u32, MetricsValue> = self.datapath.iter().copied().collect();
        let drop_rows = |bytes: bool| -> Vec<(Labels, u64)> {
            let mut rows = Vec::new();
            for r in DropReason::ALL.into_iter().filter(|r| *r != DropReason::Forwarded) {
                for d in [sinew_abi::Direction::Ingress, sinew_abi::Direction::Egress] {
                    let idx = d.metrics_index(r);
                    let v = by_index.get(&idx).copied().unwrap_or_default();
                    rows.push((
                        vec![
                            ("reason", r.label().to_string()),
                            ("direction", direction_label(idx).to_string()),
                        ],
                        if bytes { v.bytes } else { v.packets },
                    ));
                }
            }
            rows
        };
        family(
            &mut enc,
            "drop_packets",
            "Packets the datapath dropped, by reason and direction",
            MetricType::Counter,
            drop_rows(false),
        )?;
        family(
            &mut enc,
            "drop_bytes",
            "Bytes of the packets the datapath dropped, by reason and direction",
            MetricType::Counter,
            drop_rows(true),
        )?;
        let fwd = |bytes: bool| -> Vec<(Labels, u64)> {
            [sinew_abi::Direction::Ingress, sinew_abi::Direction::Egress]
                .into_iter()
                .map(|d| {
                    let idx = d.metrics_index(DropReason::Forwarded);
                    let v = by_index.get(&idx).copied().unwrap_or_default();
                    (
                        vec![("direction", direction_label(idx).to_string())],
                        if bytes { v.bytes } else { v.packets },
                    )
                })
                .collect()
        };
        family(
            &mut enc,
            "forward_packets",
            "Packets the datapath programs passed on, by direction",
            MetricType::Counter,
            fwd(false),
        )?;
        family(
            &mut enc,
            "forward_bytes",
            "Bytes of the packets the datapath programs passed on, by direction",
            MetricType::Counter,
            fwd(true),
        )?;
        family(
            &mut enc,
            "events_lost",
            "Flow events the datapath could not write because the ring buffer was full, by event type",
            MetricType::Counter,
            self.events_lost
                .iter()
                .enumerate()
                .skip(1)
                .map(|(t, n)| (vec![("type", event_type_label(t).to_string())], *n)),
        )?;
        if let Some(f) = &self.flows {
            let rows = |key: &'static str, v: &[(String, u64)]| -> Vec<(Labels, u64)> {
                v.iter().map(|(l, n)| (vec![(key, l.clone())], *n)).collect()
            };
            family(
                &mut enc,
                "flows_by_verdict",
                "Flow events the observer read, by verdict",
                MetricType::Counter,
                rows("verdict", &f.by_verdict),
            )?;
            family(
                &mut enc,
                "flows_by_protocol",
                "Flow events the observer read, by IP protocol",
                MetricType::Counter,
                rows("protocol", &f.by_protocol),
            )?;
            family(
                &mut enc,
                "flows_by_type",
                "Flow events the observer read, by event type",
                MetricType::Counter,
                rows("type", &f.by_type),
            )?;
            family(
                &mut enc,
                "flows_by_drop_reason",
                "Drop flow events the observer read, by drop reason (reasons seen at least once)",
                MetricType::Counter,
                rows("reason", &f.by_drop_reason),
            )?;
            counter(
                &mut enc,
                "observer_follower_dropped",
                "Flows that followers of GetFlows missed because they read too slowly",
                f.follower_dropped,
            )?;
            counter(
                &mut enc,
                "observer_decode_errors",
                "Ring buffer records the observer could not decode",
                f.decode_errors,
            )?;
            counter(
                &mut enc,
                "observer_flush_reports",
                "Trace reports of idle flows written by the flow flush (also counted in flows_by_type)",
                f.flush_reports,
            )?;
            counter(
                &mut enc,
                "observer_flush_errors",
                "Flow flush runs that failed: idle flows' last packets are not reported while it fails (see the agent log)",
                f.flush_errors,
            )?;
            gauge(
                &mut enc,
                "observer_buffered_flows",
                "Flows held for GetFlows",
                f.buffered,
            )?;
            gauge(
                &mut enc,
                "observer_buffer_capacity",
                "Flows the observer buffer holds at most",
                f.capacity,
            )?;
        }
        gauge(
            &mut enc,
            "policy_map_entries",
            "Entries in the policy map",
            self.policy_entries,
        )?;
        gauge(
            &mut enc,
            "policy_map_capacity",
            "Capacity of the policy map (--policy-map-size)",
            self.policy_capacity,
        )?;
        counter(
            &mut enc,
            "policy_map_refused_writes",
            "Policy map writes refused because the map was full",
            self.policy_refused,
        )?;
        gauge(
            &mut enc,
            "policy_endpoints_not_ready",
            "Local endpoints whose policy does not fit in the map: failing closed, or unenforced with --policy-fail-open",
            self.policy_failed_endpoints,
        )?;
        gauge(
            &mut enc,
            "conntrack_entries",
            "Entries in the conntrack table",
            self.ct_entries,
        )?;
        gauge(
            &mut enc,
            "conntrack_capacity",
            "Capacity of the conntrack table (--ct-map-size)",
            self.ct_capacity,
        )?;
        gauge(
            &mut enc,
            "endpoints",
            "Endpoints (pod interfaces) on this node",
            self.endpoints,
        )?;
        gauge(
            &mut enc,
            "service_frontends",
            "Service frontends (address, port, protocol) this node load-balances",
            self.service_frontends,
        )?;
        gauge(
            &mut enc,
            "service_backends",
            "Backends taking new connections, summed over frontends",
            self.service_backends,
        )?;
        counter(
            &mut enc,
            "service_map_writes",
            "Service map entries written or deleted since the agent started",
            self.service_map_writes,
        )?;
        family(
            &mut enc,
            "datastore_invalid_documents",
            "Invalid documents in the datastore by kind; what their files held before stays in force",
            MetricType::Gauge,
            self.datastore_invalid
                .iter()
                .map(|(k, n)| (vec![("kind", k.clone())], *n)),
        )?;
        counter(
            &mut enc,
            "datastore_rejected_updates",
            "Invalid versions of datastore files read (a file that becomes invalid or changes its error)",
            self.datastore_rejected_updates,
        )?;
        gauge(
            &mut enc,
            "reconcile_failing",
            "1 while applying the desired state to the datapath fails (see sinew status); the agent retries every second",
            self.reconcile_failing,
        )?;
        counter(
            &mut enc,
            "reconcile_failures",
            "Failed applies of the desired state to the datapath",
            self.reconcile_failures,
        )?;
        if let Some(e) = &self.encryption {
            encode_encryption(&mut enc, e)?;
        }
        family(
            &mut enc,
            "identities",
            "Security identities: allocated cluster-wide, and used by this node's endpoints",
            MetricType::Gauge,
            [
                (vec![("scope", "cluster".to_string())], self.identities_cluster),
                (vec![("scope", "local".to_string())], self.identities_local),
            ],
        )?;
        gauge(
            &mut enc,
            "bpf_stats_enabled",
            "1 when the kernel counts BPF program runs (kernel.bpf_stats_enabled)",
            u64::from(self.bpf_stats_enabled),
        )?;
        family(
            &mut enc,
            "bpf_program_runs",
            "Runs of each datapath program (0 unless bpf_stats_enabled)",
            MetricType::Counter,
            self.programs
                .iter()
                .map(|p| (vec![("program", p.name.to_string())], p.run_count)),
        )?;
        family(
            &mut enc,
            "bpf_program_run_time_ns",
            "Nanoseconds spent in each datapath program (0 unless bpf_stats_enabled)",
            MetricType::Counter,
            self.programs
                .iter()
                .map(|p| (vec![("program", p.name.to_string())], p.run_time_ns)),
        )?;
        if let Some(rss) = self.rss_bytes {
            gauge(
                &mut enc,
                "agent_resident_memory_bytes",
                "Resident memory of the agent process (VmRSS)",
                rss,
            )?;
        }
        gauge(
            &mut enc,
            "agent_uptime_seconds",
            "Seconds since the agent started",
            self.uptime_seconds,
        )?;
        Ok(())
    }
}

/// What the HTTP handler needs.
#[derive(Clone)]
pub struct Source {
    pub state: Arc<Mutex<NodeState>>,
    pub flows: Option<FlowSource>,
}

impl Source {
    /// One scrape, on a blocking thread (the state lock and map syscalls).
    async fn scrape(&self) -> Option<String> {
        let src = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut sample = {
                let s = src.state.lock().ok()?;
                Sample::collect(&s)
            };
            sample.flows = src.flows.as_ref().map(|f| f());
            Some(sample.render())
        })
        .await
        .ok()
        .flatten()
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(src: Source, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are at /metrics\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET /metrics\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(r);
    }
    Ok(match src.scrape().await {
        Some(body) => respond(StatusCode::OK, CONTENT_TYPE, body),
        None => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "the agent state is unavailable (a thread panicked); see the agent log\n".into(),
        ),
    })
}

/// Binds the endpoint now, so that a taken port fails the agent's start.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, src: Source) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "serving metrics");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let src = src.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(src.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        let ing = sinew_abi::Direction::Ingress;
        let eg = sinew_abi::Direction::Egress;
        Sample {
            datapath: vec![
                (
                    eg.metrics_index(DropReason::SpoofedSource),
                    MetricsValue { packets: 3, bytes: 300 },
                ),
                (
                    ing.metrics_index(DropReason::Forwarded),
                    MetricsValue {
                        packets: 10,
                        bytes: 1000,
                    },
                ),
            ],
            events_lost: vec![0, 1, 2, 3],
            policy_entries: 5,
            policy_capacity: 16,
            endpoints: 2,
            identities_cluster: 4,
            identities_local: 2,
            programs: vec![ProgramStat {
                name: "from_container",
                run_count: 7,
                run_time_ns: 700,
            }],
            rss_bytes: Some(4096),
            uptime_seconds: 1.5,
            datastore_invalid: vec![("NetworkPolicy".into(), 2)],
            datastore_rejected_updates: 3,
            reconcile_failing: 1,
            reconcile_failures: 4,
            flows: Some(FlowCounts {
                by_verdict: vec![("dropped".into(), 9)],
                by_protocol: vec![("udp".into(), 9)],
                by_type: vec![("drop".into(), 9)],
                by_drop_reason: vec![("spoofed_source".into(), 9)],
                follower_dropped: 1,
                buffered: 9,
                capacity: 100,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn renders_every_family_with_labels_and_values() {
        let text = sample().render();
        for line in [
            "sinew_drop_packets_total{reason=\"spoofed_source\",direction=\"egress\"} 3",
            "sinew_drop_bytes_total{reason=\"spoofed_source\",direction=\"egress\"} 300",
            "sinew_drop_packets_total{reason=\"ct_full\",direction=\"ingress\"} 0",
            "sinew_forward_packets_total{direction=\"ingress\"} 10",
            "sinew_forward_bytes_total{direction=\"egress\"} 0",
            "sinew_events_lost_total{type=\"trace\"} 1",
            "sinew_events_lost_total{type=\"policy\"} 3",
            "sinew_flows_by_verdict_total{verdict=\"dropped\"} 9",
            "sinew_flows_by_protocol_total{protocol=\"udp\"} 9",
            "sinew_flows_by_type_total{type=\"drop\"} 9",
            "sinew_flows_by_drop_reason_total{reason=\"spoofed_source\"} 9",
            "sinew_observer_follower_dropped_total 1",
            "sinew_observer_buffer_capacity 100",
            "sinew_policy_map_entries 5",
            "sinew_policy_map_capacity 16",
            "sinew_endpoints 2",
            "sinew_identities{scope=\"cluster\"} 4",
            "sinew_identities{scope=\"local\"} 2",
            "sinew_bpf_program_runs_total{program=\"from_container\"} 7",
            "sinew_bpf_program_run_time_ns_total{program=\"from_container\"} 700",
            "sinew_agent_resident_memory_bytes 4096",
            "sinew_agent_uptime_seconds 1.5",
            "sinew_datastore_invalid_documents{kind=\"NetworkPolicy\"} 2",
            "sinew_datastore_rejected_updates_total 3",
            "sinew_reconcile_failing 1",
            "sinew_reconcile_failures_total 4",
            "# TYPE sinew_drop_packets counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every reason but "forwarded" appears in both directions.
        let drops = text
            .lines()
            .filter(|l| l.starts_with("sinew_drop_packets_total{"))
            .count();
        assert_eq!(drops, (DropReason::ALL.len() - 1) * 2);
        assert!(!text.contains("reason=\"forwarded\""));
    }

    #[test]
    fn encryption_families_say_what_runs_and_count_per_peer() {
        let key = sinew_wireguard::PublicKey([7; 32]);
        let peer = |hs: Option<u64>| sinew_wireguard::PeerStatus {
            public_key: key,
            endpoint: "172.30.0.12:51871".parse().unwrap(),
            allowed_ips: vec!["10.244.2.0/24".parse().unwrap()],
            last_handshake: hs.map(std::time::Duration::from_secs),
            tx_bytes: 100,
            rx_bytes: 200,
        };
        let mut s = Sample {
            encryption: Some(crate::encryption::Status {
                mode: crate::encryption::Mode::WireGuard,
                implementation: "userspace",
                device: "sinew_wg".into(),
                public_key: Some(key),
                key_created: std::time::SystemTime::now(),
                port: 51871,
                encrypt_node: false,
                peers: vec![("node2".into(), peer(Some(5))), ("node3".into(), peer(None))],
                nodes_without_key: vec!["node4".into()],
                no_peer_drops: 1,
                decrypt_errors: 2,
                disallowed_source: 3,
                unknown_sender: 4,
                ipsec: None,
            }),
            ..Default::default()
        };
        let text = s.clone().render();
        for line in [
            "sinew_encryption_info{mode=\"wireguard\",implementation=\"userspace\"} 1",
            "sinew_encryption_key_age_seconds 0",
            "sinew_encryption_peers 2",
            "sinew_encryption_nodes_without_key 1",
            "sinew_encryption_peer_rx_bytes_total{node=\"node2\",endpoint=\"172.30.0.12:51871\"} 200",
            "sinew_encryption_peer_tx_bytes_total{node=\"node3\",endpoint=\"172.30.0.12:51871\"} 100",
            "sinew_encryption_peer_last_handshake_seconds{node=\"node2\",endpoint=\"172.30.0.12:51871\"} 5",
            "sinew_encryption_device_drops_total{reason=\"decrypt_error\"} 2",
            "sinew_encryption_device_drops_total{reason=\"unknown_sender\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // No handshake yet: no age, rather than a misleading 0.
        assert!(!text.contains("sinew_encryption_peer_last_handshake_seconds{node=\"node3\""));
        // Encryption off: no encryption families at all.
        s.encryption = None;
        assert!(!s.render().contains("sinew_encryption_"));
    }

    #[test]
    fn ipsec_families_say_which_key_each_peer_uses() {
        let peer = |node: &str, ready: bool| crate::ipsec::PeerStatus {
            node: node.into(),
            addr: "172.30.0.12".into(),
            ready,
            out_spi: if ready { 257 } else { 0 },
            out_wire_spi: 0x1234,
            in_spis: vec![(256, 0x99), (257, 0x98)],
            tx_bytes: 100,
            rx_bytes: 200,
            integrity_failed: 1,
            replay_drops: 2,
            ..Default::default()
        };
        let s = Sample {
            encryption: Some(crate::encryption::Status {
                mode: crate::encryption::Mode::Ipsec,
                implementation: "kernel xfrm",
                device: String::new(),
                public_key: None,
                key_created: std::time::SystemTime::now(),
                port: 0,
                encrypt_node: false,
                peers: Vec::new(),
                nodes_without_key: vec!["node3".into()],
                no_peer_drops: 0,
                decrypt_errors: 1,
                disallowed_source: 0,
                unknown_sender: 2,
                ipsec: Some(crate::encryption::IpsecStatus {
                    epoch: 42,
                    spis: vec![256, 257],
                    last_rotation: Some(std::time::SystemTime::now()),
                    rotating: true,
                    peers: vec![peer("node2", true), peer("node3", false)],
                }),
            }),
            ..Default::default()
        };
        let text = s.render();
        for line in [
            "sinew_encryption_info{mode=\"ipsec\",implementation=\"kernel xfrm\"} 1",
            "sinew_encryption_peers 1",
            "sinew_encryption_nodes_without_key 1",
            "sinew_encryption_ipsec_peer_spi{node=\"node2\",endpoint=\"172.30.0.12\"} 257",
            "sinew_encryption_peer_tx_bytes_total{node=\"node2\",endpoint=\"172.30.0.12\"} 100",
            "sinew_encryption_peer_rx_bytes_total{node=\"node3\",endpoint=\"172.30.0.12\"} 200",
            "sinew_encryption_ipsec_epoch 42",
            "sinew_encryption_last_rotation_seconds 0",
            "sinew_encryption_device_drops_total{reason=\"integrity_failed\"} 1",
            "sinew_encryption_device_drops_total{reason=\"replay\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // A peer not in place has no SPI in use.
        assert!(
            !text.contains("sinew_encryption_ipsec_peer_spi{node=\"node3\""),
            "{text}"
        );
        // No WireGuard families.
        assert!(!text.contains("handshake"), "{text}");
    }

    #[test]
    fn without_an_observer_no_flow_families() {
        let mut s = sample();
        s.flows = None;
        let text = s.render();
        assert!(!text.contains("sinew_flows"), "{text}");
    }

    #[test]
    fn addr_parses_off_and_rejects_garbage() {
        assert_eq!(parse_addr("off").unwrap(), None);
        assert_eq!(
            parse_addr("127.0.0.1:9962").unwrap(),
            Some("127.0.0.1:9962".parse().unwrap())
        );
        assert!(parse_addr("9962").unwrap_err().to_string().contains("HOST:PORT"));
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tsinew-agent\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }
}
