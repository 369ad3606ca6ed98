//! The network configuration the runtime writes on stdin, parsed and validated
//! without any I/O so that every malformed input is a unit test.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// The smallest MTU we accept: below the IPv4 minimum datagram size of 576 a
/// pod cannot talk to anything outside the node.
const MIN_MTU: u32 = 576;
const MAX_MTU: u32 = 65535;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the network configuration on stdin is not valid JSON ({0}): check the .conflist file in the CNI config directory")]
    Malformed(String),
    #[error("the network configuration has no \"{0}\": add it to the .conflist file")]
    Missing(&'static str),
    #[error("cniVersion \"{0}\" is not supported by sinew-cni (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0): set one of them in the .conflist file")]
    UnknownVersion(String),
    #[error("none of the versions in cniVersions {0} is supported by sinew-cni (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0): add one of them to the .conflist file")]
    NoSupportedVersion(String),
    #[error("field \"{field}\" has the invalid value {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("field \"{field}\" is not supported by sinew-cni: {reason}")]
    Unsupported { field: &'static str, reason: &'static str },
    #[error("GC without \"cni.dev/valid-attachments\" deleted nothing: without the list of attachments still in use every pod on this node would look stale; pass the list (an empty list if no attachment of this network is in use)")]
    GcWithoutList,
}

/// The CNI versions this plugin speaks, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [Self::V0_3_0, Self::V0_3_1, Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];
    pub const LATEST: CniVersion = Self::V1_1_0;

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Results before 1.0.0 carry an explicit "version" on each IP.
    pub fn ips_carry_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// CHECK appeared in 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// GC and STATUS appeared in 1.1.0.
    pub fn has_gc_and_status(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Picks the protocol version of one invocation, as CNI 1.1 "Version
/// considerations" asks of a runtime: `cniVersion`, when present, is the
/// runtime's selection and is used as given (a runtime that predates
/// `cniVersions`, e.g. podman 4.3, ignores the list and only understands a
/// result in `cniVersion`). Without it, the highest version in `cniVersions`
/// that this plugin supports. `Err` carries the error to report.
fn select_version(cni_version: Option<String>, cni_versions: &[String]) -> Result<CniVersion, ConfigError> {
    if let Some(v) = cni_version {
        return CniVersion::parse(&v).ok_or(ConfigError::UnknownVersion(v));
    }
    if cni_versions.is_empty() {
        return Err(ConfigError::Missing("cniVersion"));
    }
    cni_versions
        .iter()
        .filter_map(|v| CniVersion::parse(v))
        .max()
        .ok_or_else(|| ConfigError::NoSupportedVersion(format!("{cni_versions:?}")))
}

/// `cniVersions`: a list of semantic versions ("1.1.0"). Versions this
/// plugin does not know are allowed (they are for other plugins and
/// runtimes); malformed entries are not.
fn parse_cni_versions(v: Option<serde_json::Value>) -> Result<Vec<String>, ConfigError> {
    const REASON: &str = "must be a list of versions such as [\"1.0.0\", \"1.1.0\"]";
    let list = match v {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list,
        Some(other) => return Err(invalid("cniVersions", &truncate(&other.to_string()), REASON)),
    };
    list.into_iter()
        .map(|item| match item {
            serde_json::Value::String(s) if is_semver(&s) => Ok(s),
            other => Err(invalid("cniVersions", &truncate(&other.to_string()), REASON)),
        })
        .collect()
}

/// MAJOR.MINOR.PATCH with decimal numbers; what libcni accepts there.
fn is_semver(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// One attachment the runtime still uses, from the GC argument list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub plugin_type: String,
    pub agent_socket: PathBuf,
    pub mtu: Option<u32>,
    pub log_file: Option<PathBuf>,
    /// Passed through to the ADD result unchanged, as the spec asks.
    pub dns: Option<serde_json::Value>,
    /// GC's list of attachments still in use. `None` when the runtime sent
    /// no list, which is not the same as an empty one.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The result of the ADD, which the runtime passes to CHECK and DEL.
    /// Read by CHECK only (see `result::Expected`).
    pub prev_result: Option<serde_json::Value>,
}

/// What is on the wire, before validation. Unknown keys (runtimeConfig,
/// args, prevResult...) are ignored on purpose: runtimes add their own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<serde_json::Value>,
    cni_versions: Option<serde_json::Value>,
    name: Option<serde_json::Value>,
    #[serde(rename = "type")]
    plugin_type: Option<serde_json::Value>,
    agent_socket: Option<serde_json::Value>,
    mtu: Option<serde_json::Value>,
    log_file: Option<serde_json::Value>,
    dns: Option<serde_json::Value>,
    ipam: Option<serde_json::Value>,
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<serde_json::Value>,
    /// The spec-v1.1.0 text's name for the same list; libcni sends both.
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<serde_json::Value>,
}

/// Reads only the version fields, so that an error about any other field
/// can still be reported in the version the runtime asked for.
pub fn sniff_version(input: &[u8]) -> Option<CniVersion> {
    #[derive(Deserialize)]
    struct Sniff {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
        #[serde(rename = "cniVersions")]
        cni_versions: Option<Vec<String>>,
    }
    let s: Sniff = serde_json::from_slice(input).ok()?;
    select_version(s.cni_version, &s.cni_versions.unwrap_or_default()).ok()
}

/// Parses and validates the configuration.
pub fn parse(input: &[u8]) -> Result<NetConf, ConfigError> {
    let value: serde_json::Value = serde_json::from_slice(input).map_err(|e| ConfigError::Malformed(e.to_string()))?;
    if !value.is_object() {
        return Err(ConfigError::Malformed("expected a JSON object".into()));
    }
    let raw: RawConf = serde_json::from_value(value).map_err(|e| ConfigError::Malformed(e.to_string()))?;

    let cni_versions = parse_cni_versions(raw.cni_versions)?;
    let version = optional_string(raw.cni_version, "cniVersion")?.filter(|v| !v.is_empty());
    let cni_version = select_version(version, &cni_versions)?;

    let name = required_string(raw.name, "name")?;
    validate_network_name(&name)?;
    let plugin_type = required_string(raw.plugin_type, "type")?;

    let agent_socket = match optional_string(raw.agent_socket, "agentSocket")? {
        Some(s) if s.is_empty() => {
            return Err(invalid(
                "agentSocket",
                "\"\"",
                "must be the path of the agent's unix socket, or absent",
            ))
        }
        Some(s) => PathBuf::from(s),
        None => PathBuf::from(sinew_proto::DEFAULT_SOCKET),
    };

    let mtu = match raw.mtu {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| invalid("mtu", &v.to_string(), "must be a whole number"))?;
            if !(u64::from(MIN_MTU)..=u64::from(MAX_MTU)).contains(&n) {
                return Err(invalid("mtu", &n.to_string(), "must be between 576 and 65535"));
            }
            Some(n as u32)
        }
    };

    let log_file = match optional_string(raw.log_file, "logFile")? {
        Some(s) if s.is_empty() => None,
        Some(s) => Some(PathBuf::from(s)),
        None => None,
    };

    if let Some(ipam) = raw.ipam {
        if !ipam.is_null() && ipam != serde_json::json!({}) {
            return Err(ConfigError::Unsupported {
                field: "ipam",
                reason: "sinew-agent assigns pod addresses itself: remove the ipam section",
            });
        }
    }

    let dns = match raw.dns {
        None | Some(serde_json::Value::Null) => None,
        Some(v @ serde_json::Value::Object(_)) => Some(v),
        Some(v) => return Err(invalid("dns", &v.to_string(), "must be an object")),
    };

    let list = |field: &'static str, v: Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value::<Vec<ValidAttachment>>(v.clone())
            .map(Some)
            .map_err(|_| {
                invalid(
                    field,
                    &truncate(&v.to_string()),
                    "must be a list of {\"containerID\": ..., \"ifname\": ...}",
                )
            }),
    };
    let valid_attachments = match (
        list("cni.dev/valid-attachments", raw.valid_attachments)?,
        list("cni.dev/attachments", raw.attachments)?,
    ) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(
                "cni.dev/attachments",
                "a different list",
                "must be the same list as \"cni.dev/valid-attachments\" when both are given",
            ))
        }
        (a, b) => a.or(b),
    };

    Ok(NetConf {
        cni_version,
        name,
        plugin_type,
        agent_socket,
        mtu,
        log_file,
        dns,
        valid_attachments,
        prev_result: raw.prev_result.filter(|v| !v.is_null()),
    })
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason,
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn required_string(v: Option<serde_json::Value>, field: &'static str) -> Result<String, ConfigError> {
    match optional_string(v, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ConfigError::Missing(field)),
    }
}

fn optional_string(v: Option<serde_json::Value>, field: &'static str) -> Result<Option<String>, ConfigError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, &truncate(&other.to_string()), "must be a string")),
    }
}

/// The spec restricts network names to `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn validate_network_name(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            &format!("{:?}", truncate(name)),
            "must start with a letter or digit and contain only letters, digits, '_', '.' and '-'",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<NetConf, ConfigError> {
        parse(s.as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse_str(r#"{"cniVersion":"1.1.0","name":"sinew","type":"sinew-cni"}"#).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_1_0);
        assert_eq!(c.name, "sinew");
        assert_eq!(c.plugin_type, "sinew-cni");
        assert_eq!(c.agent_socket, PathBuf::from(sinew_proto::DEFAULT_SOCKET));
        assert_eq!(c.mtu, None);
        assert_eq!(c.log_file, None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn full_config_is_read() {
        let c = parse_str(
            r#"{"cniVersion":"0.4.0","name":"k8s-pod-network","type":"sinew-cni",
                "agentSocket":"/tmp/a.sock","mtu":1400,"logFile":"/var/log/sinew-cni.log",
                "dns":{"nameservers":["10.96.0.10"]},
                "runtimeConfig":{"portMappings":[]},"args":{"x":1},
                "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, CniVersion::V0_4_0);
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/sinew-cni.log")));
        assert_eq!(c.dns.unwrap()["nameservers"][0], "10.96.0.10");
        assert_eq!(
            c.valid_attachments,
            Some(vec![ValidAttachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }])
        );
    }

    #[test]
    fn every_supported_version_parses() {
        for v in CniVersion::ALL {
            let c = parse_str(&format!(r#"{{"cniVersion":"{v}","name":"n","type":"t"}}"#)).unwrap();
            assert_eq!(c.cni_version, v);
        }
    }

    #[test]
    fn unknown_version_is_rejected() {
        let e = parse_str(r#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e, ConfigError::UnknownVersion("9.9.9".into()));
        let e = parse_str(r#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e, ConfigError::UnknownVersion("0.2.0".into()));
    }

    #[test]
    fn malformed_json_is_rejected() {
        for bad in [
            "",
            "{",
            "not json",
            "[1,2]",
            "\"str\"",
            "null",
            "{\"cniVersion\":\"1.1.0\",}",
        ] {
            assert!(
                matches!(parse_str(bad), Err(ConfigError::Malformed(_))),
                "{bad:?} was accepted"
            );
        }
        assert!(matches!(parse(&[0xff, 0xfe, b'{']), Err(ConfigError::Malformed(_))));
    }

    #[test]
    fn missing_or_empty_required_fields_are_named() {
        assert_eq!(
            parse_str(r#"{"name":"n","type":"t"}"#).unwrap_err(),
            ConfigError::Missing("cniVersion")
        );
        assert_eq!(
            parse_str(r#"{"cniVersion":"1.1.0","type":"t"}"#).unwrap_err(),
            ConfigError::Missing("name")
        );
        assert_eq!(
            parse_str(r#"{"cniVersion":"1.1.0","name":"","type":"t"}"#).unwrap_err(),
            ConfigError::Missing("name")
        );
        assert_eq!(
            parse_str(r#"{"cniVersion":"1.1.0","name":"n"}"#).unwrap_err(),
            ConfigError::Missing("type")
        );
        assert_eq!(
            parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":null}"#).unwrap_err(),
            ConfigError::Missing("type")
        );
    }

    #[test]
    fn wrong_types_are_rejected_with_field_name() {
        let e = parse_str(r#"{"cniVersion":1.1,"name":"n","type":"t"}"#).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "cniVersion",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_str(r#"{"cniVersion":"1.1.0","name":["n"],"type":"t"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { field: "name", .. }), "{e:?}");
        let e = parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":5}"#).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "agentSocket",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","logFile":true}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { field: "logFile", .. }), "{e:?}");
        let e = parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","dns":"8.8.8.8"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { field: "dns", .. }), "{e:?}");
    }

    #[test]
    fn bad_network_names_are_rejected() {
        for name in ["-net", ".net", "net work", "net/x", "né"] {
            let e = parse_str(&format!(r#"{{"cniVersion":"1.1.0","name":"{name}","type":"t"}}"#)).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { field: "name", .. }), "{name}: {e:?}");
        }
        for name in ["a", "k8s-pod-network", "net_1.2"] {
            parse_str(&format!(r#"{{"cniVersion":"1.1.0","name":"{name}","type":"t"}}"#)).unwrap();
        }
    }

    #[test]
    fn mtu_bounds_are_enforced() {
        let with_mtu = |m: &str| parse_str(&format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"t","mtu":{m}}}"#));
        for bad in ["0", "575", "65536", "-1", "1500.5", "\"1500\"", "true"] {
            let e = with_mtu(bad).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { field: "mtu", .. }), "{bad}: {e:?}");
        }
        assert_eq!(with_mtu("576").unwrap().mtu, Some(576));
        assert_eq!(with_mtu("9000").unwrap().mtu, Some(9000));
        assert_eq!(with_mtu("65535").unwrap().mtu, Some(65535));
        assert_eq!(with_mtu("null").unwrap().mtu, None);
    }

    #[test]
    fn empty_agent_socket_is_rejected_and_empty_log_file_means_none() {
        let e = parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":""}"#).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "agentSocket",
                    ..
                }
            ),
            "{e:?}"
        );
        let c = parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","logFile":""}"#).unwrap();
        assert_eq!(c.log_file, None);
    }

    #[test]
    fn an_ipam_section_is_unsupported() {
        let e = parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":"host-local"}}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Unsupported { field: "ipam", .. }), "{e:?}");
        parse_str(r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{}}"#).unwrap();
    }

    #[test]
    fn malformed_valid_attachments_are_rejected() {
        for bad in [
            r#""x""#,
            r#"[{"containerID":1,"ifname":"eth0"}]"#,
            r#"[{"ifname":"eth0"}]"#,
            r#"{}"#,
        ] {
            let e = parse_str(&format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":{bad}}}"#
            ))
            .unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        field: "cni.dev/valid-attachments",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
        }
    }

    /// CNI 1.1 "Version considerations": "CNI runtimes MUST select the
    /// highest supported version from the set of network configuration
    /// versions given by the `cniVersion` and `cniVersions` fields". The
    /// request's `cniVersion` is that selection; without one we select.
    #[test]
    fn cni_versions_select_the_highest_supported_unless_cni_version_is_given() {
        let v = |s: &str| parse_str(s).map(|c| c.cni_version);
        assert_eq!(
            v(r#"{"cniVersion":"1.0.0","cniVersions":["0.4.0","1.0.0","1.1.0"],"name":"n","type":"t"}"#),
            Ok(CniVersion::V1_0_0)
        );
        assert_eq!(
            v(r#"{"cniVersions":["0.4.0","1.1.0","1.0.0","9.0.0"],"name":"n","type":"t"}"#),
            Ok(CniVersion::V1_1_0)
        );
        assert_eq!(
            v(r#"{"cniVersions":["0.2.0","9.0.0"],"name":"n","type":"t"}"#),
            Err(ConfigError::NoSupportedVersion(r#"["0.2.0", "9.0.0"]"#.into()))
        );
        assert_eq!(
            v(r#"{"cniVersions":[],"name":"n","type":"t"}"#),
            Err(ConfigError::Missing("cniVersion"))
        );
        for bad in [r#""1.1.0""#, "[1]", r#"["1.1"]"#, r#"["v1.1.0"]"#, r#"["1.x.0"]"#] {
            let e = parse_str(&format!(
                r#"{{"cniVersion":"1.0.0","cniVersions":{bad},"name":"n","type":"t"}}"#
            ))
            .unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        field: "cniVersions",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(
            sniff_version(br#"{"cniVersions":["1.0.0","1.1.0"],"mtu":"x"}"#),
            Some(CniVersion::V1_1_0)
        );
    }

    /// GC's list: absent and null are "no list", `[]` is "nothing is valid";
    /// the spec-v1.1.0 spelling `cni.dev/attachments` is the same list.
    #[test]
    fn valid_attachments_distinguish_absent_from_empty() {
        let gc = |extra: &str| parse_str(&format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"t"{extra}}}"#));
        assert_eq!(gc("").unwrap().valid_attachments, None);
        assert_eq!(
            gc(r#","cni.dev/valid-attachments":null"#).unwrap().valid_attachments,
            None
        );
        assert_eq!(
            gc(r#","cni.dev/valid-attachments":[]"#).unwrap().valid_attachments,
            Some(vec![])
        );
        let one = Some(vec![ValidAttachment {
            container_id: "a".into(),
            ifname: "eth0".into(),
        }]);
        let l = r#"[{"containerID":"a","ifname":"eth0"}]"#;
        assert_eq!(
            gc(&format!(r#","cni.dev/attachments":{l}"#)).unwrap().valid_attachments,
            one
        );
        assert_eq!(
            gc(&format!(
                r#","cni.dev/attachments":{l},"cni.dev/valid-attachments":{l}"#
            ))
            .unwrap()
            .valid_attachments,
            one
        );
        let e = gc(&format!(r#","cni.dev/attachments":[],"cni.dev/valid-attachments":{l}"#)).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "cni.dev/attachments",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn sniff_version_survives_otherwise_bad_config() {
        assert_eq!(
            sniff_version(br#"{"cniVersion":"0.3.1","mtu":"x"}"#),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(sniff_version(br#"{"cniVersion":"9.9.9"}"#), None);
        assert_eq!(sniff_version(b"{"), None);
    }

    #[test]
    fn version_capabilities() {
        assert!(CniVersion::V0_3_1.ips_carry_version());
        assert!(CniVersion::V0_4_0.ips_carry_version());
        assert!(!CniVersion::V1_0_0.ips_carry_version());
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_gc_and_status());
        assert!(CniVersion::V1_1_0.has_gc_and_status());
    }

    /// A cheap stand-in for a fuzz target (no nightly toolchain here): byte
    /// mutations of a valid config must give Ok or Err, never a panic, and
    /// whatever parses must still satisfy the validated invariants.
    #[test]
    fn mutated_input_never_panics() {
        let seed = br#"{"cniVersion":"1.1.0","cniVersions":["1.0.0","1.1.0"],"name":"sinew","type":"sinew-cni","mtu":1450,"agentSocket":"/run/s.sock","logFile":"/l","dns":{"nameservers":["1.1.1.1"]},"prevResult":{"ips":[{"address":"10.0.0.2/32","gateway":"10.0.0.1"}]},"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],"cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,0123456789.-eE \\nulltruefalse\xff\x00";
        for _ in 0..20_000 {
            let mut input = seed.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % input.len();
                match next() % 3 {
                    0 => input[at] = alphabet[(next() as usize) % alphabet.len()],
                    1 => {
                        input.remove(at);
                    }
                    _ => input.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                }
                if input.is_empty() {
                    break;
                }
            }
            if let Ok(c) = parse(&input) {
                assert!(!c.name.is_empty() && !c.plugin_type.is_empty());
                assert!(c.mtu.is_none_or(|m| (MIN_MTU..=MAX_MTU).contains(&m)));
                assert!(!c.agent_socket.as_os_str().is_empty());
            }
        }
    }

    #[test]
    fn long_values_are_truncated_in_errors() {
        let long = "x".repeat(500);
        let e = parse_str(&format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":["{long}"]}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().len() < 250, "{}", e);
    }
}
