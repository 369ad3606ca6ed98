//! The CNI_* environment variables, parsed from an injected lookup so that
//! tests never touch the process environment.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("{0} is not set: sinew-cni is meant to be run by a container runtime, which sets it")]
    Missing(&'static str),
    #[error("CNI_COMMAND={0:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION")]
    UnknownCommand(String),
    #[error("{name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("CNI_NETNS={path} is not a network namespace ({reason}): the runtime must pass the path of the container's network namespace, e.g. /run/netns/NAME or /proc/PID/ns/net")]
    NotANetns { path: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Kubernetes facts the kubelet passes in CNI_ARGS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: String,
    pub pod_name: String,
}

/// The per-invocation parameters. Which ones are required depends on the
/// command, see [`CniEnv::require_attachment`] and [`CniEnv::require_netns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    pub path: String,
}

impl CniEnv {
    /// Reads the environment through `get`, e.g. `|k| std::env::var(k).ok()`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let raw = get("CNI_COMMAND").unwrap_or_default();
        if raw.is_empty() {
            return Err(EnvError::Missing("CNI_COMMAND"));
        }
        let command = Command::parse(&raw).ok_or(EnvError::UnknownCommand(raw))?;
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
            path: get("CNI_PATH").unwrap_or_default(),
        })
    }

    /// ADD, DEL and CHECK act on one attachment: container id + interface.
    pub fn require_attachment(&self) -> Result<(), EnvError> {
        if self.container_id.is_empty() {
            return Err(EnvError::Missing("CNI_CONTAINERID"));
        }
        validate_container_id(&self.container_id)?;
        if self.ifname.is_empty() {
            return Err(EnvError::Missing("CNI_IFNAME"));
        }
        validate_ifname("CNI_IFNAME", &self.ifname)
    }

    /// ADD and CHECK need the pod's network namespace; DEL may come without.
    pub fn require_netns(&self) -> Result<(), EnvError> {
        if self.netns.is_empty() {
            return Err(EnvError::Missing("CNI_NETNS"));
        }
        Ok(())
    }
}

/// CNI_ARGS is `K=V;K=V`. Unknown keys are ignored (as if IgnoreUnknown=1 were
/// always set) because the kubelet and other runtimes add their own.
pub fn parse_cni_args(s: &str) -> Result<CniArgs, EnvError> {
    let mut args = CniArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(EnvError::Invalid {
                name: "CNI_ARGS",
                value: s.to_string(),
                reason: "each entry must be KEY=VALUE, separated by ';'",
            });
        };
        match k {
            "K8S_POD_NAMESPACE" => args.pod_namespace = v.to_string(),
            "K8S_POD_NAME" => args.pod_name = v.to_string(),
            _ => {}
        }
    }
    Ok(args)
}

/// The spec allows `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(EnvError::Invalid {
            name: "CNI_CONTAINERID",
            value: id.to_string(),
            reason: "must start with a letter or digit and contain only letters, digits, '_', '.' and '-'",
        })
    }
}

/// The kernel's rules for interface names: at most 15 bytes, no '/', ':' or
/// whitespace, and not "." or "..".
pub fn validate_ifname(name: &'static str, value: &str) -> Result<(), EnvError> {
    let reason = if value.len() > 15 {
        Some("an interface name has at most 15 characters")
    } else if value == "." || value == ".." {
        Some("an interface name cannot be \".\" or \"..\"")
    } else if value
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("an interface name cannot contain '/', ':' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EnvError::Invalid {
            name,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn full_add_environment() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u",
            ),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.netns, "/var/run/netns/cni-1");
        assert_eq!(e.ifname, "eth0");
        assert_eq!(
            e.args,
            CniArgs {
                pod_namespace: "default".into(),
                pod_name: "web-0".into()
            }
        );
        assert_eq!(e.path, "/opt/cni/bin");
        e.require_attachment().unwrap();
        e.require_netns().unwrap();
    }

    #[test]
    fn missing_command_is_an_error() {
        assert_eq!(env(&[]).unwrap_err(), EnvError::Missing("CNI_COMMAND"));
        assert_eq!(
            env(&[("CNI_COMMAND", "")]).unwrap_err(),
            EnvError::Missing("CNI_COMMAND")
        );
    }

    #[test]
    fn unknown_command_is_an_error() {
        assert_eq!(
            env(&[("CNI_COMMAND", "add")]).unwrap_err(),
            EnvError::UnknownCommand("add".into())
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "UP")]).unwrap_err(),
            EnvError::UnknownCommand("UP".into())
        );
    }

    #[test]
    fn every_command_parses() {
        for c in ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"] {
            assert_eq!(env(&[("CNI_COMMAND", c)]).unwrap().command.as_str(), c);
        }
    }

    #[test]
    fn attachment_fields_are_required_when_asked() {
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")]).unwrap();
        assert_eq!(
            e.require_attachment().unwrap_err(),
            EnvError::Missing("CNI_CONTAINERID")
        );
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")]).unwrap();
        assert_eq!(e.require_attachment().unwrap_err(), EnvError::Missing("CNI_IFNAME"));
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        e.require_attachment().unwrap();
        assert_eq!(e.require_netns().unwrap_err(), EnvError::Missing("CNI_NETNS"));
    }

    #[test]
    fn bad_container_ids_are_rejected() {
        for id in ["-abc", "a b", "a/b", "ab;c"] {
            let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", id), ("CNI_IFNAME", "eth0")]).unwrap();
            assert!(
                matches!(
                    e.require_attachment(),
                    Err(EnvError::Invalid {
                        name: "CNI_CONTAINERID",
                        ..
                    })
                ),
                "{id}"
            );
        }
    }

    #[test]
    fn bad_ifnames_are_rejected() {
        for name in ["a-very-long-ifname", ".", "..", "eth/0", "eth:0", "eth 0"] {
            let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", name)]).unwrap();
            assert!(
                matches!(
                    e.require_attachment(),
                    Err(EnvError::Invalid { name: "CNI_IFNAME", .. })
                ),
                "{name}"
            );
        }
        validate_ifname("CNI_IFNAME", "exactly15chars_").unwrap();
    }

    #[test]
    fn cni_args_ignore_unknown_keys_and_empty_entries() {
        let a = parse_cni_args(";K8S_POD_NAME=p;;FOO=bar;K8S_POD_NAMESPACE=ns;").unwrap();
        assert_eq!(
            a,
            CniArgs {
                pod_namespace: "ns".into(),
                pod_name: "p".into()
            }
        );
        assert_eq!(parse_cni_args("").unwrap(), CniArgs::default());
        // A value may itself contain '='.
        assert_eq!(parse_cni_args("K8S_POD_NAME=a=b").unwrap().pod_name, "a=b");
    }

    #[test]
    fn cni_args_without_equals_is_an_error() {
        assert!(matches!(
            parse_cni_args("K8S_POD_NAME"),
            Err(EnvError::Invalid { name: "CNI_ARGS", .. })
        ));
    }
}
