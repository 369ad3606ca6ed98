//! A stand-in for the agent's side of `ProxyControl`, for the places that
//! run `sinew-proxy` without an agent: the proxy's integration tests and
//! `sinew-bench l7-proxy`. It answers every Hello with the snapshot it
//! holds now and records the proxy's ACKs; flow events are read and let go.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::proxy_v1 as pb;

/// Cheap to clone: clones share the snapshot and the ACKs.
#[derive(Clone, Default)]
pub struct StandInAgent {
    /// Sent to every proxy that says hello (set it before the proxy starts).
    pub snapshot: Arc<Mutex<pb::Snapshot>>,
    /// Every ACK received, in order.
    pub acks: Arc<Mutex<Vec<pb::Ack>>>,
}

impl StandInAgent {
    pub fn new(snapshot: pb::Snapshot) -> Self {
        StandInAgent {
            snapshot: Arc::new(Mutex::new(snapshot)),
            acks: Arc::default(),
        }
    }

    /// Binds `socket` (replacing a stale one) and serves on the current
    /// tokio runtime until it shuts down. Returns once the socket accepts.
    pub fn serve(&self, socket: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let svc = pb::proxy_control_server::ProxyControlServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::proxy_control_server::ProxyControl for StandInAgent {
    type SubscribeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AgentMessage, tonic::Status>>;

    async fn subscribe(
        &self,
        r: tonic::Request<tonic::Streaming<pb::ProxyMessage>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut inbound = r.into_inner();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.kind {
                    Some(pb::proxy_message::Kind::Hello(_)) => {
                        let snap = me.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let msg = pb::AgentMessage {
                            kind: Some(pb::agent_message::Kind::Snapshot(snap)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Some(pb::proxy_message::Kind::Ack(a)) => me.acks.lock().unwrap_or_else(|e| e.into_inner()).push(a),
                    _ => {}
                }
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
