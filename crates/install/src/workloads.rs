//! The agent DaemonSet (with its CNI configuration) and the operator
//! Deployment with its PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::rbac::{AGENT, OPERATOR};
use crate::{value, Encryption, Settings};

/// Where the agent's gRPC socket lives, on the host (the CNI plugin, run
/// by the runtime on the host, dials it).
pub const RUN_DIR: &str = "/run/sinew";
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CONFLIST_NAME: &str = "05-sinew.conflist";
pub const OPERATOR_METRICS_PORT: i32 = 9963;

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), app.to_string()),
        ("app.kubernetes.io/part-of".to_string(), "sinew".to_string()),
    ])
}

fn meta(name: &str, s: &Settings) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(s.namespace.clone()),
        labels: Some(labels(name)),
        ..Default::default()
    }
}

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(kind.into()),
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn caps(add: &[&str]) -> Option<Capabilities> {
    Some(Capabilities {
        add: Some(add.iter().map(|c| c.to_string()).collect()),
        drop: Some(vec!["ALL".into()]),
    })
}

fn resources(cpu: &str, mem: &str) -> Option<ResourceRequirements> {
    Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
        ])),
        ..Default::default()
    })
}

/// The CNI network configuration list (the same one the lab and README
/// use): cniVersion 1.0.0 for older runtimes, 1.1.0 for those that select.
pub fn conflist() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "sinew",
        "plugins": [{"type": "sinew-cni", "agentSocket": format!("{RUN_DIR}/agent.sock")}],
    })
}

/// The agent's command line for these settings.
pub fn agent_args(s: &Settings) -> Vec<String> {
    let mut args = vec![
        "--node-name=$(SINEW_NODE_NAME)".to_string(),
        // The API through the pod's ServiceAccount (deploy/rbac.yaml).
        "--datastore-kind=kubernetes".into(),
        format!("--routing={}", s.routing),
        format!("--uplink={}", s.uplink),
        "--bpf-root=/sys/fs/bpf/sinew".into(),
        "--cgroup-root=/host/sys/fs/cgroup".into(),
        format!("--socket={RUN_DIR}/agent.sock"),
        "--state-dir=/var/lib/sinew".into(),
    ];
    if s.encryption != Encryption::None {
        args.push(format!("--encryption={}", s.encryption));
    }
    if s.encryption == Encryption::Ipsec {
        args.push(format!(
            "--ipsec-keys-secret={}/{}",
            s.namespace,
            crate::rbac::IPSEC_KEYS_SECRET
        ));
    }
    args
}

pub(crate) fn agent(s: &Settings) -> Vec<serde_json::Value> {
    let cm = ConfigMap {
        metadata: meta("sinew-cni-config", s),
        data: Some(BTreeMap::from([(
            CONFLIST_NAME.to_string(),
            serde_json::to_string_pretty(&conflist()).unwrap_or_default(),
        )])),
        ..Default::default()
    };
    // Installs the plugin binary and the conflist on the host atomically
    // (a runtime may read the directory at any moment).
    let install_cni = Container {
        name: "install-cni".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["/bin/sh".into(), "-ec".into()]),
        args: Some(vec![format!(
            "cp /usr/local/bin/sinew-cni /host{CNI_BIN_DIR}/.sinew-cni.new && mv /host{CNI_BIN_DIR}/.sinew-cni.new /host{CNI_BIN_DIR}/sinew-cni && \
             cp /etc/sinew/cni/{CONFLIST_NAME} /host{CNI_CONF_DIR}/.{CONFLIST_NAME}.new && mv /host{CNI_CONF_DIR}/.{CONFLIST_NAME}.new /host{CNI_CONF_DIR}/{CONFLIST_NAME}"
        )]),
        volume_mounts: Some(vec![
            mount("cni-bin", &format!("/host{CNI_BIN_DIR}")),
            mount("cni-conf", &format!("/host{CNI_CONF_DIR}")),
            mount("cni-config", "/etc/sinew/cni"),
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: caps(&[]),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The one privileged step: mount bpffs where the host has none (the
    // mount must propagate to the host, which only a privileged container
    // may do) and set the host's sysctls the agent needs (/proc/sys is
    // read-only in an unprivileged container; the agent then finds them
    // set and does not write).
    let prepare = Container {
        name: "prepare-node".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["/bin/sh".into(), "-ec".into()]),
        args: Some(vec!["mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; \
             echo 1 > /proc/sys/net/ipv4/ip_forward; \
             echo 61000-65535 > /proc/sys/net/ipv4/ip_local_reserved_ports"
            .into()]),
        volume_mounts: Some(vec![VolumeMount {
            mount_propagation: Some("Bidirectional".into()),
            ..mount("bpffs", "/sys/fs/bpf")
        }]),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let agent = Container {
        name: "agent".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["/usr/local/bin/sinew-agent".into()]),
        args: Some(agent_args(s)),
        env: Some(vec![field_env("SINEW_NODE_NAME", "spec.nodeName")]),
        // NET_ADMIN: links, routes, tc/TCX, cgroup attach; BPF and PERFMON:
        // load programs and maps, read the event ring; SYS_RESOURCE: the
        // memlock limit on kernels before 5.11; NET_RAW: the health probes.
        // No SYS_ADMIN: bpffs is mounted by prepare-node.
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: caps(&["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "SYS_RESOURCE"]),
            seccomp_profile: Some(SeccompProfile {
                type_: "Unconfined".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                mount_propagation: Some("HostToContainer".into()),
                ..mount("bpffs", "/sys/fs/bpf")
            },
            VolumeMount {
                mount_propagation: Some("HostToContainer".into()),
                read_only: Some(true),
                ..mount("cgroup2", "/host/sys/fs/cgroup")
            },
            mount("run", RUN_DIR),
            mount("state", "/var/lib/sinew"),
            VolumeMount {
                read_only: Some(true),
                ..mount("lib-modules", "/lib/modules")
            },
        ]),
        resources: resources("100m", "64Mi"),
        ..Default::default()
    };
    let ds = DaemonSet {
        metadata: meta(AGENT, s),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels(AGENT)),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..Default::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(AGENT)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(AGENT.into()),
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    priority_class_name: Some("system-node-critical".into()),
                    // The network comes before the node is Ready: run everywhere.
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    init_containers: Some(vec![prepare, install_cni]),
                    containers: vec![agent],
                    termination_grace_period_seconds: Some(30),
                    volumes: Some(vec![
                        host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
                        host_path("cgroup2", "/sys/fs/cgroup", "Directory"),
                        host_path("cni-bin", CNI_BIN_DIR, "DirectoryOrCreate"),
                        host_path("cni-conf", CNI_CONF_DIR, "DirectoryOrCreate"),
                        host_path("run", RUN_DIR, "DirectoryOrCreate"),
                        host_path("state", "/var/lib/sinew", "DirectoryOrCreate"),
                        host_path("lib-modules", "/lib/modules", "Directory"),
                        Volume {
                            name: "cni-config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: "sinew-cni-config".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![value(&cm), value(&ds)]
}

fn probe(path: &str) -> Option<Probe> {
    Some(Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(OPERATOR_METRICS_PORT),
            host: Some("127.0.0.1".into()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        ..Default::default()
    })
}

pub(crate) fn operator(s: &Settings) -> Vec<serde_json::Value> {
    let container = Container {
        name: "operator".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["/usr/local/bin/sinew-operator".into()]),
        args: Some(vec![
            "run".into(),
            format!("--pool-v4={}", s.pool_v4),
            format!("--node-prefix-v4={}", s.node_prefix_v4),
            format!("--metrics-addr=127.0.0.1:{OPERATOR_METRICS_PORT}"),
        ]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: OPERATOR_METRICS_PORT,
            ..Default::default()
        }]),
        liveness_probe: probe("/healthz"),
        readiness_probe: probe("/readyz"),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: caps(&[]),
            ..Default::default()
        }),
        resources: resources("50m", "64Mi"),
        ..Default::default()
    };
    let deploy = Deployment {
        metadata: meta(OPERATOR, s),
        spec: Some(DeploymentSpec {
            replicas: Some(s.operator_replicas),
            selector: LabelSelector {
                match_labels: Some(labels(OPERATOR)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(OPERATOR)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(OPERATOR.into()),
                    // Pod CIDRs come from the operator, so it cannot wait
                    // for the pod network.
                    host_network: Some(true),
                    priority_class_name: Some("system-cluster-critical".into()),
                    tolerations: Some(vec![
                        Toleration {
                            key: Some("node.kubernetes.io/not-ready".into()),
                            operator: Some("Exists".into()),
                            effect: Some("NoSchedule".into()),
                            ..Default::default()
                        },
                        Toleration {
                            key: Some("node-role.kubernetes.io/control-plane".into()),
                            operator: Some("Exists".into()),
                            effect: Some("NoSchedule".into()),
                            ..Default::default()
                        },
                    ]),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: meta(OPERATOR, s),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels(OPERATOR)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![value(&deploy), value(&pdb)]
}
