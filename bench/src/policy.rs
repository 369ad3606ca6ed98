//! Benchmarks of identity-based policy (issue 3): what rules cost on the
//! data path, how long a policy change takes to be enforced, and what
//! endpoints and identities cost the agent in memory.
//!
//! Data path: one lab, two nodes over VXLAN, a client pod on node 2 and
//! four server pods on node 1: one that no policy selects (the baseline)
//! and three selected by their own policy of 0, 1,000 and 10,000 extra
//! rules next to the rule that allows the client. All four are measured in
//! turn within each repetition, so the no-policy baseline sees the same
//! machine seconds apart. TCP_CRR opens a new connection per transaction
//! and so pays the policy lookup every time; TCP_RR and iperf3 run on an
//! established connection, which conntrack lets through without one.
//!
//! Enforcement latency: a probe thread in the client pod starts a TCP
//! connect every millisecond while a policy flips the probed port between
//! allowed and denied; the time from just before `ApplyPolicy` to the
//! first probe that sees the new verdict (and every later one too) is one
//! sample. "local" sends `ApplyPolicy` to the agent of the node that
//! enforces (the destination), "remote" to the source node's agent, from
//! which the destination learns it through the datastore.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sinew_proto::v1::{ApplyPolicyRequest, ListPoliciesRequest, ListPoliciesResponse};
use sinew_proto::AgentClient;
use sinew_testvms::lab::{LabSpec, Routing};
use sinew_testvms::NetNs;

use crate::envs::{lab_up, Endpoints, EnvError, LabGuard, LabPods};
use crate::idle;
use crate::report::{Better, Report, Row};
use crate::rr::{self, RrError};
use crate::scenarios::{
    lab_spec, metric_rows, run_tests, scenario_start, vm_rss_kib, Metric, Options, ScenarioError, Side, Test,
};
use crate::stats::{percentile, Samples};

/// Extra rules in each policied server's policy.
pub const RULE_COUNTS: [usize; 3] = [0, 1_000, 10_000];
/// Ports the client is allowed to reach on every policied server.
const ALLOWED_PORTS: [u16; 2] = [7001, 5201];
/// Policy map capacity for the data-path lab: ~11,000 entries are needed,
/// the default 65,536 would do; twice that leaves room for other policies.
const POLICY_MAP_SIZE: &str = "131072";
/// The port the enforcement probe connects to.
const PROBE_PORT: u16 = 7101;
/// The port the "deny" version of the flip policy allows instead.
const PROBE_OTHER_PORT: u16 = 7102;
/// How often the probe starts a connection.
const PROBE_EVERY: Duration = Duration::from_millis(1);
/// A probe connection without an answer by then counts as denied.
const PROBE_TIMEOUT: Duration = Duration::from_millis(20);
/// How long probing goes on after the first new verdict, to make sure it
/// holds (a stray lost SYN must not pass for a deny).
const PROBE_CONFIRM: Duration = Duration::from_millis(30);
/// Longest wait for the new verdict.
const PROBE_MAX: Duration = Duration::from_secs(3);
/// Flips per mode (local, remote) and repetition, half to deny, half to allow.
const FLIPS_PER_MODE: usize = 40;
/// The enforcement goal from issue 3.
const GOAL_P99_MS: f64 = 100.0;
/// gRPC timeout; applying 10,000 rules takes a while.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of the policy benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum PolicyBenchError {
    /// The async runtime for the gRPC client could not start.
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The agent's socket did not answer.
    #[error("cannot connect to the agent at {socket}: {reason} (is the lab's agent running?)")]
    Connect {
        /// Agent socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A gRPC call failed.
    #[error("{call} on {socket}: {reason}")]
    Rpc {
        /// `ApplyPolicy`, `ListPolicies`.
        call: &'static str,
        /// Agent socket.
        socket: PathBuf,
        /// The status the agent returned.
        reason: String,
    },
    /// The enforcement probe did not see the expected verdict.
    #[error("enforcement probe to {addr}: {reason}")]
    Probe {
        /// Probed address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// A pod for the benchmark could not be created.
    #[error("cannot add pod {pod}: {reason}")]
    Pod {
        /// Pod name.
        pod: String,
        /// What went wrong.
        reason: String,
    },
}

impl From<PolicyBenchError> for ScenarioError {
    fn from(e: PolicyBenchError) -> Self {
        ScenarioError::Step(Box::new(e))
    }
}

/// A blocking gRPC client of one agent.
struct Agent {
    rt: tokio::runtime::Runtime,
    client: AgentClient<tonic::transport::Channel>,
    socket: PathBuf,
}

impl Agent {
    fn connect(socket: &Path) -> Result<Self, PolicyBenchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(PolicyBenchError::Runtime)?;
        let client = rt
            .block_on(sinew_proto::connect(socket, RPC_TIMEOUT))
            .map_err(|e| PolicyBenchError::Connect {
                socket: socket.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            rt,
            client,
            socket: socket.to_owned(),
        })
    }

    /// Applies `yaml` and returns how long the call took (it returns once
    /// this agent's node enforces the policy).
    fn apply(&mut self, yaml: &str, source: &str) -> Result<Duration, PolicyBenchError> {
        let req = ApplyPolicyRequest {
            yaml: yaml.to_owned(),
            source: source.to_owned(),
        };
        let t0 = Instant::now();
        self.rt
            .block_on(self.client.apply_policy(req))
            .map_err(|s| PolicyBenchError::Rpc {
                call: "ApplyPolicy",
                socket: self.socket.clone(),
                reason: s.message().to_owned(),
            })?;
        Ok(t0.elapsed())
    }

    fn list(&mut self) -> Result<ListPoliciesResponse, PolicyBenchError> {
        self.rt
            .block_on(self.client.list_policies(ListPoliciesRequest {}))
            .map(|r| r.into_inner())
            .map_err(|s| PolicyBenchError::Rpc {
                call: "ListPolicies",
                socket: self.socket.clone(),
                reason: s.message().to_owned(),
            })
    }
}

/// A `SinewNetworkPolicy` selecting endpoints labelled
/// `bench-policy: <selector>` that allows pods labelled `app: <client_app>`
/// on `allowed_ports`, plus `extra` further allow rules that each become
/// exactly one distinct policy-map entry: even ones from a distinct CIDR
/// /32 (a CIDR identity each) to port 443, odd ones from a distinct label
/// selector that matches the client to port 10000 + i.
pub fn rules_policy_yaml(name: &str, selector: &str, client_app: &str, allowed_ports: &[u16], extra: usize) -> String {
    let mut y = String::with_capacity(200 + extra * 160);
    for line in [
        "apiVersion: sinew.io/v1alpha1".to_owned(),
        "kind: SinewNetworkPolicy".to_owned(),
        "metadata:".to_owned(),
        format!("  name: {name}"),
        "  namespace: default".to_owned(),
        "spec:".to_owned(),
        "  endpointSelector:".to_owned(),
        "    matchLabels:".to_owned(),
        format!("      bench-policy: {selector}"),
        "  ingress:".to_owned(),
        "  - fromEndpoints:".to_owned(),
        "    - matchLabels:".to_owned(),
        format!("        app: {client_app}"),
        "    toPorts:".to_owned(),
        "    - ports:".to_owned(),
    ] {
        y.push_str(&line);
        y.push('\n');
    }
    for p in allowed_ports {
        let _ = writeln!(y, "      - port: {p}\n        protocol: TCP");
    }
    for i in 0..extra {
        if i % 2 == 0 {
            let n = i / 2;
            let _ = write!(
                y,
                "  - fromCIDR:\n    - 100.64.{}.{}/32\n    toPorts:\n    - ports:\n      - port: 443\n        protocol: TCP\n",
                n / 256,
                n % 256
            );
        } else {
            let _ = write!(
                y,
                "  - fromEndpoints:\n    - matchExpressions:\n      - key: app\n        operator: In\n        values: [{client_app}, bench-extra-{i}]\n    toPorts:\n    - ports:\n      - port: {}\n        protocol: TCP\n",
                10_000 + i
            );
        }
    }
    y
}

/// The policy map entries [`rules_policy_yaml`] makes for one endpoint.
pub fn expected_entries(allowed_ports: usize, extra: usize) -> usize {
    allowed_ports + extra
}

/// The flip policy: selects the pod with `server` labels and allows the
/// pod with `client` labels on `port` only (so every other port is denied).
pub fn flip_policy_yaml(
    name: &str,
    server: &BTreeMap<String, String>,
    client: &BTreeMap<String, String>,
    port: u16,
) -> String {
    let labels = |m: &BTreeMap<String, String>, indent: &str| {
        m.iter()
            .map(|(k, v)| format!("{indent}{k}: \"{v}\"\n"))
            .collect::<String>()
    };
    format!(
        "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  endpointSelector:\n    matchLabels:\n{}\x20 ingress:\n\x20 - fromEndpoints:\n\x20   - matchLabels:\n{}\
         \x20   toPorts:\n\x20   - ports:\n\x20     - port: {port}\n\x20       protocol: TCP\n",
        labels(server, "      "),
        labels(client, "        "),
    )
}

fn add_pod(
    guard: &mut LabGuard,
    node: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<(NetNs, std::net::IpAddr), ScenarioError> {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let err = |reason: String| PolicyBenchError::Pod {
        pod: name.to_owned(),
        reason,
    };
    let rec = guard
        .lab_mut()
        .add_pod(node, name, labels)
        .map_err(|e| err(e.to_string()))?;
    let ip = rec
        .ip
        .map(|n| n.addr())
        .filter(std::net::IpAddr::is_ipv4)
        .ok_or_else(|| EnvError::NoPodIp(name.to_owned()))?;
    Ok((rec.netns.clone(), ip))
}

fn row(
    scenario: &str,
    metric: String,
    unit: &'static str,
    better: Better,
    baseline: &str,
    b: Samples,
    s: Samples,
) -> Row {
    Row {
        scenario: scenario.to_owned(),
        metric,
        unit,
        better,
        baseline: baseline.to_owned(),
        baseline_samples: b,
        sinew_samples: s,
    }
}

/// All three policy benchmarks.
pub fn all(opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    datapath(opts, report)?;
    enforcement(opts, report)?;
    memory(opts, report)
}

/// Throughput and request/response with 0, 1,000 and 10,000 rules
/// selecting the server, against a server no policy selects.
pub fn datapath(opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    const NAME: &str = "policy vxlan";
    scenario_start(&format!("{NAME} ({RULE_COUNTS:?} rules)"), opts, report)?;
    let mut spec = lab_spec(opts, 2, 0, Routing::Vxlan);
    spec.agent_args
        .extend(["--policy-map-size".into(), POLICY_MAP_SIZE.into()]);
    let mut guard = lab_up(&spec, &opts.binaries, opts.verbose)?;
    let (n1, n2, socket1) = {
        let nodes = guard.lab().nodes();
        (nodes[0].name.clone(), nodes[1].name.clone(), nodes[0].socket.clone())
    };
    eprintln!(
        "  adding the client pod, a server without policy and {} policied servers",
        RULE_COUNTS.len()
    );
    let (client, _) = add_pod(&mut guard, &n2, "client", &[("app", "bench-client")])?;
    let mut servers = vec![{
        let (ns, ip) = add_pod(&mut guard, &n1, "srv-base", &[("app", "bench-server")])?;
        ("no policy".to_owned(), ns, ip)
    }];
    for n in RULE_COUNTS {
        let sel = format!("rules-{n}");
        let (ns, ip) = add_pod(
            &mut guard,
            &n1,
            &format!("srv-r{n}"),
            &[("app", "bench-server"), ("bench-policy", &sel)],
        )?;
        servers.push((format!("{n} rules"), ns, ip));
    }

    let mut agent = Agent::connect(&socket1)?;
    let mut entries = agent.list()?.map_entries;
    let mut applied: Vec<(usize, f64, u64)> = Vec::new();
    for n in RULE_COUNTS {
        idle::check_interrupted()?;
        let yaml = rules_policy_yaml(
            &format!("bench-rules-{n}"),
            &format!("rules-{n}"),
            "bench-client",
            &ALLOWED_PORTS,
            n,
        );
        eprintln!(
            "  applying a policy of {} rules ({} KiB of YAML)",
            n + 1,
            yaml.len() / 1024
        );
        let took = agent.apply(&yaml, &format!("bench-rules-{n}.yaml"))?;
        let list = agent.list()?;
        let added = list.map_entries.saturating_sub(entries);
        entries = list.map_entries;
        let want = expected_entries(ALLOWED_PORTS.len(), n) as u64;
        eprintln!(
            "    took {:.0} ms; map now holds {} entries (+{added}, expected +{want}), {} overflows",
            took.as_secs_f64() * 1e3,
            list.map_entries,
            list.map_overflows
        );
        if added != want || list.map_overflows > 0 {
            report.notes.push(format!(
                "{NAME}: policy of {n} rules added {added} map entries, expected {want} ({} overflows)",
                list.map_overflows
            ));
        }
        applied.push((n, took.as_secs_f64() * 1e3, added));
    }

    let sides = servers
        .into_iter()
        .map(|(label, server, server_ip)| {
            Side::start(Endpoints {
                label,
                server,
                server_ip,
                client: client.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Both agents recompute after the apply (CIDR identities, ipcache).
    scenario_start(&format!("{NAME} measurements"), opts, report)?;
    let tests = [Test::Rr, Test::Crr, Test::Iperf(1)];
    let m = run_tests(NAME, &sides, &tests, opts, report)?;
    let metrics = [
        Metric::RrRate,
        Metric::RrP50,
        Metric::RrP99,
        Metric::CrrRate,
        Metric::CrrP50,
        Metric::CrrP99,
        Metric::Tput1,
    ];
    for (i, n) in RULE_COUNTS.iter().enumerate() {
        report.rows.extend(metric_rows(
            &metrics,
            &format!("{NAME} {n} rules"),
            "no policy",
            &m[0],
            &m[i + 1],
        ));
    }
    let base_ms = applied.first().map(|a| a.1);
    for (n, ms, added) in applied {
        let want = expected_entries(ALLOWED_PORTS.len(), n) as f64;
        report.rows.push(row(
            "policy map",
            format!("entries, {} rules", n + 1),
            "entries",
            Better::Higher,
            "expected",
            Samples { values: vec![want] },
            Samples {
                values: vec![added as f64],
            },
        ));
        report.rows.push(row(
            "policy map",
            format!("ApplyPolicy, {} rules", n + 1),
            "ms",
            Better::Lower,
            "1 rule",
            Samples {
                values: base_ms.into_iter().collect(),
            },
            Samples { values: vec![ms] },
        ));
    }
    drop(sides);
    drop(guard);
    Ok(())
}

/// What the probe thread is asked to watch for.
struct ProbeRequest {
    t0: Instant,
    want_allow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Allowed,
    NoAnswer,
    Failed(String),
}

async fn probe_once(addr: SocketAddr) -> (Instant, Verdict) {
    let start = Instant::now();
    let v = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Verdict::Allowed,
        Err(_) => Verdict::NoAnswer,
        Ok(Err(e)) => Verdict::Failed(e.to_string()),
    };
    (start, v)
}

/// The start of the earliest probe from which on every probe (in start
/// order) had the wanted verdict; `None` when the last one did not.
fn transition(results: &mut [(Instant, bool)], want_allow: bool) -> Option<Instant> {
    results.sort_by_key(|r| r.0);
    let last_other = results.iter().rposition(|r| r.1 != want_allow);
    let first_new = last_other.map_or(0, |i| i + 1);
    results.get(first_new).map(|r| r.0)
}

/// Probes `addr` until the wanted verdict holds; returns the time from
/// `t0` to the first probe with it.
async fn probe_transition(addr: SocketAddr, req: &ProbeRequest) -> Result<Duration, String> {
    let mut set = tokio::task::JoinSet::new();
    let mut results: Vec<(Instant, bool)> = Vec::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = req.t0 + PROBE_MAX;
    let mut seen_new: Option<Instant> = None;
    let record = |r: Result<(Instant, Verdict), tokio::task::JoinError>,
                  results: &mut Vec<(Instant, bool)>,
                  seen_new: &mut Option<Instant>|
     -> Result<(), String> {
        let (start, v) = r.map_err(|e| format!("probe task failed: {e}"))?;
        let allowed = match v {
            Verdict::Allowed => true,
            Verdict::NoAnswer => false,
            Verdict::Failed(e) => return Err(format!("connect failed: {e}")),
        };
        if allowed == req.want_allow && seen_new.is_none() {
            *seen_new = Some(Instant::now());
        }
        results.push((start, allowed));
        Ok(())
    };
    loop {
        let now = Instant::now();
        if now >= deadline || seen_new.is_some_and(|t| now >= t + PROBE_CONFIRM) {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                set.spawn(probe_once(addr));
            }
            Some(r) = set.join_next(), if !set.is_empty() => {
                record(r, &mut results, &mut seen_new)?;
            }
        }
    }
    while let Some(r) = set.join_next().await {
        record(r, &mut results, &mut seen_new)?;
    }
    let want = if req.want_allow { "allowed" } else { "denied" };
    match transition(&mut results, req.want_allow) {
        Some(t) => Ok(t.saturating_duration_since(req.t0)),
        None => Err(format!(
            "still not {want} {:.1} s after ApplyPolicy ({} probes)",
            PROBE_MAX.as_secs_f64(),
            results.len()
        )),
    }
}

/// Serves probe requests on the calling thread, which must be in the
/// client's namespace: a current-thread runtime polls every socket here.
fn probe_worker(
    addr: SocketAddr,
    requests: mpsc::Receiver<ProbeRequest>,
    results: mpsc::Sender<Result<Duration, String>>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))?;
    for req in requests {
        let r = rt.block_on(probe_transition(addr, &req));
        if results.send(r).is_err() {
            break;
        }
    }
    Ok(())
}

/// A small pseudo-random jitter so that flips land at every phase of the
/// datastore's polling.
struct Jitter(u64);

impl Jitter {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo + 1)
    }
}

/// Time from ApplyPolicy to enforcement, applied on the destination node
/// (local) and on the source node (remote), with `opts.pods` endpoints.
pub fn enforcement(opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    let per_node = (opts.pods / 2).max(1);
    let name = format!("policy enforce ({} endpoints)", per_node * 2);
    scenario_start(&name, opts, report)?;
    eprintln!("  building a 2-node lab with {per_node} pods per node");
    let spec: LabSpec = lab_spec(opts, 2, per_node, Routing::Vxlan);
    let guard = lab_up(&spec, &opts.binaries, opts.verbose)?;
    let lab = guard.lab();
    let (server, server_ip) = guard.pod(0)?;
    let (client, _) = guard.pod(per_node as usize)?;
    let server_labels = lab.pods()[0].labels.clone();
    let client_labels = lab.pods()[per_node as usize].labels.clone();
    let sockets = [lab.nodes()[0].socket.clone(), lab.nodes()[1].socket.clone()];
    let addr = SocketAddr::new(server_ip, PROBE_PORT);
    let listener = server
        .run(|| std::net::TcpListener::bind(addr))?
        .map_err(|source| ScenarioError::Rr {
            label: "probe server".into(),
            source: RrError::Bind { addr, source },
        })?;
    let _probe_server = rr::Server::start(listener, 1).map_err(|source| ScenarioError::Rr {
        label: "probe server".into(),
        source,
    })?;
    let mut agents = [Agent::connect(&sockets[0])?, Agent::connect(&sockets[1])?];
    let policy = |port| flip_policy_yaml("bench-flip", &server_labels, &client_labels, port);

    let (req_tx, req_rx) = mpsc::channel::<ProbeRequest>();
    let (res_tx, res_rx) = mpsc::channel();
    let probe_err = |reason: String| PolicyBenchError::Probe { addr, reason };
    let mut m: BTreeMap<&'static str, Samples> = BTreeMap::new();
    std::thread::scope(|scope| -> Result<(), ScenarioError> {
        let worker = scope.spawn(|| client.run(move || probe_worker(addr, req_rx, res_tx)));
        // The sender lives in this block only: once it is dropped the worker
        // sees the end of its requests and returns.
        let req_tx = req_tx;
        let result = (|| -> Result<(), ScenarioError> {
            let flip = |agent: &mut Agent, want_allow: bool| -> Result<(Duration, Duration), ScenarioError> {
                let yaml = policy(if want_allow { PROBE_PORT } else { PROBE_OTHER_PORT });
                let t0 = Instant::now();
                req_tx
                    .send(ProbeRequest { t0, want_allow })
                    .map_err(|_| probe_err("the probe thread ended".into()))?;
                let rpc = agent.apply(&yaml, "bench-flip.yaml")?;
                let lat = res_rx
                    .recv()
                    .map_err(|_| probe_err("the probe thread ended".into()))?
                    .map_err(probe_err)?;
                Ok((lat, rpc))
            };
            // Start allowed, on the destination, and check the probe sees it.
            flip(&mut agents[0], true)?;
            let mut jitter = Jitter(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
            for rep in 1..=opts.reps {
                let w = idle::wait_for_idle(opts.idle_wait_rep)?;
                if let Some(n) = w.note(&format!("{name} rep {rep}")) {
                    eprintln!("  {n}");
                    report.notes.push(n);
                }
                eprintln!("  {name}: rep {rep}/{}: {} flips", opts.reps, FLIPS_PER_MODE * 2);
                let mut lat: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
                let mut rpc: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
                // local deny, local allow, remote deny, remote allow, ...
                for i in 0..FLIPS_PER_MODE * 2 {
                    idle::check_interrupted()?;
                    std::thread::sleep(Duration::from_millis(jitter.next_ms(20, 80)));
                    let mode = (i / 2) % 2;
                    let (l, r) = flip(&mut agents[mode], i % 2 == 1)?;
                    lat[mode].push(l.as_micros() as u64);
                    rpc[mode].push(r.as_micros() as u64);
                }
                // A flip ends allowed, so the next repetition starts alike.
                let ms = |v: &mut Vec<u64>, q| {
                    v.sort_unstable();
                    percentile(v, q).map_or(f64::NAN, |us| us as f64 / 1e3)
                };
                for (mode, key) in [(0, "local"), (1, "remote")] {
                    let put = |m: &mut BTreeMap<&'static str, Samples>, k: &'static str, v: f64| {
                        m.entry(k).or_default().push(v)
                    };
                    let (p50, p99, rpc50) = (
                        ms(&mut lat[mode], 0.5),
                        ms(&mut lat[mode], 0.99),
                        ms(&mut rpc[mode], 0.5),
                    );
                    let keys: [&'static str; 3] = if key == "local" {
                        ["local p50", "local p99", "local rpc p50"]
                    } else {
                        ["remote p50", "remote p99", "remote rpc p50"]
                    };
                    put(&mut m, keys[0], p50);
                    put(&mut m, keys[1], p99);
                    put(&mut m, keys[2], rpc50);
                }
            }
            Ok(())
        })();
        drop(req_tx);
        let ended = match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // The worker's own failure explains a "probe thread ended" better.
        match ended {
            Err(e) => Err(e.into()),
            Ok(Err(reason)) => Err(probe_err(reason).into()),
            Ok(Ok(())) => result,
        }
    })?;
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    let goal = || Samples {
        values: vec![GOAL_P99_MS],
    };
    let none = Samples::default;
    let n = FLIPS_PER_MODE;
    report.rows.extend([
        row(
            &name,
            format!("apply->enforced local p50 (n={n})"),
            "ms",
            Better::Lower,
            "",
            none(),
            get("local p50"),
        ),
        row(
            &name,
            format!("apply->enforced local p99 (n={n})"),
            "ms",
            Better::Lower,
            "goal",
            goal(),
            get("local p99"),
        ),
        row(
            &name,
            format!("apply->enforced remote p50 (n={n})"),
            "ms",
            Better::Lower,
            "",
            none(),
            get("remote p50"),
        ),
        row(
            &name,
            format!("apply->enforced remote p99 (n={n})"),
            "ms",
            Better::Lower,
            "goal",
            goal(),
            get("remote p99"),
        ),
        row(
            &name,
            "ApplyPolicy call p50, dst node".into(),
            "ms",
            Better::Lower,
            "",
            none(),
            get("local rpc p50"),
        ),
        row(
            &name,
            "ApplyPolicy call p50, src node".into(),
            "ms",
            Better::Lower,
            "",
            none(),
            get("remote rpc p50"),
        ),
    ]);
    drop(agents);
    drop(guard);
    Ok(())
}

/// The agent's resident memory with no pods, with `opts.pods` pods sharing
/// one label set (one identity) and with as many pods of distinct labels
/// (one identity each), on one node.
pub fn memory(opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    let n = opts.pods as usize;
    let name = format!("policy memory ({n} pods)");
    scenario_start(&name, opts, report)?;
    let spec = lab_spec(opts, 1, 0, Routing::Vxlan);
    let mut guard = lab_up(&spec, &opts.binaries, opts.verbose)?;
    let node = guard.lab().nodes()[0].clone();
    let pid = node.agent_pid.ok_or_else(|| ScenarioError::Rss {
        pid: 0,
        reason: "the lab recorded no agent pid".into(),
    })?;
    let settle = || std::thread::sleep(Duration::from_millis(500));
    let mut m: BTreeMap<&'static str, Samples> = BTreeMap::new();
    for rep in 1..=opts.reps {
        let w = idle::wait_for_idle(opts.idle_wait_rep)?;
        if let Some(note) = w.note(&format!("{name} rep {rep}")) {
            report.notes.push(note);
        }
        let rss0 = vm_rss_kib(pid)?;
        let mut rss = [0u64; 2];
        for (phase, distinct) in [false, true].into_iter().enumerate() {
            let what = if distinct { "distinct labels" } else { "shared labels" };
            eprintln!("  {name}: rep {rep}/{}: {n} pods with {what}", opts.reps);
            for i in 0..n {
                idle::check_interrupted()?;
                let app = if distinct {
                    format!("mem-{i}")
                } else {
                    "mem-shared".to_owned()
                };
                add_pod(&mut guard, &node.name, &format!("m{i}"), &[("app", &app)])?;
            }
            settle();
            rss[phase] = vm_rss_kib(pid)?;
            for i in 0..n {
                idle::check_interrupted()?;
                let pod = format!("m{i}");
                guard.lab_mut().delete_pod(&pod).map_err(|e| PolicyBenchError::Pod {
                    pod: pod.clone(),
                    reason: format!("delete: {e}"),
                })?;
            }
            settle();
        }
        let put = |m: &mut BTreeMap<&'static str, Samples>, k: &'static str, v: f64| m.entry(k).or_default().push(v);
        put(&mut m, "rss0", rss0 as f64 / 1024.0);
        put(&mut m, "rss same", rss[0] as f64 / 1024.0);
        put(&mut m, "rss distinct", rss[1] as f64 / 1024.0);
        put(&mut m, "per endpoint", (rss[0] as f64 - rss0 as f64) / n as f64);
        put(&mut m, "per identity", (rss[1] as f64 - rss[0] as f64) / n as f64);
    }
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    let none = Samples::default;
    report.rows.extend([
        row(
            &name,
            "agent RSS, 0 pods".into(),
            "MiB",
            Better::Lower,
            "",
            none(),
            get("rss0"),
        ),
        row(
            &name,
            format!("agent RSS, {n} pods, 1 identity"),
            "MiB",
            Better::Lower,
            "0 pods",
            get("rss0"),
            get("rss same"),
        ),
        row(
            &name,
            format!("agent RSS, {n} pods, {n} identities"),
            "MiB",
            Better::Lower,
            "0 pods",
            get("rss0"),
            get("rss distinct"),
        ),
        row(
            &name,
            "agent RSS per endpoint".into(),
            "KiB",
            Better::Lower,
            "",
            none(),
            get("per endpoint"),
        ),
        row(
            &name,
            "agent RSS per extra identity".into(),
            "KiB",
            Better::Lower,
            "",
            none(),
            get("per identity"),
        ),
    ]);
    drop(guard);
    Ok(())
}

/// The port of the L7 rule in [`l7_untouched`]: the proxy covers it, and
/// no benchmark traffic uses it.
const L7_PORT: u16 = 80;

/// The ingress rules of a server with L7 rules on [`L7_PORT`] next to the
/// plain rules of [`rules_policy_yaml`] (no extra rules).
fn l7_policy_yaml(name: &str, selector: &str, client_app: &str) -> String {
    let mut y = rules_policy_yaml(name, selector, client_app, &ALLOWED_PORTS, 0);
    let _ = write!(
        y,
        "  - fromEndpoints:\n    - matchLabels:\n        app: {client_app}\n    toPorts:\n    - ports:\n      - port: {L7_PORT}\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path:\n            prefix: /public\n"
    );
    y
}

/// `sinew_proxy_connections_total` of a node's proxy (its admin port in
/// the node's namespace), or why not.
fn proxy_connections(node: &NetNs) -> Result<f64, String> {
    let text = node
        .run(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&"127.0.0.1:15090".parse().unwrap(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("sinew_proxy_connections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Flows the proxy must not touch (issue 12): TCP_RR and TCP_CRR to a
/// port of a pod that has L7 rules on another port, against the same to a
/// pod with the same L3/L4 rules and no L7 rule, measured in turn in each
/// repetition (VXLAN, client and servers on different nodes). The proxy of
/// the servers' node runs with the L7 rules in force; its connection
/// counter must not move during the measurements.
pub fn l7_untouched(opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    const NAME: &str = "l7 untouched vxlan";
    scenario_start(NAME, opts, report)?;
    let spec = lab_spec(opts, 2, 0, Routing::Vxlan);
    let mut guard = lab_up(&spec, &opts.binaries, opts.verbose)?;
    let (n1, n2, socket1, node1_ns) = {
        let nodes = guard.lab().nodes();
        (
            nodes[0].name.clone(),
            nodes[1].name.clone(),
            nodes[0].socket.clone(),
            nodes[0].netns.clone(),
        )
    };
    let (client, _) = add_pod(&mut guard, &n2, "client", &[("app", "bench-client")])?;
    let (plain_ns, plain_ip) = add_pod(
        &mut guard,
        &n1,
        "srv-plain",
        &[("app", "bench-server"), ("bench-policy", "plain")],
    )?;
    let (l7_ns, l7_ip) = add_pod(
        &mut guard,
        &n1,
        "srv-l7",
        &[("app", "bench-server"), ("bench-policy", "l7")],
    )?;
    let mut agent = Agent::connect(&socket1)?;
    agent.apply(
        &rules_policy_yaml("bench-plain", "plain", "bench-client", &ALLOWED_PORTS, 0),
        "bench-plain.yaml",
    )?;
    // Returns once node1's proxy has acked the L7 rules.
    agent.apply(&l7_policy_yaml("bench-l7", "l7", "bench-client"), "bench-l7.yaml")?;
    let sides = [
        ("no L7 rules", plain_ns, plain_ip),
        ("L7 rules on port 80", l7_ns, l7_ip),
    ]
    .into_iter()
    .map(|(label, server, server_ip)| {
        Side::start(Endpoints {
            label: label.to_owned(),
            server,
            server_ip,
            client: client.clone(),
        })
    })
    .collect::<Result<Vec<_>, _>>()?;
    let before = proxy_connections(&node1_ns);
    let tests = [Test::Rr, Test::Crr];
    let m = run_tests(NAME, &sides, &tests, opts, report)?;
    let after = proxy_connections(&node1_ns);
    match (before, after) {
        (Ok(b), Ok(a)) if a == b => report.notes.push(format!(
            "{NAME}: node1's proxy took no connection during the runs ({a} in total), its L7 rules in force"
        )),
        (Ok(b), Ok(a)) => report.notes.push(format!(
            "{NAME}: node1's proxy took {} connections during the runs: flows without L7 rules went through it",
            a - b
        )),
        (b, a) => report.notes.push(format!(
            "{NAME}: cannot read node1's proxy metrics ({b:?}, {a:?}); is the lab's sinew-proxy running?"
        )),
    }
    let metrics = [
        Metric::RrRate,
        Metric::RrP50,
        Metric::RrP99,
        Metric::CrrRate,
        Metric::CrrP50,
        Metric::CrrP99,
    ];
    report
        .rows
        .extend(metric_rows(&metrics, NAME, "no L7 rules", &m[0], &m[1]));
    drop(sides);
    drop(guard);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_policy_parses_with_one_rule_per_extra_and_distinct_peers_or_ports() {
        let y = rules_policy_yaml("p", "rules-6", "bench-client", &ALLOWED_PORTS, 6);
        let parsed = sinew_policy::parse("test.yaml", &y).unwrap_or_else(|e| panic!("{e:?}\n{y}"));
        assert_eq!(parsed.len(), 1);
        // The client rule plus one per extra.
        assert_eq!(y.matches("\n  - from").count(), 7, "{y}");
        assert_eq!(y.matches("fromCIDR").count(), 3);
        for cidr in ["100.64.0.0/32", "100.64.0.1/32", "100.64.0.2/32"] {
            assert!(y.contains(cidr), "{cidr} missing:\n{y}");
        }
        for port in [10_001, 10_003, 10_005] {
            assert!(y.contains(&format!("port: {port}\n")), "{port} missing:\n{y}");
        }
        assert_eq!(expected_entries(ALLOWED_PORTS.len(), 6), 8);
    }

    #[test]
    fn ten_thousand_rules_stay_distinct_and_parse() {
        let y = rules_policy_yaml("p", "rules-10000", "c", &ALLOWED_PORTS, 10_000);
        assert!(y.contains("100.64.19.135/32"), "the last CIDR (4999) is 100.64.19.135");
        assert!(y.contains("port: 19999\n"));
        assert!(sinew_policy::parse("big.yaml", &y).is_ok());
    }

    #[test]
    fn each_extra_rule_resolves_to_its_own_entry() {
        use sinew_policy::{identity_labels, Identity, IdentityKind, IgnoreRules};
        let extra = 100;
        let y = rules_policy_yaml("p", "rules-100", "bench-client", &ALLOWED_PORTS, extra);
        let policies = sinew_policy::parse("t.yaml", &y).unwrap();
        let pod = |id, labels: &[(&str, &str)]| {
            let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Identity {
                id,
                kind: IdentityKind::Pod {
                    labels: identity_labels("default", &labels, &BTreeMap::new(), None, &IgnoreRules::default()),
                    named_ports: Default::default(),
                },
            }
        };
        let server_labels = BTreeMap::from([("bench-policy".to_owned(), "rules-100".to_owned())]);
        let mut ids = vec![
            pod(1000, &[("app", "bench-client")]),
            pod(1001, &[("bench-policy", "rules-100")]),
        ];
        let cidrs = sinew_policy::cidr_prefixes(&policies);
        assert_eq!(cidrs.len(), extra / 2);
        ids.extend(cidrs.into_iter().enumerate().map(|(i, c)| Identity {
            id: 16_777_217 + i as u32,
            kind: IdentityKind::Cidr(c),
        }));
        let ep = sinew_policy::Endpoint {
            namespace: "default".into(),
            pod_labels: server_labels,
            identity: 1001,
            named_ports: Default::default(),
        };
        let r = sinew_policy::resolve(&ep, &policies, &ids, &BTreeMap::new());
        assert!(r.ingress_enforced);
        assert_eq!(r.entries.len(), expected_entries(ALLOWED_PORTS.len(), extra));
    }

    #[test]
    fn flip_policy_parses() {
        let s = BTreeMap::from([
            ("app".to_owned(), "pod1".to_owned()),
            ("node".to_owned(), "n-1".to_owned()),
        ]);
        let c = BTreeMap::from([
            ("app".to_owned(), "pod1".to_owned()),
            ("node".to_owned(), "n-2".to_owned()),
        ]);
        let y = flip_policy_yaml("bench-flip", &s, &c, 7101);
        assert!(sinew_policy::parse("flip.yaml", &y).is_ok(), "{y}");
        assert!(y.contains("port: 7101"));
        assert!(y.contains("node: \"n-2\""));
    }

    #[test]
    fn transition_is_the_first_probe_after_the_last_old_verdict() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // A stray lost probe at 2 ms must not count as the deny.
        let mut r = vec![
            (at(1), true),
            (at(2), false),
            (at(3), true),
            (at(5), false),
            (at(4), true),
            (at(6), false),
        ];
        assert_eq!(transition(&mut r, false), Some(at(5)));
        let mut r = vec![(at(1), false), (at(2), false)];
        assert_eq!(transition(&mut r, true), None);
        let mut r = vec![(at(1), true)];
        assert_eq!(transition(&mut r, true), Some(at(1)));
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut j = Jitter(12345);
        for _ in 0..1000 {
            let v = j.next_ms(20, 80);
            assert!((20..=80).contains(&v));
        }
    }
}
