//! The host firewall around preview networks, in iptables as Docker itself does.
//!
//! Every preview bridge is named `pv-…` (see `super::Networks`), so one interface wildcard
//! covers them all, of every instance on the host, and the rules do not change as previews come
//! and go:
//!
//! - `INPUT` from a preview bridge jumps to `PREVIEWD-INPUT`: only answers to connections the
//!   host opened (nginx and the health probe reach previews through Docker's published ports)
//!   are let in, so a preview reaches no service of the host, on the gateway address or any other.
//! - `DOCKER-USER` (Docker evaluates it before its own rules) and `FORWARD` itself (for the
//!   moments Docker's jump to `DOCKER-USER` is being moved, and on an engine that runs without
//!   iptables) jump to `PREVIEWD-FORWARD`: traffic within one bridge (one preview's own
//!   containers) passes; to another container network, to link-local addresses (cloud metadata
//!   at 169.254.169.254) and to ports Docker publishes on the host's addresses is refused; the
//!   rest (the internet) passes, unless the instance has `network.egress: false`: then one more
//!   rule for its own bridges (`pv-<tag>…`) refuses every other connection that is not an answer.
//!
//! The chains' contents are written whole with `iptables-restore --noflush`, one transaction, so
//! re-applying them (first thing at every start, and when the warm pool, each time it makes a
//! network, finds them gone) never opens a gap. They are the same for every instance, so instances sharing a host
//! agree on them, and no instance removes them.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const INPUT_CHAIN: &str = "PREVIEWD-INPUT";
const FORWARD_CHAIN: &str = "PREVIEWD-FORWARD";
/// Every preview bridge of every instance.
pub const ALL_BRIDGES: &str = "pv-+";

/// Which IP version a rule set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }

    fn reject(self) -> &'static str {
        match self {
            Self::V4 => "icmp-admin-prohibited",
            Self::V6 => "icmp6-adm-prohibited",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot set up the firewall of the preview networks: `{command}` failed: {message} (previewd needs root, or CAP_NET_ADMIN, and iptables; or set network.isolation: false)"
)]
pub struct FirewallError {
    command: String,
    message: String,
}

/// The rules one instance needs.
#[derive(Debug, Clone)]
pub struct Firewall {
    /// The interface wildcard of this instance's bridges, e.g. `pv-1a2b3c+`.
    own_bridges: String,
    egress: bool,
}

impl Firewall {
    pub fn new(bridge_prefix: &str, egress: bool) -> Self {
        Self { own_bridges: format!("{bridge_prefix}+"), egress }
    }

    /// Writes the chains, makes sure `INPUT` and `DOCKER-USER` (or `FORWARD`) jump to them, and
    /// adds or drops this instance's egress rule.
    pub async fn install(&self) -> Result<(), FirewallError> {
        for family in families() {
            restore(family, &restore_input(family)).await?;
            ensure(family, &jump("INPUT", INPUT_CHAIN)).await?;
            for hook in forward_hooks(family).await {
                ensure(family, &jump(hook, FORWARD_CHAIN)).await?;
                let no_egress = self.no_egress_rule(family, hook);
                if self.egress {
                    delete_all(family, &no_egress).await;
                } else {
                    ensure(family, &no_egress).await?;
                }
            }
        }
        Ok(())
    }

    /// Takes this instance's own rule out (with `network.isolation: false` once none of its
    /// networks is left). The shared chains stay: another instance on this host may rely on them
    /// at any moment, and they match no interface once no preview bridge is left (README:
    /// Security model says how to remove them by hand).
    pub async fn remove(&self) {
        for family in families() {
            for hook in forward_hooks(family).await {
                delete_all(family, &self.no_egress_rule(family, hook)).await;
            }
        }
    }

    /// Whether iptables can be run here (root or CAP_NET_ADMIN), for `previewd doctor`.
    pub async fn usable(&self) -> Result<(), FirewallError> {
        run(Family::V4.iptables(), &["-w", "-n", "-L", "INPUT"]).await
    }

    /// Whether the jumps to the chains, and the chains' last rules, are in place.
    pub async fn installed(&self) -> bool {
        let family = Family::V4;
        let last =
            |chain: &str, rule: &str| format!("{chain} {rule}").split(' ').map(str::to_owned).collect::<Vec<_>>();
        let input_last = input_rules(family).pop().unwrap_or_default();
        let forward_last = forward_rules(family).pop().unwrap_or_default();
        for hook in forward_hooks(family).await {
            if !check(family, &jump(hook, FORWARD_CHAIN)).await {
                return false;
            }
        }
        check(family, &jump("INPUT", INPUT_CHAIN)).await
            && check(family, &last(INPUT_CHAIN, &input_last)).await
            && check(family, &last(FORWARD_CHAIN, &forward_last)).await
    }

    /// `hook` + the match of every new, routed connection from this instance's bridges.
    fn no_egress_rule(&self, family: Family, hook: &str) -> Vec<String> {
        let rule = format!(
            "{hook} -i {} -m physdev ! --physdev-is-bridged -m conntrack ! --ctstate RELATED,ESTABLISHED -j REJECT --reject-with {}",
            self.own_bridges,
            family.reject()
        );
        rule.split(' ').map(str::to_owned).collect()
    }
}

fn jump(hook: &str, chain: &str) -> Vec<String> {
    [hook, "-i", ALL_BRIDGES, "-j", chain].map(str::to_owned).to_vec()
}

/// The `iptables-restore` input that sets both chains of one family.
pub fn restore_input(family: Family) -> String {
    let mut text = String::from("*filter\n");
    for chain in [INPUT_CHAIN, FORWARD_CHAIN] {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in input_rules(family) {
        text.push_str(&format!("-A {INPUT_CHAIN} {rule}\n"));
    }
    for rule in forward_rules(family) {
        text.push_str(&format!("-A {FORWARD_CHAIN} {rule}\n"));
    }
    text.push_str("COMMIT\n");
    text
}

fn input_rules(family: Family) -> Vec<String> {
    vec![
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_owned(),
        format!("-j REJECT --reject-with {}", family.reject()),
    ]
}

fn forward_rules(family: Family) -> Vec<String> {
    let reject = format!("-j REJECT --reject-with {}", family.reject());
    let mut rules = vec![
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_owned(),
        // Bridged, not routed: between containers of the same preview network.
        "-m physdev --physdev-is-bridged -j RETURN".to_owned(),
    ];
    if family == Family::V6 {
        // Preview networks have no IPv6 subnet: nothing of theirs is routed over IPv6.
        rules.push(reject);
        return rules;
    }
    rules.extend([
        format!("-d 169.254.0.0/16 {reject}"),
        // A port Docker publishes on the host's addresses is the host's service.
        format!("-m conntrack --ctstate DNAT {reject}"),
        format!("-o {ALL_BRIDGES} {reject}"),
        format!("-o docker0 {reject}"),
        format!("-o br-+ {reject}"),
    ]);
    rules
}

/// Where forwarded traffic is filtered: Docker's `DOCKER-USER` when `FORWARD` jumps to it (the
/// chain can outlive an engine switched to `--iptables=false`), and `FORWARD` itself always.
/// Docker puts its jump to `DOCKER-USER` back on top of `FORWARD` whenever it creates a
/// network, by deleting it and inserting it again: for that moment only the rules in `FORWARD`
/// stand between a preview and the host's neighbours (a test caught a preview reaching the
/// metadata address then, while other networks were being made).
async fn forward_hooks(family: Family) -> Vec<&'static str> {
    let docker_user = run(family.iptables(), &["-w", "-C", "FORWARD", "-j", "DOCKER-USER"]).await.is_ok();
    if docker_user { vec!["DOCKER-USER", "FORWARD"] } else { vec!["FORWARD"] }
}

/// Inserts `rule` (hook first) at the top of its hook unless it is there.
async fn ensure(family: Family, rule: &[String]) -> Result<(), FirewallError> {
    if check(family, rule).await {
        return Ok(());
    }
    let mut args = vec!["-w".to_owned(), "-I".to_owned(), rule[0].clone(), "1".to_owned()];
    args.extend(rule[1..].iter().cloned());
    run(family.iptables(), &args).await
}

async fn check(family: Family, rule: &[String]) -> bool {
    let mut args = vec!["-w".to_owned(), "-C".to_owned()];
    args.extend(rule.iter().cloned());
    run(family.iptables(), &args).await.is_ok()
}

async fn delete_all(family: Family, rule: &[String]) {
    let mut args = vec!["-w".to_owned(), "-D".to_owned()];
    args.extend(rule.iter().cloned());
    while run(family.iptables(), &args).await.is_ok() {}
}

/// IPv4, and IPv6 where the kernel has it: a preview bridge gets an IPv6 link-local address,
/// through which the host's services on `[::]` would answer.
fn families() -> Vec<Family> {
    let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    if ipv6 { vec![Family::V4, Family::V6] } else { vec![Family::V4] }
}

async fn restore(family: Family, input: &str) -> Result<(), FirewallError> {
    run_with(family.restore(), &["-w", "--noflush"], Some(input)).await
}

async fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<(), FirewallError> {
    run_with(program, args, None).await
}

/// Runs `program` (no shell), with `input` on its stdin; its stderr is the error's message.
async fn run_with<S: AsRef<str>>(program: &str, args: &[S], input: Option<&str>) -> Result<(), FirewallError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let failed = |message: String| FirewallError { command: format!("{program} {}", args.join(" ")), message };
    let mut child = Command::new(program)
        .args(&args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| failed(err.to_string()))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // Dropped at the end of this block: the program sees the end of its input.
        stdin.write_all(input.as_bytes()).await.map_err(|err| failed(err.to_string()))?;
    }
    let output = child.wait_with_output().await.map_err(|err| failed(err.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(String::from_utf8_lossy(&output.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_chains_let_answers_in_and_keep_previews_off_the_host_and_each_other() {
        let expected = "*filter
:PREVIEWD-INPUT - [0:0]
:PREVIEWD-FORWARD - [0:0]
-A PREVIEWD-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A PREVIEWD-INPUT -j REJECT --reject-with icmp-admin-prohibited
-A PREVIEWD-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A PREVIEWD-FORWARD -m physdev --physdev-is-bridged -j RETURN
-A PREVIEWD-FORWARD -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited
-A PREVIEWD-FORWARD -m conntrack --ctstate DNAT -j REJECT --reject-with icmp-admin-prohibited
-A PREVIEWD-FORWARD -o pv-+ -j REJECT --reject-with icmp-admin-prohibited
-A PREVIEWD-FORWARD -o docker0 -j REJECT --reject-with icmp-admin-prohibited
-A PREVIEWD-FORWARD -o br-+ -j REJECT --reject-with icmp-admin-prohibited
COMMIT
";
        assert_eq!(restore_input(Family::V4), expected);
    }

    #[test]
    fn ipv6_is_not_routed_for_previews_at_all() {
        let input = restore_input(Family::V6);
        let forward: Vec<&str> = input.lines().filter(|l| l.starts_with("-A PREVIEWD-FORWARD")).collect();
        assert_eq!(forward.last(), Some(&"-A PREVIEWD-FORWARD -j REJECT --reject-with icmp6-adm-prohibited"));
        assert!(input.contains("-A PREVIEWD-INPUT -j REJECT --reject-with icmp6-adm-prohibited"));
    }

    #[test]
    fn jumps_match_every_preview_bridge() {
        assert_eq!(jump("INPUT", INPUT_CHAIN), ["INPUT", "-i", "pv-+", "-j", "PREVIEWD-INPUT"]);
    }

    #[test]
    fn without_egress_new_routed_connections_from_the_instances_own_bridges_are_refused() {
        let rule = Firewall::new("pv-1a2b3c", false).no_egress_rule(Family::V4, "DOCKER-USER").join(" ");
        assert_eq!(
            rule,
            "DOCKER-USER -i pv-1a2b3c+ -m physdev ! --physdev-is-bridged -m conntrack ! --ctstate RELATED,ESTABLISHED -j REJECT --reject-with icmp-admin-prohibited"
        );
    }
}
