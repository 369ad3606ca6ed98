//! gRPC and h2c (HTTP/2 with prior knowledge, RFC 9113 section 3.3)
//! through the lab's real L7 path (issue 12): a tonic gRPC server and a
//! hyper h2c server in node2-pod1, real generated clients in pods of both
//! nodes, real agents with their supervised sinew-proxy and the BPF
//! redirect. gRPC rules are a whitelist of `{service, method}`: an allowed
//! unary call is served, a server-streaming call keeps its trailers
//! (grpc-status, grpc-message and custom metadata cross the proxy), a
//! method no rule names gets gRPC status 7 PERMISSION_DENIED in valid
//! trailers (gRPC over HTTP/2 protocol, "Responses": Trailers-Only), and
//! every call is an L7 flow in `sinew observe --type l7`.

mod e2e;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::pin::Pin;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_proto::observer_v1 as ob;
use sinew_proto::v1 as agent;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::NetNs;

const GRPC_PORT: u16 = 50051;
const H2C_PORT: u16 = 80;

/// node2-pod1 serves gRPC on 50051 (only Observer/ServerStatus and
/// Observer/GetFlows allowed) and h2c on 80 (GET under /public only).
const POLICY: &str = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: grpc-l7, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: pod1, node: node2}
  ingress:
    - fromEndpoints: [{}]
      toPorts:
        - ports: [{port: "50051", protocol: TCP}]
          rules:
            grpc:
              - {service: sinew.observer.v1.Observer, method: ServerStatus}
              - {service: sinew.observer.v1.Observer, method: GetFlows}
    - fromEndpoints: [{}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http:
              - {method: GET, path: {prefix: /public}}
"#;

/// The test's gRPC server: the Observer service with canned answers.
/// ServerStatus answers `num_flows: 4242`; GetFlows streams three flows
/// and ends with RESOURCE_EXHAUSTED "three is all" and the trailer
/// `x-sinew-end: kept`, so the client can tell that the trailers crossed.
struct Canned;

type FlowStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ob::GetFlowsResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ob::observer_server::Observer for Canned {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        _req: tonic::Request<ob::GetFlowsRequest>,
    ) -> Result<tonic::Response<FlowStream>, tonic::Status> {
        let mut items: Vec<Result<ob::GetFlowsResponse, tonic::Status>> = (0..3)
            .map(|i| {
                Ok(ob::GetFlowsResponse {
                    node_name: format!("canned-{i}"),
                    ..Default::default()
                })
            })
            .collect();
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("x-sinew-end", "kept".parse().unwrap());
        items.push(Err(tonic::Status::with_metadata(
            tonic::Code::ResourceExhausted,
            "three is all",
            md,
        )));
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn server_status(
        &self,
        _req: tonic::Request<ob::ServerStatusRequest>,
    ) -> Result<tonic::Response<ob::ServerStatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(ob::ServerStatusResponse {
            num_flows: 4242,
            ..Default::default()
        }))
    }
}

/// Runs `f`'s future on a current-thread runtime on a thread inside `ns`,
/// so every socket it opens is the pod's.
fn in_pod<T: Send>(ns: &NetNs, f: impl std::future::Future<Output = T> + Send) -> T {
    ns.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .unwrap()
}

/// Serves the listener (bound in the pod) with tonic (gRPC) or hyper's
/// HTTP/2 server (h2c), on a thread of its own for as long as the test
/// runs; the threads end with the test process.
fn servers(ns: &NetNs, ip: Ipv4Addr) {
    let bind = |port| {
        let a = SocketAddr::new(IpAddr::V4(ip), port);
        let l = ns.run(move || TcpListener::bind(a)).unwrap().unwrap();
        l.set_nonblocking(true).unwrap();
        l
    };
    let grpc = bind(GRPC_PORT);
    let h2c = bind(H2C_PORT);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(grpc).unwrap();
            tonic::transport::Server::builder()
                .add_service(ob::observer_server::ObserverServer::new(Canned))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await
                .unwrap();
        });
    });
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(h2c).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("served {} over {:?}", req.uri().path(), req.version());
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
}

async fn channel(to: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {to}: {e}"))
}

/// h2c with prior knowledge: GETs on one HTTP/2 connection, (status,
/// version, body) each.
async fn h2c_gets(to: SocketAddr, paths: &[&str]) -> Vec<(u16, http::Version, String)> {
    use http_body_util::BodyExt;
    let s = tokio::net::TcpStream::connect(to)
        .await
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap_or_else(|e| panic!("h2c handshake with {to}: {e}"));
    tokio::spawn(conn);
    let mut out = Vec::new();
    for p in paths {
        let req = http::Request::get(format!("http://{to}{p}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = send
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("h2c GET {p}: {e}"));
        let (code, version) = (r.status().as_u16(), r.version());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        out.push((code, version, String::from_utf8_lossy(&body).into_owned()));
    }
    out
}

fn l7_flows(socket: &std::path::Path) -> Vec<ob::Flow> {
    get_flows(
        socket,
        ob::GetFlowsRequest {
            filters: vec![ob::FlowFilter {
                event_type: ob::EventType::L7 as i32,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .unwrap()
}

fn grpc_and_h2c_matrix(routing: Routing, prefix: &str) {
    let g = lab(prefix, 2, 2, routing);
    let lab: &Lab = &g.lab;
    let web = pod_ip(lab, "node2-pod1");
    servers(&pod_ns(lab, "node2-pod1"), web);
    let s2 = lab.node("node2").unwrap().socket.clone();
    let applied = apply_policy(&s2, POLICY).unwrap_or_else(|e| panic!("apply: {e}"));
    wait_policies_everywhere(lab, &applied);
    let grpc = SocketAddr::new(IpAddr::V4(web), GRPC_PORT);
    let h2c = SocketAddr::new(IpAddr::V4(web), H2C_PORT);

    for client in ["node2-pod2", "node1-pod1"] {
        let ns = pod_ns(lab, client);
        let (unary, streamed, end, denied) = in_pod(&ns, async move {
            let ch = channel(grpc).await;
            let mut obs = ob::observer_client::ObserverClient::new(ch.clone());
            let unary = obs
                .server_status(ob::ServerStatusRequest {})
                .await
                .map(|r| r.into_inner().num_flows);
            let mut stream = obs
                .get_flows(ob::GetFlowsRequest::default())
                .await
                .unwrap_or_else(|e| panic!("GetFlows: {e}"))
                .into_inner();
            let mut streamed = Vec::new();
            let end = loop {
                match stream.message().await {
                    Ok(Some(m)) => streamed.push(m.node_name),
                    Ok(None) => break None,
                    Err(s) => break Some(s),
                }
            };
            // A real method of a service no rule names, on the same
            // HTTP/2 connection.
            let denied = agent::agent_client::AgentClient::new(ch)
                .status(agent::StatusRequest::default())
                .await;
            (unary, streamed, end, denied)
        });
        assert_eq!(
            unary.unwrap_or_else(|e| panic!("{client} ServerStatus: {e}")),
            4242,
            "{client}"
        );
        assert_eq!(streamed, ["canned-0", "canned-1", "canned-2"], "{client}");
        let end = end.unwrap_or_else(|| panic!("{client}: the stream ended without its status trailer"));
        assert_eq!(
            (end.code(), end.message()),
            (tonic::Code::ResourceExhausted, "three is all"),
            "{client}: {end:?}"
        );
        assert_eq!(
            end.metadata().get("x-sinew-end").map(|v| v.to_str().unwrap()),
            Some("kept"),
            "{client}: custom trailer lost: {end:?}"
        );
        // PERMISSION_DENIED from the proxy, not UNIMPLEMENTED from the
        // server (which has no Agent service): the call never reached it.
        let denied = denied.expect_err("Agent/Status must be denied");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{client}: {denied:?}");

        // h2c prior knowledge, allow and deny on one connection.
        let got = in_pod(&ns, h2c_gets(h2c, &["/public/a", "/admin", "/public/../admin"]));
        assert_eq!(
            got[0],
            (200, http::Version::HTTP_2, "served /public/a over HTTP/2.0".into()),
            "{client}"
        );
        assert_eq!((got[1].0, got[1].1), (403, http::Version::HTTP_2), "{client}: {got:?}");
        assert!(!got[1].2.contains("served"), "{client}: {got:?}");
        assert_eq!(
            got[2].0, 403,
            "{client}: the path judged is the path forwarded: {got:?}"
        );
    }

    // Every call is an L7 flow on node2 (events are batched, at most
    // 50 ms late): per client 3 gRPC calls and 3 h2c requests.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = l7_flows(&s2);
    while flows.len() < 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        flows = l7_flows(&s2);
    }
    let find = |client: &str, path: &str| {
        flows
            .iter()
            .find(|f| {
                f.source.as_ref().is_some_and(|s| s.pod_name == client) && f.l7.as_ref().is_some_and(|l| l.path == path)
            })
            .unwrap_or_else(|| panic!("no L7 flow {client} {path} in {flows:#?}"))
            .clone()
    };
    for client in ["node2-pod2", "node1-pod1"] {
        for m in ["ServerStatus", "GetFlows"] {
            let f = find(client, &format!("/sinew.observer.v1.Observer/{m}"));
            assert_eq!(f.verdict(), ob::Verdict::Forwarded, "{f:?}");
            assert_eq!(f.direction(), ob::TrafficDirection::Ingress);
            assert_eq!(f.destination.as_ref().unwrap().port, u32::from(GRPC_PORT));
            let l = f.l7.as_ref().unwrap();
            assert_eq!((l.protocol.as_str(), l.status), ("gRPC", 200), "{l:?}");
            assert!(
                l.rule.starts_with("SinewNetworkPolicy default/grpc-l7 ingress[0]"),
                "{l:?}"
            );
        }
        let f = find(client, "/sinew.agent.v1.Agent/Status");
        assert_eq!(f.verdict(), ob::Verdict::Dropped, "{f:?}");
        let l = f.l7.as_ref().unwrap();
        assert_eq!(
            (l.protocol.as_str(), l.grpc_status, l.verdict()),
            ("gRPC", 7, ob::L7Verdict::Denied),
            "{l:?}"
        );
        assert!(l.rule.is_empty(), "{l:?}");

        let f = find(client, "/public/a");
        let l = f.l7.as_ref().unwrap();
        assert_eq!(
            (l.protocol.as_str(), l.status, l.verdict()),
            ("HTTP/2", 200, ob::L7Verdict::Forwarded),
            "{l:?}"
        );
        let f = find(client, "/admin");
        let l = f.l7.as_ref().unwrap();
        assert_eq!(
            (l.protocol.as_str(), l.status, l.verdict()),
            ("HTTP/2", 403, ob::L7Verdict::Denied),
            "{l:?}"
        );
    }

    // The CLI shows them.
    let out = std::process::Command::new(sinew_cli())
        .args([
            "--socket",
            s2.to_str().unwrap(),
            "observe",
            "--type",
            "l7",
            "--last",
            "50",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("/sinew.observer.v1.Observer/GetFlows") && text.contains("/sinew.agent.v1.Agent/Status"),
        "{text}"
    );
}

#[test]
fn grpc_and_h2c_allow_and_deny_same_node_and_across_nodes_vxlan() {
    grpc_and_h2c_matrix(Routing::Vxlan, "e2e-l7gx");
}

#[test]
fn grpc_and_h2c_allow_and_deny_same_node_and_across_nodes_native() {
    grpc_and_h2c_matrix(Routing::Native, "e2e-l7gn");
}
