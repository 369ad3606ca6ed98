//! L7 flow events: one per judged request, queued for the agent (bounded;
//! what does not fit is counted as lost) and optionally written as an
//! access log line.
//!
//! The queue is drained in batches: the data plane wakes the control
//! runtime for the first event after a drain and when a batch is full,
//! never per event (a wake-up per request cost a context switch per
//! request and a fifth of the proxy's CPU), so events reach the agent
//! within `FLUSH_EVERY`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sinew_proto::proxy_v1 as pb;
use tokio::sync::Notify;

use crate::metrics::Metrics;

pub const QUEUE: usize = 4096;
/// Events per message to the agent; a full batch is sent at once.
pub const BATCH: usize = 256;
/// The longest an event waits for its batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

struct Queue {
    items: Mutex<VecDeque<pb::L7Flow>>,
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
            let mut g = self.q.items.lock().unwrap_or_else(|e| e.into_inner());
            let k = g.len().min(max);
            out.extend(g.drain(..k));
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
