//! The load generator of `l7-proxy`'s "h2c new conn/req" arm: HTTP/2
//! clients (prior knowledge) that each open a connection, send one
//! request, read the whole answer and close, again and again. h2load
//! keeps its connections for the whole run, so it cannot show what a
//! proxy does when HTTP/2 clients come and go (a CLI, a batch job, a
//! client behind a connection limit): whether the upstream pays a TCP
//! handshake and a SETTINGS exchange per client, and whether the first
//! request waits for them.
//!
//! It runs as a child process (`sinew-bench h2c-client`, hidden) on the
//! client CPU, so that its CPU counts as the load generator's, as wrk's
//! and h2load's do, and prints one line of JSON.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

use crate::stats::percentile;

/// What `sinew-bench h2c-client` is told.
#[derive(Debug, Clone, clap::Args)]
pub struct H2cClientArgs {
    /// The proxy (or the upstream, for the direct arm).
    #[arg(long)]
    pub addr: SocketAddr,
    /// Clients at once, each one connection at a time.
    #[arg(long, default_value_t = 1)]
    pub conns: u32,
    /// How long to run, seconds.
    #[arg(long)]
    pub secs: f64,
    /// The request's path.
    #[arg(long, default_value = "/public/x")]
    pub path: String,
}

/// The line the client prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct H2cClientOutput {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests answered otherwise, and connections or requests that
    /// failed (with the first such error in `first_error`).
    pub failed: u64,
    pub first_error: Option<String>,
    /// Answered requests per second over the whole run.
    pub rate: f64,
    /// From connect to the end of the answer's body, µs.
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One connection, one request: its latency (µs) when answered 2xx.
async fn one(addr: SocketAddr, uri: &http::Uri) -> Result<u64, String> {
    let t = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(uri.clone())
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    // The last handle gone, the connection closes once its stream has.
    drop(send);
    let _ = conn.await;
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    Ok(t.elapsed().as_micros() as u64)
}

/// Runs `a.conns` clients for `a.secs` seconds on this thread.
pub fn run(a: &H2cClientArgs) -> Result<H2cClientOutput, String> {
    if !(a.secs.is_finite() && a.secs > 0.0) {
        return Err("--secs must be a positive number of seconds".into());
    }
    let uri: http::Uri = format!("http://{}{}", a.addr, a.path)
        .parse()
        .map_err(|e| format!("--path {:?}: {e}", a.path))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let run_for = Duration::from_secs_f64(a.secs);
    rt.block_on(async {
        let start = Instant::now();
        let deadline = start + run_for;
        let mut tasks = Vec::new();
        for _ in 0..a.conns.max(1) {
            let uri = uri.clone();
            let addr = a.addr;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let (mut failed, mut first_error) = (0u64, None);
                while Instant::now() < deadline {
                    match one(addr, &uri).await {
                        Ok(us) => lat.push(us),
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (lat, failed, first_error)
            }));
        }
        let mut out = H2cClientOutput::default();
        let mut lat = Vec::new();
        for t in tasks {
            let (l, f, e) = t.await.map_err(|e| format!("client task: {e}"))?;
            lat.extend(l);
            out.failed += f;
            if out.first_error.is_none() {
                out.first_error = e;
            }
        }
        lat.sort_unstable();
        out.ok = lat.len() as u64;
        out.rate = out.ok as f64 / start.elapsed().as_secs_f64();
        out.p50_us = percentile(&lat, 0.5).unwrap_or(0);
        out.p99_us = percentile(&lat, 0.99).unwrap_or(0);
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in upstream: h2c, answers `/public...` 200 and anything else
    /// 403, and counts the connections it accepted.
    async fn upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicU64::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                n.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let st = if req.uri().path().starts_with("/public") {
                            200
                        } else {
                            403
                        };
                        http::Response::builder()
                            .status(st)
                            .body(http_body_util::Full::new(Bytes::from_static(b"ok\n")))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    #[test]
    fn every_request_gets_a_connection_of_its_own_and_failures_are_counted() {
        use std::sync::atomic::Ordering;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (addr, accepted) = rt.block_on(upstream());
        let args = H2cClientArgs {
            addr,
            conns: 2,
            secs: 0.3,
            path: "/public/x".into(),
        };
        let out = run(&args).unwrap();
        assert!(out.ok > 10, "{out:?}");
        assert_eq!(out.failed, 0, "{out:?}");
        assert!(out.p50_us > 0 && out.p99_us >= out.p50_us, "{out:?}");
        // One connection per request.
        assert_eq!(accepted.load(Ordering::Relaxed), out.ok, "{out:?}");

        let denied = run(&H2cClientArgs {
            path: "/admin".into(),
            ..args.clone()
        })
        .unwrap();
        assert_eq!(denied.ok, 0, "{denied:?}");
        assert!(denied.failed > 0, "{denied:?}");
        assert_eq!(denied.first_error.as_deref(), Some("status 403 Forbidden"));

        assert!(run(&H2cClientArgs { secs: 0.0, ..args }).is_err());
    }
}
