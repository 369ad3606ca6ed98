//! The comparisons: each scenario builds Sinew and its baseline(s) side by
//! side, then measures them alternately (baseline, Sinew, baseline, ...)
//! so that drift of the machine hits both alike.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use sinew_testvms::cni;
use sinew_testvms::datastore;
use sinew_testvms::lab::{Binaries, LabError, LabSpec, Routing, POD_IFNAME, POD_NAMESPACE};
use sinew_testvms::netns::{command_in, NetnsError};
use sinew_testvms::topology::Names;
use sinew_testvms::NetNs;

use crate::envs::{self, lab_up, BaselineEnv, Endpoints, EnvError, LabPods, VethPair};
use crate::idle::{self, IdleError};
use crate::iperf::{self, IperfError, IperfServer};
use crate::report::{Better, Report, Row};
use crate::rr::{self, RrConfig, RrError};
use crate::stats::{percentile, Samples};

/// Port of the iperf3 servers (each in its own namespace).
const IPERF_PORT: u16 = 5201;
/// Port of the request/response servers.
const RR_PORT: u16 = 7001;
/// How long the short check that each path works lasts.
const WARMUP: Duration = Duration::from_millis(200);

/// Errors from running a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// An environment could not be built.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// A namespace operation failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The request/response benchmark failed.
    #[error("{label}: {source}")]
    Rr {
        /// Which side.
        label: String,
        /// The underlying error.
        #[source]
        source: RrError,
    },
    /// iperf3 failed.
    #[error("{label}: {source}")]
    Iperf {
        /// Which side.
        label: String,
        /// The underlying error.
        #[source]
        source: IperfError,
    },
    /// Idle wait or Ctrl-C.
    #[error(transparent)]
    Idle(#[from] IdleError),
    /// A lab operation failed (boxed: it is large).
    #[error(transparent)]
    Lab(#[from] Box<LabError>),
    /// A CNI invocation failed.
    #[error("cni {command} of pod {pod}: {reason}")]
    Cni {
        /// ADD or DEL.
        command: &'static str,
        /// Pod name.
        pod: String,
        /// What went wrong.
        reason: String,
    },
    /// A step of a scenario module (policy, services) failed; boxed so
    /// that this module does not import the scenarios built on it.
    #[error(transparent)]
    Step(Box<dyn std::error::Error + Send + Sync>),
    /// The agent's memory could not be read.
    #[error("cannot read VmRSS of the agent (pid {pid}): {reason}")]
    Rss {
        /// Agent pid.
        pid: u32,
        /// What went wrong.
        reason: String,
    },
}

/// How every scenario runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Repetitions of each comparison.
    pub reps: u32,
    /// Length of each TCP_RR, TCP_CRR and iperf3 run.
    pub duration: Duration,
    /// Pods for the CNI and memory scenario.
    pub pods: u32,
    /// Longest wait for an idle machine before a scenario.
    pub idle_wait: Duration,
    /// Longest wait for an idle machine before each repetition.
    pub idle_wait_rep: Duration,
    /// Print lab progress.
    pub verbose: bool,
    /// Where sinew-agent and sinew-cni are.
    pub binaries: Binaries,
    /// Prefix of every name this run creates, unique per process.
    pub prefix: String,
    /// Extra arguments for every agent (`--agent-arg`), before the
    /// scenario's own.
    pub agent_args: Vec<String>,
    /// Which of TCP_RR, TCP_CRR and iperf3 the pod-to-pod scenarios run
    /// (`--only`); all when empty.
    pub only: Vec<TestKind>,
    /// Cross-node: also a second Sinew lab whose agents get these
    /// arguments too (`--versus-agent-arg`), measured in the same run.
    pub versus_agent_args: Vec<String>,
}

/// A family of tests, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TestKind {
    Rr,
    Crr,
    Iperf,
}

impl Options {
    fn runs(&self, test: Test) -> bool {
        let kind = match test {
            Test::Rr => TestKind::Rr,
            Test::Crr => TestKind::Crr,
            Test::Iperf(_) => TestKind::Iperf,
        };
        self.only.is_empty() || self.only.contains(&kind)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Metric {
    RrRate,
    RrP50,
    RrP99,
    CrrRate,
    CrrP50,
    CrrP99,
    Tput1,
    Tput4,
}

impl Metric {
    pub(crate) const ALL: [Metric; 8] = [
        Metric::RrRate,
        Metric::RrP50,
        Metric::RrP99,
        Metric::CrrRate,
        Metric::CrrP50,
        Metric::CrrP99,
        Metric::Tput1,
        Metric::Tput4,
    ];

    fn name(self) -> &'static str {
        match self {
            Metric::RrRate => "TCP_RR rate",
            Metric::RrP50 => "TCP_RR p50",
            Metric::RrP99 => "TCP_RR p99",
            Metric::CrrRate => "TCP_CRR rate",
            Metric::CrrP50 => "TCP_CRR p50",
            Metric::CrrP99 => "TCP_CRR p99",
            Metric::Tput1 => "iperf3 -P1",
            Metric::Tput4 => "iperf3 -P4",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::RrRate => "tx/s",
            Metric::CrrRate => "conn/s",
            Metric::Tput1 | Metric::Tput4 => "Gbit/s",
            _ => "us",
        }
    }

    fn better(self) -> Better {
        match self {
            Metric::RrRate | Metric::CrrRate | Metric::Tput1 | Metric::Tput4 => Better::Higher,
            _ => Better::Lower,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Test {
    Rr,
    Crr,
    Iperf(u32),
}

pub(crate) type Measured = BTreeMap<Metric, Samples>;

/// The servers of one side, kept for the whole scenario.
pub(crate) struct Side {
    pub(crate) ep: Endpoints,
    rr: rr::Server,
    iperf: IperfServer,
}

impl Side {
    pub(crate) fn start(ep: Endpoints) -> Result<Self, ScenarioError> {
        for ns in [&ep.client, &ep.server] {
            envs::tune_for_crr(ns)?;
        }
        let addr = SocketAddr::new(ep.server_ip, RR_PORT);
        let rr_err = |source| ScenarioError::Rr {
            label: ep.label.clone(),
            source,
        };
        let listener = ep
            .server
            .run(|| TcpListener::bind(addr))?
            .map_err(|source| rr_err(RrError::Bind { addr, source }))?;
        let rr = rr::Server::start(listener, 1).map_err(rr_err)?;
        let iperf =
            IperfServer::start(&ep.server, ep.server_ip, IPERF_PORT).map_err(|source| ScenarioError::Iperf {
                label: ep.label.clone(),
                source,
            })?;
        let side = Self { ep, rr, iperf };
        // Fails early, with the side's name, when the path does not work.
        side.rr_client(Test::Rr, WARMUP)?;
        side.rr_client(Test::Crr, WARMUP)?;
        Ok(side)
    }

    fn rr_client(&self, test: Test, duration: Duration) -> Result<rr::RrResult, ScenarioError> {
        let cfg = RrConfig {
            message_size: 1,
            duration,
        };
        let addr = self.rr.addr();
        let r = self.ep.client.run(move || match test {
            Test::Crr => rr::tcp_crr(addr, cfg),
            _ => rr::tcp_rr(addr, cfg),
        })?;
        r.map_err(|source| ScenarioError::Rr {
            label: self.ep.label.clone(),
            source,
        })
    }

    fn measure(&self, test: Test, duration: Duration, into: &mut Measured) -> Result<(), ScenarioError> {
        let mut put = |m: Metric, v: f64| into.entry(m).or_default().push(v);
        match test {
            Test::Rr | Test::Crr => {
                let r = self.rr_client(test, duration)?;
                let (rate, p50, p99) = match test {
                    Test::Rr => (Metric::RrRate, Metric::RrP50, Metric::RrP99),
                    _ => (Metric::CrrRate, Metric::CrrP50, Metric::CrrP99),
                };
                put(rate, r.rate);
                put(p50, r.p50_us);
                put(p99, r.p99_us);
            }
            Test::Iperf(streams) => {
                let secs = duration.as_secs_f64().round().max(1.0) as u32;
                let bps = iperf::run_client(&self.ep.client, &self.iperf, streams, secs).map_err(|source| {
                    ScenarioError::Iperf {
                        label: self.ep.label.clone(),
                        source,
                    }
                })?;
                put(if streams == 1 { Metric::Tput1 } else { Metric::Tput4 }, bps / 1e9);
            }
        }
        Ok(())
    }
}

/// Measures every test on every side, `reps` times, sides alternating
/// within each test. Returns one [`Measured`] per side, in order.
fn run_sides(
    scenario: &str,
    sides: &[Side],
    opts: &Options,
    report: &mut Report,
) -> Result<Vec<Measured>, ScenarioError> {
    run_tests(
        scenario,
        sides,
        &[Test::Rr, Test::Crr, Test::Iperf(1), Test::Iperf(4)],
        opts,
        report,
    )
}

/// [`run_sides`] with a chosen list of tests.
pub(crate) fn run_tests(
    scenario: &str,
    sides: &[Side],
    tests: &[Test],
    opts: &Options,
    report: &mut Report,
) -> Result<Vec<Measured>, ScenarioError> {
    let tests: Vec<Test> = tests.iter().copied().filter(|&t| opts.runs(t)).collect();
    let mut out = vec![Measured::new(); sides.len()];
    for rep in 1..=opts.reps {
        let w = idle::wait_for_idle(opts.idle_wait_rep)?;
        if let Some(n) = w.note(&format!("{scenario} rep {rep}")) {
            eprintln!("  {n}");
            report.notes.push(n);
        }
        for &test in &tests {
            for (i, side) in sides.iter().enumerate() {
                idle::check_interrupted()?;
                eprintln!("  {scenario}: rep {rep}/{}: {test:?} on {}", opts.reps, side.ep.label);
                side.measure(test, opts.duration, &mut out[i])?;
            }
        }
    }
    Ok(out)
}

fn rows(scenario: &str, baseline: &str, base: &Measured, sinew: &Measured) -> Vec<Row> {
    metric_rows(&Metric::ALL, scenario, baseline, base, sinew)
}

/// One row per metric in `metrics`.
pub(crate) fn metric_rows(
    metrics: &[Metric],
    scenario: &str,
    baseline: &str,
    base: &Measured,
    sinew: &Measured,
) -> Vec<Row> {
    metrics
        .iter()
        .filter(|m| base.contains_key(m) || sinew.contains_key(m))
        .map(|&m| Row {
            scenario: scenario.to_owned(),
            metric: m.name().to_owned(),
            unit: m.unit(),
            better: m.better(),
            baseline: baseline.to_owned(),
            baseline_samples: base.get(&m).cloned().unwrap_or_default(),
            sinew_samples: sinew.get(&m).cloned().unwrap_or_default(),
        })
        .collect()
}

pub(crate) fn scenario_start(name: &str, opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    eprintln!(
        "== {name}: waiting for an idle machine (up to {} s)",
        opts.idle_wait.as_secs()
    );
    let w = idle::wait_for_idle(opts.idle_wait)?;
    if let Some(n) = w.note(name) {
        eprintln!("  {n}");
        report.notes.push(n);
    }
    Ok(())
}

/// Same-node pod to pod: Sinew (one node, two pods) against pods routed by
/// the node without BPF, and against two namespaces joined by one veth pair.
pub fn same_node(opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    const NAME: &str = "same-node";
    scenario_start(NAME, opts, report)?;
    eprintln!("  building the veth pair, the routed baseline and a sinew lab");
    let veth = VethPair::create(&format!("{}-veth", opts.prefix))?;
    let base = BaselineEnv::create(&format!("{}-b", opts.prefix), 1, &[1, 1], Routing::Native)?;
    let lab = lab_up(&lab_spec(opts, 1, 2, Routing::Native), &opts.binaries, opts.verbose)?;
    let (bs, bs_ip) = base.pod(0);
    let (bc, _) = base.pod(1);
    let (ss, ss_ip) = lab.pod(0)?;
    let (sc, _) = lab.pod(1)?;
    let sides = [
        Side::start(Endpoints {
            label: "routed".into(),
            server: bs,
            server_ip: bs_ip,
            client: bc,
        })?,
        Side::start(Endpoints {
            label: "sinew".into(),
            server: ss,
            server_ip: ss_ip,
            client: sc,
        })?,
        Side::start(veth.endpoints())?,
    ];
    let m = run_sides(NAME, &sides, opts, report)?;
    report.rows.extend(rows(NAME, "routed", &m[0], &m[1]));
    report.rows.extend(rows(NAME, "veth pair", &m[2], &m[1]));
    Ok(())
}

/// Cross-node pod to pod with `routing`: Sinew (two nodes, one pod each)
/// against pods routed by plain kernel routes or a plain VXLAN device.
pub fn cross_node(routing: Routing, opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    let name = format!("cross-node {routing}");
    scenario_start(&name, opts, report)?;
    eprintln!("  building the routed baseline and a sinew lab ({routing})");
    let base = BaselineEnv::create(&format!("{}-b", opts.prefix), 2, &[1, 2], routing)?;
    let lab = lab_up(&lab_spec(opts, 2, 1, routing), &opts.binaries, opts.verbose)?;
    let (bs, bs_ip) = base.pod(0);
    let (bc, _) = base.pod(1);
    let (ss, ss_ip) = lab.pod(0)?;
    let (sc, _) = lab.pod(1)?;
    let label = format!("routed {routing}");
    let mut sides = vec![
        Side::start(Endpoints {
            label: label.clone(),
            server: bs,
            server_ip: bs_ip,
            client: bc,
        })?,
        Side::start(Endpoints {
            label: "sinew".into(),
            server: ss,
            server_ip: ss_ip,
            client: sc,
        })?,
    ];
    // The same scenario with other agent arguments, to see what a
    // feature costs in one run.
    let versus_label = format!("sinew {}", opts.versus_agent_args.join(" "));
    let _versus = if opts.versus_agent_args.is_empty() {
        None
    } else {
        let mut spec = lab_spec(opts, 2, 1, routing);
        spec.name_prefix = format!("{}-v", opts.prefix);
        spec.agent_args.extend(opts.versus_agent_args.iter().cloned());
        let lab = lab_up(&spec, &opts.binaries, opts.verbose)?;
        let (vs, vs_ip) = lab.pod(0)?;
        let (vc, _) = lab.pod(1)?;
        sides.push(Side::start(Endpoints {
            label: versus_label.clone(),
            server: vs,
            server_ip: vs_ip,
            client: vc,
        })?);
        Some(lab)
    };
    let m = run_sides(&name, &sides, opts, report)?;
    report.rows.extend(rows(&name, &label, &m[0], &m[1]));
    if let Some(v) = m.get(2) {
        report.rows.extend(rows(&name, &versus_label, v, &m[1]));
    }
    Ok(())
}

/// A lab for the Sinew side, its agents started with `--agent-arg`s.
pub(crate) fn lab_spec(opts: &Options, nodes: u32, pods_per_node: u32, routing: Routing) -> LabSpec {
    LabSpec {
        name_prefix: format!("{}-s", opts.prefix),
        nodes,
        pods_per_node,
        routing,
        state_dir: None,
        agent_args: opts.agent_args.clone(),
        datastore: Default::default(),
    }
}

/// Which rows [`cni_and_memory`] adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CniParts {
    /// CNI ADD/DEL latency rows.
    pub latency: bool,
    /// Agent memory rows.
    pub memory: bool,
}

/// CNI ADD and DEL latency over `opts.pods` pods on one node, and the
/// agent's resident memory with that many endpoints. Pod namespaces and
/// manifests are made before the clock starts, so only the plugin
/// invocation (fork, exec, gRPC to the agent, veth and BPF setup) is timed.
/// Its baseline is the fork and exec of `true` in the node's namespace: the
/// part of every invocation that no plugin can avoid.
pub fn cni_and_memory(parts: CniParts, opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    const NAME: &str = "cni";
    scenario_start(&format!("cni/memory ({} pods)", opts.pods), opts, report)?;
    let spec = lab_spec(opts, 1, 0, Routing::Native);
    let lab_guard = lab_up(&spec, &opts.binaries, opts.verbose)?;
    let lab = lab_guard.lab();
    let node = lab.nodes()[0].clone();
    let agent_pid = node.agent_pid.ok_or_else(|| ScenarioError::Rss {
        pid: 0,
        reason: "the lab recorded no agent pid".into(),
    })?;
    let names = Names::new(&spec.name_prefix).map_err(|source| EnvError::Topology {
        prefix: spec.name_prefix.clone(),
        source: Box::new(source),
    })?;
    let config = lab.cni_config(&node.name).map_err(Box::new)?;
    eprintln!("  creating {} pod namespaces and manifests", opts.pods);
    let mut pods = Vec::new();
    for i in 1..=opts.pods {
        idle::check_interrupted()?;
        let name = format!("{}-c{i}", node.name);
        let netns = NetNs::create(names.pod(node.index, &name))?;
        let labels = BTreeMap::from([("app".to_owned(), "bench".to_owned())]);
        datastore::write_atomic(
            &datastore::pod_path(&lab.datastore_dir(), POD_NAMESPACE, &name),
            &datastore::pod_yaml(POD_NAMESPACE, &name, &node.name, &labels),
        )
        .map_err(|e| ScenarioError::Cni {
            command: "ADD",
            pod: name.clone(),
            reason: format!("writing the pod manifest: {e}"),
        })?;
        pods.push((name.clone(), cni::container_id(&spec.name_prefix, &name), netns));
    }
    let invoke = |command: &'static str, (name, id, netns): &(String, String, NetNs)| {
        let t0 = Instant::now();
        let out = lab
            .invoke_cni(
                &node.name,
                command,
                id,
                &netns.path(),
                POD_IFNAME,
                &cni::k8s_args(POD_NAMESPACE, name),
                &config,
            )
            .map_err(Box::new)?;
        let ns = t0.elapsed().as_nanos() as u64;
        let checked = if command == "ADD" {
            cni::parse_add(name, &out).map(|_| ())
        } else {
            cni::check(command, name, &out)
        };
        checked.map_err(|e| ScenarioError::Cni {
            command,
            pod: name.clone(),
            reason: e.to_string(),
        })?;
        Ok::<u64, ScenarioError>(ns)
    };
    let mut m: BTreeMap<&'static str, Samples> = BTreeMap::new();
    let mut put = |k: &'static str, v: f64| m.entry(k).or_default().push(v);
    let n = opts.pods as usize;
    let tail = (n / 10).max(1);
    for rep in 1..=opts.reps {
        let w = idle::wait_for_idle(opts.idle_wait_rep)?;
        if let Some(note) = w.note(&format!("cni rep {rep}")) {
            report.notes.push(note);
        }
        let rss0 = vm_rss_kib(agent_pid)?;
        let exec_true = (0..n)
            .map(|_| exec_true(&node.netns))
            .collect::<Result<Vec<u64>, ScenarioError>>()?;
        eprintln!("  cni: rep {rep}/{}: ADD of {n} pods", opts.reps);
        let mut adds = Vec::with_capacity(n);
        for p in &pods {
            idle::check_interrupted()?;
            adds.push(invoke("ADD", p)?);
        }
        // Let the agent finish any work that follows the ADDs.
        std::thread::sleep(Duration::from_millis(500));
        let rss_full = vm_rss_kib(agent_pid)?;
        eprintln!("  cni: rep {rep}/{}: DEL of {n} pods", opts.reps);
        let mut dels = Vec::with_capacity(n);
        for p in &pods {
            idle::check_interrupted()?;
            dels.push(invoke("DEL", p)?);
        }
        std::thread::sleep(Duration::from_millis(500));
        let rss_after = vm_rss_kib(agent_pid)?;

        let ms = |v: &[u64], q: f64| {
            let mut v = v.to_vec();
            v.sort_unstable();
            percentile(&v, q).map_or(f64::NAN, |ns| ns as f64 / 1e6)
        };
        put("exec p50", ms(&exec_true, 0.5));
        put("exec p99", ms(&exec_true, 0.99));
        put("ADD p50", ms(&adds, 0.5));
        put("ADD p99", ms(&adds, 0.99));
        put("ADD first p50", ms(&adds[..tail], 0.5));
        put("ADD last p50", ms(&adds[n - tail..], 0.5));
        put("DEL p50", ms(&dels, 0.5));
        put("DEL p99", ms(&dels, 0.99));
        put("rss0", rss0 as f64 / 1024.0);
        put("rss full", rss_full as f64 / 1024.0);
        put("rss after", rss_after as f64 / 1024.0);
        put("rss per ep", (rss_full as f64 - rss0 as f64) / n as f64);
    }
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    let row = |metric: String, unit, better, baseline: &str, b: Samples, s: Samples| Row {
        scenario: NAME.to_owned(),
        metric,
        unit,
        better,
        baseline: baseline.to_owned(),
        baseline_samples: b,
        sinew_samples: s,
    };
    if parts.latency {
        let exec = "exec true";
        report.rows.extend([
            row(
                "ADD p50".into(),
                "ms",
                Better::Lower,
                exec,
                get("exec p50"),
                get("ADD p50"),
            ),
            row(
                "ADD p99".into(),
                "ms",
                Better::Lower,
                exec,
                get("exec p99"),
                get("ADD p99"),
            ),
            row(
                "DEL p50".into(),
                "ms",
                Better::Lower,
                exec,
                get("exec p50"),
                get("DEL p50"),
            ),
            row(
                "DEL p99".into(),
                "ms",
                Better::Lower,
                exec,
                get("exec p99"),
                get("DEL p99"),
            ),
            row(
                format!("ADD p50 last {tail} vs first {tail}"),
                "ms",
                Better::Lower,
                &format!("first {tail} ADDs"),
                get("ADD first p50"),
                get("ADD last p50"),
            ),
        ]);
    }
    if parts.memory {
        let none = Samples::default;
        let idle_agent = "0 endpoints";
        report.rows.extend([
            row(
                "agent RSS, 0 endpoints".into(),
                "MiB",
                Better::Lower,
                "",
                none(),
                get("rss0"),
            ),
            row(
                format!("agent RSS, {n} endpoints"),
                "MiB",
                Better::Lower,
                idle_agent,
                get("rss0"),
                get("rss full"),
            ),
            row(
                format!("agent RSS after {n} DELs"),
                "MiB",
                Better::Lower,
                idle_agent,
                get("rss0"),
                get("rss after"),
            ),
            row(
                "agent RSS per endpoint".into(),
                "KiB",
                Better::Lower,
                "",
                none(),
                get("rss per ep"),
            ),
        ]);
    }
    drop(pods);
    drop(lab_guard);
    Ok(())
}

fn exec_true(netns: &NetNs) -> Result<u64, ScenarioError> {
    let mut cmd = command_in(netns, "true")?;
    cmd.env_clear();
    let t0 = Instant::now();
    let status = cmd.status().map_err(|e| ScenarioError::Cni {
        command: "ADD",
        pod: "-".into(),
        reason: format!("running `true` for the baseline: {e}"),
    })?;
    let ns = t0.elapsed().as_nanos() as u64;
    if !status.success() {
        return Err(ScenarioError::Cni {
            command: "ADD",
            pod: "-".into(),
            reason: format!("`true` exited with {status}"),
        });
    }
    Ok(ns)
}

/// VmRSS of `pid` in KiB, from `/proc/PID/status`.
pub fn vm_rss_kib(pid: u32) -> Result<u64, ScenarioError> {
    let err = |reason: String| ScenarioError::Rss { pid, reason };
    let text = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
        .map_err(|e| err(format!("{e} (did the agent exit?)")))?;
    parse_vm_rss(&text).ok_or_else(|| err("no VmRSS line".into()))
}

/// The `VmRSS:` value in KiB from the text of `/proc/PID/status`.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tsinew-agent\nVmPeak:\t  100 kB\nVmRSS:\t   23456 kB\nThreads: 4\n";
        assert_eq!(parse_vm_rss(status), Some(23456));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn every_metric_has_a_unit_and_direction() {
        for m in Metric::ALL {
            assert!(!m.unit().is_empty());
            let rate = m.name().ends_with("rate") || m.name().starts_with("iperf3");
            assert_eq!(m.better() == Better::Higher, rate, "{}", m.name());
        }
    }
}
