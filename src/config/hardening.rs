//! What a preview container may do beyond the defaults: the Linux capabilities an image adds
//! back after `CapDrop: ALL`, and which `container_create_params` weaken the isolation enough
//! that `serve` refuses them unless the image says `allow_unsafe: true`.

use std::fmt;

use serde_json::{Map, Value};

/// Linux capability names without the `CAP_` prefix, in the kernel's bit order (capability.h),
/// so the position of a name is its bit in `/proc/<pid>/status`'s `CapEff`.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Capabilities that give a container the host: an image may list them only with `allow_unsafe`.
const HOST_CAPABILITIES: [&str; 5] = ["SYS_ADMIN", "NET_ADMIN", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO"];

/// Host paths whose bind mount hands a container the host (Docker's socket is root on the host).
const HOST_PATHS: [&str; 4] = ["/", "/var/run/docker.sock", "/run/docker.sock", "/var/run"];

/// A Linux capability, by its name without `CAP_` (`CHOWN`, `NET_BIND_SERVICE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability(&'static str);

impl Capability {
    /// Accepts `chown`, `CHOWN` and `CAP_CHOWN`.
    pub fn parse(input: &str) -> Result<Self, String> {
        let upper = input.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
        CAPABILITIES.iter().find(|known| **known == name).map(|known| Self(known)).ok_or_else(|| {
            format!("{input:?} is not a Linux capability; use a name from capabilities(7) without CAP_, e.g. CHOWN")
        })
    }

    /// The capability's bit in the kernel's capability sets.
    pub fn bit(self) -> u32 {
        CAPABILITIES.iter().position(|known| *known == self.0).map_or(0, |index| index as u32)
    }

    pub fn gives_the_host(self) -> bool {
        HOST_CAPABILITIES.contains(&self.0)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Each setting of `container_create_params` that weakens a preview's isolation, as
/// `(key path, why)`, e.g. `("HostConfig.Privileged", "…")`.
pub fn unsafe_params(params: &Map<String, Value>) -> Vec<(String, String)> {
    let Some(host) = params.get("HostConfig").and_then(Value::as_object) else { return Vec::new() };
    let mut found = Vec::new();
    let mut flag = |key: &str, why: String| found.push((format!("HostConfig.{key}"), why));
    if host.get("Privileged").and_then(Value::as_bool) == Some(true) {
        flag("Privileged", "a privileged container is root on the host".to_owned());
    }
    for cap in strings(host.get("CapAdd")) {
        let name = cap.to_ascii_uppercase();
        let name = name.strip_prefix("CAP_").unwrap_or(&name);
        if name == "ALL" || HOST_CAPABILITIES.contains(&name) {
            flag("CapAdd", format!("{name} lets the container take over the host or its network"));
        }
    }
    for bind in strings(host.get("Binds")) {
        let source = bind.split(':').next().unwrap_or_default();
        if is_host_path(source) {
            flag("Binds", format!("mounting {source} hands the container the host"));
        }
    }
    for mount in host.get("Mounts").and_then(Value::as_array).into_iter().flatten() {
        let source = mount.get("Source").and_then(Value::as_str).unwrap_or_default();
        if is_host_path(source) {
            flag("Mounts", format!("mounting {source} hands the container the host"));
        }
    }
    for key in ["NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode"] {
        if host.get(key).and_then(Value::as_str) == Some("host") {
            flag(key, "sharing the host's namespace lets the container see and reach the host's own".to_owned());
        }
    }
    for opt in strings(host.get("SecurityOpt")) {
        if opt.ends_with("=unconfined") || opt.starts_with("no-new-privileges=false") {
            flag("SecurityOpt", format!("{opt} turns off a protection of the host"));
        }
    }
    found
}

/// Create params that take a preview off the network of its own that `network.isolation` gives
/// it: a `NetworkMode` (other than `none`, and `host`, named by [`unsafe_params`]), or
/// `NetworkingConfig`, whose endpoints Docker attaches instead.
pub fn leaves_preview_network(params: &Map<String, Value>) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mode = params.get("HostConfig").and_then(|host| host.get("NetworkMode")).and_then(Value::as_str);
    if let Some(mode) = mode.filter(|mode| !matches!(*mode, "none" | "host")) {
        found.push((
            "HostConfig.NetworkMode".to_owned(),
            format!(
                "`{mode}` puts previews on a network they share, outside the per-preview networks and their firewall"
            ),
        ));
    }
    if params.contains_key("NetworkingConfig") {
        found.push((
            "NetworkingConfig".to_owned(),
            "attaches previews to networks of its choosing, outside the per-preview networks and their firewall"
                .to_owned(),
        ));
    }
    found
}

fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    value.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
}

fn is_host_path(source: &str) -> bool {
    let trimmed = source.trim_end_matches('/');
    let path = if trimmed.is_empty() && !source.is_empty() { "/" } else { trimmed };
    HOST_PATHS.contains(&path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(params: Value) -> Vec<String> {
        let Value::Object(map) = params else { panic!("an object") };
        unsafe_params(&map).into_iter().map(|(key, _)| key).collect()
    }

    #[test]
    fn capability_names_parse_in_any_case_and_with_the_cap_prefix() {
        assert_eq!(Capability::parse("chown").unwrap().to_string(), "CHOWN");
        assert_eq!(Capability::parse("CAP_NET_BIND_SERVICE").unwrap().bit(), 10);
        assert_eq!(Capability::parse("CHECKPOINT_RESTORE").unwrap().bit(), 40);
        assert!(Capability::parse("CAP_FLY").unwrap_err().contains("not a Linux capability"));
    }

    #[test]
    fn params_that_hand_over_the_host_are_named_by_key() {
        let found = keys(json!({"HostConfig": {
            "Privileged": true,
            "CapAdd": ["CAP_SYS_ADMIN", "CHOWN"],
            "Binds": ["/var/run/docker.sock:/var/run/docker.sock", "/srv/data:/data:ro"],
            "Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}],
            "NetworkMode": "host",
            "PidMode": "host",
            "SecurityOpt": ["seccomp=unconfined"],
        }}));
        assert_eq!(
            found,
            [
                "HostConfig.Privileged",
                "HostConfig.CapAdd",
                "HostConfig.Binds",
                "HostConfig.Mounts",
                "HostConfig.NetworkMode",
                "HostConfig.PidMode",
                "HostConfig.SecurityOpt"
            ]
        );
    }

    #[test]
    fn a_network_mode_or_networking_config_of_the_images_own_is_named_as_leaving_the_preview_networks() {
        for mode in ["bridge", "shared-db", "container:abc"] {
            let found = leaves_preview_network(json!({"HostConfig": {"NetworkMode": mode}}).as_object().unwrap());
            assert_eq!(found.len(), 1, "{mode}");
            assert!(found[0].1.contains("outside the per-preview networks"), "{found:?}");
        }
        let config = json!({"NetworkingConfig": {"EndpointsConfig": {"bridge": {}}}});
        assert_eq!(leaves_preview_network(config.as_object().unwrap())[0].0, "NetworkingConfig");
        for mode in ["none", "host"] {
            let params = json!({"HostConfig": {"NetworkMode": mode}});
            assert!(leaves_preview_network(params.as_object().unwrap()).is_empty(), "{mode}");
        }
    }

    #[test]
    fn ordinary_params_are_not_unsafe() {
        let found = keys(json!({"Tty": true, "HostConfig": {
            "Binds": ["/srv/seed:/seed:ro"], "ShmSize": 8388608, "CapAdd": ["CHOWN"], "NetworkMode": "bridge",
            "SecurityOpt": ["no-new-privileges"],
        }}));
        assert!(found.is_empty(), "{found:?}");
    }
}
