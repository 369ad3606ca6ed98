//! The `sinew-proxy` binary: flags, logging, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sinew_abi::{PROXY_EGRESS_PORT_DEFAULT, PROXY_INGRESS_PORT_DEFAULT};
use sinew_proxy::{Config, Proxy};

#[derive(Parser, Debug)]
#[command(name = "sinew-proxy", about = "Sinew's node L7 proxy")]
struct Args {
    /// Transparent listener addresses for ingress rules.
    #[arg(long, value_delimiter = ',', default_value_t = format!("0.0.0.0:{PROXY_INGRESS_PORT_DEFAULT}"))]
    ingress: String,
    /// Transparent listener addresses for egress rules.
    #[arg(long, value_delimiter = ',', default_value_t = format!("0.0.0.0:{PROXY_EGRESS_PORT_DEFAULT}"))]
    egress: String,
    /// The agent's ProxyControl socket; "none" runs without an agent
    /// (every request is denied until a snapshot arrives).
    #[arg(long, default_value = sinew_proto::DEFAULT_PROXY_SOCKET)]
    agent_socket: String,
    /// Admin port (metrics, health); "none" to disable.
    #[arg(long, default_value = "127.0.0.1:15090")]
    admin: String,
    /// Do not set IP_TRANSPARENT (tests without redirect).
    #[arg(long)]
    no_transparent: bool,
    /// Test hook: the original destination of every connection.
    #[arg(long, hide = true)]
    original_dst: Option<SocketAddr>,
    /// The datapath's pinned sinew_proxy_src map (the agent passes it):
    /// who an ingress connection from another node's proxy speaks for.
    #[arg(long)]
    source_map: Option<PathBuf>,
    /// Write one line per request to stdout.
    #[arg(long)]
    access_log: bool,
    /// Seconds a draining process (SIGTERM) waits for requests in flight.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    #[arg(long, default_value_t = 2)]
    data_threads: usize,
    /// Seconds for a client's request head.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
}

fn addrs(name: &'static str, v: &str) -> anyhow::Result<Vec<SocketAddr>> {
    v.split(',')
        .filter(|s| !s.is_empty() && *s != "none")
        .map(|s| {
            s.parse()
                .map_err(|e| anyhow::anyhow!("--{name} {s}: {e} (give ADDRESS:PORT)"))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let mut c = Config {
        ingress: addrs("ingress", &a.ingress)?,
        egress: addrs("egress", &a.egress)?,
        transparent: !a.no_transparent,
        admin: addrs("admin", &a.admin)?.first().copied(),
        agent_socket: (a.agent_socket != "none").then(|| PathBuf::from(&a.agent_socket)),
        original_dst_override: a.original_dst,
        access_log: a.access_log,
        source_map: a.source_map,
        drain_timeout: Duration::from_secs(a.drain_timeout),
        data_threads: a.data_threads,
        ..Config::default()
    };
    c.limits.header_read_timeout = Duration::from_secs(a.header_timeout);
    let handle = Proxy::start(c)?;
    tracing::info!(ingress = ?handle.ingress, egress = ?handle.egress, admin = ?handle.admin, "sinew-proxy ready");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    tracing::info!("draining");
    handle.drain();
    handle.join();
    tracing::info!("drained, exiting");
    Ok(())
}
