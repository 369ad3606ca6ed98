//! The Observer gRPC service (sinew.observer.v1.Observer).

use std::pin::Pin;

use sinew_proto::observer_v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{filter, now_unix_nanos, Observer};

pub struct ObserverApi {
    pub observer: Observer,
}

type FlowStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GetFlowsResponse, Status>> + Send>>;

fn flow_response(node: &str, f: pb::Flow) -> pb::GetFlowsResponse {
    pb::GetFlowsResponse {
        response: Some(pb::get_flows_response::Response::Flow(f)),
        node_name: node.to_string(),
        time_unix_nanos: now_unix_nanos(),
    }
}

/// Records a follower names per read of the buffer.
const FOLLOW_BATCH: usize = 256;

/// Sends the history, then (following) new flows from sequence `next` on
/// until the client goes away or `until` passes. A follower that falls
/// more than the buffer behind is told how many flows it missed.
async fn stream_flows(
    observer: Observer,
    req: pb::GetFlowsRequest,
    history: Vec<pb::Flow>,
    mut next: u64,
    tx: mpsc::Sender<Result<pb::GetFlowsResponse, Status>>,
) {
    let node = observer.node_name().to_string();
    for f in history {
        if tx.send(Ok(flow_response(&node, f))).await.is_err() {
            return;
        }
    }
    if !req.follow {
        return;
    }
    observer.follower_started();
    let deadline = (req.until_unix_nanos != 0).then(|| {
        let left = req.until_unix_nanos.saturating_sub(now_unix_nanos());
        tokio::time::Instant::now() + std::time::Duration::from_nanos(left)
    });
    'follow: loop {
        let batch = observer.read_from(next, FOLLOW_BATCH);
        next = batch.next;
        if batch.missed > 0 {
            observer.stats().follower_lagged(batch.missed);
            let lost = pb::GetFlowsResponse {
                response: Some(pb::get_flows_response::Response::LostEvents(pb::LostEvents {
                    count: batch.missed,
                })),
                node_name: node.clone(),
                time_unix_nanos: now_unix_nanos(),
            };
            if tx.send(Ok(lost)).await.is_err() {
                break;
            }
        }
        if batch.records.is_empty() {
            tokio::select! {
                _ = observer.wait_for(next) => continue,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
                _ = tx.closed() => break,
            }
        }
        let now = observer.current_index();
        for r in &batch.records {
            let f = observer.flow(r, &now);
            if !filter::selects(&req, &f) {
                continue;
            }
            if tx.send(Ok(flow_response(&node, f))).await.is_err() {
                break 'follow;
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
    }
    observer.follower_stopped();
}

#[tonic::async_trait]
impl sinew_proto::Observer for ObserverApi {
    type GetFlowsStream = FlowStream;

    async fn get_flows(&self, req: Request<pb::GetFlowsRequest>) -> Result<Response<FlowStream>, Status> {
        let req = req.into_inner();
        filter::validate(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (history, next) = self.observer.history(&req);
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(stream_flows(self.observer.clone(), req, history, next, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn server_status(
        &self,
        _: Request<pb::ServerStatusRequest>,
    ) -> Result<Response<pb::ServerStatusResponse>, Status> {
        let s = self.observer.stats().snapshot();
        let counts = |v: &[(&'static str, u64)]| {
            v.iter()
                .map(|(t, n)| pb::EventCount {
                    r#type: t.to_string(),
                    count: *n,
                })
                .collect()
        };
        Ok(Response::new(pb::ServerStatusResponse {
            num_flows: s.flows_total(),
            current_flows: s.buffered,
            max_flows: s.capacity,
            events_lost: counts(&s.events_lost),
            events_lost_total: s.events_lost_total(),
            follower_dropped: s.follower_dropped,
            flows_by_type: counts(&s.flows_by_type),
            node_name: self.observer.node_name().to_string(),
            uptime_nanos: self.observer.uptime().as_nanos() as u64,
            observer_start_unix_nanos: self.observer.started_unix_nanos(),
            enabled: self.observer.enabled(),
            flows_by_drop_reason: s
                .flows_by_drop_reason
                .iter()
                .map(|(r, n)| (r.to_string(), *n))
                .collect(),
            followers: s.followers as u32,
            event_ring_bytes: self.observer.event_ring_bytes(),
        }))
    }
}
