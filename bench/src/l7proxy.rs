//! `sinew-bench l7-proxy`: sinew-proxy against haproxy, nginx and Envoy,
//! each enforcing the same allow-by-path rule (`/public...` forwarded,
//! anything else 403), and against no proxy at all, in one run on one
//! path: client -> proxy -> upstream over loopback in a network namespace
//! of its own.
//!
//! Every arm runs the same way: the proxy (one worker: `--data-threads 1`,
//! `nbthread 1`, `worker_processes 1`, `--concurrency 1`) alone on the
//! server CPU; the load generator and the upstream (nginx answering "ok",
//! one worker) on the client CPU. The direct arm sends the same load
//! straight to the upstream, so the proxies' added latency is their
//! percentile minus the direct one, measured in the same repetition.
//!
//! Per protocol (HTTP/1.1 keep-alive, h2c, a new connection per request
//! with HTTP/1.1 and with h2c) it measures requests/s at `CONNS`
//! connections and p50/p99 with one connection (the latency of one
//! request, not a queue). wrk drives HTTP/1.1, h2load drives h2c (its
//! per-request log gives the percentiles), and [`crate::h2client`] drives
//! h2c clients that connect for each request (h2load cannot). Memory is
//! the resident set of each proxy's processes idle and with 1,000 open
//! keep-alive connections that each carried one request. Sinew alone is also measured with 1,000 path rules against 1.
//!
//! Sinew gets its rules the way it does in a node: over the ProxyControl
//! stream, from a stand-in agent in this process that also takes the
//! flow events (the peers emit none). The agent runs on the server CPU,
//! where a node's agent would, and its CPU counts with the proxy's in
//! "node CPU per request".

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sinew_proto::proxy_v1 as pb;
use sinew_proto::standin::StandInAgent;

use crate::cpu::{self, Role};
use crate::report::{Better, Report, Row};
use crate::stats::{percentile, Samples};

/// Where the proxies listen.
const PROXY_PORT: u16 = 15006;
/// The upstream: HTTP/1.1 and h2c (prior knowledge).
const UP_H1: u16 = 18080;
const UP_H2: u16 = 18081;
/// Connections for the requests/s runs.
pub const CONNS: u32 = 50;
/// h2c streams in flight per connection for the requests/s runs.
const H2_STREAMS: u32 = 10;
/// Open connections for the memory figure.
pub const MEM_CONNS: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum L7ProxyError {
    #[error("cannot start {what}: {source} (run scripts/install-deps.sh as root to install it)")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not listen on port {port} within 10 s; its log: {log}")]
    NotListening { what: String, port: u16, log: String },
    #[error("{what} answered {path} with {got:?}, want {want}: its rule is not the benchmark's")]
    WrongAnswer {
        what: String,
        path: &'static str,
        got: String,
        want: &'static str,
    },
    #[error("{tool} against {arm}: {reason}; output: {output}")]
    Tool {
        tool: &'static str,
        arm: String,
        reason: String,
        output: String,
    },
    #[error("the network namespace for the benchmark: {0} (run as root)")]
    Netns(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Idle(#[from] crate::idle::IdleError),
}

/// What one run measures with.
#[derive(Debug, Clone)]
pub struct Options {
    pub reps: u32,
    /// Each requests/s run.
    pub rate_for: Duration,
    /// Each one-connection latency run.
    pub latency_for: Duration,
    /// The release sinew-proxy.
    pub proxy_bin: PathBuf,
    /// Config files, logs and the stand-in agent's socket.
    pub dir: PathBuf,
    pub idle_wait: Duration,
    pub verbose: bool,
    pub only: Only,
}

/// A part of the comparison, for quick A/B runs while working on the
/// proxy (the full run is the default).
#[derive(Clone, Debug, Default)]
pub struct Only {
    /// The peers to run (Sinew and the direct baseline always run): all
    /// when empty.
    pub arms: Vec<Arm>,
    /// The protocols to run: all when empty.
    pub protos: Vec<Proto>,
    /// Skip the memory figures and the many-rules comparison.
    pub speed_only: bool,
}

impl Options {
    fn arms(&self) -> Vec<Arm> {
        Arm::ALL
            .into_iter()
            .filter(|a| {
                matches!(a, Arm::Direct | Arm::Sinew) || self.only.arms.is_empty() || self.only.arms.contains(a)
            })
            .collect()
    }
    fn protos(&self) -> Vec<Proto> {
        Proto::ALL
            .into_iter()
            .filter(|p| self.only.protos.is_empty() || self.only.protos.contains(p))
            .collect()
    }
}

/// The proxies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arm {
    Direct,
    Sinew,
    Haproxy,
    Nginx,
    Envoy,
}

impl Arm {
    pub const ALL: [Arm; 5] = [Arm::Direct, Arm::Sinew, Arm::Haproxy, Arm::Nginx, Arm::Envoy];
    pub const PEERS: [Arm; 3] = [Arm::Haproxy, Arm::Nginx, Arm::Envoy];
    pub fn name(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Sinew => "sinew",
            Arm::Haproxy => "haproxy",
            Arm::Nginx => "nginx",
            Arm::Envoy => "envoy",
        }
    }
}

/// How the client talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// HTTP/1.1, one connection carrying many requests.
    KeepAlive,
    /// HTTP/2 over cleartext, prior knowledge.
    H2c,
    /// HTTP/1.1, a new connection per request.
    NewConn,
    /// HTTP/2 over cleartext, a new connection per request: clients that
    /// come and go, so that the proxy's upstream connections must outlive
    /// its clients'.
    H2cNewConn,
}

impl Proto {
    pub const ALL: [Proto; 4] = [Proto::KeepAlive, Proto::H2c, Proto::NewConn, Proto::H2cNewConn];
    pub fn name(self) -> &'static str {
        match self {
            Proto::KeepAlive => "HTTP/1.1 keep-alive",
            Proto::H2c => "h2c",
            Proto::NewConn => "HTTP/1.1 new conn/req",
            Proto::H2cNewConn => "h2c new conn/req",
        }
    }
    /// Whether the client speaks HTTP/2 (and the upstream too).
    pub fn is_h2(self) -> bool {
        matches!(self, Proto::H2c | Proto::H2cNewConn)
    }
    fn upstream(self) -> u16 {
        if self.is_h2() {
            UP_H2
        } else {
            UP_H1
        }
    }
}

/// One measurement of one arm.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &str, role: Role, cmd: &mut Command, log: PathBuf) -> Result<Proc, L7ProxyError> {
        let f = std::fs::File::create(&log)?;
        let f2 = f.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cpu::on(role, || cmd.spawn()).map_err(|source| L7ProxyError::Spawn {
            what: what.to_owned(),
            source,
        })?;
        Ok(Proc {
            child,
            what: what.to_owned(),
            log,
        })
    }

    fn wait_listening(&mut self, port: u16) -> Result<(), L7ProxyError> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(L7ProxyError::NotListening {
            what: self.what.clone(),
            port,
            log: std::fs::read_to_string(&self.log).unwrap_or_default(),
        })
    }

    /// The process and its children.
    fn tree(&self) -> Vec<u32> {
        let mut all = Vec::new();
        let mut todo = vec![self.child.id()];
        while let Some(pid) = todo.pop() {
            all.push(pid);
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for t in tasks.flatten() {
                    if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                        todo.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                    }
                }
            }
        }
        all
    }

    /// Resident memory of the process and its children, KiB.
    fn rss_kib(&self) -> u64 {
        self.tree()
            .into_iter()
            .filter_map(|pid| {
                let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .sum()
    }

    /// CPU time (user and system, every thread) of the process and its
    /// children so far, seconds.
    fn cpu_secs(&self) -> f64 {
        let ticks: u64 = self
            .tree()
            .into_iter()
            .filter_map(|pid| cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
            .sum();
        // USER_HZ: 100 on every architecture this runs on (x86, arm64).
        ticks as f64 / 100.0
    }
}

/// utime + stime from a `/proc/PID/stat` line (fields 14 and 15, counted
/// after the parenthesised command name, which may hold spaces).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

/// CPU time (user and system) of the children waited for so far and of
/// this process, seconds.
fn rusage_secs() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let secs = |who| {
        getrusage(who).map_or(0.0, |r| {
            let (u, s) = (r.user_time(), r.system_time());
            (u.tv_sec() + s.tv_sec()) as f64 + (u.tv_usec() + s.tv_usec()) as f64 / 1e6
        })
    };
    (secs(UsageWho::RUSAGE_CHILDREN), secs(UsageWho::RUSAGE_SELF))
}

/// How long a run of `secs` lasts as the load generators are told (whole
/// seconds, at least 1).
fn whole_secs(secs: Duration) -> u64 {
    secs.as_secs_f64().max(1.0).round() as u64
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its worker, which a
        // SIGKILL of the master would leave holding the port.
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn upstream_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/up.pid;\nerror_log {d}/up.err warn;\n\
         events {{ worker_connections 8192; }}\nworker_rlimit_nofile 16384;\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n{temps}\n\
         server {{ listen 127.0.0.1:{UP_H1} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{UP_H2} http2 backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
        temps = temp_paths(dir, "up"),
    )
}

fn temp_paths(dir: &Path, who: &str) -> String {
    let d = dir.display();
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("  {t}_temp_path {d}/{who}-tmp;\n"))
        .collect()
}

fn haproxy_conf(p: Proto) -> String {
    let (bind, server) = if p.is_h2() {
        (" proto h2", format!("127.0.0.1:{UP_H2} proto h2"))
    } else {
        ("", format!("127.0.0.1:{UP_H1}"))
    };
    format!(
        "global\n  nbthread 1\n  maxconn 8000\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\n\
         frontend f\n  bind 127.0.0.1:{PROXY_PORT}{bind}\n  http-request deny deny_status 403 unless {{ path_beg /public }}\n  default_backend b\n\n\
         backend b\n  server s {server}\n"
    )
}

fn nginx_conf(dir: &Path, p: Proto) -> String {
    let d = dir.display();
    let h2 = if p.is_h2() { " http2" } else { "" };
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
         events {{ worker_connections 8192; }}\nworker_rlimit_nofile 16384;\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n{temps}\n\
         upstream up {{ server 127.0.0.1:{UP_H1}; keepalive 128; keepalive_requests 100000000; }}\n\
         server {{\n  listen 127.0.0.1:{PROXY_PORT}{h2} backlog=4096;\n \n\
         location /public {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
         location / {{ return 403 \"Access denied\\n\"; }}\n}}\n}}\n",
        temps = temp_paths(dir, "nginx"),
    )
}

fn envoy_conf(p: Proto) -> String {
    let (port, h2opts) = if p.is_h2() {
        (
            UP_H2,
            "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options: {}\n",
        )
    } else {
        (UP_H1, "")
    };
    format!(
        r#"static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {PROXY_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ing
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /public}}
                route: {{cluster: up}}
              - match: {{prefix: /}}
                direct_response: {{status: 403, body: {{inline_string: "Access denied\n"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 5s
{h2opts}    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

/// The rules Sinew enforces: `n` path rules on the upstream's port, the
/// last of which allows `/public`.
pub fn snapshot(port: u16, n: usize) -> pb::Snapshot {
    use pb::string_match::Kind;
    let prefix = |p: String| pb::HttpRule {
        path: Some(pb::StringMatch {
            kind: Some(Kind::Prefix(p)),
        }),
        ..Default::default()
    };
    let mut http: Vec<pb::HttpRule> = (1..n).map(|i| prefix(format!("/api/v{i}/"))).collect();
    http.push(prefix("/public".into()));
    pb::Snapshot {
        version: 1,
        endpoints: vec![pb::L7Endpoint {
            addresses: vec!["127.0.0.1".into()],
            identity: 1000,
            namespace: "bench".into(),
            name: "upstream".into(),
            direction: pb::Direction::Ingress as i32,
            port: port.into(),
            rule_sets: vec![pb::RuleSet {
                http,
                rule: "SinewNetworkPolicy bench/allow-public ingress[0]".into(),
                ..Default::default()
            }],
        }],
        identities: vec![pb::IdentityEntry {
            prefix: "127.0.0.1/32".into(),
            identity: 1001,
            namespace: "bench".into(),
            name: "client".into(),
        }],
        ..Default::default()
    }
}

/// The stand-in agent (`sinew_proto::standin`) on a runtime of its own.
struct AgentHandle {
    socket: PathBuf,
    agent: StandInAgent,
    _rt: tokio::runtime::Runtime,
}

fn start_agent(dir: &Path) -> Result<AgentHandle, L7ProxyError> {
    let socket = dir.join("proxy.sock");
    // The agent runs on the node beside the proxy: its thread shares the
    // server CPU, and the client CPU carries the same load on every arm.
    let rt = cpu::on(Role::Server, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
    })?;
    let agent = StandInAgent::default();
    rt.block_on(async { agent.serve(&socket) })?;
    Ok(AgentHandle { socket, agent, _rt: rt })
}

/// Starts one arm's proxy for `p` (None for the direct arm).
fn start_arm(arm: Arm, p: Proto, rules: usize, o: &Options, agent: &AgentHandle) -> Result<Option<Proc>, L7ProxyError> {
    let dir = &o.dir;
    let log = dir.join(format!("{}.log", arm.name()));
    let mut proc = match arm {
        Arm::Direct => return Ok(None),
        Arm::Sinew => {
            if let Ok(mut s) = agent.agent.snapshot.lock() {
                *s = snapshot(p.upstream(), rules);
            }
            let mut c = Command::new(&o.proxy_bin);
            c.args(["--ingress", &format!("127.0.0.1:{PROXY_PORT}"), "--egress", "none"])
                .args(["--admin", "none", "--no-transparent", "--data-threads", "1"])
                .arg("--agent-socket")
                .arg(&agent.socket)
                .arg("--original-dst")
                .arg(format!("127.0.0.1:{}", p.upstream()))
                .env("RUST_LOG", "warn");
            Proc::spawn("sinew-proxy", Role::Server, &mut c, log)?
        }
        Arm::Haproxy => {
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_conf(p))?;
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(&cfg);
            Proc::spawn("haproxy", Role::Server, &mut c, log)?
        }
        Arm::Nginx => {
            let cfg = dir.join("nginx.conf");
            std::fs::create_dir_all(dir.join("nginx-tmp"))?;
            std::fs::write(&cfg, nginx_conf(dir, p))?;
            let mut c = Command::new("nginx");
            c.arg("-e")
                .arg(dir.join("nginx.err"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&cfg);
            Proc::spawn("nginx", Role::Server, &mut c, log)?
        }
        Arm::Envoy => {
            let cfg = dir.join("envoy.yaml");
            std::fs::write(&cfg, envoy_conf(p))?;
            let mut c = Command::new("envoy");
            c.arg("-c")
                .arg(&cfg)
                .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"]);
            Proc::spawn("envoy", Role::Server, &mut c, log)?
        }
    };
    proc.wait_listening(PROXY_PORT)?;
    if arm == Arm::Sinew {
        // Listening comes after the first snapshot; make sure it judged.
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(proc))
}

fn port_of(arm: Arm, p: Proto) -> u16 {
    if arm == Arm::Direct {
        p.upstream()
    } else {
        PROXY_PORT
    }
}

/// One HTTP/1.1 request on a new connection; the status line.
fn status_of(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return "connection refused".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or("").to_owned()
}

/// One h2c request with h2load; its status-codes line.
fn h2_status_of(port: u16, path: &str) -> String {
    let out = cpu::on(Role::Client, || {
        Command::new("h2load")
            .args(["-n1", "-c1"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
    });
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or("no answer");
    // "status codes: 1 2xx, 0 3xx, 0 4xx, 0 5xx" -> " 200" or " 403" as
    // the HTTP/1.1 check reads them.
    if codes.contains(" 1 2xx") {
        " 200".into()
    } else if codes.contains(" 1 4xx") {
        " 403".into()
    } else {
        codes.to_owned()
    }
}

/// Checks that an arm forwards /public and refuses /admin.
fn check_rule(arm: Arm, p: Proto) -> Result<(), L7ProxyError> {
    for (path, want) in [("/public/x", " 200"), ("/admin", " 403")] {
        let got = if p.is_h2() {
            h2_status_of(PROXY_PORT, path)
        } else {
            status_of(PROXY_PORT, path)
        };
        if !got.contains(want) {
            return Err(L7ProxyError::WrongAnswer {
                what: arm.name().into(),
                path,
                got,
                want,
            });
        }
    }
    Ok(())
}

fn parse_wrk_time(s: &str) -> Option<f64> {
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1_000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

/// Requests/s, p50 and p99 (µs) from wrk's `--latency` output.
pub fn parse_wrk(out: &str) -> Option<Run> {
    let mut r = Run::default();
    for l in out.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v] => r.rate = v.parse().ok()?,
            ["50%", v] => r.p50_us = parse_wrk_time(v)?,
            ["99%", v] => r.p99_us = parse_wrk_time(v)?,
            _ => {}
        }
    }
    (r.rate > 0.0).then_some(r)
}

/// Requests/s from h2load's summary, p50 and p99 (µs) from its request
/// log (start, status, duration in µs per line); also whether every
/// request got a 2xx.
pub fn parse_h2load(out: &str, log: &str) -> Option<(Run, bool)> {
    let rate = out.lines().find_map(|l| {
        let rest = l.strip_prefix("finished in ")?;
        let f = rest.split(", ").nth(1)?;
        f.strip_suffix(" req/s")?.parse::<f64>().ok()
    })?;
    let all_2xx = out
        .lines()
        .any(|l| l.starts_with("status codes:") && l.contains(" 0 3xx, 0 4xx, 0 5xx") && !l.contains(": 0 2xx"));
    let mut d: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    d.sort_unstable();
    Some((
        Run {
            rate,
            p50_us: percentile(&d, 0.5).unwrap_or(0) as f64,
            p99_us: percentile(&d, 0.99).unwrap_or(0) as f64,
        },
        all_2xx,
    ))
}

/// Drives one measurement from the client CPU.
fn drive(arm: Arm, p: Proto, conns: u32, secs: Duration, o: &Options) -> Result<Run, L7ProxyError> {
    let port = port_of(arm, p);
    let url = format!("http://127.0.0.1:{port}/public/x");
    let secs_s = whole_secs(secs).to_string();
    let arm_name = format!("{} {}", arm.name(), p.name());
    match p {
        Proto::KeepAlive | Proto::NewConn => {
            let mut c = Command::new("wrk");
            c.args([
                "-t1",
                "-c",
                &conns.to_string(),
                "-d",
                &format!("{secs_s}s"),
                "--latency",
            ]);
            if p == Proto::NewConn {
                c.args(["-H", "Connection: close"]);
            }
            c.arg(&url);
            let out = cpu::on(Role::Client, || c.output())?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let bad = text.contains("Non-2xx") || text.contains("Socket errors");
            match parse_wrk(&text) {
                Some(r) if out.status.success() && !bad => Ok(r),
                _ => Err(L7ProxyError::Tool {
                    tool: "wrk",
                    arm: arm_name,
                    reason: "failed, or some requests failed or were refused".into(),
                    output: text,
                }),
            }
        }
        Proto::H2c => {
            let log = o.dir.join("h2load.log");
            let streams = if conns == 1 { 1 } else { H2_STREAMS };
            let mut c = Command::new("h2load");
            c.args([
                "-t1",
                "-c",
                &conns.to_string(),
                "-m",
                &streams.to_string(),
                "-D",
                &secs_s,
            ])
            .arg(format!("--log-file={}", log.display()))
            .arg(&url);
            let out = cpu::on(Role::Client, || c.output())?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let logt = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            if o.verbose {
                // What went over the client connections: header bytes
                // per response show how each proxy encodes its heads.
                if let Some(t) = text.lines().find(|l| l.starts_with("traffic:")) {
                    eprintln!("{arm_name} ({conns} conns): {}", t.trim());
                }
            }
            match parse_h2load(&text, &logt) {
                Some((r, true)) if out.status.success() => Ok(r),
                _ => Err(L7ProxyError::Tool {
                    tool: "h2load",
                    arm: arm_name,
                    reason: "failed, or some requests did not get a 2xx".into(),
                    output: text,
                }),
            }
        }
        Proto::H2cNewConn => {
            let exe = std::env::current_exe()?;
            let mut c = Command::new(exe);
            c.arg("h2c-client")
                .arg(format!("--addr=127.0.0.1:{port}"))
                .arg(format!("--conns={conns}"))
                .arg(format!("--secs={secs_s}"));
            let out = cpu::on(Role::Client, || c.output())?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let fail = |reason: String| L7ProxyError::Tool {
                tool: "sinew-bench h2c-client",
                arm: arm_name.clone(),
                reason,
                output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
            };
            let r: crate::h2client::H2cClientOutput =
                serde_json::from_str(text.trim()).map_err(|e| fail(format!("its output does not parse: {e}")))?;
            if !out.status.success() || r.failed > 0 || r.ok == 0 {
                return Err(fail(format!(
                    "{} of {} requests failed (first: {})",
                    r.failed,
                    r.failed + r.ok,
                    r.first_error.as_deref().unwrap_or("-")
                )));
            }
            Ok(Run {
                rate: r.rate,
                p50_us: r.p50_us as f64,
                p99_us: r.p99_us as f64,
            })
        }
    }
}

/// Opens `n` keep-alive connections, one allowed request on each, and
/// returns them open.
fn open_conns(n: usize) -> Result<Vec<TcpStream>, L7ProxyError> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", PROXY_PORT))?;
        s.write_all(b"GET /public/x HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        v.push(s);
    }
    for s in &mut v {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 2048];
        let k = s.read(&mut buf)?;
        if !buf[..k].starts_with(b"HTTP/1.1 200") {
            return Err(L7ProxyError::Io(std::io::Error::other(format!(
                "a memory-test request was not answered 200: {:?}",
                String::from_utf8_lossy(&buf[..k])
            ))));
        }
    }
    Ok(v)
}

fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(65_536);
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want, want);
    }
}

/// Moves this process into a new network namespace with loopback up, so
/// that the ports are ours and nothing else's traffic shares the path.
fn own_netns() -> Result<(), L7ProxyError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| L7ProxyError::Netns(e.to_string()))?;
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| L7ProxyError::Netns(format!("ip link set lo up: {e}")))?;
    if !st.success() {
        return Err(L7ProxyError::Netns("ip link set lo up failed".into()));
    }
    Ok(())
}

#[derive(Default)]
struct Series {
    rate: Samples,
    /// The arm's CPU per request, us.
    cpu: Samples,
    /// The upstream's CPU per request, us.
    cpu_up: Samples,
    p50: Samples,
    p99: Samples,
    added50: Samples,
    added99: Samples,
}

fn row(scenario: &str, metric: &str, unit: &'static str, better: Better, base: &str, b: &Samples, s: &Samples) -> Row {
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        unit,
        better,
        baseline: base.into(),
        baseline_samples: b.clone(),
        sinew_samples: s.clone(),
    }
}

/// Runs every comparison and adds its rows to `report`.
///
/// Must be called before any other thread of the process exists: it
/// moves the process into a network namespace of its own.
pub fn run(o: &Options, report: &mut Report) -> Result<(), L7ProxyError> {
    own_netns()?;
    raise_nofile();
    std::fs::create_dir_all(&o.dir)?;
    std::fs::create_dir_all(o.dir.join("up-tmp"))?;
    let up_cfg = o.dir.join("upstream.conf");
    std::fs::write(&up_cfg, upstream_conf(&o.dir))?;
    let mut up_cmd = Command::new("nginx");
    up_cmd
        .arg("-e")
        .arg(o.dir.join("up.err"))
        .arg("-p")
        .arg(&o.dir)
        .arg("-c")
        .arg(&up_cfg);
    let mut upstream = Proc::spawn(
        "nginx (upstream)",
        Role::Client,
        &mut up_cmd,
        o.dir.join("upstream.log"),
    )?;
    upstream.wait_listening(UP_H1)?;
    upstream.wait_listening(UP_H2)?;
    let agent = start_agent(&o.dir)?;

    let mut series: Vec<((Arm, Proto), Series)> = Vec::new();
    for a in Arm::ALL {
        for p in Proto::ALL {
            series.push(((a, p), Series::default()));
        }
    }
    let idx = |a: Arm, p: Proto| {
        Arm::ALL.iter().position(|x| *x == a).unwrap_or(0) * Proto::ALL.len()
            + Proto::ALL.iter().position(|x| *x == p).unwrap_or(0)
    };
    let mut rss_idle: Vec<Samples> = vec![Samples::default(); Arm::ALL.len()];
    let mut rss_busy: Vec<Samples> = vec![Samples::default(); Arm::ALL.len()];
    let mut many = (Samples::default(), Samples::default());

    for rep in 0..o.reps {
        let w = crate::idle::wait_for_idle(o.idle_wait)?;
        if let Some(n) = w.note(&format!("l7-proxy rep {}", rep + 1)) {
            report.notes.push(n);
        }
        for p in o.protos() {
            let mut direct = Run::default();
            for (ai, a) in Arm::ALL.into_iter().enumerate() {
                if !o.arms().contains(&a) {
                    continue;
                }
                crate::idle::check_interrupted()?;
                let proc = start_arm(a, p, 1, o, &agent)?;
                if a != Arm::Direct {
                    check_rule(a, p)?;
                }
                if p == Proto::KeepAlive && !o.only.speed_only {
                    if let Some(pr) = &proc {
                        rss_idle[ai].push(pr.rss_kib() as f64 / 1024.0);
                    }
                }
                // A short warm-up fills pools and caches on every arm.
                let _ = drive(a, p, CONNS, Duration::from_secs(1), o);
                let cpu0 = (proc.as_ref().map(Proc::cpu_secs), upstream.cpu_secs(), rusage_secs());
                let rate = drive(a, p, CONNS, o.rate_for, o)?;
                // CPU per request during the rate run, in us: the arm's
                // (on the server CPU) and the upstream's (on the client
                // CPU, where fewer upstream connections cost it less).
                let reqs = (rate.rate * whole_secs(o.rate_for) as f64).max(1.0);
                let cpu_proxy = proc
                    .as_ref()
                    .zip(cpu0.0)
                    .map(|(pr, c0)| (pr.cpu_secs() - c0) * 1e6 / reqs);
                let cpu_up = (upstream.cpu_secs() - cpu0.1) * 1e6 / reqs;
                // The load generator (a child that has exited, on the
                // client CPU) and this process (the stand-in agent taking
                // Sinew's flow events, on the server CPU; next to nothing
                // for the peers, which send none).
                let r1 = rusage_secs();
                let (cpu_tool, cpu_agent) = ((r1.0 - cpu0.2 .0) * 1e6 / reqs, (r1.1 - cpu0.2 .1) * 1e6 / reqs);
                // What the node spends per request: the proxy and the
                // agent's share.
                let cpu_arm = cpu_proxy.map(|c| c + cpu_agent);
                let lat = drive(a, p, 1, o.latency_for, o)?;
                if a == Arm::Direct {
                    direct = lat;
                }
                if o.verbose {
                    eprintln!(
                        "rep {} {} {}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us (1 conn), CPU per request: {} us, upstream {:.1} us, load generator {:.1} us, stand-in agent {:.1} us, proxy {} us",
                        rep + 1,
                        a.name(),
                        p.name(),
                        rate.rate,
                        lat.p50_us,
                        lat.p99_us,
                        cpu_arm.map_or("-".into(), |c| format!("{c:.1}")),
                        cpu_up,
                        cpu_tool,
                        cpu_agent,
                        cpu_proxy.map_or("-".into(), |c| format!("{c:.1}")),
                    );
                }
                let s = &mut series[idx(a, p)].1;
                s.rate.push(rate.rate);
                if let Some(c) = cpu_arm {
                    s.cpu.push(c);
                }
                s.cpu_up.push(cpu_up);
                s.p50.push(lat.p50_us);
                s.p99.push(lat.p99_us);
                s.added50.push(lat.p50_us - direct.p50_us);
                s.added99.push(lat.p99_us - direct.p99_us);
                if p == Proto::KeepAlive && !o.only.speed_only {
                    if let Some(pr) = &proc {
                        let conns = open_conns(MEM_CONNS)?;
                        std::thread::sleep(Duration::from_millis(500));
                        rss_busy[ai].push(pr.rss_kib() as f64 / 1024.0);
                        drop(conns);
                    }
                }
                drop(proc);
                // Let TIME_WAIT and the closed connections settle.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        // Many rules: Sinew with 1 rule and with 1,000, keep-alive.
        for (n, into) in [(1usize, 0usize), (1_000, 1)] {
            if o.only.speed_only {
                break;
            }
            let proc = start_arm(Arm::Sinew, Proto::KeepAlive, n, o, &agent)?;
            check_rule(Arm::Sinew, Proto::KeepAlive)?;
            let _ = drive(Arm::Sinew, Proto::KeepAlive, CONNS, Duration::from_secs(1), o);
            let r = drive(Arm::Sinew, Proto::KeepAlive, CONNS, o.rate_for, o)?;
            if into == 0 {
                many.0.push(r.rate);
            } else {
                many.1.push(r.rate);
            }
            drop(proc);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    drop(upstream);

    let peers: Vec<Arm> = Arm::PEERS.into_iter().filter(|a| o.arms().contains(a)).collect();
    let direct_and_peers: Vec<Arm> = [Arm::Direct].into_iter().chain(peers.iter().copied()).collect();
    for p in o.protos() {
        let sc = format!("l7-proxy {}", p.name());
        let sinew = &series[idx(Arm::Sinew, p)].1;
        // One row per baseline arm: Sinew's samples of a measure against
        // that arm's.
        let mut against =
            |metric: &str, unit: &'static str, better: Better, bases: &[Arm], field: fn(&Series) -> &Samples| {
                for &b in bases {
                    let base = &series[idx(b, p)].1;
                    report
                        .rows
                        .push(row(&sc, metric, unit, better, b.name(), field(base), field(sinew)));
                }
            };
        against("requests/s", "req/s", Better::Higher, &direct_and_peers, |s| &s.rate);
        against(
            "node CPU per request (proxy + agent)",
            "us",
            Better::Lower,
            &peers,
            |s| &s.cpu,
        );
        against(
            "upstream CPU per request",
            "us",
            Better::Lower,
            &direct_and_peers,
            |s| &s.cpu_up,
        );
        against("p50 (1 conn)", "us", Better::Lower, &[Arm::Direct], |s| &s.p50);
        against("p99 (1 conn)", "us", Better::Lower, &[Arm::Direct], |s| &s.p99);
        for peer in &peers {
            against("added p50", "us", Better::Lower, std::slice::from_ref(peer), |s| {
                &s.added50
            });
            against("added p99", "us", Better::Lower, std::slice::from_ref(peer), |s| {
                &s.added99
            });
        }
    }
    if o.only.speed_only {
        return Ok(());
    }
    let si = Arm::ALL.iter().position(|a| *a == Arm::Sinew).unwrap_or(1);
    for (metric, samples) in [("RSS idle", &rss_idle), ("RSS at 1,000 conns", &rss_busy)] {
        for &peer in &peers {
            let pi = Arm::ALL.iter().position(|a| *a == peer).unwrap_or(0);
            report.rows.push(row(
                "l7-proxy memory",
                metric,
                "MiB",
                Better::Lower,
                peer.name(),
                &samples[pi],
                &samples[si],
            ));
        }
    }
    report.rows.push(row(
        "l7-proxy many rules",
        "requests/s, 1,000 path rules",
        "req/s",
        Better::Higher,
        "1 rule",
        &many.0,
        &many.1,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces() {
        let stat = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 123 4096 10";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 1s test @ http://127.0.0.1:18080/public/x\n  1 threads and 10 connections\n  Latency Distribution\n     50%   61.00us\n     75%  131.00us\n     90%    2.80ms\n     99%    1.5s\n  69613 requests in 1.02s, 9.96MB read\nRequests/sec:  68544.60\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.rate, 68544.60);
        assert_eq!(r.p50_us, 61.0);
        assert_eq!(r.p99_us, 1_500_000.0);
        assert!(parse_wrk("nothing").is_none());
    }

    #[test]
    fn h2load_output_and_log_are_parsed() {
        let out = "finished in 1.00s, 32939.67 req/s, 2.17MB/s\nrequests: 3 total\nstatus codes: 3 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let log = "1\t200\t184\n2\t200\t34\n3\t200\t26\n";
        let (r, ok) = parse_h2load(out, log).unwrap();
        assert!(ok);
        assert_eq!(r.rate, 32939.67);
        assert_eq!(r.p50_us, 34.0);
        assert_eq!(r.p99_us, 184.0);
        let bad = out.replace("0 4xx", "2 4xx");
        assert!(!parse_h2load(&bad, log).unwrap().1);
    }

    #[test]
    fn the_many_rules_snapshot_allows_public_last() {
        let s = snapshot(80, 1_000);
        let http = &s.endpoints[0].rule_sets[0].http;
        assert_eq!(http.len(), 1_000);
        assert_eq!(snapshot(80, 1).endpoints[0].rule_sets[0].http.len(), 1);
    }
}
