//! `sinew.proxy.v1.ProxyControl` on the proxy's unix socket: one stream
//! per proxy. The proxy says Hello; the agent sends the current snapshot
//! and every newer one; the proxy ACKs each version and sends its L7 flow
//! events, which go to the observer.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sinew_proto::proxy_v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::Publisher;

/// Where L7 flow events go: a batch as the proxy packed it (its flows, and
/// the events it lost since its last message).
pub type FlowSink = Arc<dyn Fn(pb::FlowEvents) + Send + Sync>;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ProxyControlService {
    pub publisher: Arc<Publisher>,
    pub flows: FlowSink,
    /// The pinned sockhash the proxy's listeners go into (see
    /// [`super::listeners`]).
    pub listener_map: std::path::PathBuf,
}

type AgentStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AgentMessage, Status>> + Send>>;

/// Counts a stream as connected while it lives.
struct Connected(Arc<Publisher>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.stream_closed();
    }
}

async fn run_stream(
    publisher: Arc<Publisher>,
    flows: FlowSink,
    listener_map: std::path::PathBuf,
    peer_pid: Option<u32>,
    mut inbound: Streaming<pb::ProxyMessage>,
    tx: mpsc::Sender<Result<pb::AgentMessage, Status>>,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::ProxyMessage {
            kind: Some(pb::proxy_message::Kind::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first message on ProxyControl/Subscribe must be Hello",
                )))
                .await;
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "proxy stream failed before Hello");
            return;
        }
        Ok(Ok(None)) => return,
        Err(_) => {
            let _ = tx.send(Err(Status::deadline_exceeded("no Hello within 10 s"))).await;
            return;
        }
    };
    publisher.hello(hello.version);
    publisher.stream_opened();
    let _connected = Connected(publisher.clone());
    tracing::info!(
        pid = hello.pid,
        version = hello.version,
        ingress_port = hello.ingress_port,
        egress_port = hello.egress_port,
        "L7 proxy connected"
    );
    // The kernel's word for who is on the other end, when it has one.
    let pid = peer_pid.unwrap_or(hello.pid);
    let ports: Vec<u16> = [hello.ingress_port, hello.egress_port]
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok().filter(|p| *p != 0))
        .collect();
    tokio::spawn(register_listeners(listener_map, pid, ports));
    let mut snapshots = publisher.subscribe();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let msg = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Snapshot((*snap).clone())),
        };
        if tx.send(Ok(msg)).await.is_err() {
            break;
        }
        // Until the next snapshot: ACKs and flow events.
        let more = loop {
            tokio::select! {
                changed = snapshots.changed() => break changed.is_ok(),
                m = inbound.message() => match m {
                    Ok(Some(m)) => match m.kind {
                        Some(pb::proxy_message::Kind::Ack(a)) => {
                            if !a.error.is_empty() {
                                tracing::error!(version = a.version, error = %a.error, "the L7 proxy refused a snapshot and keeps its previous rules");
                            } else {
                                tracing::debug!(version = a.version, "L7 proxy rules in force");
                            }
                            publisher.ack(&a);
                        }
                        Some(pb::proxy_message::Kind::Events(e)) => flows(e),
                        Some(pb::proxy_message::Kind::Hello(_)) | None => {}
                    },
                    Ok(None) => break false,
                    Err(e) => {
                        tracing::info!(error = %e, "L7 proxy stream ended");
                        break false;
                    }
                },
            }
        };
        if !more {
            break;
        }
    }
    tracing::info!(pid = hello.pid, "L7 proxy disconnected; it keeps its last rules");
}

/// Puts the proxy's listeners into the datapath's sockhash, retrying while
/// the proxy may still be binding them. Without them only a connection
/// that meets a TIME_WAIT is affected (its SYN is answered as if nobody
/// listened, and the client retries), so a failure is logged, not fatal.
async fn register_listeners(map: std::path::PathBuf, pid: u32, ports: Vec<u16>) {
    let mut last = None;
    for _ in 0..20 {
        let (m, p) = (map.clone(), ports.clone());
        match tokio::task::spawn_blocking(move || super::listeners::register(&m, pid, &p)).await {
            Ok(Ok(())) => {
                tracing::debug!(pid, ?ports, "proxy listeners registered with the datapath");
                return;
            }
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(pid, ?ports, error = last.as_deref().unwrap_or(""), "cannot register the proxy's listeners with the datapath; a new connection that meets an earlier one's TIME_WAIT waits for the client's SYN retry");
}

#[tonic::async_trait]
impl pb::proxy_control_server::ProxyControl for ProxyControlService {
    type SubscribeStream = AgentStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let peer_pid = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        tokio::spawn(run_stream(
            self.publisher.clone(),
            self.flows.clone(),
            self.listener_map.clone(),
            peer_pid,
            req.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Binds the proxy socket (replacing a stale one) and serves ProxyControl
/// on it until the process ends.
pub async fn serve(socket: &Path, service: ProxyControlService) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| {
        format!(
            "bind the proxy socket {} (pass --proxy-socket; a unix socket path has at most 107 bytes)",
            socket.display()
        )
    })?;
    tracing::info!(socket = %socket.display(), "serving the L7 proxy's control stream");
    let incoming = UnixListenerStream::new(listener);
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(pb::proxy_control_server::ProxyControlServer::new(service))
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "the L7 proxy's control stream stopped; the proxy keeps its last rules");
        }
    });
    Ok(())
}
