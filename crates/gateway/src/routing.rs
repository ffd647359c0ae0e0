//! Pure routing decisions: which service a host names, which revision gets a request, which
//! instance takes it. No I/O, no clock, no randomness of their own: callers pass the roll.

use std::borrow::Cow;

use ferry_api::gateway::TrafficTarget;

/// The service named by a `Host` (or `:authority`) value: `<service>.<domain>[:port]`,
/// compared case-insensitively, lowercased (borrowed when it already is). `None` when the
/// host is not under `domain`.
pub fn service_from_host<'a>(host: &'a str, domain: &str) -> Option<Cow<'a, str>> {
    let host = strip_port(host.trim()).trim_end_matches('.');
    let domain = domain.trim().trim_end_matches('.');
    if host.len() <= domain.len() + 1 {
        return None;
    }
    let (name, rest) = host.split_at(host.len() - domain.len() - 1);
    let rest = rest.strip_prefix('.')?;
    if !rest.eq_ignore_ascii_case(domain) || name.is_empty() || name.contains('.') {
        return None;
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(name))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: never a service host, keep it whole.
        return host;
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Weighted choice among traffic targets; `roll` is uniform in `0..100` (or `0..sum` when the
/// percentages do not add up to 100). `None` when no target has any weight.
pub fn pick_revision(traffic: &[TrafficTarget], roll: u32) -> Option<&str> {
    let total: u32 = traffic.iter().map(|t| u32::from(t.percent)).sum();
    if total == 0 {
        return None;
    }
    let mut roll = roll % total;
    for t in traffic {
        let p = u32::from(t.percent);
        if roll < p {
            return Some(&t.revision);
        }
        roll -= p;
    }
    None
}

/// Sum of the traffic weights (the range of `roll` for [`pick_revision`]).
pub fn traffic_total(traffic: &[TrafficTarget]) -> u32 {
    traffic.iter().map(|t| u32::from(t.percent)).sum()
}

/// Least outstanding requests among instances with room (`concurrency` 0 = unlimited),
/// skipping `exclude`. Ties are broken by `roll` so load spreads evenly.
pub fn pick_instance(
    in_flight: &[u32],
    concurrency: u32,
    exclude: Option<usize>,
    roll: usize,
) -> Option<usize> {
    let candidates = in_flight
        .iter()
        .enumerate()
        .filter(|&(i, &n)| Some(i) != exclude && (concurrency == 0 || n < concurrency));
    let min = candidates.clone().map(|(_, &n)| n).min()?;
    let tied: Vec<usize> = candidates
        .filter(|&(_, &n)| n == min)
        .map(|(i, _)| i)
        .collect();
    Some(tied[roll % tied.len()])
}

/// Requests the instances can still take (`usize::MAX` when unlimited), skipping `exclude`.
pub fn free_slots(in_flight: &[u32], concurrency: u32, exclude: Option<usize>) -> usize {
    let mut free = 0usize;
    for (i, &n) in in_flight.iter().enumerate() {
        if Some(i) == exclude {
            continue;
        }
        if concurrency == 0 {
            return usize::MAX;
        }
        free += concurrency.saturating_sub(n) as usize;
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tt(r: &str, p: u8) -> TrafficTarget {
        TrafficTarget {
            revision: r.into(),
            percent: p,
        }
    }

    #[test]
    fn host_parsing() {
        assert_eq!(
            service_from_host("hello.localhost", "localhost").as_deref(),
            Some("hello")
        );
        assert_eq!(
            service_from_host("Hello.LocalHost:8080", "localhost").as_deref(),
            Some("hello")
        );
        assert_eq!(service_from_host("localhost", "localhost"), None);
        assert_eq!(service_from_host(".localhost", "localhost"), None);
        assert_eq!(service_from_host("a.b.localhost", "localhost"), None);
        assert_eq!(service_from_host("hello.example.com", "localhost"), None);
        assert_eq!(service_from_host("hellolocalhost", "localhost"), None);
        assert_eq!(
            service_from_host("x.apps.example.com", "apps.example.com").as_deref(),
            Some("x")
        );
        assert_eq!(service_from_host("[::1]:80", "localhost"), None);
    }

    #[test]
    fn revision_split() {
        let t = vec![tt("a", 90), tt("b", 10)];
        assert_eq!(pick_revision(&t, 0), Some("a"));
        assert_eq!(pick_revision(&t, 89), Some("a"));
        assert_eq!(pick_revision(&t, 90), Some("b"));
        assert_eq!(pick_revision(&t, 99), Some("b"));
        assert_eq!(pick_revision(&[tt("a", 0)], 5), None);
        assert_eq!(pick_revision(&[], 5), None);
    }

    #[test]
    fn instance_choice() {
        assert_eq!(pick_instance(&[3, 1, 2], 0, None, 0), Some(1));
        assert_eq!(pick_instance(&[1, 1], 1, None, 0), None);
        assert_eq!(pick_instance(&[0, 1], 1, Some(0), 0), None);
        assert_eq!(pick_instance(&[0, 0], 1, Some(0), 7), Some(1));
        assert_eq!(pick_instance(&[], 0, None, 0), None);
        assert_eq!(free_slots(&[0, 1, 2], 2, None), 3);
        assert_eq!(free_slots(&[0, 1, 2], 2, Some(0)), 1);
        assert_eq!(free_slots(&[5], 0, None), usize::MAX);
        assert_eq!(free_slots(&[], 0, None), 0);
    }

    proptest! {
        #[test]
        fn split_counts_follow_percentages(a in 0u8..=100, roll in 0u32..1000) {
            let t = vec![tt("a", a), tt("b", 100 - a)];
            let got = pick_revision(&t, roll).unwrap();
            let expect = if roll % 100 < u32::from(a) { "a" } else { "b" };
            prop_assert_eq!(got, expect);
        }

        #[test]
        fn chosen_instance_has_room_and_is_least_loaded(
            loads in proptest::collection::vec(0u32..5, 0..8),
            cc in 0u32..4,
            roll in 0usize..100,
        ) {
            match pick_instance(&loads, cc, None, roll) {
                Some(i) => {
                    prop_assert!(cc == 0 || loads[i] < cc);
                    let min = loads.iter().filter(|&&n| cc == 0 || n < cc).min().unwrap();
                    prop_assert_eq!(loads[i], *min);
                }
                None => prop_assert!(loads.iter().all(|&n| cc != 0 && n >= cc)),
            }
        }
    }
}
