//! L7 flow events: one per judged request, queued for the agent (bounded;
//! what does not fit is counted as lost) and optionally written as an
//! access log line.

use std::io::Write as _;
use std::sync::Arc;

use sinew_proto::proxy_v1 as pb;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

pub const QUEUE: usize = 4096;

#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<pb::L7Flow>,
    access_log: bool,
    metrics: Arc<Metrics>,
}

impl Events {
    pub fn new(access_log: bool, metrics: Arc<Metrics>) -> (Self, mpsc::Receiver<pb::L7Flow>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                access_log,
                metrics,
            },
            rx,
        )
    }

    pub fn emit(&self, f: pb::L7Flow) {
        if self.access_log {
            let verdict = pb::L7Verdict::try_from(f.verdict).unwrap_or(pb::L7Verdict::Unspecified);
            let line = format!(
                "{} {} {}:{} -> {}:{} {} {} {}{} {} {}us {} rule={:?} reason={}\n",
                f.time_unix_nanos,
                pb::Direction::try_from(f.direction)
                    .map(|d| d.as_str_name())
                    .unwrap_or("?"),
                f.src_ip,
                f.src_port,
                f.dst_ip,
                f.dst_port,
                f.protocol,
                f.method,
                f.host,
                f.path,
                f.status,
                f.latency_micros,
                verdict.as_str_name(),
                f.rule,
                if f.drop_reason.is_empty() { "-" } else { &f.drop_reason },
            );
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
        }
        if self.tx.try_send(f).is_err() {
            self.metrics
                .events_lost
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
