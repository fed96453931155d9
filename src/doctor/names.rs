//! The DNS check: a name under `base_domain` that nobody configured by hand resolves (a
//! wildcard record), and to an address of this host.

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use super::Check;
use crate::config::Config;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn checks(config: &Config) -> Vec<Check> {
    let base = config.base_domain.to_string();
    let name = format!("doctor-{:08x}.{base}", rand::random::<u32>());
    if base == "localhost" || base.ends_with(".localhost") {
        return vec![Check::ok(
            "dns",
            format!("{name}: names under .localhost are loopback (RFC 6761); browsers on this host reach them"),
        )];
    }
    let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name.as_str(), 80))).await;
    let addresses: Vec<IpAddr> = match lookup {
        Ok(Ok(found)) => found.map(|addr| addr.ip()).collect(),
        Ok(Err(err)) => return vec![no_record(&name, &base, &err.to_string())],
        Err(_) => return vec![no_record(&name, &base, &format!("no answer within {LOOKUP_TIMEOUT:?}"))],
    };
    let listed = addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    vec![if addresses.iter().copied().any(is_local) {
        Check::ok("dns", format!("{name} resolves to {listed}, an address of this host"))
    } else {
        Check::warn(
            "dns",
            format!(
                "{name} resolves to {listed}, not an address of this host: fine behind a load balancer or NAT, \
                 otherwise point *.{base} at this host"
            ),
        )
    }]
}

fn no_record(name: &str, base: &str, why: &str) -> Check {
    Check::fail(
        "dns",
        format!("{name} does not resolve ({why}): add a wildcard DNS record *.{base} pointing at this host"),
    )
}

/// Whether this host has the address: only then can a socket be bound to it.
fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_an_address_of_this_host_and_a_documentation_address_is_not() {
        assert!(is_local(IpAddr::from([127, 0, 0, 1])));
        assert!(!is_local(IpAddr::from([192, 0, 2, 1])));
    }
}
