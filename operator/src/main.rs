//! `sinew-operator`: `crds` prints Sinew's CRDs; `run` (the default in the
//! Deployment) is the operator.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use sinew_operator::config::RunArgs;
use sinew_operator::controller;
use sinew_operator::identity_gc::GcMemory;
use sinew_operator::leader::Elector;
use sinew_operator::metrics::{self, Metrics};

#[derive(Parser)]
#[command(name = "sinew-operator", version, about = "Sinew's cluster-wide operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML), for kubectl apply.
    Crds,
    /// Run the operator.
    Run(RunArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", sinew_crd::crds_yaml());
            Ok(())
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let cfg = args.validate()?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(cfg))
        }
    }
}

async fn run(cfg: sinew_operator::config::Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} for metrics: {e}; pass another --metrics-addr",
            cfg.metrics_addr
        )
    })?;
    tokio::spawn(metrics::serve(listener, metrics.clone(), cfg.lease_duration * 4));
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "no Kubernetes client configuration: {e}; run in a pod with a ServiceAccount, or set KUBECONFIG"
        )
    })?;
    let elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &cfg.lease_namespace),
        &cfg.lease_namespace,
        &cfg.lease_name,
        &cfg.identity,
        cfg.lease_duration,
    );
    let renew_every = cfg.lease_duration / 3;
    // Follow until elected.
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => metrics.tick(true),
            Err(e) => {
                tracing::warn!(error = %e, "leader election");
                metrics.tick(false);
            }
        }
        tokio::time::sleep(renew_every).await;
    }
    tracing::info!(identity = %cfg.identity, "elected leader");
    metrics.leader.set(1);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controller::run_node_controller(
        client.clone(),
        cfg.pools.clone(),
        metrics.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut gc_memory = GcMemory::default();
    let mut next_gc = tokio::time::Instant::now() + cfg.gc_interval;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(renew_every).await;
        match elector.try_acquire_or_renew().await {
            Ok(true) => {
                last_renewed = tokio::time::Instant::now();
                metrics.tick(true);
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                metrics.tick(false);
                if last_renewed.elapsed() >= cfg.lease_duration {
                    break;
                }
            }
        }
        if tokio::time::Instant::now() >= next_gc {
            next_gc = tokio::time::Instant::now() + cfg.gc_interval;
            match controller::gc_identities(client.clone(), &mut gc_memory, cfg.gc_grace, &metrics).await {
                Ok(p) => tracing::debug!(deleted = p.delete.len(), waiting = p.waiting, "identity GC"),
                Err(e) => {
                    metrics.reconcile_errors.inc();
                    tracing::warn!(error = %e, "identity GC failed; retrying next interval");
                }
            }
        }
    }
    // Lost the lease: stop acting at once and exit, so that the restarted
    // process starts as a follower with no state from this term.
    metrics.leader.set(0);
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    anyhow::bail!(
        "lost the leader lease {}/{}; exiting to restart as a follower",
        cfg.lease_namespace,
        cfg.lease_name
    )
}
