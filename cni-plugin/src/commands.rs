//! ADD, DEL, CHECK, GC and STATUS: the order of agent calls and netlink
//! steps, and the clean-up when one of them fails.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sinew_netlink::{NetlinkError, Route, Rtnl};
use sinew_proto::v1::{
    AllocateIpRequest, AllocateIpResponse, Attachment, CreateEndpointRequest, DeleteEndpointRequest,
    GarbageCollectRequest, GetEndpointRequest, ReleaseIpRequest, StatusRequest,
};
use sinew_proto::{addr, AgentClient};
use tonic::transport::Channel;

use crate::config::{ConfigError, NetConf};
use crate::env::{validate_ifname, CniEnv, Command, EnvError};
use crate::error::CniError;
use crate::lock::{self, ContainerLock};
use crate::result::{expected_from_prev, version_info, AddResult, Expected};
use crate::veth::host_veth_name;

/// How long one agent call may take. The runtime's own ADD timeout is
/// minutes; a healthy agent answers in about a millisecond.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

type Agent = AgentClient<Channel>;

/// Runs one command; `Some` is printed on stdout.
pub async fn run(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniError> {
    match env.command {
        Command::Version => Ok(Some(version_info())),
        Command::Add => add(env, conf).await.map(Some),
        Command::Del => del(env, conf).await.map(|()| None),
        Command::Check => check(env, conf).await.map(|()| None),
        Command::Gc => gc(conf).await.map(|()| None),
        Command::Status => status(conf).await.map(|()| None),
    }
}

async fn connect(conf: &NetConf) -> Result<Agent, CniError> {
    sinew_proto::connect(&conf.agent_socket, AGENT_TIMEOUT)
        .await
        .map_err(|e| CniError::agent_unreachable(&conf.agent_socket, &error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn attachment(env: &CniEnv) -> Attachment {
    Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CniError::ContainerUnknown(format!(
                "the network namespace CNI_NETNS={path} does not exist: the container's sandbox is gone, nothing to set up"
            ))
        } else {
            CniError::Io { msg: format!("cannot open the network namespace CNI_NETNS={path}"), source }
        }
    })
}

/// Opens CNI_NETNS and a netlink socket inside it. Entering it is also the
/// test that it is a network namespace: setns(CLONE_NEWNET) refuses a
/// regular file, a directory or another kind of namespace with EINVAL.
fn enter_netns(path: &str) -> Result<(File, Rtnl), CniError> {
    let netns = open_netns(path)?;
    match Rtnl::open_in(&netns, path) {
        Ok(nl) => Ok((netns, nl)),
        Err(NetlinkError::EnterNetns {
            source: nix::errno::Errno::EINVAL,
            ..
        }) => {
            let reason = match netns.metadata() {
                Ok(m) if m.is_file() => "it is a regular file",
                Ok(m) if m.is_dir() => "it is a directory",
                _ => "the kernel refused to enter it as one",
            };
            Err(EnvError::NotANetns {
                path: path.to_string(),
                reason: reason.to_string(),
            }
            .into())
        }
        Err(e) => Err(datapath("cannot enter the pod's network namespace", e)),
    }
}

/// Serialises ADD, DEL and CHECK of one container (see `lock.rs`).
fn lock_container(env: &CniEnv) -> Result<ContainerLock, CniError> {
    Ok(ContainerLock::acquire(
        Path::new(lock::DEFAULT_DIR),
        &env.container_id,
        lock::WAIT,
    )?)
}

/// An address from the agent that does not decode.
fn agent_sent(e: addr::AddrError) -> CniError {
    CniError::Decode(format!("sinew-agent sent {e}; upgrade or restart the agent"))
}

/// A netlink failure as a CNI error. The netlink error already says what
/// the errno means for the user; this adds what it means for a CNI step.
fn datapath(what: &str, e: NetlinkError) -> CniError {
    let hint = match e.errno() {
        Some(nix::errno::Errno::EEXIST) => " (check that the runtime did not ADD twice)",
        Some(nix::errno::Errno::EPERM) => " (the runtime must run sinew-cni as root)",
        _ => {
            "; if that does not explain it, check the kernel log (`dmesg`) and that nothing else manages this interface"
        }
    };
    CniError::Datapath {
        msg: format!("{what}: {e}{hint}"),
        details: format!("{e:?}"),
    }
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    env.require_attachment()?;
    env.require_netns()?;
    let _lock = lock_container(env)?;
    // Before allocating, so that a vanished sandbox never holds an address.
    let (netns, mut pod) = enter_netns(&env.netns)?;
    // CNI 1.1: "If an interface of the requested name already exists in the
    // container, the CNI plugin MUST return with an error." Before anything
    // is taken, so that nothing is undone either: this ADD made nothing.
    let existing = pod
        .link_by_name(&env.ifname)
        .map_err(|e| datapath("cannot read the pod's interfaces", e))?;
    if existing.is_some() {
        return Err(CniError::Datapath {
            msg: format!(
                "an interface {} already exists in the container (CNI_NETNS={}): an ADD of this attachment already ran, or something else made it; DEL the attachment (or remove the interface) before adding it again",
                env.ifname, env.netns
            ),
            details: String::new(),
        });
    }
    let mut agent = connect(conf).await?;
    let att = attachment(env);
    let alloc = agent
        .allocate_ip(AllocateIpRequest {
            attachment: Some(att.clone()),
            pod_namespace: env.args.pod_namespace.clone(),
            pod_name: env.args.pod_name.clone(),
        })
        .await
        .map_err(|s| CniError::from_status("AllocateIp", &s))?
        .into_inner();

    let host_ifname = host_veth_name(&env.container_id, &env.ifname);
    match plumb_and_register(&mut agent, env, conf, &netns, &mut pod, &host_ifname, &alloc).await {
        Ok(result) => Ok(result.render(conf.cni_version)),
        Err(err) => Err(undo_add(&mut agent, att, &host_ifname, err).await),
    }
}

/// Leaves nothing behind after a failed ADD: no veth, no address held.
/// Clean-up failures are added to the error's details, never hide it.
async fn undo_add(agent: &mut Agent, att: Attachment, host_ifname: &str, err: CniError) -> CniError {
    let mut notes = Vec::new();
    if let Err(e) = Rtnl::open().and_then(|mut nl| nl.delete_link(host_ifname)) {
        notes.push(format!("could not remove veth {host_ifname}: {e}"));
    }
    if let Err(s) = agent.release_ip(ReleaseIpRequest { attachment: Some(att) }).await {
        notes.push(format!("could not release the address: {}", s.message()));
    }
    if notes.is_empty() {
        return err;
    }
    let note = notes.join("; ");
    match err {
        CniError::Datapath { msg, details } => CniError::Datapath {
            msg,
            details: format!("{details}; {note}"),
        },
        CniError::AgentRejected { msg, details } => CniError::AgentRejected {
            msg,
            details: format!("{details}; {note}"),
        },
        CniError::TryAgainLater { msg, details } => CniError::TryAgainLater {
            msg,
            details: format!("{details}; {note}"),
        },
        other => other,
    }
}

async fn plumb_and_register(
    agent: &mut Agent,
    env: &CniEnv,
    conf: &NetConf,
    netns: &File,
    pod: &mut Rtnl,
    host_ifname: &str,
    alloc: &AllocateIpResponse,
) -> Result<AddResult, CniError> {
    let (ip, prefix_len) = addr::prefix("address", alloc.address.as_ref()).map_err(agent_sent)?;
    let gateway = addr::ip("gateway", alloc.gateway.as_ref()).map_err(agent_sent)?;
    let mtu = conf.mtu.or(Some(alloc.mtu).filter(|&m| m > 0));

    let plumbed = plumb(host_ifname, &env.ifname, netns, pod, ip, prefix_len, gateway, mtu)
        .map_err(|e| datapath("cannot set up the pod's network interface", e))?;

    agent
        .create_endpoint(CreateEndpointRequest {
            attachment: Some(attachment(env)),
            pod_namespace: env.args.pod_namespace.clone(),
            pod_name: env.args.pod_name.clone(),
            netns: env.netns.clone(),
            host_ifname: host_ifname.to_string(),
            host_ifindex: plumbed.host_index,
            ip: Some(ip.into()),
            pod_mac: Some(sinew_proto::v1::MacAddr {
                octets: plumbed.pod_mac.clone(),
            }),
        })
        .await
        .map_err(|s| CniError::from_status("CreateEndpoint", &s))?;

    Ok(AddResult {
        host_ifname: host_ifname.to_string(),
        host_mac: addr::format_mac(&plumbed.host_mac),
        pod_ifname: env.ifname.clone(),
        pod_mac: addr::format_mac(&plumbed.pod_mac),
        sandbox: env.netns.clone(),
        mtu,
        ip,
        prefix_len,
        gateway,
        dns: conf.dns.clone(),
    })
}

struct Plumbed {
    host_index: u32,
    host_mac: Vec<u8>,
    pod_mac: Vec<u8>,
}

/// The kernel side of ADD: veth pair, addresses and routes.
#[allow(clippy::too_many_arguments)]
fn plumb(
    host_ifname: &str,
    pod_ifname: &str,
    netns: &File,
    pod: &mut Rtnl,
    ip: IpAddr,
    prefix_len: u8,
    gateway: IpAddr,
    mtu: Option<u32>,
) -> Result<Plumbed, NetlinkError> {
    let mut node = Rtnl::open()?;

    // A leftover from an earlier ADD of the same attachment that died half-way.
    node.delete_link(host_ifname)?;
    node.create_veth(host_ifname, pod_ifname, netns, mtu)?;

    let missing = |name: &str| NetlinkError::Protocol {
        op: format!("get link {name}"),
        reason: "link vanished after creation",
    };
    let pod_link = pod.link_by_name(pod_ifname)?.ok_or_else(|| missing(pod_ifname))?;
    if let Some(lo) = pod.link_by_name("lo")? {
        pod.set_up(lo.index, None)?;
    }
    pod.set_up(pod_link.index, None)?;
    pod.add_address(pod_link.index, ip, prefix_len)?;
    pod.add_route(&Route {
        dst: gateway,
        dst_len: host_len(gateway),
        gateway: None,
        oif: pod_link.index,
        src: None,
        link_scope: true,
        onlink: false,
    })?;
    pod.add_route(&Route {
        dst: unspecified(gateway),
        dst_len: 0,
        gateway: Some(gateway),
        oif: pod_link.index,
        src: None,
        link_scope: false,
        onlink: true,
    })?;

    let host_link = node.link_by_name(host_ifname)?.ok_or_else(|| missing(host_ifname))?;
    node.set_up(host_link.index, None)?;
    node.add_route(&Route {
        dst: ip,
        dst_len: host_len(ip),
        gateway: None,
        oif: host_link.index,
        src: None,
        link_scope: true,
        onlink: false,
    })?;
    Ok(Plumbed {
        host_index: host_link.index,
        host_mac: host_link.mac,
        pod_mac: pod_link.mac,
    })
}

/// The prefix length of one address: /32 or /128.
fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn unspecified(like: IpAddr) -> IpAddr {
    if like.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u8; 16])
    }
}

/// Deletes host-side veths (the pod side goes with them). Absent ones are fine.
fn delete_host_links(names: &[&str]) -> Result<(), CniError> {
    let mut nl = Rtnl::open().map_err(|e| datapath("cannot open netlink", e))?;
    for name in names {
        if name.is_empty() || validate_ifname("host_ifname", name).is_err() {
            continue;
        }
        nl.delete_link(name)
            .map_err(|e| datapath(&format!("cannot remove the pod's veth {name}"), e))?;
    }
    Ok(())
}

/// DEL never fails because something is already gone. When the agent is
/// down it still removes the veth, then answers 11 so that the runtime
/// retries and the agent releases the address once it is back.
async fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    env.require_attachment()?;
    let lock = lock_container(env)?;
    del_locked(env, conf).await?;
    lock.remove();
    Ok(())
}

async fn del_locked(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let host_ifname = host_veth_name(&env.container_id, &env.ifname);
    let mut agent = match connect(conf).await {
        Ok(a) => a,
        Err(e) => {
            delete_host_links(&[&host_ifname])?;
            return Err(e);
        }
    };
    let reply = agent
        .delete_endpoint(DeleteEndpointRequest {
            attachment: Some(attachment(env)),
        })
        .await;
    let (known, queued) = match &reply {
        Ok(r) => (r.get_ref().host_ifname.clone(), r.get_ref().link_removal_queued),
        Err(_) => (String::new(), false),
    };
    if queued && known == host_ifname {
        // The agent deletes it after detaching the datapath.
    } else {
        delete_host_links(&[&host_ifname, &known])?;
    }
    match reply {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(CniError::from_status("DeleteEndpoint", &s)),
    }
}

/// CHECK verifies everything ADD set up, host side and pod side: the agent's
/// endpoint, the host veth (present, up, the one the agent attached to) and
/// its route to the pod, the pod interface (present, up) with its address,
/// its route to the gateway and its default route via the gateway. CNI 1.1
/// asks for an error when a resource the plugin created is "missing or in an
/// invalid state", and when the container is "generally unreachable".
async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if !conf.cni_version.has_check() {
        return Err(CniError::IncompatibleVersion(format!(
            "CHECK needs cniVersion 0.4.0 or later, the config says {}",
            conf.cni_version
        )));
    }
    env.require_attachment()?;
    env.require_netns()?;
    let _lock = lock_container(env)?;
    let (_netns, mut pod) = match enter_netns(&env.netns) {
        Ok(ns) => ns,
        Err(CniError::ContainerUnknown(_)) | Err(CniError::Io { .. }) => {
            return Err(CniError::CheckMismatch(format!(
                "the pod's network namespace {} cannot be opened: recreate the pod",
                env.netns
            )))
        }
        Err(e) => return Err(e),
    };
    let mut agent = connect(conf).await?;
    let ep = match agent
        .get_endpoint(GetEndpointRequest {
            attachment: Some(attachment(env)),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            return Err(CniError::CheckMismatch(format!(
                "sinew-agent has no endpoint for container {} interface {}: delete the pod so that it is recreated",
                env.container_id, env.ifname
            )))
        }
        Err(s) => return Err(CniError::from_status("GetEndpoint", &s)),
    };
    let ip = addr::ip("ip", ep.ip.as_ref()).map_err(agent_sent)?;
    let host_ifname = if ep.host_ifname.is_empty() {
        host_veth_name(&env.container_id, &env.ifname)
    } else {
        ep.host_ifname.clone()
    };
    let mismatch = |what: String| {
        Err(CniError::CheckMismatch(format!(
            "{what}: delete the pod so that it is recreated"
        )))
    };

    // Host side.
    let mut node = Rtnl::open().map_err(|e| datapath("cannot open netlink", e))?;
    let host = node
        .link_by_name(&host_ifname)
        .map_err(|e| datapath("cannot read the host veth", e))?;
    let Some(host) = host else {
        return mismatch(format!("the host veth {host_ifname} is missing"));
    };
    if !host.up {
        return mismatch(format!("the host veth {host_ifname} is down"));
    }
    if ep.host_ifindex != 0 && ep.host_ifindex != host.index {
        return mismatch(format!(
            "the host veth {host_ifname} has index {} but the agent attached to index {}",
            host.index, ep.host_ifindex
        ));
    }
    let node_routes = node
        .routes(ip)
        .map_err(|e| datapath("cannot read the node's routes", e))?;
    if !node_routes.iter().any(|r| r.is(ip, host_len(ip), None, host.index)) {
        return mismatch(format!(
            "the node has no route {ip}/{} dev {host_ifname}, so nothing reaches the pod",
            host_len(ip)
        ));
    }

    // Pod side.
    let Some(link) = pod
        .link_by_name(&env.ifname)
        .map_err(|e| datapath("cannot read the pod interface", e))?
    else {
        return mismatch(format!("the pod interface {} is missing in {}", env.ifname, env.netns));
    };
    if !link.up {
        return mismatch(format!("the pod interface {} is down", env.ifname));
    }
    let addrs = pod
        .addresses(link.index)
        .map_err(|e| datapath("cannot read the pod's addresses", e))?;
    if !addrs.iter().any(|(a, _)| *a == ip) {
        return mismatch(format!(
            "the pod interface {} does not have the address {ip}",
            env.ifname
        ));
    }
    // The gateway and routes ADD reported, from prevResult (CNI 1.1: "The
    // plugin must consult the prevResult to determine the expected
    // interfaces and addresses"); without one, the agent's gateway.
    let expected = match &conf.prev_result {
        Some(prev) => expected_from_prev(prev, ip)
            .map_err(|e| CniError::CheckMismatch(format!("{e}: delete the pod so that it is recreated")))?,
        None => Expected {
            gateway: None,
            default_route: true,
        },
    };
    let gateway = match expected.gateway {
        Some(g) => g,
        None => pod_gateway(&mut agent, env, ip).await?,
    };
    let pod_routes = pod
        .routes(ip)
        .map_err(|e| datapath("cannot read the pod's routes", e))?;
    if !pod_routes
        .iter()
        .any(|r| r.is(gateway, host_len(gateway), None, link.index))
    {
        return mismatch(format!(
            "the pod has no route to its gateway {gateway} on {}",
            env.ifname
        ));
    }
    if expected.default_route
        && !pod_routes
            .iter()
            .any(|r| r.is(unspecified(ip), 0, Some(gateway), link.index))
    {
        return mismatch(format!("the pod has no default route via {gateway} dev {}", env.ifname));
    }
    Ok(())
}

/// The gateway ADD gave the pod, for a CHECK without prevResult. Only called
/// once the agent has an endpoint for the attachment, which always holds an
/// address: AllocateIp then returns that address and its gateway and takes
/// nothing new.
async fn pod_gateway(agent: &mut Agent, env: &CniEnv, ip: IpAddr) -> Result<IpAddr, CniError> {
    let alloc = agent
        .allocate_ip(AllocateIpRequest {
            attachment: Some(attachment(env)),
            pod_namespace: env.args.pod_namespace.clone(),
            pod_name: env.args.pod_name.clone(),
        })
        .await
        .map_err(|s| CniError::from_status("AllocateIp", &s))?
        .into_inner();
    let (held, _) = addr::prefix("address", alloc.address.as_ref()).map_err(agent_sent)?;
    if held != ip {
        return Err(CniError::CheckMismatch(format!(
            "sinew-agent holds {held} for container {} interface {} but its endpoint has {ip}: delete the pod so that it is recreated",
            env.container_id, env.ifname
        )));
    }
    addr::ip("gateway", alloc.gateway.as_ref()).map_err(agent_sent)
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    if !conf.cni_version.has_gc_and_status() {
        return Err(CniError::IncompatibleVersion(format!(
            "GC needs cniVersion 1.1.0, the config says {}",
            conf.cni_version
        )));
    }
    // CNI 1.1 GC: the runtime "specif[ies] the expected set of attachments".
    // No list is no set, not an empty one (cnitool's `gc` sends none).
    let Some(valid) = &conf.valid_attachments else {
        return Err(ConfigError::GcWithoutList.into());
    };
    let mut agent = connect(conf).await?;
    let valid = valid
        .iter()
        .map(|a| Attachment {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    let reply = agent
        .garbage_collect(GarbageCollectRequest { valid })
        .await
        .map_err(|s| CniError::from_status("GarbageCollect", &s))?
        .into_inner();
    let mut names: Vec<String> = reply.host_ifnames;
    // Also the veths of released attachments whose name the agent did not send.
    names.extend(
        reply
            .released
            .iter()
            .map(|a| host_veth_name(&a.container_id, &a.ifname)),
    );
    names.sort();
    names.dedup();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    delete_host_links(&refs)
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    if !conf.cni_version.has_gc_and_status() {
        return Err(CniError::IncompatibleVersion(format!(
            "STATUS needs cniVersion 1.1.0, the config says {}",
            conf.cni_version
        )));
    }
    let socket = conf.agent_socket.display();
    let not_running = |details: String| {
        CniError::NotAvailable {
        msg: format!(
            "sinew-agent is not running on this node: check `systemctl status sinew-agent` or the agent log; socket {socket}"
        ),
        details,
    }
    };
    let mut agent = sinew_proto::connect(&conf.agent_socket, AGENT_TIMEOUT)
        .await
        .map_err(|e| not_running(error_chain(&e)))?;
    let st = agent
        .status(StatusRequest {})
        .await
        .map_err(|s| not_running(format!("Status: {:?}: {}", s.code(), s.message())))?
        .into_inner();
    if !st.healthy {
        return Err(CniError::NotAvailable {
            msg: format!(
                "sinew-agent on node {} is not ready: {}: see the agent log (`journalctl -u sinew-agent`)",
                st.node_name,
                if st.reason.is_empty() {
                    "no reason given"
                } else {
                    &st.reason
                }
            ),
            details: String::new(),
        });
    }
    Ok(())
}
