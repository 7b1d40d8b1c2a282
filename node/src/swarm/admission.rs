//! Origin admission: the seed serves a chunk only when no peer can.
//!
//! As BitTorrent's super-seeding, the seed answers a chunk request with "get it from these
//! peers" when a peer already holds that chunk, or when the seed sent it recently to a peer that
//! will soon hold it. A request that says it tried those peers and failed is served. Peers in
//! the asker's site come first, so a site pulls a chunk across its WAN link about once; an
//! asker sent out of its site (no peer of its site holds the chunk yet) counts as soon holding
//! it too, so the next askers of its site are sent to it rather than across the link again.
//!
//! Owns: the decision and the memory of recent serves. Does not own: who holds what (the
//! tracker answers that and passes it in), or time (callers pass `now`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pkgmesh_protocol::blob::BlobId;

/// How long a chunk the seed sent counts as "soon held" by its receiver. When a whole fleet
/// asks at once, the seed's first copy of every chunk goes out in one burst (8.6 s for 1 GiB
/// at 1 Gbit/s), and each receiver takes it in behind its own downloads: 10 s was too short,
/// redirects expired and the seed served chunks again (origin 1.39x in a 500-node simulation,
/// 1.0x with 30 s). A receiver that died is still not waited on for long.
pub const DEFAULT_RECENT_WINDOW: Duration = Duration::from_secs(30);
/// Peers named in one redirect; more gives the asker choice, fewer keeps replies small.
pub const MAX_REDIRECT_PEERS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send the chunk from the seed.
    Serve,
    /// Ask these nodes (names, best first) instead.
    Redirect(Vec<String>),
}

/// One request for a chunk, as the seed sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChunkAsk<'a> {
    pub blob: BlobId,
    pub index: u32,
    /// The asking node's certificate name, and the site it announced.
    pub asker: &'a str,
    pub asker_site: &'a str,
    /// The asker tried the peers it was sent to and they failed.
    pub after_peer_failure: bool,
}

/// A node that holds the chunk, as the tracker knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub site: String,
}

#[derive(Debug, Clone)]
struct RecentServe {
    node: String,
    site: String,
    at: Instant,
}

/// Counters for the operator: how often the seed served and how often it redirected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    pub served: u64,
    pub served_after_peer_failure: u64,
    pub redirected: u64,
}

pub struct Admission {
    window: Duration,
    recent: HashMap<(BlobId, u32), Vec<RecentServe>>,
    stats: AdmissionStats,
    decisions_since_prune: u32,
}

impl Admission {
    pub fn new(window: Duration) -> Self {
        Admission {
            window,
            recent: HashMap::new(),
            stats: AdmissionStats::default(),
            decisions_since_prune: 0,
        }
    }

    pub fn stats(&self) -> AdmissionStats {
        self.stats
    }

    /// Decides one request. `holders` are the nodes the tracker says hold the chunk (the asker
    /// may be among them).
    ///
    /// A node the seed served recently counts as a holder only if `reachable` says the asker can
    /// be told how to reach it (the tracker knows its address); otherwise a redirect to it would
    /// be a dead end.
    pub fn decide(
        &mut self,
        ask: &ChunkAsk<'_>,
        holders: &[Holder],
        reachable: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Decision {
        let ChunkAsk {
            blob,
            index,
            asker,
            asker_site,
            after_peer_failure,
        } = *ask;
        self.prune_now_and_then(now);
        if after_peer_failure {
            self.stats.served_after_peer_failure += 1;
            self.record(blob, index, asker, asker_site, now);
            return Decision::Serve;
        }
        let window = self.window;
        let recent: Vec<&RecentServe> = self
            .recent
            .get(&(blob, index))
            .map(|list| {
                list.iter()
                    .filter(|r| r.node != asker && now.duration_since(r.at) < window)
                    .filter(|r| reachable(&r.node))
                    .collect()
            })
            .unwrap_or_default();
        // Holders before nodes that will hold it soon, the asker's site before others; within
        // each group a pick of its own for every asker, so that thousands asking for one chunk
        // at once are spread over all its holders, not sent to the tracker's first few.
        let pick = ask_key(asker, index);
        let mut peers: Vec<&str> = Vec::with_capacity(MAX_REDIRECT_PEERS);
        let mut same_site_seen = false;
        let mut other_site_seen = false;
        for local in [true, false] {
            let mut held: Vec<&str> = holders
                .iter()
                .filter(|h| h.node != asker && (h.site == asker_site) == local)
                .map(|h| h.node.as_str())
                .collect();
            let mut soon: Vec<&str> = recent
                .iter()
                .filter(|r| (r.site == asker_site) == local && !held.contains(&r.node.as_str()))
                .map(|r| r.node.as_str())
                .collect();
            let seen = !held.is_empty() || !soon.is_empty();
            if local {
                same_site_seen = seen;
            } else {
                other_site_seen = seen;
            }
            for group in [&mut held, &mut soon] {
                let room = MAX_REDIRECT_PEERS - peers.len();
                spread(group, room, pick);
                peers.extend(group.iter().take(room));
            }
        }
        let peers: Vec<String> = peers.into_iter().map(str::to_string).collect();
        let crosses_wan = !same_site_seen && other_site_seen;
        if crosses_wan {
            // The asker will hold it in a moment, and is the first of its site to: the next
            // askers of its site are sent to it rather than across their WAN link too.
            self.record(blob, index, asker, asker_site, now);
        }
        if peers.is_empty() {
            self.record(blob, index, asker, asker_site, now);
            self.stats.served += 1;
            return Decision::Serve;
        }
        self.stats.redirected += 1;
        Decision::Redirect(peers)
    }

    fn record(&mut self, blob: BlobId, index: u32, node: &str, site: &str, now: Instant) {
        let list = self.recent.entry((blob, index)).or_default();
        list.retain(|r| r.node != node);
        list.push(RecentServe {
            node: node.to_string(),
            site: site.to_string(),
            at: now,
        });
    }

    /// Keeps memory bounded by the chunks served within one window.
    fn prune_now_and_then(&mut self, now: Instant) {
        self.decisions_since_prune += 1;
        if self.decisions_since_prune < 1024 {
            return;
        }
        self.decisions_since_prune = 0;
        let window = self.window;
        self.recent.retain(|_, list| {
            list.retain(|r| now.duration_since(r.at) < window);
            !list.is_empty()
        });
    }

    /// Chunks with a serve still inside the window (for tests and metrics).
    pub fn remembered(&self) -> usize {
        self.recent.len()
    }
}

/// A number of its own for one asker and chunk (FNV-1a, then a mixer): stable across runs, so
/// the seed's answers are reproducible, and different for every asker.
fn ask_key(asker: &str, index: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in asker.bytes().chain(index.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Moves a pick of `wanted` entries, chosen by `key`, to the front of `list` (a partial
/// Fisher-Yates shuffle: as many steps as entries wanted, whatever the list's length).
fn spread(list: &mut [&str], wanted: usize, key: u64) {
    let mut state = key;
    for i in 0..wanted.min(list.len()) {
        state = mix(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
        let j = i + (state % (list.len() - i) as u64) as usize;
        list.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    const BLOB: BlobId = BlobId([3; 32]);

    fn ask<'a>(
        blob: BlobId,
        index: u32,
        asker: &'a str,
        asker_site: &'a str,
        after_peer_failure: bool,
    ) -> ChunkAsk<'a> {
        ChunkAsk {
            blob,
            index,
            asker,
            asker_site,
            after_peer_failure,
        }
    }

    fn holder(node: &str, site: &str) -> Holder {
        Holder {
            node: node.into(),
            site: site.into(),
        }
    }

    #[test]
    fn the_first_asker_is_served_and_the_next_is_sent_to_it() {
        let mut admission = Admission::new(DEFAULT_RECENT_WINDOW);
        let now = Instant::now();
        assert_eq!(
            admission.decide(&ask(BLOB, 0, "a", "s1", false), &[], |_| true, now),
            Decision::Serve
        );
        assert_eq!(
            admission.decide(&ask(BLOB, 0, "b", "s1", false), &[], |_| true, now),
            Decision::Redirect(vec!["a".into()])
        );
        // "a" asking again (it lost the chunk) is not sent to itself.
        assert_eq!(
            admission.decide(&ask(BLOB, 0, "a", "s1", false), &[], |_| true, now),
            Decision::Serve
        );
        // After the window, a silent receiver is no longer waited on.
        let later = now + DEFAULT_RECENT_WINDOW + Duration::from_secs(1);
        assert_eq!(
            admission.decide(&ask(BLOB, 1, "c", "s1", false), &[], |_| true, now),
            Decision::Serve
        );
        assert_eq!(
            admission.decide(&ask(BLOB, 1, "d", "s1", false), &[], |_| true, later),
            Decision::Serve
        );
    }

    #[test]
    fn a_recent_receiver_nobody_can_reach_is_not_waited_on() {
        let mut admission = Admission::new(DEFAULT_RECENT_WINDOW);
        let now = Instant::now();
        let ask_a = ask(BLOB, 0, "a", "s1", false);
        assert_eq!(
            admission.decide(&ask_a, &[], |_| true, now),
            Decision::Serve
        );
        let ask_b = ask(BLOB, 0, "b", "s1", false);
        assert_eq!(
            admission.decide(&ask_b, &[], |n| n != "a", now),
            Decision::Serve
        );
    }

    #[test]
    fn same_site_holders_come_first_and_peer_failure_gets_through() {
        let mut admission = Admission::new(DEFAULT_RECENT_WINDOW);
        let now = Instant::now();
        let holders = [
            holder("far", "s2"),
            holder("near", "s1"),
            holder("me", "s1"),
        ];
        assert_eq!(
            admission.decide(&ask(BLOB, 5, "me", "s1", false), &holders, |_| true, now),
            Decision::Redirect(vec!["near".into(), "far".into()])
        );
        assert_eq!(
            admission.decide(&ask(BLOB, 5, "me", "s1", true), &holders, |_| true, now),
            Decision::Serve
        );
        let stats = admission.stats();
        assert_eq!((stats.redirected, stats.served_after_peer_failure), (1, 1));
    }

    #[test]
    fn the_first_of_a_site_to_cross_its_wan_link_is_where_the_rest_of_the_site_goes() {
        let mut admission = Admission::new(DEFAULT_RECENT_WINDOW);
        let now = Instant::now();
        let holders = [holder("far", "s2")];
        assert_eq!(
            admission.decide(&ask(BLOB, 2, "a", "s1", false), &holders, |_| true, now),
            Decision::Redirect(vec!["far".into()])
        );
        // The tracker does not know yet that "a" holds it; admission does.
        assert_eq!(
            admission.decide(&ask(BLOB, 2, "b", "s1", false), &holders, |_| true, now),
            Decision::Redirect(vec!["a".into(), "far".into()])
        );
        // A node of the holder's own site still goes to the holder first.
        assert_eq!(
            admission.decide(&ask(BLOB, 2, "c", "s2", false), &holders, |_| true, now),
            Decision::Redirect(vec!["far".into(), "a".into()])
        );
        // "a" asking again is not sent to itself.
        assert_eq!(
            admission.decide(&ask(BLOB, 2, "a", "s1", false), &holders, |_| true, now),
            Decision::Redirect(vec!["far".into()])
        );
        assert_eq!(admission.stats().served, 0);
    }

    /// Many nodes asking for every chunk at once, in random order, holding nothing yet: the
    /// seed sends each chunk once and points every other request at a node it served.
    #[test]
    fn a_fleet_asking_at_once_gets_each_chunk_from_the_seed_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut admission = Admission::new(DEFAULT_RECENT_WINDOW);
        let nodes: Vec<String> = (0..64).map(|i| format!("node{i}")).collect();
        let mut requests: Vec<(usize, u32)> = (0..nodes.len())
            .flat_map(|n| (0..128u32).map(move |c| (n, c)))
            .collect();
        requests.shuffle(&mut rng);
        let start = Instant::now();
        let mut served = vec![0u32; 128];
        for (i, (node, chunk)) in requests.into_iter().enumerate() {
            let now = start + Duration::from_micros(i as u64);
            let site = if node % 2 == 0 { "east" } else { "west" };
            if admission.decide(
                &ask(BLOB, chunk, &nodes[node], site, false),
                &[],
                |_| true,
                now,
            ) == Decision::Serve
            {
                served[chunk as usize] += 1;
            }
        }
        assert!(served.iter().all(|&n| n == 1), "{served:?}");
    }

    #[test]
    fn askers_of_one_chunk_are_spread_over_all_its_holders_same_site_first() {
        let mut admission = Admission::new(DEFAULT_RECENT_WINDOW);
        let now = Instant::now();
        let mut holders: Vec<Holder> = (0..100).map(|i| holder(&format!("a{i}"), "A")).collect();
        holders.extend((0..100).map(|i| holder(&format!("b{i}"), "B")));
        let mut named: HashMap<String, u32> = HashMap::new();
        for asker in 0..1000 {
            let name = format!("asker{asker}");
            let decision =
                admission.decide(&ask(BLOB, 0, &name, "A", false), &holders, |_| true, now);
            let Decision::Redirect(peers) = decision else {
                panic!("{name} was served while 200 nodes hold the chunk");
            };
            assert_eq!(peers.len(), MAX_REDIRECT_PEERS);
            assert!(peers.iter().all(|p| p.starts_with('a')), "{peers:?}");
            let mut unique = peers.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), peers.len(), "a holder named twice: {peers:?}");
            // The same ask gets the same answer: reproducible, not a fresh draw.
            let again = admission.decide(&ask(BLOB, 0, &name, "A", false), &holders, |_| true, now);
            assert_eq!(again, Decision::Redirect(peers.clone()));
            for peer in peers {
                *named.entry(peer).or_default() += 1;
            }
        }
        // 8,000 names over 100 same-site holders: 80 each on average. The tracker's order would
        // have sent all 1,000 askers to the same eight.
        assert_eq!(
            named.len(),
            100,
            "holders never named: {}",
            100 - named.len()
        );
        let most = named.values().copied().max().unwrap_or(0);
        assert!(most < 160, "one holder named {most} times");
    }
}
