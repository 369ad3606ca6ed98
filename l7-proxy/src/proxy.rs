//! Starting and stopping the proxy: the data runtime (listeners and client
//! connections) and the control runtime (agent stream, admin port) each run
//! on their own threads, so neither can starve the other.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::events::{Events, EventsRx};
use crate::inbound::{self, Ctx};
use crate::listener;
use crate::metrics::Metrics;
use crate::srcmap::SourceMap;
use crate::state::{Direction, SharedState};
use crate::upstream::Pool;

pub struct Proxy;

/// A running proxy.
pub struct ProxyHandle {
    pub ingress: Vec<SocketAddr>,
    pub egress: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub state: Arc<SharedState>,
    pub metrics: Arc<Metrics>,
    events: Mutex<Option<EventsRx>>,
    drain: watch::Sender<bool>,
    data: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ProxyHandle {
    /// The flow events, when no agent socket is configured (tests).
    pub fn take_events(&self) -> Option<EventsRx> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Stops accepting and lets connections finish (SIGTERM).
    pub fn drain(&self) {
        self.metrics.draining.store(1, Relaxed);
        let _ = self.drain.send(true);
    }

    /// Waits until the data runtime has drained and stopped.
    pub fn join(&self) {
        if let Some(t) = self.data.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Proxy {
    pub fn start(config: Config) -> anyhow::Result<ProxyHandle> {
        config.validate()?;
        if config.transparent {
            if let Err(e) = listener::enable_request_migration() {
                tracing::warn!(error = %e, "cannot enable net.ipv4.tcp_migrate_req; a proxy restart may reset queued connections");
            }
        }
        let mut bound = Vec::new();
        for (dir, addrs) in [
            (Direction::Ingress, &config.ingress),
            (Direction::Egress, &config.egress),
        ] {
            for a in addrs {
                let l = listener::bind(*a, config.transparent)?;
                if config.agent_socket.is_none() {
                    // No rules to wait for: connectable when start returns.
                    l.listen(4096)?;
                }
                bound.push((dir, l));
            }
        }
        let addr_of = |d: Direction| -> Vec<SocketAddr> {
            bound
                .iter()
                .filter(|(x, _)| *x == d)
                .filter_map(|(_, l)| l.local_addr().ok().and_then(|a| a.as_socket()))
                .collect()
        };
        let ingress = addr_of(Direction::Ingress);
        let egress = addr_of(Direction::Egress);

        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(SharedState::default());
        let (events, events_rx) = Events::new(config.access_log, metrics.clone());
        let pool = Arc::new(Pool::new(
            config.limits.upstream_connect_timeout,
            config.limits.upstream_idle_per_key,
            config.limits.upstream_idle_timeout,
            metrics.clone(),
        ));
        let ctx = Arc::new(Ctx {
            state: state.clone(),
            metrics: metrics.clone(),
            pool,
            events,
            limits: config.limits.clone(),
            original_dst_override: config.original_dst_override,
            source_map: config.source_map.as_deref().and_then(|p| match SourceMap::open(p) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(
                        path = %p.display(),
                        error = %e,
                        "cannot open the datapath's source map: ingress clients from another node's proxy are judged as that node (fails closed); check that the agent's BPF filesystem is mounted here and that the proxy runs as root"
                    );
                    None
                }
            }),
            hubs: Default::default(),
        });
        let (drain_tx, drain_rx) = watch::channel(false);

        // Control runtime: admin port and the agent stream.
        let admin_listener = match config.admin {
            Some(a) => Some(std::net::TcpListener::bind(a)?),
            None => None,
        };
        let admin = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = &admin_listener {
            l.set_nonblocking(true)?;
        }
        let (control_events, test_events) = if config.agent_socket.is_some() {
            (Some(events_rx), None)
        } else {
            (None, Some(events_rx))
        };
        {
            let state = state.clone();
            let metrics = metrics.clone();
            let agent = config.agent_socket.clone();
            let listeners = (
                config.ingress.first().map(|a| a.port()),
                config.egress.first().map(|a| a.port()),
            );
            let drain_rx = drain_rx.clone();
            std::thread::Builder::new()
                .name("sinew-proxy-control".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot build the control runtime");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        if let Some(l) = admin_listener {
                            match tokio::net::TcpListener::from_std(l) {
                                Ok(l) => {
                                    tokio::spawn(crate::admin::serve(
                                        l,
                                        metrics.clone(),
                                        state.clone(),
                                        drain_rx.clone(),
                                    ));
                                }
                                Err(e) => tracing::error!(error = %e, "admin listener"),
                            }
                        }
                        if let (Some(socket), Some(rx)) = (agent, control_events) {
                            crate::control::run(socket, state, metrics, rx, listeners).await;
                        } else {
                            std::future::pending::<()>().await;
                        }
                    });
                })?;
        }

        // Data runtime: listeners and client connections.
        let wait_for_rules = config.agent_socket.is_some();
        let data = {
            let metrics = metrics.clone();
            let state = state.clone();
            let drain_timeout = config.drain_timeout;
            // One worker: a current-thread runtime on the data thread
            // itself: no work-stealing queues, no wake-ups across threads.
            let rt = if config.data_threads <= 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(config.data_threads)
                    .thread_name("sinew-proxy-data")
                    .enable_all()
                    .build()?
            };
            std::thread::Builder::new()
                .name("sinew-proxy-data-main".into())
                .spawn(move || {
                    rt.block_on(async move {
                        let mut accepts = Vec::new();
                        if wait_for_rules {
                            while state.load().version == 0 && !*drain_rx.borrow() {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        for (dir, l) in bound {
                            let l = match listener::listen(l).and_then(|l| {
                                crate::netio::listener(l).map_err(|source| listener::ListenError::Bind {
                                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                                    source,
                                })
                            }) {
                                Ok(l) => l,
                                Err(e) => {
                                    tracing::error!(error = %e, "listener");
                                    continue;
                                }
                            };
                            let ctx = ctx.clone();
                            let drain = drain_rx.clone();
                            accepts.push(tokio::spawn(async move {
                                loop {
                                    match crate::netio::accept(&l).await {
                                        Ok((s, peer)) => {
                                            let s = crate::netio::Client::new(s);
                                            tokio::spawn(inbound::serve(ctx.clone(), s, peer, dir, drain.clone()));
                                        }
                                        Err(e) => {
                                            tracing::warn!(error = %e, "accept");
                                            tokio::time::sleep(Duration::from_millis(20)).await;
                                        }
                                    }
                                }
                            }));
                        }
                        metrics.listening.store(1, Relaxed);
                        let mut drain = drain_rx.clone();
                        let _ = drain.wait_for(|d| *d).await;
                        // Closing the listeners hands queued connections to the
                        // process that shares the port (tcp_migrate_req).
                        for a in accepts {
                            a.abort();
                            let _ = a.await;
                        }
                        let deadline = Instant::now() + drain_timeout;
                        while metrics.active_connections() > 0 && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    });
                    rt.shutdown_timeout(Duration::from_millis(100));
                })?
        };

        Ok(ProxyHandle {
            ingress,
            egress,
            admin,
            state,
            metrics,
            events: Mutex::new(test_events),
            drain: drain_tx,
            data: Mutex::new(Some(data)),
        })
    }
}
