//! The seed's tracker as the simulator needs it: the same answers as
//! `pkgmesh_node::seed::tracker::Tracker` for one blob, indexed so that 10,000 nodes asking
//! thousands of times a second cost little.
//!
//! The real tracker keeps `blob → node → bitfield` in a `HashMap` and walks every holder on each
//! question. Two of its answers matter to the swarm, and both are kept faithfully here:
//!
//! - **`peers`** (`GetPeers`): nodes holding any chunk, except the asker, same-site first, each
//!   group shuffled, at most [`MAX_PEERS_PER_ANSWER`], each with the bitfield it last announced.
//!   Here: a uniform sample without replacement from the same-site holders, topped up with a
//!   uniform sample of the other holders, which is the same distribution.
//! - **`holders_of_chunk`** (input of origin admission): the holders of one chunk in `HashMap`
//!   iteration order. That order is fixed by the hash of each node's name, so every asker gets
//!   the holders in the same order, and admission names the first ones of the asker's site
//!   (then of other sites) in every redirect. Here each node gets a fixed random key standing
//!   for its hash, and each (chunk, site) keeps the few holders with the smallest keys: nodes
//!   never drop chunks in the simulation, so that set only grows and is kept exactly. Only the
//!   first [`MAX_REDIRECT_PEERS`] of each group can reach a redirect, so passing those to
//!   admission gives the decision the full list would.
//!
//! Nodes announce their whole bitfield (`full: true`), as `peer::NodeState::announce` does; a
//! node is known (reachable, for admission) from its first announcement on. Entries never expire:
//! nodes refresh every 20 s, well within the 60 s lifetime.

use pkgmesh_node::seed::tracker::MAX_PEERS_PER_ANSWER;
use pkgmesh_node::swarm::admission::{Holder, MAX_REDIRECT_PEERS};
use pkgmesh_protocol::bitfield::Bitfield;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Holders kept per (chunk, site): one more than a redirect can name, so the asker itself can be
/// left out and enough remain.
const KEPT: usize = MAX_REDIRECT_PEERS + 1;

/// A peer as a tracker answer describes it: node index, site, and the chunks it announced.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    pub node: u32,
    pub site: u32,
    pub chunks: Option<Bitfield>,
}

pub struct SimTracker {
    site_of: Vec<u32>,
    known: Vec<bool>,
    /// What each node last announced, while it holds at least one chunk.
    announced: Vec<Option<Bitfield>>,
    /// Nodes holding at least one chunk, by site (insertion order; sampled uniformly).
    holders_by_site: Vec<Vec<u32>>,
    holder_count: usize,
    /// Stand-in for the hash of each node's name: its place in `HashMap` iteration order.
    key: Vec<u64>,
    /// Per chunk, per site: the holders with the smallest keys, ascending, at most [`KEPT`].
    first_holders: Vec<Vec<Vec<(u64, u32)>>>,
    /// Per chunk, per site: every holder (for [`SimTracker::random_holders_of_chunk`]).
    all_holders: Vec<Vec<Vec<u32>>>,
    rng: StdRng,
}

impl SimTracker {
    pub fn new(site_of: Vec<u32>, sites: u32, chunks: u32, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let key = site_of.iter().map(|_| rng.random()).collect();
        let nodes = site_of.len();
        SimTracker {
            site_of,
            known: vec![false; nodes],
            announced: vec![None; nodes],
            holders_by_site: vec![Vec::new(); sites as usize],
            holder_count: 0,
            key,
            first_holders: vec![vec![Vec::new(); sites as usize]; chunks as usize],
            all_holders: vec![vec![Vec::new(); sites as usize]; chunks as usize],
            rng,
        }
    }

    pub fn is_known(&self, node: u32) -> bool {
        self.known[node as usize]
    }

    /// Nodes the tracker knows to hold at least one chunk.
    pub fn holder_count(&self) -> usize {
        self.holder_count
    }

    /// A full announcement of `chunks` by `node`. Chunks are only ever gained in the simulation.
    pub fn announce(&mut self, node: u32, chunks: Bitfield) {
        let n = node as usize;
        self.known[n] = true;
        if chunks.count_ones() == 0 {
            debug_assert!(self.announced[n].is_none(), "nodes never drop chunks here");
            return;
        }
        let site = self.site_of[n] as usize;
        let key = self.key[n];
        if self.announced[n].is_none() {
            self.holders_by_site[site].push(node);
            self.holder_count += 1;
        }
        let old = self.announced[n].take();
        let old_bytes = old.as_ref().map(|b| b.as_bytes());
        for (at, &byte) in chunks.as_bytes().iter().enumerate() {
            let was = old_bytes.map_or(0, |b| b[at]);
            debug_assert_eq!(was & !byte, 0, "nodes never drop chunks here");
            let gained = byte & !was;
            if gained == 0 {
                continue;
            }
            for bit in 0..8u32 {
                if gained & (0x80 >> bit) == 0 {
                    continue;
                }
                let index = at * 8 + bit as usize;
                self.all_holders[index][site].push(node);
                let list = &mut self.first_holders[index][site];
                if list.len() == KEPT && list[KEPT - 1].0 <= key {
                    continue;
                }
                let position = list.partition_point(|&(k, _)| k < key);
                list.insert(position, (key, node));
                list.truncate(KEPT);
            }
        }
        self.announced[n] = Some(chunks);
    }

    /// `Tracker::holders_of_chunk` cut to what admission can use: the first holders of the
    /// asker's site and the first of the other sites, in iteration order, the asker left out.
    pub fn holders_of_chunk(
        &self,
        index: u32,
        asker: u32,
        names: &[String],
        site_names: &[String],
    ) -> Vec<Holder> {
        let asker_site = self.site_of[asker as usize] as usize;
        let lists = &self.first_holders[index as usize];
        let holder = |node: u32| Holder {
            node: names[node as usize].clone(),
            site: site_names[self.site_of[node as usize] as usize].clone(),
        };
        let mut out: Vec<Holder> = lists[asker_site]
            .iter()
            .filter(|&&(_, node)| node != asker)
            .take(MAX_REDIRECT_PEERS)
            .map(|&(_, node)| holder(node))
            .collect();
        let mut others: Vec<(u64, u32)> = lists
            .iter()
            .enumerate()
            .filter(|&(site, _)| site != asker_site)
            .flat_map(|(_, list)| list.iter().copied())
            .collect();
        others.sort_unstable();
        out.extend(
            others
                .into_iter()
                .take(MAX_REDIRECT_PEERS)
                .map(|(_, node)| holder(node)),
        );
        out
    }

    /// Like [`SimTracker::holders_of_chunk`], but a fresh uniform sample of each group for
    /// every request, as if the tracker shuffled the holders it hands to admission.
    pub fn random_holders_of_chunk(
        &mut self,
        index: u32,
        asker: u32,
        names: &[String],
        site_names: &[String],
    ) -> Vec<Holder> {
        let asker_site = self.site_of[asker as usize] as usize;
        let lists = &self.all_holders[index as usize];
        let mut chosen: Vec<u32> = Vec::new();
        let same = &lists[asker_site];
        let take = same.len().min(MAX_REDIRECT_PEERS + 1);
        for i in rand::seq::index::sample(&mut self.rng, same.len(), take) {
            if same[i] != asker && chosen.len() < MAX_REDIRECT_PEERS {
                chosen.push(same[i]);
            }
        }
        let others: usize = lists
            .iter()
            .enumerate()
            .filter(|&(site, _)| site != asker_site)
            .map(|(_, list)| list.len())
            .sum();
        let take = others.min(MAX_REDIRECT_PEERS);
        for mut i in rand::seq::index::sample(&mut self.rng, others, take) {
            for (site, list) in lists.iter().enumerate() {
                if site == asker_site {
                    continue;
                }
                if i < list.len() {
                    chosen.push(list[i]);
                    break;
                }
                i -= list.len();
            }
        }
        chosen
            .into_iter()
            .map(|node| Holder {
                node: names[node as usize].clone(),
                site: site_names[self.site_of[node as usize] as usize].clone(),
            })
            .collect()
    }

    /// `Tracker::peers`: holders of any chunk except `asker`, same-site first, shuffled, at most
    /// `max` (and [`MAX_PEERS_PER_ANSWER`]).
    pub fn peers(&mut self, asker: u32, max: usize, cross_wan: bool) -> Vec<PeerEntry> {
        let max = max.min(MAX_PEERS_PER_ANSWER);
        let asker_site = self.site_of[asker as usize] as usize;
        let mut chosen: Vec<u32> = Vec::with_capacity(max);
        let same = &self.holders_by_site[asker_site];
        let take = same.len().min(max + 1);
        for i in rand::seq::index::sample(&mut self.rng, same.len(), take) {
            let node = same[i];
            if node != asker && chosen.len() < max {
                chosen.push(node);
            }
        }
        let want = if cross_wan { max - chosen.len() } else { 0 };
        let others = self.holder_count - same.len();
        if want > 0 && others > 0 {
            for mut i in rand::seq::index::sample(&mut self.rng, others, want.min(others)) {
                for (site, list) in self.holders_by_site.iter().enumerate() {
                    if site == asker_site {
                        continue;
                    }
                    if i < list.len() {
                        chosen.push(list[i]);
                        break;
                    }
                    i -= list.len();
                }
            }
        }
        chosen.into_iter().map(|node| self.entry(node)).collect()
    }

    /// Every holder of chunk `index` in `site`.
    pub fn site_holders(&self, index: u32, site: u32) -> &[u32] {
        &self.all_holders[index as usize][site as usize]
    }

    /// `Tracker::peer_info`: contact details and announced chunks of named nodes it knows.
    pub fn peer_info(&self, nodes: &[u32]) -> Vec<PeerEntry> {
        nodes
            .iter()
            .filter(|&&node| self.known[node as usize])
            .map(|&node| self.entry(node))
            .collect()
    }

    fn entry(&self, node: u32) -> PeerEntry {
        PeerEntry {
            node,
            site: self.site_of[node as usize],
            chunks: self.announced[node as usize].clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(len: u32, ones: &[u32]) -> Bitfield {
        let mut f = Bitfield::new(len).unwrap();
        for &i in ones {
            f.set(i, true);
        }
        f
    }

    #[test]
    fn answers_match_the_real_trackers_rules() {
        let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let sites: Vec<String> = (0..2).map(|i| format!("s{i}")).collect();
        let site_of: Vec<u32> = (0..40).map(|i| i % 2).collect();
        let mut tracker = SimTracker::new(site_of, 2, 4, 9);
        for node in 0..40 {
            tracker.announce(node, field(4, &[]));
        }
        assert!(tracker.peers(0, 32, true).is_empty());
        for node in 1..40 {
            tracker.announce(node, field(4, &[node % 4]));
        }
        // Same site first, never the asker.
        let peers = tracker.peers(0, 32, true);
        assert_eq!(peers.len(), 32);
        assert!(tracker.peers(0, 32, false).iter().all(|p| p.site == 0));
        assert!(peers[..19].iter().all(|p| p.site == 0));
        assert!(peers.iter().all(|p| p.node != 0));
        // Holders of chunk 1: nodes 1, 5, 9, ... all in site 1.
        let holders = tracker.holders_of_chunk(1, 2, &names, &sites);
        assert_eq!(holders.len(), 8);
        assert!(holders.iter().all(|h| h.site == "s1"));
        // Every asker sees them in the same order, as from one HashMap.
        assert_eq!(holders, tracker.holders_of_chunk(1, 4, &names, &sites));
        let mut cut = tracker.holders_of_chunk(1, 1, &names, &sites);
        cut.truncate(7);
        assert!(cut.iter().all(|h| h.node != "n1"));
    }
}
