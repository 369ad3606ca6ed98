//! `sinew-bench observe`: what flow observability costs.
//!
//! (a) Event rate: a pod sends UDP to a pod whose policy denies it, at
//! increasing paced rates and then as fast as it can. Each packet makes two
//! datapath events (the policy verdict of a new connection, then the drop).
//! The observer's ServerStatus says how many it read and how many the
//! datapath lost (ring full); `/proc/<agent>/stat` and `status` give the
//! agent's CPU time and memory over each step.
//!
//! (b) Overhead: TCP_RR, TCP_CRR and iperf3 between two pods of a lab whose
//! agents run `--events true`, against the same in a lab with
//! `--events false`, both up at once and measured alternately.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sinew_proto::observer_v1::{ServerStatusRequest, ServerStatusResponse};
use sinew_proto::v1::ApplyPolicyRequest;
use sinew_proto::{AgentClient, ObserverClient};
use sinew_testvms::lab::Routing;
use sinew_testvms::NetNs;

use crate::envs::{lab_up, Endpoints, LabPods};
use crate::idle;
use crate::report::{Better, Report, Row};
use crate::scenarios::{lab_spec, metric_rows, run_tests, scenario_start, Metric, Options, ScenarioError, Side, Test};
use crate::stats::Samples;

const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Paced packet rates (packets per second) of the event-rate steps; the
/// last step sends as fast as the generator can.
const RATES_PPS: [u64; 4] = [10_000, 25_000, 50_000, 100_000];
/// Datapath events per denied packet: the policy verdict and the drop.
const EVENTS_PER_PACKET: u64 = 2;
/// Generator threads (the machine has two cores; the agent needs one).
const GENERATORS: usize = 2;
/// The port no policy admits.
const DENIED_PORT: u16 = 9999;
/// The event rate the observer must read without loss.
const GOAL_EVENTS_PER_SEC: f64 = 100_000.0;
/// Linux reports /proc/<pid>/stat times in USER_HZ, 100 on every
/// architecture the project runs on.
const USER_HZ: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ObserveBenchError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot reach the agent at {socket}: {reason}")]
    Connect { socket: PathBuf, reason: String },
    #[error("{call} on {socket}: {reason}")]
    Rpc {
        call: &'static str,
        socket: PathBuf,
        reason: String,
    },
    #[error("cannot read /proc/{pid}: {reason} (did the agent exit?)")]
    Proc { pid: u32, reason: String },
    #[error("the lab's agent has no pid: it was not started by this run")]
    NoPid,
    #[error("no flow events after sending denied packets: is the observer on and the policy enforced? ({0})")]
    NoEvents(String),
    #[error("the packet generator in the pod failed: {0}")]
    Generator(String),
}

/// The agent and observer clients of one node.
struct Clients {
    rt: tokio::runtime::Runtime,
    agent: AgentClient<tonic::transport::Channel>,
    observer: ObserverClient<tonic::transport::Channel>,
    socket: PathBuf,
}

impl Clients {
    fn connect(socket: &Path) -> Result<Self, ObserveBenchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ObserveBenchError::Runtime)?;
        let err = |e: tonic::transport::Error| ObserveBenchError::Connect {
            socket: socket.to_owned(),
            reason: e.to_string(),
        };
        let agent = rt.block_on(sinew_proto::connect(socket, RPC_TIMEOUT)).map_err(err)?;
        let observer = rt
            .block_on(sinew_proto::connect_observer(socket, RPC_TIMEOUT))
            .map_err(err)?;
        Ok(Self {
            rt,
            agent,
            observer,
            socket: socket.to_owned(),
        })
    }

    fn rpc_err(&self, call: &'static str) -> impl Fn(tonic::Status) -> ObserveBenchError + '_ {
        move |s| ObserveBenchError::Rpc {
            call,
            socket: self.socket.clone(),
            reason: s.message().to_owned(),
        }
    }

    fn apply(&mut self, yaml: &str) -> Result<(), ObserveBenchError> {
        let req = ApplyPolicyRequest {
            yaml: yaml.to_owned(),
            source: "sinew-bench-observe.yaml".to_owned(),
        };
        let r = self.rt.block_on(self.agent.apply_policy(req));
        r.map(|_| ()).map_err(self.rpc_err("ApplyPolicy"))
    }

    fn status(&mut self) -> Result<ServerStatusResponse, ObserveBenchError> {
        let r = self.rt.block_on(self.observer.server_status(ServerStatusRequest {}));
        r.map(|r| r.into_inner()).map_err(self.rpc_err("ServerStatus"))
    }
}

/// utime + stime of a process, in seconds, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Result<f64, ObserveBenchError> {
    let err = |reason: String| ObserveBenchError::Proc { pid, reason };
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| err(e.to_string()))?;
    parse_cpu_ticks(&text)
        .map(|t| t as f64 / USER_HZ)
        .ok_or_else(|| err("unexpected format of stat".into()))
}

/// utime + stime in clock ticks. The command name may contain spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn rss_mib(pid: u32) -> Result<f64, ObserveBenchError> {
    crate::scenarios::vm_rss_kib(pid)
        .map(|k| k as f64 / 1024.0)
        .map_err(ObserveBenchError::from)
}

/// Sends UDP from `ns` to `dst` for `duration` on [`GENERATORS`] threads,
/// paced to `pps` in total (None: as fast as possible). Returns the
/// datagrams the kernel accepted.
fn generate(ns: &NetNs, dst: SocketAddr, pps: Option<u64>, duration: Duration) -> Result<u64, ObserveBenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..GENERATORS {
        let (ns, stop) = (ns.clone(), stop.clone());
        let per_thread = pps.map(|p| p as f64 / GENERATORS as f64);
        threads.push(std::thread::spawn(move || -> Result<u64, String> {
            ns.run(move || -> Result<u64, String> {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.connect(dst).map_err(|e| e.to_string())?;
                let payload = [0u8; 16];
                let t0 = Instant::now();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rate) = per_thread {
                        let due = (t0.elapsed().as_secs_f64() * rate) as u64;
                        if sent >= due {
                            std::thread::sleep(Duration::from_micros(100));
                            continue;
                        }
                        // Catch up in small bursts, never more than 1 ms.
                        let burst = (due - sent).min((rate / 1000.0).max(1.0) as u64);
                        for _ in 0..burst {
                            if s.send(&payload).is_ok() {
                                sent += 1;
                            }
                        }
                    } else {
                        for _ in 0..64 {
                            if s.send(&payload).is_ok() {
                                sent += 1;
                            }
                        }
                    }
                }
                Ok(sent)
            })
            .map_err(|e| e.to_string())?
        }));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| ObserveBenchError::Generator("a generator thread panicked".into()))?
            .map_err(ObserveBenchError::Generator)?;
    }
    Ok(total)
}

/// What one step measured.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    /// Events the datapath produced per second (read + lost).
    produced: f64,
    /// Events the observer read per second.
    read: f64,
    lost: u64,
    packets_per_sec: f64,
    cpu_pct: f64,
    rss_mib: f64,
}

fn counters(s: &ServerStatusResponse) -> (u64, u64) {
    (s.num_flows, s.events_lost_total)
}

fn measure_step(
    clients: &mut Clients,
    pid: u32,
    ns: &NetNs,
    dst: SocketAddr,
    pps: Option<u64>,
    duration: Duration,
) -> Result<Step, ObserveBenchError> {
    let (flows0, lost0) = counters(&clients.status()?);
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let sent = generate(ns, dst, pps, duration)?;
    let gen_secs = t0.elapsed().as_secs_f64();
    // Let the observer drain what is still in the ring.
    std::thread::sleep(Duration::from_millis(500));
    let (flows1, lost1) = counters(&clients.status()?);
    let cpu1 = cpu_seconds(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let read = flows1.saturating_sub(flows0);
    let lost = lost1.saturating_sub(lost0);
    Ok(Step {
        produced: (read + lost) as f64 / gen_secs,
        read: read as f64 / gen_secs,
        lost,
        packets_per_sec: sent as f64 / gen_secs,
        cpu_pct: (cpu1 - cpu0) / wall * 100.0,
        rss_mib: rss_mib(pid)?,
    })
}

fn row(
    scenario: &str,
    metric: String,
    unit: &'static str,
    better: Better,
    baseline: &str,
    b: Vec<f64>,
    s: Vec<f64>,
) -> Row {
    Row {
        scenario: scenario.to_owned(),
        metric,
        unit,
        better,
        baseline: baseline.to_owned(),
        baseline_samples: Samples { values: b },
        sinew_samples: Samples { values: s },
    }
}

/// (a): events per second the agent reads without loss.
pub fn event_rate(opts: &Options, report: &mut Report) -> Result<(), ObserveBenchError> {
    const NAME: &str = "observe events";
    scenario_start(NAME, opts, report)?;
    let mut spec = lab_spec(opts, 1, 2, Routing::Vxlan);
    spec.name_prefix = format!("{}-oe", opts.prefix);
    spec.agent_args.extend(["--events".into(), "true".into()]);
    let guard = lab_up(&spec, &opts.binaries, opts.verbose).map_err(ScenarioError::from)?;
    let node = &guard.lab().nodes()[0];
    let pid = node.agent_pid.ok_or(ObserveBenchError::NoPid)?;
    let mut clients = Clients::connect(&node.socket)?;
    let (client, _) = guard.pod(0).map_err(ScenarioError::from)?;
    let (_, server_ip) = guard.pod(1).map_err(ScenarioError::from)?;
    // The lab's pods are labelled app: podN; pod2 admits TCP 8080 only.
    clients.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bench-deny, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: pod2}}\n  ingress:\n  - ports:\n    - {protocol: TCP, port: 8080}\n",
    )?;
    let dst = SocketAddr::new(server_ip, DENIED_PORT);
    let check = measure_step(&mut clients, pid, &client, dst, Some(1000), Duration::from_millis(300))?;
    if check.read == 0.0 {
        return Err(ObserveBenchError::NoEvents(format!("{check:?}")));
    }
    let idle_rss = rss_mib(pid)?;
    let steps: Vec<Option<u64>> = RATES_PPS.iter().map(|r| Some(*r)).chain([None]).collect();
    let mut results: Vec<Vec<Step>> = vec![Vec::new(); steps.len()];
    for rep in 1..=opts.reps {
        let w = idle::wait_for_idle(opts.idle_wait_rep).map_err(ScenarioError::from)?;
        if let Some(n) = w.note(&format!("{NAME} rep {rep}")) {
            report.notes.push(n);
        }
        for (i, pps) in steps.iter().enumerate() {
            idle::check_interrupted().map_err(ScenarioError::from)?;
            let s = measure_step(&mut clients, pid, &client, dst, *pps, opts.duration)?;
            eprintln!(
                "  {NAME}: rep {rep}/{}: {} -> {:.0} pkt/s, {:.0} events/s produced, {:.0} read, {} lost, agent CPU {:.1}%, RSS {:.1} MiB",
                opts.reps,
                pps.map_or("max".to_owned(), |p| format!("{p} pkt/s")),
                s.packets_per_sec,
                s.produced,
                s.read,
                s.lost,
                s.cpu_pct,
                s.rss_mib
            );
            results[i].push(s);
        }
    }
    let mut best_lossless: Option<f64> = None;
    for (pps, rs) in steps.iter().zip(&results) {
        let label = pps.map_or("max rate".to_owned(), |p| format!("{}k pkt/s", p / 1000));
        let col = |f: fn(&Step) -> f64| rs.iter().map(f).collect::<Vec<_>>();
        report.rows.push(row(
            NAME,
            format!("{label}: events read"),
            "kev/s",
            Better::Higher,
            "produced",
            col(|s| s.produced / 1e3),
            col(|s| s.read / 1e3),
        ));
        report.rows.push(row(
            NAME,
            format!("{label}: events lost"),
            "events",
            Better::Lower,
            "",
            Vec::new(),
            col(|s| s.lost as f64),
        ));
        report.rows.push(row(
            NAME,
            format!("{label}: packets sent"),
            "kpkt/s",
            Better::Higher,
            "",
            Vec::new(),
            col(|s| s.packets_per_sec / 1e3),
        ));
        report.rows.push(row(
            NAME,
            format!("{label}: agent CPU"),
            "%",
            Better::Lower,
            "",
            Vec::new(),
            col(|s| s.cpu_pct),
        ));
        report.rows.push(row(
            NAME,
            format!("{label}: agent RSS"),
            "MiB",
            Better::Lower,
            "idle",
            vec![idle_rss],
            col(|s| s.rss_mib),
        ));
        for s in rs.iter().filter(|s| s.lost == 0) {
            best_lossless = Some(best_lossless.map_or(s.read, |b: f64| b.max(s.read)));
        }
    }
    let expected = format!(
        "{EVENTS_PER_PACKET} events per denied packet (policy verdict + drop); goal: at least {GOAL_EVENTS_PER_SEC:.0} events/s read without loss"
    );
    report.notes.push(match best_lossless {
        Some(b) => format!(
            "{NAME}: highest rate read without loss {b:.0} events/s ({}); {expected}",
            if b >= GOAL_EVENTS_PER_SEC {
                "goal met"
            } else {
                "goal NOT met"
            }
        ),
        None => format!("{NAME}: every step lost events; {expected}"),
    });
    Ok(())
}

/// (b): the data path with flow events on against off.
pub fn overhead(opts: &Options, report: &mut Report) -> Result<(), ObserveBenchError> {
    const NAME: &str = "observe overhead";
    scenario_start(NAME, opts, report)?;
    let mut sides = Vec::new();
    let mut guards = Vec::new();
    for (suffix, events) in [("of", "false"), ("on", "true")] {
        let mut spec = lab_spec(opts, 1, 2, Routing::Vxlan);
        spec.name_prefix = format!("{}-{suffix}", opts.prefix);
        spec.agent_args.extend(["--events".into(), events.into()]);
        let guard = lab_up(&spec, &opts.binaries, opts.verbose).map_err(ScenarioError::from)?;
        let (client, _) = guard.pod(0).map_err(ScenarioError::from)?;
        let (server, server_ip): (NetNs, IpAddr) = guard.pod(1).map_err(ScenarioError::from)?;
        sides.push(Side::start(Endpoints {
            label: format!("--events {events}"),
            server,
            server_ip,
            client,
        })?);
        guards.push(guard);
    }
    scenario_start(&format!("{NAME} measurements"), opts, report)?;
    let tests = [Test::Rr, Test::Crr, Test::Iperf(1), Test::Iperf(4)];
    let m = run_tests(NAME, &sides, &tests, opts, report)?;
    report.rows.extend(metric_rows(
        &Metric::ALL,
        "observe: events on vs off (same node)",
        "--events false",
        &m[0],
        &m[1],
    ));
    report.notes.push(format!(
        "{NAME}: pods on one node, no policy; events on means a trace event per TCP SYN/FIN/RST and one counter report per flow and interval; goal: cost at most 3%"
    ));
    drop(sides);
    drop(guards);
    Ok(())
}

/// Both observability benchmarks.
pub fn all(opts: &Options, report: &mut Report) -> Result<(), ObserveBenchError> {
    event_rate(opts, report)?;
    overhead(opts, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_count_from_the_last_parenthesis() {
        let stat = "1234 (sinew (agent) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }
}
