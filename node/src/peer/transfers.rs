//! The node's downloads in flight, one per blob, each publishing its progress.
//!
//! Owns: the rule that a blob is downloaded once however many callers want it (a second caller
//! joins the download in flight and sees the same progress and result), and the progress
//! snapshots that `pkgmesh fetch`, `pkgmesh transfers` and the admin API show. Does not own the
//! download itself ([`super::fetch`]).

use std::collections::HashMap;
use std::sync::Mutex;

use pkgmesh_protocol::blob::BlobId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    #[default]
    Running,
    Done,
    Failed,
}

/// A snapshot of one blob's download: where its bytes came from so far. The final snapshot
/// (state `done`) is the fetch's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferStatus {
    pub blob: String,
    pub size: u64,
    pub chunks: u32,
    /// Chunks verified and in the cache, including those held before the transfer started.
    pub chunks_held: u32,
    /// Chunks already in the cache when the transfer started (a resumed download).
    pub chunks_already_held: u32,
    pub bytes_from_seed: u64,
    pub bytes_from_local_peers: u64,
    pub bytes_from_remote_peers: u64,
    /// Peers with requests in flight at the moment of the snapshot.
    pub peers_in_use: u32,
    /// Peers dropped for this blob, each with the reason.
    pub peers_banned: Vec<String>,
    pub seconds: f64,
    pub state: TransferState,
    /// Why the transfer failed, when it did.
    pub error: Option<String>,
}

impl TransferStatus {
    /// Bytes received in this transfer, from any source.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_from_seed + self.bytes_from_local_peers + self.bytes_from_remote_peers
    }

    /// Bytes of the blob verified in the cache (an estimate from chunk counts, exact at the end).
    pub fn bytes_held(&self) -> u64 {
        if self.chunks == 0 {
            return 0;
        }
        if self.chunks_held >= self.chunks {
            return self.size;
        }
        self.size / self.chunks as u64 * self.chunks_held as u64
    }
}

/// What starting a transfer gave the caller.
pub enum Joined {
    /// The caller must run the download and publish through this sender.
    Leader(
        watch::Sender<TransferStatus>,
        watch::Receiver<TransferStatus>,
    ),
    /// Someone else runs it; follow it here.
    Follower(watch::Receiver<TransferStatus>),
}

/// The downloads in flight.
#[derive(Default)]
pub struct Transfers {
    running: Mutex<HashMap<BlobId, watch::Receiver<TransferStatus>>>,
}

impl Transfers {
    /// Joins the transfer of `blob` in flight, or makes the caller its leader.
    pub fn join(&self, blob: BlobId, initial: TransferStatus) -> Joined {
        let mut running = self.lock();
        if let Some(receiver) = running.get(&blob) {
            if receiver.borrow().state == TransferState::Running && receiver.has_changed().is_ok() {
                return Joined::Follower(receiver.clone());
            }
        }
        let (sender, receiver) = watch::channel(initial);
        running.insert(blob, receiver.clone());
        Joined::Leader(sender, receiver)
    }

    /// Forgets a finished transfer (its followers keep their receivers).
    pub fn finish(&self, blob: &BlobId) {
        self.lock().remove(blob);
    }

    /// Every transfer in flight, as of now.
    pub fn snapshot(&self) -> Vec<TransferStatus> {
        let mut list: Vec<TransferStatus> = self
            .lock()
            .values()
            .map(|receiver| receiver.borrow().clone())
            .collect();
        list.sort_by(|a, b| a.blob.cmp(&b.blob));
        list
    }

    /// Follows the transfer of `blob`, if one is in flight.
    pub fn follow(&self, blob: &BlobId) -> Option<watch::Receiver<TransferStatus>> {
        self.lock().get(blob).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BlobId, watch::Receiver<TransferStatus>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Waits for a followed transfer to end; its final status, or why it failed.
pub async fn wait_for_end(
    mut receiver: watch::Receiver<TransferStatus>,
) -> anyhow::Result<TransferStatus> {
    loop {
        let status = receiver.borrow_and_update().clone();
        match status.state {
            TransferState::Done => return Ok(status),
            TransferState::Failed => {
                anyhow::bail!(status.error.unwrap_or_else(|| "the download failed".into()))
            }
            TransferState::Running => {}
        }
        if receiver.changed().await.is_err() {
            let last = receiver.borrow().clone();
            return match last.state {
                TransferState::Done => Ok(last),
                _ => Err(anyhow::anyhow!(last.error.unwrap_or_else(|| {
                    format!("the download of blob {} stopped", last.blob)
                }))),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_caller_follows_the_first_and_sees_its_result() {
        let transfers = Transfers::default();
        let blob = BlobId([7; 32]);
        let Joined::Leader(sender, _) = transfers.join(blob, TransferStatus::default()) else {
            panic!("the first caller must lead");
        };
        let Joined::Follower(receiver) = transfers.join(blob, TransferStatus::default()) else {
            panic!("the second caller must follow");
        };
        let waiting = tokio::spawn(wait_for_end(receiver));
        sender.send_modify(|s| {
            s.chunks_held = 4;
            s.state = TransferState::Done;
        });
        transfers.finish(&blob);
        let end = waiting.await.unwrap().unwrap();
        assert_eq!(end.chunks_held, 4);
        assert!(transfers.snapshot().is_empty());
    }

    #[tokio::test]
    async fn a_leader_that_vanishes_fails_its_followers() {
        let transfers = Transfers::default();
        let blob = BlobId([8; 32]);
        let Joined::Leader(sender, _) = transfers.join(blob, TransferStatus::default()) else {
            panic!("the first caller must lead");
        };
        let Joined::Follower(receiver) = transfers.join(blob, TransferStatus::default()) else {
            panic!("the second caller must follow");
        };
        drop(sender);
        let error = wait_for_end(receiver).await.unwrap_err();
        assert!(error.to_string().contains("stopped"), "{error}");
        // A new caller after the leader vanished leads a fresh transfer.
        assert!(matches!(
            transfers.join(blob, TransferStatus::default()),
            Joined::Leader(..)
        ));
    }
}
