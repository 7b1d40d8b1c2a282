//! The seed's tracker: which node holds which chunks of which blob, where it listens and in
//! which site. In memory only: nodes re-announce everything after a seed restart, and an entry
//! a node stops refreshing expires.
//!
//! Owns: announcements, expiry, peer selection. Does not own: time (callers pass `now`) or
//! authentication (the node name comes from the caller's certificate).

use std::collections::HashMap;
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
pub const MAX_PEERS_PER_ANSWER: usize = 64;
/// Longest site name, listen address and tag accepted, so one node cannot bloat the tracker.
const MAX_FIELD_CHARS: usize = 256;
const MAX_TAGS: usize = 64;

#[derive(Debug, Clone)]
pub struct NodeMeta {
    pub listen: String,
    pub site: String,
    pub tags: Vec<(String, String)>,
    pub last_seen: Instant,
}

#[derive(Default)]
pub struct Tracker {
    nodes: HashMap<String, NodeMeta>,
    by_blob: HashMap<BlobId, HashMap<String, Bitfield>>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
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
        if announcement.full {
            for holders in self.by_blob.values_mut() {
                holders.remove(node);
            }
            self.by_blob.retain(|_, holders| !holders.is_empty());
        }
        for holding in announcement.holdings {
            let holders = self.by_blob.entry(holding.blob).or_default();
            if holding.chunks.count_ones() == 0 {
                holders.remove(node);
            } else {
                holders.insert(node.to_string(), holding.chunks);
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
        &self,
        blob: &BlobId,
        asker: &str,
        max: usize,
        rng: &mut impl rand::Rng,
    ) -> Vec<PeerInfo> {
        let max = max.min(MAX_PEERS_PER_ANSWER);
        let Some(holders) = self.by_blob.get(blob) else {
            return Vec::new();
        };
        let asker_site = self.nodes.get(asker).map(|m| m.site.as_str());
        let mut same: Vec<(&String, &Bitfield, &NodeMeta)> = Vec::new();
        let mut other: Vec<(&String, &Bitfield, &NodeMeta)> = Vec::new();
        for (name, chunks) in holders {
            if name == asker {
                continue;
            }
            let Some(meta) = self.nodes.get(name) else {
                continue;
            };
            if Some(meta.site.as_str()) == asker_site {
                same.push((name, chunks, meta));
            } else {
                other.push((name, chunks, meta));
            }
        }
        same.shuffle(rng);
        other.shuffle(rng);
        same.into_iter()
            .chain(other)
            .take(max)
            .map(|(name, chunks, meta)| PeerInfo {
                node: name.clone(),
                listen: meta.listen.clone(),
                site: meta.site.clone(),
                chunks: Some(chunks.clone()),
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
            .filter(|(_, chunks)| chunks.get(index))
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
}
