//! The `network` section: whether each preview gets a Docker network of its own behind the host's
//! firewall, whether previews may open connections to the outside, the address range their
//! networks come from, and how many networks are kept ready.

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Validated `network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Each preview on a network of its own, fenced off by iptables (see `crate::network`).
    /// `false`: previews share Docker's default bridge, as before 0.2.
    pub isolation: bool,
    /// Previews may open connections to addresses outside the host (the internet).
    pub egress: bool,
    /// The range every preview network's subnet is cut from.
    pub subnets: Ipv4Net,
    /// The prefix length of one preview's subnet (27: 32 addresses, 29 containers).
    pub subnet_prefix: u8,
    /// Networks created ahead of launches, so that a launch does not wait ~100 ms for one.
    pub warm: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            isolation: true,
            egress: true,
            subnets: Ipv4Net::new(std::net::Ipv4Addr::new(10, 210, 0, 0), 16).expect("valid literal"),
            subnet_prefix: 27,
            warm: 8,
        }
    }
}

/// `network` as written in config.yml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNetwork {
    isolation: Option<bool>,
    egress: Option<bool>,
    subnets: Option<String>,
    subnet_prefix: Option<u8>,
    warm: Option<usize>,
}

/// Most networks kept ready: each holds a bridge, a subnet and ~100 ms of Docker's time.
const MAX_WARM: usize = 32;
/// At most 2^16 subnets: previewd lists the candidates when it picks one.
const MAX_SPLIT_BITS: u8 = 16;
/// A subnet must hold a gateway, a broadcast address and some containers.
const LONGEST_PREFIX: u8 = 29;

/// The section, or the `(key, message)` of each value that cannot work.
pub(super) fn validate(raw: RawNetwork) -> Result<NetworkConfig, Vec<(String, String)>> {
    let defaults = NetworkConfig::default();
    let mut problems = Vec::new();
    let subnets = match raw.subnets.as_deref().map(str::parse::<Ipv4Net>) {
        None => defaults.subnets,
        Some(Ok(net)) if net == net.trunc() => net,
        Some(Ok(net)) => {
            problems.push(("network.subnets".to_owned(), format!("{net} has host bits set; write {}", net.trunc())));
            defaults.subnets
        }
        Some(Err(_)) => {
            let text = raw.subnets.unwrap_or_default();
            problems
                .push(("network.subnets".to_owned(), format!("`{text}` is not an IPv4 network like 10.210.0.0/16")));
            defaults.subnets
        }
    };
    let subnet_prefix = raw.subnet_prefix.unwrap_or(defaults.subnet_prefix);
    if subnet_prefix > subnets.prefix_len() + MAX_SPLIT_BITS && subnet_prefix <= LONGEST_PREFIX {
        problems.push((
            "network.subnet_prefix".to_owned(),
            format!(
                "cuts network.subnets into more than {} subnets: use a prefix of at most /{}",
                1u32 << MAX_SPLIT_BITS,
                subnets.prefix_len() + MAX_SPLIT_BITS
            ),
        ));
    } else if subnet_prefix <= subnets.prefix_len() || subnet_prefix > LONGEST_PREFIX {
        problems.push((
            "network.subnet_prefix".to_owned(),
            format!("must be longer than network.subnets' /{} and at most /{LONGEST_PREFIX}", subnets.prefix_len()),
        ));
    }
    let warm = raw.warm.unwrap_or(defaults.warm);
    if warm > MAX_WARM {
        problems.push(("network.warm".to_owned(), format!("must be at most {MAX_WARM}")));
    }
    let config = NetworkConfig {
        isolation: raw.isolation.unwrap_or(defaults.isolation),
        egress: raw.egress.unwrap_or(defaults.egress),
        subnets,
        subnet_prefix,
        warm,
    };
    if problems.is_empty() { Ok(config) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_the_documented_defaults() {
        let network = validate(RawNetwork::default()).unwrap();
        assert_eq!(network, NetworkConfig::default());
        assert!(network.isolation && network.egress);
        assert_eq!(
            (network.subnets.to_string().as_str(), network.subnet_prefix, network.warm),
            ("10.210.0.0/16", 27, 8)
        );
    }

    #[test]
    fn a_range_that_is_not_a_network_is_refused_naming_its_key() {
        let raw = RawNetwork { subnets: Some("10.210.0.0".to_owned()), ..RawNetwork::default() };
        let problems = validate(raw).unwrap_err();
        assert_eq!(problems[0].0, "network.subnets");
        assert!(problems[0].1.contains("is not an IPv4 network"), "{problems:?}");
    }

    #[test]
    fn a_range_with_host_bits_is_refused_with_the_network_it_meant() {
        let raw = RawNetwork { subnets: Some("10.210.3.1/16".to_owned()), ..RawNetwork::default() };
        let problems = validate(raw).unwrap_err();
        assert_eq!(
            problems,
            vec![("network.subnets".to_owned(), "10.210.3.1/16 has host bits set; write 10.210.0.0/16".to_owned())]
        );
    }

    #[test]
    fn a_subnet_prefix_that_does_not_fit_the_range_is_refused() {
        for prefix in [16, 12, 30] {
            let raw = RawNetwork { subnet_prefix: Some(prefix), ..RawNetwork::default() };
            let problems = validate(raw).unwrap_err();
            assert_eq!(problems[0].0, "network.subnet_prefix", "/{prefix}");
        }
    }

    #[test]
    fn a_range_cut_into_more_than_65536_subnets_is_refused() {
        let raw =
            RawNetwork { subnets: Some("10.0.0.0/8".to_owned()), subnet_prefix: Some(27), ..RawNetwork::default() };
        let problems = validate(raw).unwrap_err();
        assert_eq!(problems[0].0, "network.subnet_prefix");
        assert!(problems[0].1.contains("at most /24"), "{problems:?}");
    }

    #[test]
    fn too_many_warm_networks_are_refused() {
        let raw = RawNetwork { warm: Some(33), ..RawNetwork::default() };
        assert_eq!(validate(raw).unwrap_err()[0].0, "network.warm");
    }
}
