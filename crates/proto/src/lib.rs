//! The gRPC contract of sinew-agent, generated from `proto/`, and the client
//! and server plumbing for its unix socket. Nothing here knows about BPF or
//! netlink: it must stay cheap to link into the CNI plugin.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod addr;
pub mod l7pack;
pub mod standin;

#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("sinew.agent.v1");
}

/// The flow observer (`sinew observe`), served on the same socket.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod observer_v1 {
    tonic::include_proto!("sinew.observer.v1");
}

/// The agent-proxy stream (`sinew-proxy`), served on its own unix socket.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod proxy_v1 {
    tonic::include_proto!("sinew.proxy.v1");
}

/// Where the agent serves `ProxyControl` when nothing else is configured.
pub const DEFAULT_PROXY_SOCKET: &str = "/run/sinew/proxy.sock";

pub use observer_v1::observer_client::ObserverClient;
pub use observer_v1::observer_server::{Observer, ObserverServer};
pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};

/// Where the agent listens when nothing else is configured.
pub const DEFAULT_SOCKET: &str = "/run/sinew/agent.sock";

/// Connects to the agent's unix socket. The URI is a placeholder that tonic
/// requires; the connector ignores it.
pub async fn connect(socket: &Path, timeout: Duration) -> Result<AgentClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(timeout)
        .timeout(timeout);
    Ok(AgentClient::new(channel(endpoint, socket).await?))
}

/// Connects the observer client. Only connecting is bounded by `timeout`:
/// a followed flow stream lasts as long as the caller wants.
pub async fn connect_observer(
    socket: &Path,
    timeout: Duration,
) -> Result<ObserverClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::try_from("http://[::]:50051")?.connect_timeout(timeout);
    Ok(ObserverClient::new(channel(endpoint, socket).await?))
}

async fn channel(endpoint: Endpoint, socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Connects the proxy's control client (`ProxyControl`). Only connecting is
/// bounded by `timeout`: the stream lasts as long as both sides run.
pub async fn connect_proxy_control(
    socket: &Path,
    timeout: Duration,
) -> Result<proxy_v1::proxy_control_client::ProxyControlClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::try_from("http://[::]:50051")?.connect_timeout(timeout);
    Ok(proxy_v1::proxy_control_client::ProxyControlClient::new(
        channel(endpoint, socket).await?,
    ))
}
