//! Consistent hashing with a weighted Maglev table (Eisenbud et al., NSDI 2016).
//!
//! **Key.** [`request_key`] hashes (xxh3, fixed seed [`KEY_SEED`]) the value of a header, a
//! cookie (parsed from every `Cookie` header), a query argument (raw, not percent-decoded), the
//! client IP (IPv4-mapped IPv6 is hashed as the IPv4 address), or the path. A request without the
//! key (missing or empty value) has `ctx.key == None` and is balanced by an internal smooth
//! weighted round robin instead; the proxy, which knows `hash_on` is set, counts that
//! (`edge_agent_chash_fallback_total`).
//!
//! **Table.** Built once per snapshot, off the request path, from *all* endpoints with a weight,
//! healthy or not, so health flaps never rebuild it. Its size M is a prime from a few fixed
//! tiers, [`TABLE_SIZES`], the first with at least [`TABLE_FACTOR`] (100) slots per endpoint:
//! 65,537 for N ≤ 655, 262,147 for N ≤ 2,621, 1,048,583 for N ≤ 10,485, else 4,194,319. M must
//! not follow N closely: a key's slot is `key % M`, so a change of M remaps nearly every key;
//! with tiers that happens only when an upstream crosses one (Envoy likewise fixes M at 65,537).
//! Slots hold `u16` indices while N fits (128 KiB at the first tier), `u32` past that. A build
//! for 1,000 endpoints takes a few milliseconds. Each endpoint walks its own permutation of the slots (offset and skip from the xxh3 of its
//! address) and claims the next free slot when its turn comes; turns are handed out in
//! proportion to weight, so shares follow weights to within about N/M. Turn order is by
//! address, not by position in the snapshot, so the same set always gives the same table, and
//! an endpoint's identity is its address, so an instance re-registering under a new id at the
//! same address keeps its keys. Removing one of N endpoints remaps about 1/N of the keys (plus a
//! little Maglev churn, measured in the tests).
//!
//! **Pick.** Slot `key % M` names the endpoint. If it is unusable ([`Endpoint::usable`]) or
//! already tried, the key is rehashed and the next slot looked up, up to [`MAX_PROBES`] times, so
//! a down endpoint's keys spread over the others and every other key stays where it was (a flap
//! moves only that endpoint's keys). If every probe misses (most endpoints down or tried) a scan
//! from a key-derived position finds any usable endpoint left.
use std::net::IpAddr;

use http::{header, HeaderMap, Uri};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{mix64, roundrobin, Balancer, Kind, Options, PickContext, Settings, Tried};
use crate::endpoint::Endpoint;

/// `balancer = "chash"`: reads `hash_on` (default `ip`).
pub const KIND: Kind = Kind {
    name: "chash",
    options: &["hash_on"],
    settings: |o: &Options| {
        let hash_on = match o.hash_on {
            Some(h) => HashOn::parse(h).map_err(|e| format!("hash_on = {h:?}: {e}"))?,
            None => HashOn::Ip,
        };
        Ok(std::sync::Arc::new(ChashSettings { hash_on }))
    },
};

/// The `chash` balancer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChashSettings {
    pub hash_on: HashOn,
}

impl Settings for ChashSettings {
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Balancer> {
        Box::new(ConsistentHash::new(endpoints))
    }

    fn key(&self, headers: &HeaderMap, uri: &Uri, ip: IpAddr) -> Option<Option<u64>> {
        Some(request_key(&self.hash_on, headers, uri, ip))
    }
}

/// Where `chash` takes its key from (APISIX's `hash_on` choices).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
    Arg(String),
    Ip,
    Path,
}

impl HashOn {
    /// `header:<name>`, `cookie:<name>`, `arg:<name>`, `ip` or `path`.
    pub fn parse(s: &str) -> Result<HashOn, String> {
        let s = s.trim();
        let (kind, name) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n.trim())),
            None => (s, None),
        };
        match (kind, name) {
            ("ip", None) => Ok(HashOn::Ip),
            ("path", None) => Ok(HashOn::Path),
            ("header", Some(n)) if !n.is_empty() => http::HeaderName::try_from(n)
                .map(HashOn::Header)
                .map_err(|_| format!("{n:?} is not a header name")),
            ("cookie", Some(n)) if !n.is_empty() => Ok(HashOn::Cookie(n.to_string())),
            ("arg", Some(n)) if !n.is_empty() => Ok(HashOn::Arg(n.to_string())),
            _ => Err("expected header:<name>, cookie:<name>, arg:<name>, ip or path".into()),
        }
    }
}

/// Seed of the request-key hash. Fixed, so every agent (and every restart) maps a key alike.
pub const KEY_SEED: u64 = 0x6564_6765_2d6b_6579;
/// Seeds of an endpoint's permutation (offset, skip).
const OFFSET_SEED: u64 = 0x6d61_676c_6576_2d6f;
const SKIP_SEED: u64 = 0x6d61_676c_6576_2d73;
/// Table slots per endpoint at least (while a tier allows); the Maglev paper's ≥ 100 keeps
/// shares within about 1% and the churn of a membership change small.
pub const TABLE_FACTOR: usize = 100;
/// Table sizes: the smallest primes above 2^16, 2^18, 2^20 and 2^22. Past 41,943 endpoints the
/// last tier gives fewer than [`TABLE_FACTOR`] slots each.
pub const TABLE_SIZES: [usize; 4] = [65_537, 262_147, 1_048_583, 4_194_319];
/// Rehashes of a key before falling back to a scan.
pub const MAX_PROBES: u64 = 16;

/// The hash of the request's balancing key, or `None` when the request lacks it.
pub fn request_key(on: &HashOn, headers: &HeaderMap, uri: &Uri, ip: IpAddr) -> Option<u64> {
    let hash = |b: &[u8]| xxh3_64_with_seed(b, KEY_SEED);
    let non_empty = |b: &[u8]| (!b.is_empty()).then(|| hash(b));
    match on {
        HashOn::Header(name) => headers.get(name).and_then(|v| non_empty(v.as_bytes())),
        HashOn::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .find_map(|v| cookie(v.as_bytes(), name.as_bytes()))
            .and_then(non_empty),
        HashOn::Arg(name) => uri
            .query()
            .and_then(|q| query_arg(q, name))
            .and_then(|v| non_empty(v.as_bytes())),
        HashOn::Ip => Some(match ip.to_canonical() {
            IpAddr::V4(v4) => hash(&v4.octets()),
            IpAddr::V6(v6) => hash(&v6.octets()),
        }),
        HashOn::Path => Some(hash(uri.path().as_bytes())),
    }
}

/// The value of cookie `name` in one `Cookie` header (`a=1; b=2`).
fn cookie<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name).then(|| pair[eq + 1..].trim_ascii())
    })
}

/// The raw value of the first query argument `name` (`a=1&b=2`; `a` alone has value "").
fn query_arg<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((n, v)) if n == name => Some(v),
            None if pair == name => Some(""),
            _ => None,
        })
}

/// Slot → index into the snapshot's endpoints; narrow while the indices fit.
enum Table {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Table {
    fn len(&self) -> usize {
        match self {
            Table::Narrow(t) => t.len(),
            Table::Wide(t) => t.len(),
        }
    }

    fn get(&self, slot: usize) -> usize {
        match self {
            Table::Narrow(t) => usize::from(t[slot]),
            Table::Wide(t) => t[slot] as usize,
        }
    }
}

pub struct ConsistentHash {
    /// Empty when no endpoint has a weight.
    table: Table,
    /// For requests without a key.
    fallback: Box<dyn Balancer>,
}

impl ConsistentHash {
    pub fn new(endpoints: &[Endpoint]) -> Self {
        let wide = maglev(endpoints);
        let table = if endpoints.len() <= usize::from(u16::MAX) {
            Table::Narrow(wide.iter().map(|&i| i as u16).collect())
        } else {
            Table::Wide(wide.into_boxed_slice())
        };
        ConsistentHash {
            table,
            fallback: roundrobin::build(endpoints),
        }
    }

    /// The table size (for tests and diagnostics).
    pub fn table_size(&self) -> usize {
        self.table.len()
    }
}

/// Table size for `n` weighted endpoints: the first tier of [`TABLE_SIZES`] with
/// [`TABLE_FACTOR`] slots each, else the last.
pub fn table_size(n: usize) -> usize {
    TABLE_SIZES
        .into_iter()
        .find(|&m| m >= n.saturating_mul(TABLE_FACTOR))
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

/// Builds the weighted Maglev table.
fn maglev(endpoints: &[Endpoint]) -> Vec<u32> {
    struct Walker {
        index: u32,
        weight: u128,
        pos: usize,
        skip: usize,
    }
    let mut live: Vec<(&str, u32, u32)> = endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.weight > 0)
        .map(|(i, e)| (e.authority.as_str(), e.weight, i as u32))
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    live.sort_unstable();
    let n = live.len();
    let m = table_size(n);
    let mut walkers: Vec<Walker> = live
        .iter()
        .map(|(addr, weight, index)| Walker {
            index: *index,
            weight: u128::from(*weight),
            pos: (xxh3_64_with_seed(addr.as_bytes(), OFFSET_SEED) % m as u64) as usize,
            skip: (xxh3_64_with_seed(addr.as_bytes(), SKIP_SEED) % (m as u64 - 1)) as usize + 1,
        })
        .collect();
    // In round r an endpoint has had floor(r × weight × n / total) turns in all: one turn per
    // round at the mean weight, so a round costs O(n) and the build about M / n rounds.
    let total: u128 = walkers.iter().map(|w| w.weight).sum();
    let n128 = n as u128;
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    let mut round: u128 = 0;
    while filled < m {
        round += 1;
        for w in &mut walkers {
            let due = round * w.weight * n128 / total - (round - 1) * w.weight * n128 / total;
            for _ in 0..due {
                // The permutation visits every slot (M prime, 0 < skip < M): this ends.
                while table[w.pos] != u32::MAX {
                    w.pos += w.skip;
                    if w.pos >= m {
                        w.pos -= m;
                    }
                }
                table[w.pos] = w.index;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
    table
}

impl Balancer for ConsistentHash {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        let Some(key) = ctx.key else {
            return self.fallback.next(endpoints, ctx, tried);
        };
        let ok = |i: usize| !tried.contains(i) && endpoints.get(i).is_some_and(|e| ctx.usable(e));
        let m = self.table.len() as u64;
        if m == 0 {
            return None;
        }
        for probe in 0..MAX_PROBES {
            let h = if probe == 0 {
                key
            } else {
                mix64(key.wrapping_add(probe.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            };
            let i = self.table.get((h % m) as usize);
            if ok(i) {
                return Some(i);
            }
        }
        let n = endpoints.len();
        let start = (mix64(key) % n as u64) as usize;
        (0..n).map(|s| (start + s) % n).find(|&i| ok(i))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Instant;

    use super::super::testing::{ctx, endpoints};
    use super::super::Candidates;
    use super::*;

    fn keyed(key: u64) -> PickContext<'static> {
        PickContext {
            key: Some(key),
            ..ctx()
        }
    }

    fn keys(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|k| xxh3_64_with_seed(&k.to_le_bytes(), 1))
    }

    /// Key → address of the endpoint it lands on.
    fn assignment(eps: &[Endpoint], nkeys: u64) -> HashMap<u64, String> {
        let b = ConsistentHash::new(eps);
        keys(nkeys)
            .map(|k| {
                let i = b.next(eps, &keyed(k), &Tried::default()).unwrap();
                (k, eps[i].authority.to_string())
            })
            .collect()
    }

    /// Removes each of `tries` endpoints of `n` in turn (and reverses the snapshot order);
    /// returns the mean and the largest share of keys remapped, and the largest share of keys
    /// not on the removed endpoint that moved anyway (Maglev churn).
    fn remap_on_removal(n: usize, tries: usize) -> (f64, f64, f64) {
        let all = endpoints(&vec![1; n]);
        let before = assignment(&all, 10_000);
        let (mut sum, mut max, mut churn) = (0.0, 0.0f64, 0.0f64);
        for t in 0..tries {
            let gone = t * n / tries;
            let removed = all[gone].authority.to_string();
            let mut fewer = all.clone();
            fewer.remove(gone);
            // The table must not depend on snapshot order.
            fewer.reverse();
            let after = assignment(&fewer, 10_000);
            let moved = before.iter().filter(|(k, a)| after[*k] != **a).count();
            let others = before.values().filter(|a| **a != removed).count();
            let others_moved = before
                .iter()
                .filter(|(k, a)| **a != removed && after[*k] != **a)
                .count();
            let moved = moved as f64 / 10_000.0;
            sum += moved;
            max = max.max(moved);
            churn = churn.max(others_moved as f64 / others as f64);
        }
        (sum / tries as f64, max, churn)
    }

    #[test]
    fn removing_one_of_10_remaps_about_a_tenth() {
        let (mean, max, churn) = remap_on_removal(10, 5);
        eprintln!(
            "chash N=10 remove one: {mean:.4} remapped (max {max:.4}), others moved ≤ {churn:.4}"
        );
        assert!(max < 1.5 / 10.0, "{max}");
        assert!(churn < 0.01, "{churn}");
    }

    #[test]
    fn removing_one_of_100_remaps_about_a_hundredth() {
        let (mean, max, churn) = remap_on_removal(100, 5);
        eprintln!(
            "chash N=100 remove one: {mean:.4} remapped (max {max:.4}), others moved ≤ {churn:.4}"
        );
        // About 1/N from the removed endpoint plus Maglev's churn at 655 slots per endpoint.
        assert!(max < 2.0 / 100.0, "{max}");
        assert!(churn < 0.01, "{churn}");
    }

    #[test]
    fn a_health_flap_moves_only_that_endpoints_keys() {
        let mut eps = endpoints(&[1; 10]);
        let b = ConsistentHash::new(&eps);
        let pick = |eps: &[Endpoint], k| b.next(eps, &keyed(k), &Tried::default()).unwrap();
        let before: Vec<usize> = keys(10_000).map(|k| pick(&eps, k)).collect();
        eps[3].healthy = false;
        let during: Vec<usize> = keys(10_000).map(|k| pick(&eps, k)).collect();
        let mut others_moved = 0;
        let mut spread = [0usize; 10];
        for (b, d) in before.iter().zip(&during) {
            assert_ne!(*d, 3);
            if *b == 3 {
                spread[*d] += 1;
            } else if b != d {
                others_moved += 1;
            }
        }
        assert_eq!(others_moved, 0);
        eprintln!("chash flap: endpoint 3's keys went to {spread:?}");
        // Its keys spread over all the others rather than piling onto a neighbour.
        let most = *spread.iter().max().unwrap() as f64;
        let total: usize = spread.iter().sum();
        assert!(most < 0.25 * total as f64, "{spread:?}");
        eps[3].healthy = true;
        let after: Vec<usize> = keys(10_000).map(|k| pick(&eps, k)).collect();
        assert_eq!(before, after, "keys return when it recovers");
    }

    #[test]
    fn shares_follow_weights() {
        let eps = endpoints(&[1, 2, 3]);
        let b = ConsistentHash::new(&eps);
        let mut counts = [0usize; 3];
        for k in keys(60_000) {
            counts[b.next(&eps, &keyed(k), &Tried::default()).unwrap()] += 1;
        }
        let s: Vec<f64> = counts.iter().map(|&c| c as f64 / 60_000.0).collect();
        eprintln!("chash 1:2:3 over 60,000 keys: {s:?}");
        for (share, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((share - want).abs() < 0.015, "{s:?}");
        }
        // Slots too.
        let mut slots = [0usize; 3];
        for s in 0..b.table_size() {
            slots[b.table.get(s)] += 1;
        }
        assert_eq!(slots.iter().sum::<usize>(), b.table_size());
        assert!(
            (slots[2] as f64 / slots[0] as f64 - 3.0).abs() < 0.1,
            "{slots:?}"
        );
    }

    #[test]
    fn table_sizes_and_build_time_for_1000() {
        assert_eq!(table_size(1), 65_537);
        assert_eq!(table_size(655), 65_537);
        assert_eq!(table_size(656), 262_147);
        assert_eq!(table_size(1_000), 262_147);
        assert_eq!(table_size(100_000), 4_194_319);
        for m in TABLE_SIZES {
            assert!(
                (2..).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} prime"
            );
        }
        let eps: Vec<Endpoint> = (0..1_000u32)
            .map(|i| {
                let mut inst =
                    discovery::Instance::new(format!("10.0.{}.{}", i / 250, i % 250), 8080);
                inst.weight = 1 + (i % 7) * 100;
                Endpoint::from_instance(&inst, "file", Default::default()).unwrap()
            })
            .collect();
        let t = Instant::now();
        let b = ConsistentHash::new(&eps);
        let took = t.elapsed();
        let t = Instant::now();
        let table = maglev(&eps);
        let table_took = t.elapsed();
        assert_eq!(table.len(), 262_147);
        eprintln!(
            "chash build for 1,000 weighted endpoints: {took:?}, of which the Maglev table \
             {table_took:?} (debug build)"
        );
        assert_eq!(b.table_size(), 262_147);
        assert!((0..b.table_size()).all(|s| b.table.get(s) < eps.len()));
        // The table; the whole build adds the keyless fallback's smooth WRR schedule.
        assert!(table_took.as_millis() < 2_000, "{table_took:?}");
    }

    #[test]
    fn zero_weight_and_no_key() {
        let eps = endpoints(&[0, 0]);
        let b = ConsistentHash::new(&eps);
        assert_eq!(b.next(&eps, &keyed(1), &Tried::default()), None);
        assert_eq!(b.next(&eps, &ctx(), &Tried::default()), None);
        // Without a key: round robin by weight.
        let eps = endpoints(&[1, 0, 2]);
        let b = ConsistentHash::new(&eps);
        let p: Vec<usize> = (0..6)
            .map(|_| b.next(&eps, &ctx(), &Tried::default()).unwrap())
            .collect();
        assert_eq!(p.iter().filter(|&&i| i == 2).count(), 4, "{p:?}");
        assert_eq!(p.iter().filter(|&&i| i == 0).count(), 2, "{p:?}");
    }

    #[test]
    fn retries_walk_on_and_cover_each_usable_once() {
        let mut eps = endpoints(&[1, 2, 3, 1, 1, 1]);
        eps[4].healthy = false;
        let b = ConsistentHash::new(&eps);
        for k in keys(200) {
            let order: Vec<usize> = Candidates::new(&b, &eps, keyed(k))
                .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                .collect();
            let first = b.next(&eps, &keyed(k), &Tried::default()).unwrap();
            assert_eq!(order[0], first, "the first candidate is the key's endpoint");
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 5]);
            // Deterministic: the same key retries in the same order.
            let again: Vec<usize> = Candidates::new(&b, &eps, keyed(k))
                .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                .collect();
            assert_eq!(order, again);
        }
    }

    #[test]
    fn most_down_still_finds_the_last_one() {
        let mut eps = endpoints(&[1; 50]);
        for e in eps.iter_mut().skip(1) {
            e.healthy = false;
        }
        let b = ConsistentHash::new(&eps);
        for k in keys(100) {
            assert_eq!(b.next(&eps, &keyed(k), &Tried::default()), Some(0));
        }
    }

    fn key_of(on: &str, headers: &[(&str, &str)], uri: &str, ip: &str) -> Option<u64> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::try_from(*k).unwrap(),
                http::HeaderValue::try_from(*v).unwrap(),
            );
        }
        request_key(
            &HashOn::parse(on).unwrap(),
            &h,
            &uri.parse().unwrap(),
            ip.parse().unwrap(),
        )
    }

    #[test]
    fn request_keys() {
        let ip = "10.1.2.3";
        let v = |s: &str| Some(xxh3_64_with_seed(s.as_bytes(), KEY_SEED));
        // Header.
        assert_eq!(
            key_of("header:x-user", &[("x-user", "alice")], "/", ip),
            v("alice")
        );
        assert_eq!(
            key_of("header:x-user", &[("X-User", "alice")], "/", ip),
            v("alice")
        );
        assert_eq!(key_of("header:x-user", &[], "/", ip), None);
        assert_eq!(key_of("header:x-user", &[("x-user", "")], "/", ip), None);
        // Cookie, across several Cookie headers, with spaces.
        let c = [("cookie", "a=1; sid=xyz ;b=2")];
        assert_eq!(key_of("cookie:sid", &c, "/", ip), v("xyz"));
        let c2 = [("cookie", "a=1"), ("cookie", "sid=q")];
        assert_eq!(key_of("cookie:sid", &c2, "/", ip), v("q"));
        assert_eq!(
            key_of("cookie:sid", &[("cookie", "sidx=1; xsid=2")], "/", ip),
            None
        );
        assert_eq!(key_of("cookie:sid", &[], "/", ip), None);
        // Query argument.
        assert_eq!(key_of("arg:u", &[], "/p?a=1&u=bob&u=eve", ip), v("bob"));
        assert_eq!(key_of("arg:u", &[], "/p?uu=1", ip), None);
        assert_eq!(key_of("arg:u", &[], "/p?u", ip), None);
        assert_eq!(key_of("arg:u", &[], "/p", ip), None);
        // Path, without the query.
        assert_eq!(key_of("path", &[], "/a/b?x=1", ip), v("/a/b"));
        // Client IP: bytes; IPv4-mapped IPv6 is the IPv4 address.
        let v4 = Some(xxh3_64_with_seed(&[10, 1, 2, 3], KEY_SEED));
        assert_eq!(key_of("ip", &[], "/", ip), v4);
        assert_eq!(key_of("ip", &[], "/", "::ffff:10.1.2.3"), v4);
        assert_ne!(key_of("ip", &[], "/", "2001:db8::1"), v4);
    }
}
