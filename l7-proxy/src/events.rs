//! L7 flow events: one per judged request, queued for the agent (bounded;
//! what does not fit is counted as lost) and optionally written as an
//! access log line.
//!
//! The data plane records a [`Flow`] (shared peers and rule names, no
//! formatting); the control runtime turns it into the proto it sends, so
//! the per-request cost of an event is a few moves, not a dozen strings.
//!
//! The queue is drained in batches: the data plane wakes the control
//! runtime when a batch is full, and for the first event only when the
//! control runtime has gone idle (it found nothing for a whole
//! `FLUSH_EVERY`); otherwise the control runtime comes back every
//! `FLUSH_EVERY` by itself. Never a wake-up per event (that cost a context
//! switch per request and a fifth of the proxy's CPU), and under load one
//! per batch; events reach the agent within `FLUSH_EVERY`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sinew_proto::l7pack::Packer;
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

/// Packs the data plane's flows into [`pb::FlowEvents`]: on top of the
/// batch's string table, each address is formatted and each peer's names
/// looked up once per batch.
pub struct FlowPacker {
    packer: Packer,
    ips: std::collections::HashMap<std::net::IpAddr, u32>,
    /// (peer, namespace, name): peers are shared, so a few per batch.
    peers: Vec<(Arc<Peer>, u32, u32)>,
}

/// Peers remembered per batch; past that their names are looked up in
/// the string table each time.
const PEERS_PER_BATCH: usize = 32;

impl Default for FlowPacker {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowPacker {
    pub fn new() -> Self {
        FlowPacker {
            packer: Packer::new(),
            ips: Default::default(),
            peers: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.packer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packer.is_empty()
    }

    fn ip(&mut self, ip: std::net::IpAddr) -> u32 {
        if let Some(&i) = self.ips.get(&ip) {
            return i;
        }
        let i = self.packer.string(&ip.to_string());
        self.ips.insert(ip, i);
        i
    }

    fn peer(&mut self, p: &Arc<Peer>) -> (u32, u32) {
        if let Some((_, ns, name)) = self.peers.iter().find(|(q, ..)| Arc::ptr_eq(q, p)) {
            return (*ns, *name);
        }
        let names = (self.packer.string(&p.namespace), self.packer.string(&p.name));
        if self.peers.len() < PEERS_PER_BATCH {
            self.peers.push((p.clone(), names.0, names.1));
        }
        names
    }

    pub fn push(&mut self, f: &Flow) {
        let (src_namespace, src_name) = self.peer(&f.src_peer);
        let (dst_namespace, dst_name) = self.peer(&f.dst_peer);
        let packed = pb::PackedFlow {
            time_unix_nanos: f
                .time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            direction: f.direction.to_proto() as i32,
            src_ip: self.ip(f.src.ip()),
            src_port: f.src.port().into(),
            src_identity: f.src_peer.identity,
            src_namespace,
            src_name,
            dst_ip: self.ip(f.dst.ip()),
            dst_port: f.dst.port().into(),
            dst_identity: f.dst_peer.identity,
            dst_namespace,
            dst_name,
            protocol: self.packer.string(f.protocol),
            method: self.packer.string(f.method.as_str()),
            host: self.packer.string(&f.host),
            path: self.packer.string(&f.path),
            status: f.status.into(),
            latency_micros: u64::try_from(f.latency.as_micros()).unwrap_or(u64::MAX),
            verdict: match f.verdict {
                Verdict::Forwarded => pb::L7Verdict::Forwarded,
                Verdict::Denied => pb::L7Verdict::Denied,
                Verdict::Error => pb::L7Verdict::Error,
            } as i32,
            rule: self.packer.string(f.rule.as_deref().unwrap_or_default()),
            drop_reason: self.packer.string(f.drop_reason.map(|r| r.name()).unwrap_or_default()),
            grpc_status: f.grpc_status,
        };
        self.packer.push(packed);
    }

    /// The batch so far, with `lost`; the next one starts empty.
    pub fn take(&mut self, lost: u64) -> pb::FlowEvents {
        self.ips.clear();
        self.peers.clear();
        self.packer.take(lost)
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
    /// The control runtime waits for the next event, with no timer.
    idle: std::sync::atomic::AtomicBool,
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
    /// The oldest queued event, if any, as the agent reads it (packed and
    /// read back).
    #[allow(clippy::result_unit_err)]
    pub fn try_recv(&mut self) -> Result<pb::L7Flow, ()> {
        let f = self
            .q
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .ok_or(())?;
        let mut p = FlowPacker::new();
        p.push(&f);
        p.take(0).flow(0).ok_or(())
    }

    /// Waits for events and packs up to `max` of them into `out`: a full
    /// batch at once, else what came within `FLUSH_EVERY` of the first.
    /// Cancel-safe: events stay queued until packed.
    pub async fn next_batch(&mut self, out: &mut FlowPacker, max: usize) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        let len = |q: &Queue| q.items.lock().unwrap_or_else(|e| e.into_inner()).len();
        // Not idle while here and awake (also after a wait that was
        // cancelled): the data plane leaves the first event to the timer.
        self.q.idle.store(false, Release);
        // Whether the last wait found nothing.
        let mut dry = false;
        loop {
            if dry {
                // Idle: the data plane wakes this for the next event. The
                // flag goes up before the queue is looked at again, so an
                // event queued meanwhile is seen here or wakes the wait.
                let first = self.q.notify.notified();
                tokio::pin!(first);
                first.as_mut().enable();
                self.q.idle.store(true, Release);
                if len(&self.q) == 0 {
                    first.await;
                }
                self.q.idle.swap(false, AcqRel);
            }
            let full = self.q.notify.notified();
            let n = len(&self.q);
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
            for f in &taken {
                out.push(f);
            }
            if !out.is_empty() {
                return;
            }
            dry = true;
        }
    }
}

impl Events {
    pub fn new(access_log: bool, metrics: Arc<Metrics>) -> (Self, EventsRx) {
        let q = Arc::new(Queue {
            items: Mutex::new(VecDeque::with_capacity(BATCH)),
            notify: Notify::new(),
            idle: std::sync::atomic::AtomicBool::new(false),
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
        if n == BATCH || n == 1 && self.q.idle.load(std::sync::atomic::Ordering::Acquire) {
            self.q.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn flow(path: &str) -> Flow {
        let peer = Arc::new(Peer {
            identity: 4242,
            namespace: "shop".into(),
            name: "client".into(),
        });
        Flow {
            time: SystemTime::now(),
            direction: Direction::Ingress,
            src: "10.1.0.7:40000".parse().unwrap(),
            dst: "10.1.1.9:8080".parse().unwrap(),
            src_peer: peer.clone(),
            dst_peer: peer,
            protocol: "HTTP/1.1",
            method: http::Method::GET,
            host: "api".into(),
            path: path.into(),
            status: 200,
            latency: Duration::from_micros(120),
            verdict: Verdict::Forwarded,
            rule: Some(Arc::from("shop/api")),
            drop_reason: None,
            grpc_status: 0,
        }
    }

    /// The batching contract: a full batch goes at once; a lone event
    /// within `FLUSH_EVERY` (of the control side's next look, busy or
    /// idle), never lost and never held longer.
    #[test]
    fn batches_go_when_full_and_lone_events_within_the_flush_interval() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = Events::new(false, Arc::new(Metrics::default()));
        rt.block_on(async {
            let mut out = FlowPacker::new();
            // Idle from the start: one event, then nothing.
            tx.emit(flow("/a"));
            let t = Instant::now();
            tokio::time::timeout(Duration::from_secs(2), rx.next_batch(&mut out, BATCH))
                .await
                .expect("events held back");
            assert!(t.elapsed() < FLUSH_EVERY * 3, "took {:?}", t.elapsed());
            let b = out.take(0);
            assert_eq!((b.flows.len(), b.flow(0).unwrap().path.as_str()), (1, "/a"));

            // A full batch from another thread while the control side
            // waits: at once, in order.
            let tx2 = tx.clone();
            let feeder = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                for i in 0..BATCH {
                    tx2.emit(flow(&format!("/{i}")));
                }
            });
            let t = Instant::now();
            tokio::time::timeout(Duration::from_secs(2), rx.next_batch(&mut out, BATCH))
                .await
                .expect("events held back");
            let b = out.take(0);
            feeder.join().unwrap();
            assert!(t.elapsed() < FLUSH_EVERY, "a full batch waited {:?}", t.elapsed());
            assert_eq!(b.flows.len(), BATCH);
            assert_eq!(b.flow(BATCH - 1).unwrap().path, format!("/{}", BATCH - 1));

            // Quiet long enough for the control side to go idle, then one
            // event from another thread wakes it.
            let tx3 = tx.clone();
            let late = std::thread::spawn(move || {
                std::thread::sleep(FLUSH_EVERY * 3);
                tx3.emit(flow("/late"));
                Instant::now()
            });
            tokio::time::timeout(Duration::from_secs(2), rx.next_batch(&mut out, BATCH))
                .await
                .expect("events held back");
            let sent = late.join().unwrap();
            assert!(
                sent.elapsed() < FLUSH_EVERY * 2,
                "an idle wait held an event {:?}",
                sent.elapsed()
            );
            assert_eq!(out.take(0).flow(0).unwrap().path, "/late");
        });
    }
}
