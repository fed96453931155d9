//! The `runtime` section: which container engine previews run on. `docker` (the default): the
//! local engine, containers published on 127.0.0.1. `swarm`: that engine is a Swarm manager and
//! each preview's app is a Swarm service, placed by `constraints` and reached by nginx at the
//! address of the node that runs it (`upstream: node_addr`, the only way without the routing
//! mesh). `holder` names an image every such node has: previewd keeps its warm overlay networks
//! set up on the nodes with one idle task each, so a launch does not wait for Swarm to do it.

use std::fmt;

use serde::Deserialize;

use super::{ImageKey, ImageSpec, NetworkConfig, Problems};

/// Validated `runtime`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RuntimeConfig {
    #[default]
    Docker,
    Swarm {
        /// Swarm placement constraints every preview service gets.
        constraints: Vec<Constraint>,
        /// What keeps the warm networks set up on the nodes; without it a launch waits for
        /// Swarm to set its network up on the node (about 0.6 s on the drills' Swarm).
        holder: Option<Holder>,
    },
}

/// An idle task previewd runs on every node the constraints allow, on each warm network: a
/// node sets an overlay up when the first task on it arrives and tears it down after the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// An image on every such node (or in a registry the nodes pull from).
    pub image: String,
    /// What it runs; the image's own command when absent (a pause image waits by itself).
    pub command: Option<Vec<String>>,
}

impl RuntimeConfig {
    pub fn is_swarm(&self) -> bool {
        matches!(self, Self::Swarm { .. })
    }
}

/// A Swarm placement constraint, `node.<attribute> ==|!= <value>` (as `docker service create
/// --constraint` takes it): checked here so that a typo is a config error, not a preview that
/// never gets a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint(String);

impl Constraint {
    pub fn parse(text: &str) -> Result<Self, String> {
        let hint =
            "write `node.<attribute> == <value>` or `!=`, e.g. node.labels.previews == true or node.role == worker";
        let (attribute, value) = match (text.split_once("=="), text.split_once("!=")) {
            (Some(parts), None) | (None, Some(parts)) => parts,
            _ => return Err(format!("{text:?}: {hint}")),
        };
        let (attribute, value) = (attribute.trim(), value.trim());
        let known = ["node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch"];
        let label = ["node.labels.", "engine.labels."]
            .iter()
            .any(|prefix| attribute.strip_prefix(prefix).is_some_and(|name| !name.is_empty() && is_word(name)));
        if !(known.contains(&attribute) || label) {
            return Err(format!("{text:?}: `{attribute}` is not a node attribute Swarm knows; {hint}"));
        }
        if value.is_empty() || !is_word(value) {
            return Err(format!("{text:?}: the value must be one word of letters, digits, `.`, `_`, `-` or `/`"));
        }
        Ok(Self(text.trim().to_owned()))
    }
}

fn is_word(text: &str) -> bool {
    text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Constraint {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// `runtime` as written in config.yml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRuntime {
    kind: Option<String>,
    constraints: Option<Vec<String>>,
    upstream: Option<String>,
    holder: Option<RawHolder>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHolder {
    image: String,
    command: Option<Vec<String>>,
}

pub(super) fn validate(raw: RawRuntime, problems: &mut Problems) -> RuntimeConfig {
    let swarm = match raw.kind.as_deref() {
        None | Some("docker") => false,
        Some("swarm") => true,
        Some(other) => {
            problems.add("runtime.kind", format!("`{other}` is not a runtime; use docker (the default) or swarm"));
            false
        }
    };
    match raw.upstream.as_deref() {
        None | Some("node_addr") => {}
        Some(other) => problems.add(
            "runtime.upstream",
            format!(
                "`{other}` is not supported; use node_addr (nginx proxies to the address of the node that runs the \
                 preview: the routing mesh needs IPVS, which previewd does not rely on)"
            ),
        ),
    }
    if !swarm {
        if raw.constraints.is_some() {
            problems.add("runtime.constraints", "placement constraints need runtime.kind: swarm");
        }
        if raw.holder.is_some() {
            problems.add("runtime.holder", "holders keep Swarm overlay networks set up; they need runtime.kind: swarm");
        }
        return RuntimeConfig::Docker;
    }
    let mut constraints = Vec::new();
    for (index, text) in raw.constraints.unwrap_or_default().iter().enumerate() {
        match Constraint::parse(text) {
            Ok(constraint) => constraints.push(constraint),
            Err(message) => problems.add(&format!("runtime.constraints[{index}]"), message),
        }
    }
    let holder = raw.holder.map(|holder| {
        super::check_image_and_command("runtime.holder", &holder.image, holder.command.as_deref(), problems);
        Holder { image: holder.image, command: holder.command }
    });
    RuntimeConfig::Swarm { constraints, holder }
}

/// What previewd does not run on a Swarm yet: each is refused at start-up, with what to change,
/// rather than half-working there.
pub(super) fn check_swarm_images(
    images: &std::collections::BTreeMap<ImageKey, ImageSpec>,
    network: &NetworkConfig,
    problems: &mut Problems,
) {
    for (key, spec) in images {
        if !spec.container_create_params.is_empty() {
            problems.add(
                &format!("images.{key}.container_create_params"),
                "these are Docker container fields, which a Swarm service does not take; remove them to run on \
                 runtime.kind: swarm",
            );
        }
    }
    if !network.egress {
        problems.add(
            "network.egress",
            "false is enforced by previewd's iptables rules on this host only, not on the Swarm's nodes; set it to \
             true on runtime.kind: swarm (and fence the nodes' egress in their own firewalls)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_swarm_understands_are_taken() {
        for text in
            ["node.labels.previews == true", "node.role!=manager", "engine.labels.disk == ssd", "node.hostname == w-1"]
        {
            assert!(Constraint::parse(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn a_constraint_that_is_not_one_comparison_of_a_node_attribute_is_refused() {
        for text in
            ["node.labels == x", "labels.x == y", "node.role = worker", "node.role == a b", "node.role == x == y", ""]
        {
            assert!(Constraint::parse(text).is_err(), "{text}");
        }
    }
}
