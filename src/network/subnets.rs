//! Which subnet a new preview network gets: one of `network.subnets` cut to
//! `network.subnet_prefix` that neither a network on the engine nor a route of the host overlaps.
//! Docker's own address pools hold about thirty networks, fewer than `limits.max_previews`, so
//! previewd picks subnets itself; Docker checks an explicit subnet against its own networks only,
//! so a bridge another engine left behind (or a VPN's route) would win the preview's traffic.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Free subnets of `range` at `prefix`, starting at the `start`-th one and wrapping around, so
/// that daemons sharing an engine (each starting somewhere else) rarely race for the same one.
/// Empty when `prefix` does not fit inside `range`.
pub fn free(range: Ipv4Net, prefix: u8, used: &[Ipv4Net], start: usize) -> impl Iterator<Item = Ipv4Net> + '_ {
    let all: Vec<Ipv4Net> = range.subnets(prefix).map(Iterator::collect).unwrap_or_default();
    let count = all.len();
    (0..count)
        .map(move |offset| all[(start % count.max(1) + offset) % count])
        .filter(move |candidate| !used.iter().any(|net| overlaps(net, candidate)))
}

/// The networks the host routes to directly or through a gateway, from `/proc/net/route`,
/// without the default route (it overlaps everything).
pub fn host_routes() -> Vec<Ipv4Net> {
    std::fs::read_to_string("/proc/net/route").map(|table| parse_routes(&table)).unwrap_or_default()
}

/// `/proc/net/route`: a header, then per route the interface, destination, gateway, flags, … and
/// mask, addresses in hex in the kernel's (little-endian) byte order.
fn parse_routes(table: &str) -> Vec<Ipv4Net> {
    let address = |hex: &str| u32::from_str_radix(hex, 16).ok().map(|raw| Ipv4Addr::from(raw.swap_bytes()));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (destination, mask) = (address(fields.get(1)?)?, address(fields.get(7)?)?);
            let prefix = u8::try_from(u32::from(mask).leading_ones()).ok()?;
            (prefix > 0).then(|| Ipv4Net::new(destination, prefix).ok()).flatten()
        })
        .collect()
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    #[test]
    fn the_first_subnet_is_handed_out_when_nothing_is_used() {
        let first = free(net("10.210.0.0/16"), 27, &[], 0).next();
        assert_eq!(first, Some(net("10.210.0.0/27")));
    }

    #[test]
    fn subnets_in_use_or_overlapping_one_in_use_are_skipped() {
        let used = [net("10.210.0.0/27"), net("10.210.0.32/28"), net("10.210.0.64/26")];
        let next: Vec<_> = free(net("10.210.0.0/16"), 27, &used, 0).take(2).collect();
        assert_eq!(next, vec![net("10.210.0.128/27"), net("10.210.0.160/27")]);
    }

    #[test]
    fn a_network_that_covers_the_whole_range_leaves_nothing() {
        assert_eq!(free(net("10.210.0.0/16"), 27, &[net("10.0.0.0/8")], 5).count(), 0);
    }

    #[test]
    fn the_search_starts_where_asked_and_wraps_around() {
        let range = net("10.210.0.0/24");
        let all: Vec<_> = free(range, 26, &[], 3).collect();
        assert_eq!(
            all,
            vec![net("10.210.0.192/26"), net("10.210.0.0/26"), net("10.210.0.64/26"), net("10.210.0.128/26")]
        );
        assert_eq!(free(range, 26, &[], 7).next(), Some(net("10.210.0.192/26")));
    }

    #[test]
    fn host_routes_are_read_from_the_kernels_table_without_the_default_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            pv-681d1601fbe\t6000D20A\t00000000\t0001\t0\t0\t0\tE0FFFFFF\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_routes(table), vec![net("10.210.0.96/27"), net("192.0.2.0/24")]);
    }

    #[test]
    fn a_prefix_that_does_not_fit_gives_nothing() {
        assert_eq!(free(net("10.210.0.0/24"), 16, &[], 0).count(), 0);
    }
}
