//! Prometheus `/metrics`, and `/healthz` (the loops are alive) and
//! `/readyz` (the last API call succeeded) for the Deployment's probes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

/// The operator's metrics and health, shared by its loops.
pub struct Metrics {
    pub registry: Registry,
    pub leader: Gauge,
    pub pool_free: Family<PoolLabel, Gauge>,
    pub nodes_without_cidr: Gauge,
    pub identities_deleted: Counter,
    pub reconcile_errors: Counter,
    /// Seconds since the epoch of the last loop tick.
    pub last_tick: AtomicI64,
    pub api_ok: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sinew_operator");
        let leader = Gauge::default();
        let pool_free = Family::<PoolLabel, Gauge>::default();
        let nodes_without_cidr = Gauge::default();
        let identities_deleted = Counter::default();
        let reconcile_errors = Counter::default();
        registry.register("leader", "1 while this operator holds the lease", leader.clone());
        registry.register("pod_cidr_pool_free", "free node blocks per pool", pool_free.clone());
        registry.register(
            "nodes_without_pod_cidr",
            "nodes the pool could not serve (PoolExhausted)",
            nodes_without_cidr.clone(),
        );
        registry.register(
            "identities_deleted",
            "identities deleted by GC",
            identities_deleted.clone(),
        );
        registry.register("reconcile_errors", "failed reconciles", reconcile_errors.clone());
        Metrics {
            registry,
            leader,
            pool_free,
            nodes_without_cidr,
            identities_deleted,
            reconcile_errors,
            last_tick: AtomicI64::new(now_secs()),
            api_ok: AtomicBool::new(false),
        }
    }
}

pub fn now_secs() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

impl Metrics {
    pub fn tick(&self, api_ok: bool) {
        self.last_tick.store(now_secs(), Ordering::Relaxed);
        self.api_ok.store(api_ok, Ordering::Relaxed);
    }

    /// The answer to one request (pure apart from the clock).
    pub fn answer(&self, method: &Method, path: &str, stale_after: Duration) -> (StatusCode, String) {
        if method != Method::GET {
            return (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match path {
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => (StatusCode::OK, out),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding failed: {e}\n")),
                }
            }
            "/healthz" => {
                let age = now_secs() - self.last_tick.load(Ordering::Relaxed);
                if age <= stale_after.as_secs() as i64 {
                    (StatusCode::OK, "ok\n".into())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("loops stalled for {age} s\n"))
                }
            }
            "/readyz" => {
                if self.api_ok.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok\n".into())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the API server is not reachable yet; see the operator's log\n".into(),
                    )
                }
            }
            _ => (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
        }
    }
}

async fn handle(
    m: Arc<Metrics>,
    stale_after: Duration,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = m.answer(req.method(), req.uri().path(), stale_after);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    Ok(resp)
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, m: Arc<Metrics>, stale_after: Duration) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "serving metrics and health");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = m.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(m.clone(), stale_after, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_answer() {
        let m = Metrics::default();
        let d = Duration::from_secs(60);
        assert_eq!(m.answer(&Method::GET, "/healthz", d).0, StatusCode::OK);
        assert_eq!(m.answer(&Method::GET, "/readyz", d).0, StatusCode::SERVICE_UNAVAILABLE);
        m.tick(true);
        assert_eq!(m.answer(&Method::GET, "/readyz", d).0, StatusCode::OK);
        m.leader.set(1);
        let (code, text) = m.answer(&Method::GET, "/metrics", d);
        assert_eq!(code, StatusCode::OK);
        assert!(text.contains("sinew_operator_leader 1"), "{text}");
        m.last_tick.store(0, Ordering::Relaxed);
        assert_eq!(m.answer(&Method::GET, "/healthz", d).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(m.answer(&Method::POST, "/metrics", d).0, StatusCode::METHOD_NOT_ALLOWED);
    }
}
