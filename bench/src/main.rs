//! `sinew-bench`: runs the Sinew benchmarks and prints a comparison table.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sinew_bench::report::Report;
use sinew_bench::scenarios::{self, CniParts, Options};
use sinew_bench::{cpu, idle, kube, observe, policy, services};
use sinew_testvms::lab::{Binaries, Routing};

/// Benchmarks Sinew against plain-kernel baselines measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "sinew-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Repetitions of each comparison (baseline and Sinew alternate).
    #[arg(long, global = true, default_value_t = 5)]
    reps: u32,
    /// Seconds per TCP_RR, TCP_CRR and iperf3 run.
    #[arg(long, global = true, default_value_t = 5.0)]
    duration: f64,
    /// Pods for the CNI and memory scenarios.
    #[arg(long, global = true, default_value_t = 200)]
    pods: u32,
    /// Smoke test: 1 repetition, 1 s runs, 20 pods.
    #[arg(long, global = true)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Longest wait in seconds for an idle machine before each scenario.
    #[arg(long, global = true, default_value_t = 60)]
    idle_wait: u64,
    /// Directory of sinew-agent and sinew-cni; default: next to this program.
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// An extra sinew-agent argument for every lab (repeat for more), e.g.
    /// `--agent-arg=--events --agent-arg=false` to see what a feature costs.
    #[arg(long = "agent-arg", global = true, allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Only these tests in the pod-to-pod scenarios (comma-separated:
    /// rr, crr, iperf); default: all.
    #[arg(long, global = true, value_delimiter = ',')]
    only: Vec<sinew_bench::scenarios::TestKind>,
    /// Cross-node: also measure a second Sinew lab whose agents get this
    /// extra argument (repeat for more), in the same run, e.g.
    /// `--versus-agent-arg=--events --versus-agent-arg=false`.
    #[arg(long = "versus-agent-arg", global = true, allow_hyphen_values = true)]
    versus_agent_args: Vec<String>,
    /// CPUs of the client and the server on every arm: `CLIENT,SERVER`
    /// (e.g. `1,0`), `auto` (the last two CPUs this process may use) or
    /// `off`. Unpinned TCP_RR can be bimodal.
    #[arg(long, global = true, env = "SINEW_BENCH_CPUS", default_value = "auto")]
    cpus: String,
    /// Print lab progress.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every scenario.
    All,
    /// Pod to pod on one node: Sinew vs routed pods vs one veth pair.
    SameNode,
    /// Pod to pod across two nodes: Sinew vs plain routing of the same kind.
    CrossNode {
        /// vxlan or native.
        #[arg(long, default_value = "vxlan")]
        routing: Routing,
    },
    /// CNI ADD and DEL latency over many pods on one node.
    Cni,
    /// The agent's resident memory with many endpoints.
    Memory,
    /// Identity-based policy: data path with 0/1,000/10,000 rules,
    /// ApplyPolicy-to-enforcement latency, memory per endpoint and identity.
    Policy,
    /// Flows the L7 proxy must not touch: TCP_RR and TCP_CRR to a pod
    /// with L7 rules on another port vs a pod without L7 rules (VXLAN,
    /// the node's proxy running with the rules in force).
    L7Untouched,
    /// Flow observability: events per second the agent reads without loss
    /// (CPU, memory), and TCP_RR/CRR/iperf3 with events on vs off.
    Observe {
        /// Only the event rate (events read and lost per step), not the
        /// overhead on TCP_RR/CRR/iperf3.
        #[arg(long)]
        events_only: bool,
    },
    /// ClusterIP services (issue 5): new connections per second and
    /// first-byte latency with N other services, Sinew vs kube-proxy's
    /// iptables and nftables shapes vs the pod address; iperf3 at 0.
    Services {
        /// Numbers of other services, comma-separated [default:
        /// 0,1000,10000; with --quick 0,100].
        #[arg(long = "services")]
        sizes: Option<String>,
    },
    /// The kubernetes datastore backend at scale (issue 14): one agent
    /// against the fake API with 1,000 pods, 100 namespaces, 500 policies
    /// and 1,000 services: its RSS and watch event to ipcache p50/p99.
    /// Use a release build.
    Kube,
    /// The L7 matcher alone: nanoseconds per request with 1, 100 and
    /// 1,000 rules on a port (exact, prefix, regex paths and a mix). No
    /// lab, no root.
    L7Match,
    /// sinew-proxy against haproxy, nginx and Envoy with the same
    /// allow-by-path rule, and against no proxy: requests/s and added
    /// p50/p99 for HTTP/1.1 keep-alive, h2c and a new connection per
    /// request (HTTP/1.1 and h2c); RSS idle and at 1,000 connections;
    /// 1,000 path rules vs 1.
    /// Root (a network namespace of its own); wrk, h2load, haproxy, nginx
    /// and envoy from scripts/install-deps.sh. Use a release build.
    L7Proxy {
        /// The sinew-proxy binary; default: next to this program.
        #[arg(long)]
        proxy: Option<PathBuf>,
        /// Config files and logs; default: a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only these peers (comma-separated: haproxy, nginx, envoy);
        /// Sinew and the direct baseline always run. Default: all.
        #[arg(long, value_delimiter = ',')]
        arms: Vec<sinew_bench::l7proxy::Arm>,
        /// Only these protocols (comma-separated: keep-alive, h2c,
        /// new-conn, h2c-new-conn). Default: all.
        #[arg(long, value_delimiter = ',')]
        protos: Vec<sinew_bench::l7proxy::Proto>,
        /// Requests/s and latency only: no memory figures, no many-rules
        /// comparison.
        #[arg(long)]
        speed_only: bool,
    },
    /// Sinew's userspace WireGuard (the agent's device where the kernel
    /// has none) against boringtun-cli and wireguard-go, and the bare veth
    /// under them: iperf3 through each, between two namespaces, in one run.
    /// Root; iperf3, wireguard-tools, wireguard-go (apt) and boringtun-cli
    /// (`cargo install boringtun-cli`). Use a release build.
    WireguardUserspace,
    /// The client process of `services` (runs inside a pod; not for users).
    #[command(hide = true)]
    SvcClient(services::ClientArgs),
    /// The reconnecting h2c load generator of `l7-proxy` (not for users).
    #[command(hide = true)]
    H2cClient(sinew_bench::h2client::H2cClientArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::SvcClient(args) = &cli.command {
        return svc_client(args, cli.duration);
    }
    if let Command::H2cClient(args) = &cli.command {
        return match sinew_bench::h2client::run(args) {
            Ok(out) => {
                println!("{}", serde_json::to_string(&out).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("h2c-client: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::L7Match = &cli.command {
        return l7_match(&cli);
    }
    if let Command::L7Proxy {
        proxy,
        dir,
        arms,
        protos,
        speed_only,
    } = &cli.command
    {
        let only = sinew_bench::l7proxy::Only {
            arms: arms.clone(),
            protos: protos.clone(),
            speed_only: *speed_only,
        };
        return l7_proxy(&cli, proxy.as_deref(), dir.as_deref(), only);
    }
    if let Command::WireguardUserspace = &cli.command {
        return wireguard_userspace(&cli);
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sinew-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn wireguard_userspace(cli: &Cli) -> ExitCode {
    let (reps, secs) = if cli.quick {
        (1, 1)
    } else {
        (cli.reps.max(1), cli.duration.round().max(1.0) as u32)
    };
    if let Err(e) = cpu::parse_request(&cli.cpus).and_then(cpu::init) {
        eprintln!("sinew-bench wireguard-userspace: {e}");
        return ExitCode::FAILURE;
    }
    let mut report = Report {
        reps,
        duration_secs: f64::from(secs),
        cpu: cpu::describe(),
        ..Default::default()
    };
    eprintln!("cpu: {}", report.cpu);
    let _ = idle::install_interrupt_handler();
    let result = sinew_bench::wguserspace::run(reps, secs, Duration::from_secs(cli.idle_wait), &mut report);
    print!("{}", report.table());
    if let Err(e) = result {
        eprintln!("sinew-bench wireguard-userspace: {e:#}");
        return ExitCode::FAILURE;
    }
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("sinew-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn l7_match(cli: &Cli) -> ExitCode {
    let (reps, run_for) = if cli.quick {
        (1, Duration::from_millis(100))
    } else {
        // Each measurement is short: the matcher's cost is steady, and 4
        // workloads x 3 sizes x reps add up.
        (cli.reps.max(1), Duration::from_secs_f64(cli.duration.clamp(0.05, 1.0)))
    };
    let mut report = sinew_bench::report::Report {
        reps,
        duration_secs: run_for.as_secs_f64(),
        ..Default::default()
    };
    if let Err(e) = sinew_bench::l7::run(reps, run_for, &mut report) {
        eprintln!("sinew-bench l7-match: the benchmark rules do not compile: {e}");
        return ExitCode::FAILURE;
    }
    print!("{}", report.table());
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("sinew-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn l7_proxy(
    cli: &Cli,
    proxy: Option<&std::path::Path>,
    dir: Option<&std::path::Path>,
    only: sinew_bench::l7proxy::Only,
) -> ExitCode {
    let proxy_bin = match proxy {
        Some(p) => p.to_path_buf(),
        None => match std::env::current_exe() {
            Ok(e) => e.with_file_name("sinew-proxy"),
            Err(e) => {
                eprintln!("sinew-bench l7-proxy: cannot find this program ({e}); give --proxy");
                return ExitCode::FAILURE;
            }
        },
    };
    if !proxy_bin.exists() {
        eprintln!(
            "sinew-bench l7-proxy: {} does not exist: cargo build --release -p sinew-proxy, or give --proxy",
            proxy_bin.display()
        );
        return ExitCode::FAILURE;
    }
    let (reps, rate_for, latency_for) = if cli.quick {
        (1, Duration::from_secs(1), Duration::from_secs(1))
    } else {
        let d = cli.duration.clamp(1.0, 30.0);
        (
            cli.reps.max(1),
            Duration::from_secs_f64(d),
            Duration::from_secs_f64((d / 2.0).max(1.0)),
        )
    };
    let opts = sinew_bench::l7proxy::Options {
        reps,
        rate_for,
        latency_for,
        proxy_bin,
        dir: dir
            .map(|d| d.to_path_buf())
            .unwrap_or_else(|| std::env::temp_dir().join(format!("sinew-bench-l7-{}", std::process::id()))),
        idle_wait: Duration::from_secs(cli.idle_wait),
        verbose: cli.verbose,
        only,
    };
    let cpus = cpu::parse_request(&cli.cpus).and_then(cpu::init);
    if let Err(e) = cpus {
        eprintln!("sinew-bench l7-proxy: {e}");
        return ExitCode::FAILURE;
    }
    let mut report = Report {
        reps,
        duration_secs: rate_for.as_secs_f64(),
        cpu: cpu::describe(),
        ..Report::default()
    };
    eprintln!("cpu: {}", report.cpu);
    let _ = idle::install_interrupt_handler();
    let result = sinew_bench::l7proxy::run(&opts, &mut report);
    if let Err(e) = &result {
        report.notes.push(format!("stopped early: {e}"));
    }
    if !report.rows.is_empty() {
        print!("{}", report.table());
    }
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("sinew-bench: cannot write {}: {e}", path.display());
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sinew-bench l7-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn svc_client(args: &services::ClientArgs, duration: f64) -> ExitCode {
    if !(duration.is_finite() && duration > 0.0) {
        eprintln!("svc-client: --duration must be a positive number of seconds");
        return ExitCode::FAILURE;
    }
    match services::client_main(args, Duration::from_secs_f64(duration)) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("svc-client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    idle::install_interrupt_handler()?;
    let binaries = match &cli.bin_dir {
        Some(dir) => Binaries::in_dir(dir),
        None => Binaries::from_current_exe()?,
    };
    binaries.check()?;
    let (reps, duration, pods) = if cli.quick {
        (1, 1.0, 20)
    } else {
        (cli.reps, cli.duration, cli.pods)
    };
    anyhow::ensure!(reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(
        duration.is_finite() && duration > 0.0,
        "--duration must be a positive number of seconds"
    );
    anyhow::ensure!(
        (1..=200).contains(&pods),
        "--pods must be 1..=200 (a node's pod CIDR is a /24)"
    );
    let opts = Options {
        reps,
        duration: Duration::from_secs_f64(duration),
        pods,
        idle_wait: Duration::from_secs(cli.idle_wait),
        idle_wait_rep: Duration::from_secs(cli.idle_wait.min(10)),
        verbose: cli.verbose,
        binaries,
        prefix: format!("bench-{}", std::process::id()),
        agent_args: cli.agent_args.clone(),
        only: cli.only.clone(),
        versus_agent_args: cli.versus_agent_args.clone(),
    };
    cpu::init(cpu::parse_request(&cli.cpus)?)?;
    let mut report = Report {
        reps,
        duration_secs: duration,
        cpu: cpu::describe(),
        ..Report::default()
    };
    eprintln!("cpu: {}", report.cpu);
    // The kernel default, which a node agent only changes with --bpf-stats.
    let _stats = BpfStatsOff::new(&mut report);
    let result: anyhow::Result<()> = match &cli.command {
        Command::Observe { events_only: true } => observe::event_rate(&opts, &mut report).map_err(Into::into),
        Command::Observe { events_only: false } => observe::all(&opts, &mut report).map_err(Into::into),
        Command::Services { sizes } => {
            let default = if cli.quick { "0,100" } else { "0,1000,10000" };
            services::parse_sizes(sizes.as_deref().unwrap_or(default))
                .map_err(scenarios::ScenarioError::from)
                .and_then(|sizes| services::run(&sizes, &opts, &mut report))
                .map_err(Into::into)
        }
        Command::Kube => kube::run(&opts, cli.quick, &mut report).map_err(Into::into),
        c => run_command(c, &opts, &mut report).map_err(Into::into),
    };
    if let Err(e) = &result {
        report.notes.push(format!("stopped early: {e}"));
    }
    if !report.rows.is_empty() {
        print!("{}", report.table());
    }
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    result
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time statistics off for the run (an agent
/// started with `--bpf-stats true`, or a profiler, may have left them on:
/// then every program run pays two clock reads that no baseline pays) and
/// back on afterwards.
struct BpfStatsOff {
    restore: bool,
}

impl BpfStatsOff {
    fn new(report: &mut Report) -> Self {
        let on = std::fs::read_to_string(BPF_STATS).is_ok_and(|s| s.trim() == "1");
        let restore = on && std::fs::write(BPF_STATS, "0").is_ok();
        if restore {
            report.notes.push(
                "kernel.bpf_stats_enabled was 1: set to 0 for the run (the kernel default), restored after".into(),
            );
        } else if on {
            report.notes.push(
                "kernel.bpf_stats_enabled is 1 and could not be turned off: every BPF program run pays two clock reads"
                    .into(),
            );
        }
        Self { restore }
    }
}

impl Drop for BpfStatsOff {
    fn drop(&mut self) {
        if self.restore {
            let _ = std::fs::write(BPF_STATS, "1");
        }
    }
}

fn run_command(command: &Command, opts: &Options, report: &mut Report) -> Result<(), scenarios::ScenarioError> {
    match command {
        Command::All => {
            scenarios::same_node(opts, report)?;
            scenarios::cross_node(Routing::Vxlan, opts, report)?;
            scenarios::cross_node(Routing::Native, opts, report)?;
            scenarios::cni_and_memory(
                CniParts {
                    latency: true,
                    memory: true,
                },
                opts,
                report,
            )?;
            policy::all(opts, report)
        }
        Command::SameNode => scenarios::same_node(opts, report),
        Command::CrossNode { routing } => scenarios::cross_node(*routing, opts, report),
        Command::Cni => scenarios::cni_and_memory(
            CniParts {
                latency: true,
                memory: false,
            },
            opts,
            report,
        ),
        Command::Memory => scenarios::cni_and_memory(
            CniParts {
                latency: false,
                memory: true,
            },
            opts,
            report,
        ),
        Command::Policy => policy::all(opts, report),
        Command::L7Untouched => policy::l7_untouched(opts, report),
        Command::Observe { .. } | Command::Services { .. } | Command::Kube => unreachable!("handled in run"),
        Command::SvcClient(_)
        | Command::H2cClient(_)
        | Command::L7Match
        | Command::L7Proxy { .. }
        | Command::WireguardUserspace => {
            unreachable!("handled in main")
        }
    }
}
