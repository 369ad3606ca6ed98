//! L7 flow events: one per judged request, queued for the agent (bounded;
//! what does not fit is counted as lost) and optionally written as an
//! access log line.
//!
//! The data plane records a [`Flow`] (shared peers and rule names, no
//! formatting); the control runtime turns it into the proto it sends, so
//! the per-request cost of an event is a few moves, not a dozen strings.
//!
//! The queue is drained in batches: the data plane wakes the control
//! runtime for the first event after a drain and when a batch is full,
//! never per event (a wake-up per request cost a context switch per
//! request and a fifth of the proxy's CPU), so events reach the agent
//! within `FLUSH_EVERY`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sinew_proto::proxy_v1 as pb;
use tokio::sync::Notify;

use crate::metrics::{DropReason, Metrics, Verdict};
use crate::state::{Direction, Peer};

/// One judged request as the data plane records it.
#[derive(Clone, Debug)]
pub struct Flow {
    pub time: SystemTime,
    pub direction: Direction,
    /// The client (ingress: the remote peer; egress: the local endpoint).
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
    pub src_peer: Arc<Peer>,
    pub dst_peer: Arc<Peer>,
    pub protocol: &'static str,
    pub method: http::Method,
    pub host: String,
    /// Normalised; empty when the target was refused before.
    pub path: String,
    pub status: u16,
    pub latency: Duration,
    pub verdict: Verdict,
    pub rule: Option<Arc<str>>,
    pub drop_reason: Option<DropReason>,
    pub grpc_status: u32,
}

impl Flow {
    /// The event as the agent takes it; its strings move, not copied.
    pub fn into_proto(self) -> pb::L7Flow {
        pb::L7Flow {
            time_unix_nanos: self
                .time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            direction: self.direction.to_proto() as i32,
            src_ip: self.src.ip().to_string(),
            src_port: self.src.port().into(),
            src_identity: self.src_peer.identity,
            src_namespace: self.src_peer.namespace.clone(),
            src_name: self.src_peer.name.clone(),
            dst_ip: self.dst.ip().to_string(),
            dst_port: self.dst.port().into(),
            dst_identity: self.dst_peer.identity,
            dst_namespace: self.dst_peer.namespace.clone(),
            dst_name: self.dst_peer.name.clone(),
            protocol: self.protocol.into(),
            method: self.method.as_str().into(),
            host: self.host,
            path: self.path,
            status: self.status.into(),
            latency_micros: u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX),
            verdict: match self.verdict {
                Verdict::Forwarded => pb::L7Verdict::Forwarded,
                Verdict::Denied => pb::L7Verdict::Denied,
                Verdict::Error => pb::L7Verdict::Error,
            } as i32,
            rule: self.rule.as_deref().unwrap_or_default().into(),
            drop_reason: self.drop_reason.map(|r| r.name()).unwrap_or_default().into(),
            grpc_status: self.grpc_status,
        }
    }

    fn access_log_line(&self) -> String {
        format!(
            "{} {} {} -> {} {} {} {}{} {} {}us {} rule={:?} reason={}\n",
            self.time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            self.direction.to_proto().as_str_name(),
            self.src,
            self.dst,
            self.protocol,
            self.method,
            self.host,
            self.path,
            self.status,
            self.latency.as_micros(),
            self.verdict.proto_name(),
            self.rule.as_deref().unwrap_or_default(),
            self.drop_reason.map(|r| r.name()).unwrap_or("-"),
        )
    }
}

pub const QUEUE: usize = 4096;
/// Events per message to the agent; a full batch is sent at once. The
/// control thread turns a batch into protos in one go, and on a busy
/// machine that burst delays the data thread's requests: 256 put about
/// 700 us on the added p99 of a new connection per request, 64 about 400
/// (sinew-bench l7-proxy, 3 alternating rounds), for about 4% of
/// keep-alive throughput in more control wake-ups.
pub const BATCH: usize = 64;
/// The longest an event waits for its batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

struct Queue {
    items: Mutex<VecDeque<Flow>>,
    notify: Notify,
}

#[derive(Clone)]
pub struct Events {
    q: Arc<Queue>,
    access_log: bool,
    metrics: Arc<Metrics>,
}

/// The receiving end: the control stream, or a test.
pub struct EventsRx {
    q: Arc<Queue>,
}

impl EventsRx {
    /// The oldest queued event, if any.
    #[allow(clippy::result_unit_err)]
    pub fn try_recv(&mut self) -> Result<pb::L7Flow, ()> {
        self.q
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .map(Flow::into_proto)
            .ok_or(())
    }

    /// Waits for events and moves up to `max` of them into `out`: a full
    /// batch at once, else what came within `FLUSH_EVERY` of the first.
    /// Cancel-safe: events stay queued until moved.
    pub async fn next_batch(&mut self, out: &mut Vec<pb::L7Flow>, max: usize) {
        loop {
            let first = self.q.notify.notified();
            let empty = self.q.items.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
            if empty {
                first.await;
            }
            let full = self.q.notify.notified();
            let n = self.q.items.lock().unwrap_or_else(|e| e.into_inner()).len();
            if n < max {
                tokio::select! {
                    _ = full => {}
                    _ = tokio::time::sleep(FLUSH_EVERY) => {}
                }
            }
            let taken: Vec<Flow> = {
                let mut g = self.q.items.lock().unwrap_or_else(|e| e.into_inner());
                let k = g.len().min(max);
                g.drain(..k).collect()
            };
            out.extend(taken.into_iter().map(Flow::into_proto));
            if !out.is_empty() {
                return;
            }
        }
    }
}

impl Events {
    pub fn new(access_log: bool, metrics: Arc<Metrics>) -> (Self, EventsRx) {
        let q = Arc::new(Queue {
            items: Mutex::new(VecDeque::with_capacity(BATCH)),
            notify: Notify::new(),
        });
        (
            Self {
                q: q.clone(),
                access_log,
                metrics,
            },
            EventsRx { q },
        )
    }

    pub fn emit(&self, f: Flow) {
        if self.access_log {
            let line = f.access_log_line();
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
        }
        let mut g = self.q.items.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() >= QUEUE {
            drop(g);
            self.metrics
                .events_lost
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        g.push_back(f);
        let n = g.len();
        drop(g);
        if n == 1 || n == BATCH {
            self.q.notify.notify_one();
        }
    }
}
