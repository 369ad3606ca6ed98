//! The admin port: `/metrics` (Prometheus text), `/healthz`, `/ready`.
//! Runs on the control runtime.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::state::SharedState;

pub async fn serve(l: TcpListener, metrics: Arc<Metrics>, state: Arc<SharedState>, drain: watch::Receiver<bool>) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let metrics = metrics.clone();
        let state = state.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => (StatusCode::OK, metrics.render()),
                    "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                    "/ready" if *drain.borrow() => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned()),
                    "/ready" if metrics.listening.load(std::sync::atomic::Ordering::Relaxed) == 0 => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the first snapshot\n".to_owned(),
                    ),
                    "/ready" => (StatusCode::OK, format!("ready version={}\n", state.load().version)),
                    _ => (StatusCode::NOT_FOUND, "try /metrics, /healthz or /ready\n".to_owned()),
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}
