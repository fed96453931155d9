//! Which subnet a new preview network gets: one of `network.subnets` cut to
//! `network.subnet_prefix` that no network on the engine overlaps. Docker's own address pools
//! hold about thirty networks, fewer than `limits.max_previews`, so previewd picks subnets itself.

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
    fn a_prefix_that_does_not_fit_gives_nothing() {
        assert_eq!(free(net("10.210.0.0/24"), 16, &[], 0).count(), 0);
    }
}
