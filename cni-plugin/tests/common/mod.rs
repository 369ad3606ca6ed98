//! Test helpers: network namespaces cleaned up on drop, a fake sinew-agent on
//! a unix socket, and a runner that execs the built plugin like a runtime.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sinew_proto::v1::*;
use sinew_proto::{Agent, AgentServer};
use tonic::{Request, Response, Status};

pub const BIN: &str = env!("CARGO_BIN_EXE_sinew-cni");

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short name for this test process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn require_root() {
    sinew_testvms::support::require_root("sinew-cni's namespace tests");
}

fn run_ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the `ip` command (iproute2) must be installed");
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        require_root();
        let name = unique(prefix);
        let out = run_ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`, stdout as text; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        let out = run_ip(&all);
        assert!(
            out.status.success(),
            "ip {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
    }
}

/// What the plugin printed and how it exited.
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?} stderr: {}", self.stdout, self.stderr))
    }

    /// The CNI error code; panics if the run succeeded.
    pub fn code(&self) -> u64 {
        assert!(!self.status.success(), "expected failure, got success: {}", self.stdout);
        self.json()["code"].as_u64().expect("error has a code")
    }

    pub fn assert_ok(&self) {
        assert!(self.status.success(), "plugin failed: {} {}", self.stdout, self.stderr);
    }
}

/// Execs the plugin with exactly `env` (plus PATH), optionally inside `node`.
pub fn run_plugin(node: Option<&Netns>, env: &[(&str, &str)], stdin: &str) -> Run {
    let cmd = match node {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    let out = sinew_testvms::support::run_cni(cmd, env, stdin);
    Run {
        status: out.status,
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

pub fn conf(version: &str, socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": version,
        "name": "sinew",
        "type": "sinew-cni",
        "agentSocket": socket,
    })
    .to_string()
}

/// The behaviour switches of the fake agent.
#[derive(Default, Clone, Copy)]
pub struct Faults {
    pub fail_create_endpoint: bool,
    pub pool_exhausted: bool,
    pub unhealthy: bool,
}

#[derive(Default)]
pub struct FakeState {
    next: u8,
    pub allocs: HashMap<(String, String), Ipv4Addr>,
    pub endpoints: HashMap<(String, String), Endpoint>,
    /// Every ReleaseIp and DeleteEndpoint that released an address, in order.
    pub released: Vec<(String, String)>,
    pub calls: Vec<&'static str>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    faults: Faults,
}

fn key(a: &Option<Attachment>) -> Result<(String, String), Status> {
    let a = a
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("attachment missing"))?;
    Ok((a.container_id.clone(), a.ifname.clone()))
}

#[tonic::async_trait]
impl Agent for Fake {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.state.lock().unwrap().calls.push("Status");
        Ok(Response::new(StatusResponse {
            healthy: !self.faults.unhealthy,
            reason: if self.faults.unhealthy {
                "bpf programs not loaded".into()
            } else {
                String::new()
            },
            node_name: "test-node".into(),
            ..Default::default()
        }))
    }

    async fn allocate_ip(&self, r: Request<AllocateIpRequest>) -> Result<Response<AllocateIpResponse>, Status> {
        let k = key(&r.get_ref().attachment)?;
        let mut s = self.state.lock().unwrap();
        s.calls.push("AllocateIp");
        if self.faults.pool_exhausted {
            return Err(Status::resource_exhausted("no free address in 10.250.0.0/24"));
        }
        let existing = s.allocs.contains_key(&k);
        let ip = match s.allocs.get(&k) {
            Some(ip) => *ip,
            None => {
                s.next += 1;
                let ip = Ipv4Addr::new(10, 250, 0, 1 + s.next);
                s.allocs.insert(k, ip);
                ip
            }
        };
        Ok(Response::new(AllocateIpResponse {
            address: Some(sinew_proto::v1::IpPrefix::new(ip.into(), 32)),
            gateway: Some(Ipv4Addr::new(10, 250, 0, 1).into()),
            mtu: 1450,
            existing,
        }))
    }

    async fn release_ip(&self, r: Request<ReleaseIpRequest>) -> Result<Response<ReleaseIpResponse>, Status> {
        let k = key(&r.get_ref().attachment)?;
        let mut s = self.state.lock().unwrap();
        s.calls.push("ReleaseIp");
        let released = s.allocs.remove(&k).is_some();
        if released {
            s.released.push(k);
        }
        Ok(Response::new(ReleaseIpResponse { released }))
    }

    async fn create_endpoint(
        &self,
        r: Request<CreateEndpointRequest>,
    ) -> Result<Response<CreateEndpointResponse>, Status> {
        let r = r.into_inner();
        let k = key(&r.attachment)?;
        let mut s = self.state.lock().unwrap();
        s.calls.push("CreateEndpoint");
        if self.faults.fail_create_endpoint {
            return Err(Status::internal("cannot attach bpf program"));
        }
        let ep = Endpoint {
            id: s.endpoints.len() as u32 + 1,
            attachment: r.attachment.clone(),
            pod_namespace: r.pod_namespace,
            pod_name: r.pod_name,
            netns: r.netns,
            host_ifname: r.host_ifname,
            host_ifindex: r.host_ifindex,
            ip: r.ip,
            pod_mac: r.pod_mac,
            state: "ready".into(),
            ..Default::default()
        };
        s.endpoints.insert(k, ep.clone());
        Ok(Response::new(CreateEndpointResponse { endpoint: Some(ep) }))
    }

    async fn delete_endpoint(
        &self,
        r: Request<DeleteEndpointRequest>,
    ) -> Result<Response<DeleteEndpointResponse>, Status> {
        let k = key(&r.get_ref().attachment)?;
        let mut s = self.state.lock().unwrap();
        s.calls.push("DeleteEndpoint");
        let ep = s.endpoints.remove(&k);
        if s.allocs.remove(&k).is_some() {
            s.released.push(k);
        }
        Ok(Response::new(DeleteEndpointResponse {
            existed: ep.is_some(),
            host_ifname: ep.map(|e| e.host_ifname).unwrap_or_default(),
            // This fake leaves the veth to the plugin, as an older agent would.
            link_removal_queued: false,
        }))
    }

    async fn get_endpoint(&self, r: Request<GetEndpointRequest>) -> Result<Response<Endpoint>, Status> {
        let k = key(&r.get_ref().attachment)?;
        let mut s = self.state.lock().unwrap();
        s.calls.push("GetEndpoint");
        s.endpoints
            .get(&k)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such endpoint"))
    }

    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let s = self.state.lock().unwrap();
        Ok(Response::new(ListEndpointsResponse {
            endpoints: s.endpoints.values().cloned().collect(),
        }))
    }

    async fn garbage_collect(
        &self,
        r: Request<GarbageCollectRequest>,
    ) -> Result<Response<GarbageCollectResponse>, Status> {
        let valid: Vec<(String, String)> = r
            .into_inner()
            .valid
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let mut s = self.state.lock().unwrap();
        s.calls.push("GarbageCollect");
        let stale: Vec<_> = s.allocs.keys().filter(|k| !valid.contains(k)).cloned().collect();
        let mut reply = GarbageCollectResponse::default();
        for k in stale {
            s.allocs.remove(&k);
            if let Some(ep) = s.endpoints.remove(&k) {
                reply.host_ifnames.push(ep.host_ifname);
            }
            reply.released.push(Attachment {
                container_id: k.0.clone(),
                ifname: k.1.clone(),
            });
            s.released.push(k);
        }
        Ok(Response::new(reply))
    }

    // The CNI plugin never calls the policy API; the fake refuses it.
    async fn apply_policy(
        &self,
        _: Request<sinew_proto::v1::ApplyPolicyRequest>,
    ) -> Result<Response<sinew_proto::v1::ApplyPolicyResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn list_policies(
        &self,
        _: Request<sinew_proto::v1::ListPoliciesRequest>,
    ) -> Result<Response<sinew_proto::v1::ListPoliciesResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn delete_policy(
        &self,
        _: Request<sinew_proto::v1::DeletePolicyRequest>,
    ) -> Result<Response<sinew_proto::v1::DeletePolicyResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn trace_policy(
        &self,
        _: Request<sinew_proto::v1::TracePolicyRequest>,
    ) -> Result<Response<sinew_proto::v1::TracePolicyResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn list_identities(
        &self,
        _: Request<sinew_proto::v1::ListIdentitiesRequest>,
    ) -> Result<Response<sinew_proto::v1::ListIdentitiesResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    async fn list_services(
        &self,
        _: Request<sinew_proto::v1::ListServicesRequest>,
    ) -> Result<Response<sinew_proto::v1::ListServicesResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn encryption_status(
        &self,
        _: Request<sinew_proto::v1::EncryptionStatusRequest>,
    ) -> Result<Response<sinew_proto::v1::EncryptionStatusResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
}

/// A fake sinew-agent serving on a unix socket in a temp dir until dropped.
pub struct FakeAgent {
    pub socket: PathBuf,
    pub state: Arc<Mutex<FakeState>>,
    _dir: tempfile::TempDir,
    rt: Option<tokio::runtime::Runtime>,
}

impl FakeAgent {
    pub fn start(faults: Faults) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let state = Arc::new(Mutex::new(FakeState::default()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket) }).unwrap();
        let fake = Fake {
            state: state.clone(),
            faults,
        };
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(AgentServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .unwrap();
        });
        Self {
            socket,
            state,
            _dir: dir,
            rt: Some(rt),
        }
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn released(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().released.clone()
    }

    pub fn allocated(&self) -> usize {
        self.state.lock().unwrap().allocs.len()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The env of one attachment.
pub fn attach_env<'a>(command: &'a str, container: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}
