//! The seed's tracker: which node holds which chunks of which blob, where it listens and in
//! which site. In memory only: nodes re-announce everything after a seed restart, and an entry
//! a node stops refreshing expires.
//!
//! Owns: announcements, expiry, peer selection. Does not own: time (callers pass `now`) or
//! authentication (the node name comes from the caller's certificate).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::{BlobId, ChunkLayout};
use pkgmesh_protocol::wire::{Announcement, HolderInfo, PeerInfo};
use rand::seq::SliceRandom;

use crate::swarm::admission::Holder;

/// How often nodes are asked to refresh; entries live three refreshes.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(20);
pub const ENTRY_TTL: Duration = Duration::from_secs(60);
/// Most blobs one announcement may carry, and most peers one answer names.
pub const MAX_HOLDINGS_PER_ANNOUNCE: usize = 4096;
/// Most blobs the tracker records for one node: what one full announcement may carry, so
/// partial announcements cannot add up to more.
pub const MAX_HOLDINGS_PER_NODE: usize = MAX_HOLDINGS_PER_ANNOUNCE;
pub const MAX_PEERS_PER_ANSWER: usize = 64;
/// Longest site name, listen address and tag accepted, so one node cannot bloat the tracker.
const MAX_FIELD_CHARS: usize = 256;
const MAX_TAGS: usize = 64;
/// Distinct nodes that must report a peer for one blob before the tracker stops naming it: one
/// report could be a lie by the reporter, aimed at an honest node.
pub const BAN_QUORUM: usize = 2;
/// (blob, peer) pairs with reports kept at once, so reports cannot grow without bound.
const MAX_BAN_REPORTS: usize = 65_536;

#[derive(Debug, Clone)]
pub struct NodeMeta {
    pub listen: String,
    pub site: String,
    pub tags: Vec<(String, String)>,
    pub last_seen: Instant,
}

/// The holders of one blob: each one's chunks, and their names per site, so that an answer
/// is sampled in time proportional to its size and not to the holders (10,000 for a fleet-wide
/// package, asked about by every node of the fleet).
#[derive(Default)]
struct Holders {
    by_name: HashMap<String, HolderEntry>,
    by_site: HashMap<String, Vec<String>>,
}

struct HolderEntry {
    chunks: Bitfield,
    site: String,
    /// Where the name sits in `by_site[site]`.
    slot: usize,
}

impl Holders {
    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn contains_key(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn get(&self, name: &str) -> Option<&Bitfield> {
        self.by_name.get(name).map(|entry| &entry.chunks)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Bitfield)> {
        self.by_name
            .iter()
            .map(|(name, entry)| (name, &entry.chunks))
    }

    fn insert(&mut self, name: &str, site: &str, chunks: Bitfield) {
        if let Some(entry) = self.by_name.get_mut(name) {
            if entry.site == site {
                entry.chunks = chunks;
                return;
            }
            self.remove(name);
        }
        let names = self.by_site.entry(site.to_string()).or_default();
        names.push(name.to_string());
        self.by_name.insert(
            name.to_string(),
            HolderEntry {
                chunks,
                site: site.to_string(),
                slot: names.len() - 1,
            },
        );
    }

    fn remove(&mut self, name: &str) -> bool {
        let Some(entry) = self.by_name.remove(name) else {
            return false;
        };
        if let Some(names) = self.by_site.get_mut(&entry.site) {
            names.swap_remove(entry.slot);
            if let Some(moved) = names.get(entry.slot) {
                if let Some(moved) = self.by_name.get_mut(moved) {
                    moved.slot = entry.slot;
                }
            }
            if names.is_empty() {
                self.by_site.remove(&entry.site);
            }
        }
        true
    }

    /// Up to `want` names drawn uniformly at random from the holders of the sites `lists`
    /// (together), in random order, keeping only those `usable` accepts.
    fn sample<'a>(
        lists: &[&'a Vec<String>],
        want: usize,
        rng: &mut impl rand::Rng,
        usable: impl Fn(&str) -> bool,
    ) -> Vec<&'a String> {
        let total: usize = lists.iter().map(|names| names.len()).sum();
        if want == 0 || total == 0 {
            return Vec::new();
        }
        let at = |mut index: usize| -> &'a String {
            for names in lists {
                if index < names.len() {
                    return &names[index];
                }
                index -= names.len();
            }
            unreachable!("index below the total")
        };
        // One more than wanted, for the asker (usually a holder of its own site) to be dropped.
        let drawn = (want + 1).min(total);
        let mut picked: Vec<&String> = rand::seq::index::sample(rng, total, drawn)
            .into_iter()
            .map(at)
            .filter(|name| usable(name))
            .collect();
        if picked.len() < want && drawn < total {
            // Distrusted holders were drawn: choose among all the usable ones instead.
            picked = lists
                .iter()
                .flat_map(|names| names.iter())
                .filter(|name| usable(name))
                .collect();
        }
        let taken = picked.len().min(want);
        let (chosen, _) = picked.partial_shuffle(rng, taken);
        chosen.to_vec()
    }
}

#[derive(Default)]
pub struct Tracker {
    nodes: HashMap<String, NodeMeta>,
    by_blob: HashMap<BlobId, Holders>,
    /// Who reported whom for which blob.
    ban_reports: HashMap<(BlobId, String), BTreeSet<String>>,
    /// Sites behind a thin WAN link: how many of their nodes may fetch from outside the site.
    wan_fetchers: HashMap<String, usize>,
    /// The nodes chosen to fetch each blob across each limited site's link.
    assigned_fetchers: HashMap<(BlobId, String), Vec<String>>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits which nodes of `site` take chunks from outside it (the seed or other sites): only
    /// `fetchers` of them per blob, and the rest take from those. 0 removes the limit.
    pub fn set_wan_fetchers(&mut self, site: &str, fetchers: usize) {
        if fetchers == 0 {
            self.wan_fetchers.remove(site);
        } else {
            self.wan_fetchers.insert(site.to_string(), fetchers);
        }
    }

    /// Records that `reporter` dropped `peer` for `blob`. Returns true once the peer is
    /// distrusted for that blob (reported by [`BAN_QUORUM`] distinct nodes).
    pub fn report_ban(&mut self, blob: &BlobId, peer: &str, reporter: &str) -> bool {
        if peer == reporter {
            return self.distrusted(blob, peer);
        }
        let key = (*blob, peer.to_string());
        if !self.ban_reports.contains_key(&key) && self.ban_reports.len() >= MAX_BAN_REPORTS {
            return self.distrusted(blob, peer);
        }
        self.ban_reports
            .entry(key)
            .or_default()
            .insert(reporter.to_string());
        self.distrusted(blob, peer)
    }

    /// Distinct nodes that reported `peer` for `blob`.
    pub fn reporters(&self, blob: &BlobId, peer: &str) -> usize {
        self.ban_reports
            .get(&(*blob, peer.to_string()))
            .map_or(0, BTreeSet::len)
    }

    /// The peer was reported for this blob by enough distinct nodes to stop naming it.
    pub fn distrusted(&self, blob: &BlobId, peer: &str) -> bool {
        // Asked for every holder on every GetPeers: skip building the key when nobody reported.
        if self.ban_reports.is_empty() {
            return false;
        }
        self.ban_reports
            .get(&(*blob, peer.to_string()))
            .is_some_and(|reporters| reporters.len() >= BAN_QUORUM)
    }

    /// Whether `node` may take chunks of `blob` from outside its site. In a site with a WAN
    /// limit of N, the first N live, trusted nodes of the site to ask for the blob become its
    /// fetchers and stay so while they live: the choice is stable (so the link carries each
    /// byte about once), and a fetcher that expires or is distrusted is replaced by the next
    /// node to ask.
    pub fn may_cross_wan(&mut self, blob: &BlobId, node: &str) -> bool {
        let Some(site) = self.nodes.get(node).map(|meta| meta.site.clone()) else {
            return true;
        };
        let Some(&limit) = self.wan_fetchers.get(&site) else {
            return true;
        };
        let mut fetchers = self.site_fetchers(blob, &site);
        if fetchers.iter().any(|name| name == node) {
            return true;
        }
        if fetchers.len() >= limit || self.distrusted(blob, node) {
            return false;
        }
        fetchers.push(node.to_string());
        self.assigned_fetchers.insert((*blob, site), fetchers);
        true
    }

    /// The live, trusted fetchers of `blob` in a WAN-limited `site` (empty for a site without a
    /// limit, or before any node of it asked).
    pub fn site_fetchers(&self, blob: &BlobId, site: &str) -> Vec<String> {
        self.assigned_fetchers
            .get(&(*blob, site.to_string()))
            .map(|names| {
                names
                    .iter()
                    .filter(|name| {
                        self.nodes.get(*name).is_some_and(|meta| meta.site == site)
                            && !self.distrusted(blob, name)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records an announcement from `node` (its certificate name). Refuses malformed content
    /// with a message naming the field.
    pub fn announce(
        &mut self,
        node: &str,
        announcement: Announcement,
        now: Instant,
    ) -> Result<(), String> {
        check_field("listen", &announcement.listen)?;
        check_field("site", &announcement.site)?;
        if announcement.tags.len() > MAX_TAGS {
            return Err(format!(
                "{} tags, the limit is {MAX_TAGS}",
                announcement.tags.len()
            ));
        }
        for (key, value) in &announcement.tags {
            check_field("tag key", key)?;
            check_field("tag value", value)?;
        }
        if announcement.holdings.len() > MAX_HOLDINGS_PER_ANNOUNCE {
            return Err(format!(
                "{} holdings in one announcement, the limit is {MAX_HOLDINGS_PER_ANNOUNCE}",
                announcement.holdings.len()
            ));
        }
        for holding in &announcement.holdings {
            let layout = ChunkLayout::for_size(holding.size)
                .map_err(|e| format!("holding of blob {}: {e}", holding.blob))?;
            if holding.chunks.len() != layout.chunk_count() {
                return Err(format!(
                    "bitfield for blob {} has {} bits, a blob of {} bytes has {} chunks",
                    holding.blob,
                    holding.chunks.len(),
                    holding.size,
                    layout.chunk_count()
                ));
            }
        }
        if !announcement.full {
            let held = |blob: &BlobId| {
                self.by_blob
                    .get(blob)
                    .is_some_and(|holders| holders.contains_key(node))
            };
            let before = self
                .by_blob
                .values()
                .filter(|h| h.contains_key(node))
                .count();
            let mut after = before;
            for holding in &announcement.holdings {
                match (held(&holding.blob), holding.chunks.count_ones() == 0) {
                    (false, false) => after += 1,
                    (true, true) => after = after.saturating_sub(1),
                    _ => {}
                }
            }
            if after > MAX_HOLDINGS_PER_NODE && after > before {
                return Err(format!(
                    "this announcement would record {after} blobs for one node, the limit is \
                     {MAX_HOLDINGS_PER_NODE}; send a full announcement"
                ));
            }
        }
        let moved = self
            .nodes
            .get(node)
            .is_some_and(|meta| meta.site != announcement.site);
        if announcement.full {
            for holders in self.by_blob.values_mut() {
                holders.remove(node);
            }
        } else if moved {
            // A node that changed site keeps what it held, listed under its new site.
            for holders in self.by_blob.values_mut() {
                if let Some(chunks) = holders.get(node).cloned() {
                    holders.insert(node, &announcement.site, chunks);
                }
            }
        }
        for holding in announcement.holdings {
            let holders = self.by_blob.entry(holding.blob).or_default();
            if holding.chunks.count_ones() == 0 {
                holders.remove(node);
            } else {
                holders.insert(node, &announcement.site, holding.chunks);
            }
        }
        self.by_blob.retain(|_, holders| !holders.is_empty());
        self.nodes.insert(
            node.to_string(),
            NodeMeta {
                listen: announcement.listen,
                site: announcement.site,
                tags: announcement.tags,
                last_seen: now,
            },
        );
        Ok(())
    }

    /// Forgets nodes that stopped refreshing, and what they held.
    pub fn expire(&mut self, now: Instant) {
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, meta)| now.duration_since(meta.last_seen) > ENTRY_TTL)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &stale {
            self.nodes.remove(name);
            for holders in self.by_blob.values_mut() {
                holders.remove(name);
            }
        }
        if !stale.is_empty() {
            let nodes = &self.nodes;
            self.ban_reports
                .retain(|(_, peer), _| nodes.contains_key(peer));
            self.assigned_fetchers.retain(|_, names| {
                names.retain(|name| nodes.contains_key(name));
                !names.is_empty()
            });
        }
        if !stale.is_empty() {
            self.by_blob.retain(|_, holders| !holders.is_empty());
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeMeta> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&String, &NodeMeta)> {
        self.nodes.iter()
    }

    /// Peers holding any chunk of `blob`, except `asker`: all same-site holders first (up to
    /// `max`), then a random sample of the rest.
    pub fn peers(
        &mut self,
        blob: &BlobId,
        asker: &str,
        max: usize,
        rng: &mut impl rand::Rng,
    ) -> Vec<PeerInfo> {
        let max = max.min(MAX_PEERS_PER_ANSWER);
        // A blob nobody holds has no peers; and asking about it must not record the asker as
        // a fetcher, or asking about made-up blobs would grow the fetcher table without bound.
        if !self.by_blob.contains_key(blob) {
            return Vec::new();
        }
        // Asking is what makes a node of a WAN-limited site one of its fetchers.
        let may_cross_wan = self.may_cross_wan(blob, asker);
        let Some(holders) = self.by_blob.get(blob) else {
            return Vec::new();
        };
        let asker_site = self.nodes.get(asker).map(|m| m.site.as_str());
        let usable = |name: &str| {
            name != asker && self.nodes.contains_key(name) && !self.distrusted(blob, name)
        };
        // A random sample of the same-site holders (all of them when they are fewer than
        // `max`), then a random sample of the other sites' holders for the rest.
        let same: Vec<&Vec<String>> = asker_site
            .and_then(|site| holders.by_site.get(site))
            .into_iter()
            .collect();
        let mut chosen = Holders::sample(&same, max, rng, usable);
        if may_cross_wan && chosen.len() < max {
            let other: Vec<&Vec<String>> = holders
                .by_site
                .iter()
                .filter(|(site, _)| Some(site.as_str()) != asker_site)
                .map(|(_, names)| names)
                .collect();
            chosen.extend(Holders::sample(&other, max - chosen.len(), rng, usable));
        }
        chosen
            .into_iter()
            .filter_map(|name| {
                let meta = self.nodes.get(name)?;
                Some(PeerInfo {
                    node: name.clone(),
                    listen: meta.listen.clone(),
                    site: meta.site.clone(),
                    chunks: holders.get(name).cloned(),
                })
            })
            .collect()
    }

    /// Nodes holding chunk `index` of `blob`, for origin admission.
    pub fn holders_of_chunk(&self, blob: &BlobId, index: u32) -> Vec<Holder> {
        let Some(holders) = self.by_blob.get(blob) else {
            return Vec::new();
        };
        holders
            .iter()
            .filter(|(name, chunks)| chunks.get(index) && !self.distrusted(blob, name))
            .filter_map(|(name, _)| {
                self.nodes.get(name).map(|meta| Holder {
                    node: name.clone(),
                    site: meta.site.clone(),
                })
            })
            .collect()
    }

    /// Contact details of named nodes, for turning an admission redirect into peers.
    pub fn peer_info(&self, blob: &BlobId, names: &[String]) -> Vec<PeerInfo> {
        names
            .iter()
            .filter(|name| !self.distrusted(blob, name))
            .filter_map(|name| {
                let meta = self.nodes.get(name)?;
                Some(PeerInfo {
                    node: name.clone(),
                    listen: meta.listen.clone(),
                    site: meta.site.clone(),
                    chunks: self
                        .by_blob
                        .get(blob)
                        .and_then(|holders| holders.get(name))
                        .cloned(),
                })
            })
            .collect()
    }

    /// Who holds `blob` and how much of it, for `pkgmesh where`.
    pub fn holders(&self, blob: &BlobId, now: Instant) -> Vec<HolderInfo> {
        let Some(holders) = self.by_blob.get(blob) else {
            return Vec::new();
        };
        let mut list: Vec<HolderInfo> = holders
            .iter()
            .filter_map(|(name, chunks)| {
                let meta = self.nodes.get(name)?;
                Some(HolderInfo {
                    node: name.clone(),
                    listen: meta.listen.clone(),
                    site: meta.site.clone(),
                    blob: *blob,
                    chunks_held: chunks.count_ones(),
                    chunks_total: chunks.len(),
                    last_seen_secs_ago: now.duration_since(meta.last_seen).as_secs(),
                })
            })
            .collect();
        list.sort_by(|a, b| a.site.cmp(&b.site).then(a.node.cmp(&b.node)));
        list
    }
}

fn check_field(what: &str, value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_FIELD_CHARS {
        return Err(format!("{what} is over {MAX_FIELD_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{what} {value:?} contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkgmesh_protocol::wire::Holding;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    const BLOB: BlobId = BlobId([1; 32]);
    const SIZE: u64 = 10 * 256 * 1024;

    fn announcement(site: &str, chunks: &[u32]) -> Announcement {
        let mut field = Bitfield::new(10).unwrap();
        for &c in chunks {
            field.set(c, true);
        }
        Announcement {
            listen: format!("127.0.0.1:{}", 7000 + chunks.len()),
            site: site.into(),
            tags: vec![("role".into(), "web".into())],
            full: true,
            holdings: vec![Holding {
                blob: BLOB,
                size: SIZE,
                chunks: field,
            }],
        }
    }

    #[test]
    fn peers_come_same_site_first_and_never_include_the_asker() {
        let mut tracker = Tracker::new();
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        tracker
            .announce("asker", announcement("east", &[]), now)
            .unwrap();
        for i in 0..5 {
            tracker
                .announce(&format!("west{i}"), announcement("west", &[1]), now)
                .unwrap();
        }
        tracker
            .announce("east0", announcement("east", &[2]), now)
            .unwrap();
        let peers = tracker.peers(&BLOB, "asker", 3, &mut rng);
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[0].node, "east0");
        assert!(peers.iter().all(|p| p.node != "asker"));
        let holders = tracker.holders_of_chunk(&BLOB, 1);
        assert_eq!(holders.len(), 5);
        assert_eq!(tracker.holders(&BLOB, now).len(), 6);
    }

    #[test]
    fn silent_nodes_expire_and_full_announcements_replace() {
        let mut tracker = Tracker::new();
        let now = Instant::now();
        tracker
            .announce("a", announcement("s", &[0, 1]), now)
            .unwrap();
        tracker
            .announce("b", announcement("s", &[0]), now + ENTRY_TTL)
            .unwrap();
        tracker.expire(now + ENTRY_TTL + Duration::from_secs(1));
        assert!(tracker.node("a").is_none());
        assert_eq!(tracker.holders_of_chunk(&BLOB, 0).len(), 1);
        let mut empty = announcement("s", &[]);
        empty.holdings.clear();
        tracker.announce("b", empty, now + ENTRY_TTL).unwrap();
        assert!(tracker.holders(&BLOB, now + ENTRY_TTL).is_empty());
    }

    #[test]
    fn a_bitfield_of_the_wrong_length_is_refused() {
        let mut tracker = Tracker::new();
        let mut bad = announcement("s", &[0]);
        bad.holdings[0].size = 100 * 256 * 1024;
        let error = tracker.announce("a", bad, Instant::now()).unwrap_err();
        assert!(error.contains("bitfield"), "{error}");
        let mut bad = announcement("s\u{1b}[2J", &[0]);
        bad.holdings.clear();
        assert!(tracker.announce("a", bad, Instant::now()).is_err());
    }

    #[test]
    fn a_peer_is_named_until_a_quorum_of_distinct_nodes_reports_it() {
        let mut tracker = Tracker::new();
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for name in ["asker", "liar", "victim", "other"] {
            tracker
                .announce(name, announcement("s", &[0, 1]), now)
                .unwrap();
        }
        // One node's word, however often repeated, is not enough; nor is a self-report.
        assert!(!tracker.report_ban(&BLOB, "victim", "liar"));
        assert!(!tracker.report_ban(&BLOB, "victim", "liar"));
        assert!(!tracker.report_ban(&BLOB, "victim", "victim"));
        assert!(tracker
            .peers(&BLOB, "asker", 10, &mut rng)
            .iter()
            .any(|p| p.node == "victim"));
        assert!(tracker.report_ban(&BLOB, "victim", "other"));
        assert!(tracker
            .peers(&BLOB, "asker", 10, &mut rng)
            .iter()
            .all(|p| p.node != "victim"));
        assert!(tracker
            .holders_of_chunk(&BLOB, 0)
            .iter()
            .all(|h| h.node != "victim"));
        // Only for that blob.
        assert!(!tracker.distrusted(&BlobId([2; 32]), "victim"));
    }

    #[test]
    fn partial_announcements_cannot_record_more_blobs_than_a_full_one_may_carry() {
        let mut tracker = Tracker::new();
        let now = Instant::now();
        let holding = |i: usize| {
            let mut chunks = Bitfield::new(10).unwrap();
            chunks.set(0, true);
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Holding {
                blob: BlobId(id),
                size: SIZE,
                chunks,
            }
        };
        let partial = |range: std::ops::Range<usize>| Announcement {
            listen: "127.0.0.1:7000".into(),
            site: "s".into(),
            tags: Vec::new(),
            full: false,
            holdings: range.map(holding).collect(),
        };
        tracker
            .announce("a", partial(0..MAX_HOLDINGS_PER_NODE), now)
            .unwrap();
        // Re-announcing what is held adds nothing and is accepted.
        tracker.announce("a", partial(0..10), now).unwrap();
        let error = tracker
            .announce(
                "a",
                partial(MAX_HOLDINGS_PER_NODE..MAX_HOLDINGS_PER_NODE + 1),
                now,
            )
            .unwrap_err();
        assert!(error.contains("limit"), "{error}");
        let last = holding(MAX_HOLDINGS_PER_NODE);
        assert!(tracker.holders(&last.blob, now).is_empty());
        // Other nodes are not limited by it, and a full announcement starts over.
        tracker
            .announce(
                "b",
                partial(MAX_HOLDINGS_PER_NODE..MAX_HOLDINGS_PER_NODE + 1),
                now,
            )
            .unwrap();
        let mut full = partial(MAX_HOLDINGS_PER_NODE..MAX_HOLDINGS_PER_NODE + 1);
        full.full = true;
        tracker.announce("a", full, now).unwrap();
        assert_eq!(tracker.holders(&last.blob, now).len(), 2);
        assert!(tracker.holders(&holding(0).blob, now).is_empty());
    }

    #[test]
    fn answers_are_samples_of_the_current_holders_same_site_first() {
        let mut tracker = Tracker::new();
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // 100 holders in "big", 10 in "small", 50 in "far".
        let mut names = Vec::new();
        for (site, count) in [("big", 100), ("small", 10), ("far", 50)] {
            for i in 0..count {
                let name = format!("{site}-{i}");
                tracker
                    .announce(&name, announcement(site, &[0]), now)
                    .unwrap();
                names.push(name);
            }
        }
        let distinct = |peers: &[PeerInfo]| {
            let set: std::collections::BTreeSet<&str> =
                peers.iter().map(|p| p.node.as_str()).collect();
            set.len() == peers.len()
        };
        let peers = tracker.peers(&BLOB, "big-0", 32, &mut rng);
        assert_eq!(peers.len(), 32);
        assert!(distinct(&peers));
        assert!(peers.iter().all(|p| p.site == "big" && p.node != "big-0"));
        let peers = tracker.peers(&BLOB, "small-0", 32, &mut rng);
        assert_eq!(peers.len(), 32);
        assert!(distinct(&peers));
        assert!(peers[..9].iter().all(|p| p.site == "small"));
        assert!(peers[9..].iter().all(|p| p.site != "small"));
        assert!(peers.iter().all(|p| p.node != "small-0"));

        // Holders leave (an empty full announcement) or move site; every answer names only
        // current holders with their current site, and over many answers every one of them.
        let mut leaving = names.clone();
        leaving.shuffle(&mut rng);
        let (gone, stay) = leaving.split_at(80);
        for name in gone {
            let mut empty = announcement("big", &[]);
            empty.holdings.clear();
            tracker.announce(name, empty, now).unwrap();
        }
        let mut current: BTreeMap<String, String> = stay
            .iter()
            .map(|name| (name.clone(), name.split('-').next().unwrap().to_string()))
            .collect();
        for name in stay.iter().take(5) {
            tracker
                .announce(name, announcement("far", &[0]), now)
                .unwrap();
            current.insert(name.clone(), "far".into());
        }
        let mut seen = BTreeMap::new();
        for _ in 0..200 {
            for peer in tracker.peers(&BLOB, "outsider", 32, &mut rng) {
                assert_eq!(current.get(&peer.node), Some(&peer.site), "{}", peer.node);
                seen.insert(peer.node, peer.site);
            }
        }
        assert_eq!(seen, current);
    }

    #[test]
    fn asking_for_peers_of_a_blob_nobody_holds_records_no_fetcher() {
        let mut tracker = Tracker::new();
        tracker.set_wan_fetchers("edge", 1);
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        tracker
            .announce("edge-a", announcement("edge", &[]), now)
            .unwrap();
        for i in 0..100u8 {
            let unknown = BlobId([i.wrapping_add(100); 32]);
            assert!(tracker.peers(&unknown, "edge-a", 10, &mut rng).is_empty());
            assert!(tracker.site_fetchers(&unknown, "edge").is_empty());
        }
        assert!(tracker.assigned_fetchers.is_empty());
    }

    #[test]
    fn a_wan_limited_site_keeps_its_first_fetchers_and_replaces_departed_ones() {
        let mut tracker = Tracker::new();
        tracker.set_wan_fetchers("edge", 1);
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        tracker
            .announce("core", announcement("core", &[0, 1, 2]), now)
            .unwrap();
        for name in ["edge-a", "edge-b"] {
            tracker
                .announce(name, announcement("edge", &[]), now)
                .unwrap();
        }
        // edge-a asks first: it fetches across the link, and sees the other site's holder.
        let peers = tracker.peers(&BLOB, "edge-a", 10, &mut rng);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].node, "core");
        // edge-b does not: it is told of nothing outside its site.
        assert!(tracker.peers(&BLOB, "edge-b", 10, &mut rng).is_empty());
        assert!(!tracker.may_cross_wan(&BLOB, "edge-b"));
        assert!(tracker.may_cross_wan(&BLOB, "edge-a"));
        assert!(
            tracker.may_cross_wan(&BLOB, "core"),
            "other sites are not limited"
        );
        assert_eq!(
            tracker.site_fetchers(&BLOB, "edge"),
            vec!["edge-a".to_string()]
        );
        // edge-a goes silent and expires: the next to ask takes over.
        let later = now + ENTRY_TTL + Duration::from_secs(1);
        for name in ["core", "edge-b"] {
            let site = if name == "core" { "core" } else { "edge" };
            tracker
                .announce(name, announcement(site, &[0]), later)
                .unwrap();
        }
        tracker.expire(later);
        assert!(tracker.may_cross_wan(&BLOB, "edge-b"));
        assert_eq!(
            tracker.site_fetchers(&BLOB, "edge"),
            vec!["edge-b".to_string()]
        );
    }
}
