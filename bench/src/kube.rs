//! The kubernetes datastore backend at scale (issue 14): one node's agent
//! against the in-process fake API server (`sinew-fakeapi`) holding 1,000
//! pods on 10 other nodes (published as SinewEndpoints, 1,000 identities),
//! 100 namespaces, 500 NetworkPolicies and 1,000 Services with their
//! EndpointSlices ([`Scale::ISSUE_14`]).
//!
//! Measured: how long after the agent is ready all of it is in its maps
//! (the first and last endpoint's ipcache /32s carry their identities);
//! the agent's RSS then, and after the events; and event to map, the time
//! from storing a new SinewEndpoint on another node in the API to its /32
//! in the node's pinned ipcache, polled every 0.5 ms, one event at a time.
//! Beside the agent, `sinew-operator` (next to the agent binary) runs
//! against the same API: its RSS once it leads and has done its first
//! passes (node CIDRs, identity GC) over that cluster, and again after
//! the events. Goals from the issue: agent RSS < 40 MB, operator RSS <
//! 60 MB, p99 < 100 ms. No baseline: the figures stand alone. Use a
//! release build. Beside each agent RSS, where it is (by mapping, from
//! `/proc/PID/smaps`: the binary's code and data, libraries, malloc's
//! heap and arenas, thread stacks, BPF maps mapped in) and, once, the
//! agent's threads.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use sinew_fakeapi::scale::Scale;
use sinew_testvms::kube;
use sinew_testvms::lab::{Routing, UpOptions};

use crate::idle;
use crate::report::{Better, Report, Row};
use crate::scenarios::{lab_spec, scenario_start, vm_rss_kib, Options, ScenarioError};
use crate::stats::{percentile, Samples};

/// Events measured (`--quick`: 20).
const EVENTS: u32 = 100;
/// Longest wait for the whole cluster to reach the maps.
const LOAD_MAX: Duration = Duration::from_secs(120);
/// Longest wait for one event to reach the map.
const EVENT_MAX: Duration = Duration::from_secs(10);

type Ipcache = aya::maps::LpmTrie<aya::maps::MapData, sinew_abi::IpcacheData, sinew_abi::IpcacheValue>;

/// Errors of the kubernetes benchmark.
#[derive(Debug, thiserror::Error)]
pub enum KubeBenchError {
    /// The node's pinned ipcache could not be opened.
    #[error("cannot open the agent's ipcache {path}: {reason} (did the agent load its datapath?)")]
    Ipcache {
        /// The pin.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The operator could not be started or did not stay up.
    #[error("sinew-operator {what}; its log {log}:\n{tail}")]
    Operator {
        /// What went wrong.
        what: String,
        /// Its log.
        log: String,
        /// Its last lines.
        tail: String,
    },
    /// Entries did not reach the map in time.
    #[error("{what} did not reach the agent's ipcache within {secs} s; agent log {log}:\n{tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        secs: u64,
        /// The agent's log.
        log: String,
        /// Its last lines.
        tail: String,
    },
}

impl From<KubeBenchError> for ScenarioError {
    fn from(e: KubeBenchError) -> Self {
        ScenarioError::Step(Box::new(e))
    }
}

fn healthy(socket: &Path) -> bool {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return false;
    };
    rt.block_on(async {
        let Ok(mut c) = sinew_proto::connect(socket, Duration::from_secs(2)).await else {
            return false;
        };
        c.status(sinew_proto::v1::StatusRequest {})
            .await
            .is_ok_and(|r| r.into_inner().healthy)
    })
}

fn row(scenario: &str, metric: &str, unit: &'static str, v: f64) -> Row {
    let mut s = Samples::default();
    s.push(v);
    Row {
        scenario: scenario.to_owned(),
        metric: metric.to_owned(),
        unit,
        better: Better::Lower,
        baseline: String::new(),
        baseline_samples: Samples::default(),
        sinew_samples: s,
    }
}

/// Runs the benchmark; `quick`: 20 events instead of 100.
pub fn run(opts: &Options, quick: bool, report: &mut Report) -> Result<(), ScenarioError> {
    let scale = Scale::ISSUE_14;
    let name = format!(
        "kube ({} pods, {} ns, {} policies, {} services)",
        scale.pods, scale.namespaces, scale.policies, scale.pods
    );
    scenario_start(&name, opts, report)?;
    let spec = lab_spec(opts, 1, 0, Routing::Vxlan);
    let up_opts = UpOptions {
        ready: Some(&healthy),
        ..Default::default()
    };
    let prefix = spec.name_prefix.clone();
    let verbose = opts.verbose;
    eprintln!("  {name}: filling the API and starting the agent");
    let (guard, api) = kube::up(&spec, &opts.binaries, &up_opts, &|f| scale.populate(f), &mut |line| {
        if verbose {
            eprintln!("    [{prefix}] {line}");
        }
    })
    .map_err(Box::new)?;
    let node = guard.lab().nodes()[0].clone();
    let pid = node.agent_pid.ok_or_else(|| ScenarioError::Rss {
        pid: 0,
        reason: "the lab recorded no agent pid".into(),
    })?;
    let pin = node
        .bpf_root
        .join(format!("v{}", sinew_abi::ABI_VERSION))
        .join("maps")
        .join(sinew_abi::maps::IPCACHE);
    let map_err = |reason: String| KubeBenchError::Ipcache {
        path: pin.display().to_string(),
        reason,
    };
    let data = aya::maps::MapData::from_pin(&pin).map_err(|e| map_err(e.to_string()))?;
    let map: Ipcache =
        aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(|e| map_err(e.to_string()))?;
    // The /32 with the endpoint's identity (a longest-prefix lookup would
    // find the remote node's pod CIDR before it exists).
    let has = |ip: Ipv4Addr, identity: u32| {
        let k = sinew_abi::IpcacheKey::v4(ip, 32);
        map.get(&aya::maps::lpm_trie::Key::new(k.prefixlen, k.data()), 0)
            .is_ok_and(|v| v.identity == identity)
    };
    let timeout = |what: String, within: Duration| KubeBenchError::Timeout {
        what,
        secs: within.as_secs(),
        log: node.agent_log.display().to_string(),
        tail: sinew_testvms::lab::tail(&node.agent_log, 20),
    };
    let last = scale.pods - 1;
    let start = Instant::now();
    while !(has(scale.pod_ip(0), scale.identity(0)) && has(scale.pod_ip(last), scale.identity(last))) {
        idle::check_interrupted()?;
        if start.elapsed() > LOAD_MAX {
            return Err(timeout(format!("the {} endpoints", scale.pods), LOAD_MAX).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let loaded = start.elapsed();
    // In the external host's namespace, where the API listens.
    let ext = format!("{}-ext", spec.name_prefix);
    let operator = Operator::start(&opts.binaries.agent, &spec.state_dir(), &ext)?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_loaded = vm_rss_kib(pid)? as f64 / 1024.0;
    // Elected, and an identity GC pass over the cluster's identities and
    // endpoints done.
    operator.wait_for("identity GC", Duration::from_secs(30))?;
    let op_loaded = operator.rss()?;
    eprintln!(
        "  {name}: operator RSS {op_loaded:.1} MiB ({})",
        rss_parts(operator.pid())
    );
    eprintln!(
        "  {name}: all in the maps {loaded:?} after the agent was ready; RSS {rss_loaded:.1} MiB ({})",
        rss_parts(pid)
    );
    eprintln!("  {name}: agent RSS by mapping: {}", rss_by_mapping(pid));
    eprintln!("  {name}: agent threads: {}", threads(pid));

    let events = if quick { 20 } else { EVENTS };
    let mut lat_us: Vec<u64> = Vec::new();
    for i in 0..events {
        idle::check_interrupted()?;
        // Above every address the cluster uses, on the 10 other nodes.
        let ip = Ipv4Addr::new(10, 250, (i % scale.nodes) as u8, 200 + (i / scale.nodes) as u8);
        let (j, identity) = (scale.pods * 2 + i, scale.identity(i));
        let t = Instant::now();
        scale.put_endpoint(api.fake(), j, ip, identity);
        while !has(ip, identity) {
            if t.elapsed() > EVENT_MAX {
                return Err(timeout(format!("the new endpoint {ip}"), EVENT_MAX).into());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        lat_us.push(t.elapsed().as_micros() as u64);
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_after = vm_rss_kib(pid)? as f64 / 1024.0;
    lat_us.sort_unstable();
    let ms = |q: f64| percentile(&lat_us, q).unwrap_or(0) as f64 / 1000.0;
    eprintln!(
        "  {name}: event to ipcache p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; RSS after {events} events {rss_after:.1} MiB ({})",
        ms(0.5),
        ms(0.99),
        ms(1.0),
        rss_parts(pid)
    );
    eprintln!("  {name}: agent RSS by mapping: {}", rss_by_mapping(pid));
    let op_after = operator.rss()?;
    eprintln!(
        "  {name}: operator RSS after {events} events {op_after:.1} MiB ({})",
        rss_parts(operator.pid())
    );
    drop(operator);
    report.rows.extend([
        row(&name, "operator RSS, loaded (goal < 60 MB)", "MiB", op_loaded),
        row(&name, &format!("operator RSS, after {events} events"), "MiB", op_after),
        row(
            &name,
            "all in the maps after ready",
            "ms",
            loaded.as_secs_f64() * 1000.0,
        ),
        row(&name, "agent RSS, loaded (goal < 40 MB)", "MiB", rss_loaded),
        row(&name, &format!("agent RSS, after {events} events"), "MiB", rss_after),
        row(&name, "event to ipcache p50", "ms", ms(0.5)),
        row(&name, "event to ipcache p99 (goal < 100)", "ms", ms(0.99)),
    ]);
    // The agent stops before the API it watches.
    drop(guard);
    drop(api);
    Ok(())
}

/// `sinew-operator run` against the lab's API, stopped when dropped.
struct Operator {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Operator {
    fn start(agent: &Path, state_dir: &Path, netns: &str) -> Result<Self, KubeBenchError> {
        let bin = agent.with_file_name("sinew-operator");
        let log = state_dir.join("operator.log");
        let err = |what: String| KubeBenchError::Operator {
            what,
            log: log.display().to_string(),
            tail: sinew_testvms::lab::tail(&log, 20),
        };
        let out = std::fs::File::create(&log).map_err(|e| err(format!("log: {e}")))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&bin)
            .args([
                "run",
                "--metrics-addr",
                "127.0.0.1:0",
                "--lease-duration-secs",
                "6",
                "--identity-gc-interval-secs",
                "2",
            ])
            .env("KUBECONFIG", sinew_testvms::kube::kubeconfig_path(state_dir))
            .env("RUST_LOG", "info,sinew_operator=debug")
            .stdout(out.try_clone().map_err(|e| err(format!("log: {e}")))?)
            .stderr(out)
            .spawn()
            .map_err(|e| {
                err(format!(
                    "cannot start {}: {e} (build it: cargo build --release -p sinew-operator)",
                    bin.display()
                ))
            })?;
        Ok(Operator { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until its log has a line with `what`.
    fn wait_for(&self, what: &str, within: Duration) -> Result<(), KubeBenchError> {
        let t = Instant::now();
        while !std::fs::read_to_string(&self.log).unwrap_or_default().contains(what) {
            self.rss()?;
            if t.elapsed() > within {
                return Err(KubeBenchError::Operator {
                    what: format!("logged no {what:?} within {} s", within.as_secs()),
                    log: self.log.display().to_string(),
                    tail: sinew_testvms::lab::tail(&self.log, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Its RSS in MiB; an error when it exited.
    fn rss(&self) -> Result<f64, KubeBenchError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        match crate::scenarios::parse_vm_rss(&status) {
            Some(kib) if !status.contains("State:\tZ") => Ok(kib as f64 / 1024.0),
            _ => Err(KubeBenchError::Operator {
                what: "exited".into(),
                log: self.log.display().to_string(),
                tail: sinew_testvms::lab::tail(&self.log, 20),
            }),
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a process's resident memory is, from `/proc/PID/status`: anonymous
/// (heap, stacks, mmapped maps), file-backed (the binary's code) and
/// shared.
fn rss_parts(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ["RssAnon", "RssFile", "RssShmem"]
        .iter()
        .filter_map(|k| {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()?;
            Some(format!("{} {:.1}", &k[3..].to_lowercase(), v / 1024.0))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a process's resident memory is, from `/proc/PID/smaps`, in MiB:
/// its own binary's code (r-x), read-only data (r--) and writable data;
/// shared libraries; the main heap (brk); glibc's other malloc arenas
/// (64 MiB reservations, read-write at the start and inaccessible after);
/// thread stacks (read-write after an inaccessible guard page); BPF maps
/// mapped into it; and other anonymous memory (large allocations malloc
/// maps directly).
fn rss_by_mapping(pid: u32) -> String {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    // (perms, path, rss KiB) per mapping, in address order.
    let mut maps: Vec<(String, String, u64)> = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            let perms = f.next().unwrap_or_default().to_string();
            let path = f.nth(3).unwrap_or_default().to_string();
            maps.push((perms, path, 0));
        } else if first == "Rss:" {
            if let (Some(m), Some(kib)) = (maps.last_mut(), f.next().and_then(|v| v.parse().ok())) {
                m.2 = kib;
            }
        }
    }
    let exe = exe.display().to_string();
    let mut parts: Vec<(&str, u64)> = [
        "binary r-x",
        "binary r--",
        "binary rw-",
        "libraries",
        "heap",
        "arenas",
        "thread stacks",
        "bpf",
        "other anon",
    ]
    .iter()
    .map(|k| (*k, 0))
    .collect();
    let mut add = |k: &str, v: u64| {
        if let Some(p) = parts.iter_mut().find(|p| p.0 == k) {
            p.1 += v;
        }
    };
    for (i, (perms, path, rss)) in maps.iter().enumerate() {
        let guard_before = i > 0 && maps[i - 1].0.starts_with("---") && maps[i - 1].1.is_empty();
        let none_after = maps
            .get(i + 1)
            .is_some_and(|m| m.0.starts_with("---") && m.1.is_empty());
        let k = if *path == exe {
            match &perms[..3] {
                "r-x" => "binary r-x",
                "r--" => "binary r--",
                _ => "binary rw-",
            }
        } else if path.starts_with('/') {
            "libraries"
        } else if path == "[heap]" {
            "heap"
        } else if path.contains("bpf") {
            "bpf"
        } else if path.is_empty() && guard_before {
            "thread stacks"
        } else if path.is_empty() && none_after {
            "arenas"
        } else {
            "other anon"
        };
        add(k, *rss);
    }
    parts
        .iter()
        .map(|(k, v)| format!("{k} {:.1}", *v as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A process's threads by name, with counts.
fn threads(pid: u32) -> String {
    let mut names: std::collections::BTreeMap<String, u32> = Default::default();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_default() += 1;
    }
    let total: u32 = names.values().sum();
    let list: Vec<String> = names.iter().map(|(n, c)| format!("{n} x{c}")).collect();
    format!("{total} ({})", list.join(", "))
}
