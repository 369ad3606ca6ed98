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
//! Goals from the issue: RSS < 40 MB, p99 < 100 ms. No baseline: the
//! figures stand alone. Use a release build.

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
    std::thread::sleep(Duration::from_secs(2));
    let rss_loaded = vm_rss_kib(pid)? as f64 / 1024.0;
    eprintln!(
        "  {name}: all in the maps {loaded:?} after the agent was ready; RSS {rss_loaded:.1} MiB ({})",
        rss_parts(pid)
    );

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
    report.rows.extend([
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
