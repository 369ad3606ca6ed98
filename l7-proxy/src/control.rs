//! The control stream to the agent: Hello, then snapshots in and ACKs and
//! flow events out. Reconnects with backoff when the agent goes away and
//! keeps the last snapshot in force meanwhile.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use sinew_proto::proxy_v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::events::{EventsRx, FlowPacker, BATCH};
use crate::metrics::Metrics;
use crate::state::SharedState;

pub async fn run(
    socket: PathBuf,
    state: Arc<SharedState>,
    metrics: Arc<Metrics>,
    mut events: EventsRx,
    ports: (Option<u16>, Option<u16>),
) {
    let mut backoff = Duration::from_millis(100);
    // The proto counts lost events since the previous message (also those
    // lost while the agent was away); the metric since the process started.
    let mut lost_reported = 0;
    loop {
        match session(&socket, &state, &metrics, &mut events, ports, &mut lost_reported).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::info!(socket = %socket.display(), error = %e, "agent stream down, keeping the last rules; retrying")
            }
        }
        metrics.agent_connected.store(0, Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    socket: &std::path::Path,
    state: &SharedState,
    metrics: &Metrics,
    events: &mut EventsRx,
    ports: (Option<u16>, Option<u16>),
    lost_reported: &mut u64,
) -> anyhow::Result<()> {
    let mut client = sinew_proto::connect_proxy_control(socket, Duration::from_secs(2)).await?;
    let (tx, rx) = mpsc::channel::<pb::ProxyMessage>(64);
    tx.send(pb::ProxyMessage {
        kind: Some(pb::proxy_message::Kind::Hello(pb::Hello {
            pid: std::process::id(),
            version: state.load().version,
            ingress_port: ports.0.unwrap_or(0).into(),
            egress_port: ports.1.unwrap_or(0).into(),
        })),
    })
    .await?;
    let mut inbound = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    metrics.agent_connected.store(1, Relaxed);
    let mut batch = FlowPacker::new();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                if let Some(pb::agent_message::Kind::Snapshot(s)) = msg.kind {
                    let error = match state.apply(&s) {
                        Ok(v) => {
                            metrics.snapshot_version.store(v, Relaxed);
                            String::new()
                        }
                        Err(e) => {
                            metrics.snapshots_refused.fetch_add(1, Relaxed);
                            tracing::warn!(version = s.version, error = %e, "snapshot refused, keeping the previous rules");
                            e.to_string()
                        }
                    };
                    tx.send(pb::ProxyMessage {
                        kind: Some(pb::proxy_message::Kind::Ack(pb::Ack { version: s.version, error })),
                    })
                    .await?;
                }
            }
            _ = events.next_batch(&mut batch, BATCH) => {
                let now = metrics.events_lost.load(Relaxed);
                let lost = now.saturating_sub(*lost_reported);
                *lost_reported = now;
                tx.send(pb::ProxyMessage {
                    kind: Some(pb::proxy_message::Kind::Events(batch.take(lost))),
                })
                .await?;
            }
        }
    }
}
