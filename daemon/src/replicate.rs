//! Replication between trusted devices: each device *pulls*. A peer's index
//! is read from the sequence number we last applied (so a reconnect resumes
//! instead of resending), the chunks we lack are fetched and verified, and
//! the worker of the workspace applies the entries. A device that changes
//! something tells its peers (`Changed`), which pull.
//!
//! **Architecture Invariant:** progress with a peer is saved only after the
//! entries up to it are applied and committed; a crash re-reads, never
//! skips.
//!
//! Asking for entries after `since` acknowledges everything up to `since`;
//! `flush` waits for those acknowledgements.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use mariesync_protocol::ipc::{ErrorCode, RpcError};
use mariesync_protocol::wire::{
    CHUNK_REQUEST_MAX, CHUNK_RESPONSE_BYTES_MAX, INDEX_ENTRIES_MAX, Request, Response,
};
use mariesync_protocol::{ChunkHash, FileEntry, WorkspaceId};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::daemon::Daemon;
use crate::network::{NetEvent, Network};
use crate::store::EncodedChunk;
use crate::workspace::Job;

/// New chunks fetched for one apply at most before they are handed over.
const APPLY_CHUNK_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A failed pull is retried after these delays (doubling) while connected.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(60);
/// How long `flush` waits for peers to acknowledge.
const FLUSH_ACK_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Replicator {
    /// Weak: the daemon owns the replicator; a strong reference back would
    /// keep the store open forever (and redb unclosed at exit).
    daemon: std::sync::Weak<Daemon>,
    network: Network,
    /// Pulls under way, and whether another was asked for meanwhile.
    running: Mutex<HashMap<(WorkspaceId, PeerId), bool>>,
    /// What each peer acknowledged of each workspace (its last `since`).
    acks: Mutex<HashMap<(WorkspaceId, PeerId), u64>>,
    acked: Notify,
}

impl Replicator {
    pub fn new(daemon: &Arc<Daemon>, network: Network) -> Arc<Replicator> {
        Arc::new(Replicator {
            daemon: Arc::downgrade(daemon),
            network,
            running: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            acked: Notify::new(),
        })
    }

    fn daemon(&self) -> Result<Arc<Daemon>, String> {
        self.daemon
            .upgrade()
            .ok_or_else(|| "the daemon is shutting down".to_string())
    }

    pub async fn run(self: Arc<Self>, mut events: mpsc::Receiver<NetEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                NetEvent::PeerUp(peer) => {
                    let Ok(daemon) = self.daemon() else { return };
                    for workspace in daemon.workspace_ids() {
                        self.clone().pull(workspace, peer);
                    }
                }
                NetEvent::PeerDown(peer) => {
                    self.acks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(_, p), _| *p != peer);
                    self.acked.notify_waiters();
                }
                NetEvent::Request {
                    peer,
                    request,
                    channel,
                } => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let response = this.serve(peer, request).await;
                        this.network.respond(channel, response).await;
                    });
                }
            }
        }
    }

    async fn serve(self: &Arc<Self>, peer: PeerId, request: Request) -> Response {
        match request {
            Request::Hello { .. } => Response::Ack,
            Request::Changed { workspace, .. } => {
                tracing::debug!(%peer, %workspace, "peer announced changes");
                self.clone().pull(workspace, peer);
                Response::Ack
            }
            Request::IndexSince { workspace, since } => {
                let Ok(daemon) = self.daemon() else {
                    return Response::Error {
                        message: "shutting down".into(),
                    };
                };
                let Some(number) = daemon.workspace_number(workspace) else {
                    return Response::Error {
                        message: format!("workspace {workspace} is not shared here"),
                    };
                };
                {
                    let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
                    let ack = acks.entry((workspace, peer)).or_insert(0);
                    *ack = (*ack).max(since);
                }
                self.acked.notify_waiters();
                let store = daemon.store.clone();
                let read = tokio::task::spawn_blocking(move || {
                    store.changes_since(number, since, INDEX_ENTRIES_MAX)
                })
                .await;
                match read {
                    Ok(Ok((entries, more, last_sequence))) => {
                        tracing::debug!(%peer, %workspace, number, since, last_sequence, entries = entries.len(), "serving index entries");
                        Response::Index {
                            entries,
                            last_sequence,
                            more,
                        }
                    }
                    Ok(Err(e)) => Response::Error {
                        message: e.to_string(),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Chunks { hashes } => {
                if hashes.len() > CHUNK_REQUEST_MAX {
                    return Response::Error {
                        message: format!("at most {CHUNK_REQUEST_MAX} chunks per request"),
                    };
                }
                let Ok(daemon) = self.daemon() else {
                    return Response::Error {
                        message: "shutting down".into(),
                    };
                };
                let store = daemon.store.clone();
                let read = tokio::task::spawn_blocking(
                    move || -> Result<Vec<(ChunkHash, Vec<u8>)>, String> {
                        let reader = store.reader().map_err(|e| e.to_string())?;
                        let mut out = Vec::new();
                        let mut bytes = 0;
                        for hash in hashes {
                            match store.stored_chunk(&reader, &hash) {
                                Ok(Some(chunk)) => {
                                    bytes += chunk.stored.len();
                                    out.push((hash, chunk.stored));
                                    if bytes >= CHUNK_RESPONSE_BYTES_MAX {
                                        break;
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => tracing::error!("not serving chunk {hash}: {e}"),
                            }
                        }
                        Ok(out)
                    },
                )
                .await;
                match read {
                    Ok(Ok(chunks)) => Response::Chunks { chunks },
                    Ok(Err(message)) => Response::Error { message },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
        }
    }

    /// Starts pulling `workspace` from `peer`, or asks the running pull to
    /// go round once more.
    pub fn pull(self: Arc<Self>, workspace: WorkspaceId, peer: PeerId) {
        if self
            .daemon()
            .ok()
            .and_then(|d| d.workspace_number(workspace))
            .is_none()
        {
            return;
        }
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = running.get_mut(&(workspace, peer)) {
                *again = true;
                return;
            }
            running.insert((workspace, peer), false);
        }
        tokio::spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                if let Err(e) = self.pull_once(workspace, peer).await {
                    tracing::debug!(%peer, %workspace, "pull stopped: {e}");
                    // Again later while the peer is there: a busy peer, a
                    // file being saved, a full disk all pass.
                    if self.network.snapshot(|s| s.connected.contains_key(&peer)) {
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RETRY_LAST);
                        continue;
                    }
                }
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                if running.get(&(workspace, peer)) == Some(&true) {
                    running.insert((workspace, peer), false);
                    continue;
                }
                running.remove(&(workspace, peer));
                return;
            }
        });
    }

    async fn pull_once(&self, workspace: WorkspaceId, peer: PeerId) -> Result<(), String> {
        let progress_key = format!("progress/{workspace}/{peer}");
        tracing::debug!(%peer, %workspace, "pulling");
        loop {
            let since = self
                .daemon()?
                .store
                .meta_get(&progress_key)
                .map_err(|e| e.to_string())?
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .unwrap_or(0);
            let (entries, last_sequence, more) = match self
                .network
                .request(peer, Request::IndexSince { workspace, since })
                .await?
            {
                Response::Index {
                    entries,
                    last_sequence,
                    more,
                } => (entries, last_sequence, more),
                Response::Error { message } => return Err(message),
                other => return Err(format!("unexpected answer {other:?}")),
            };
            tracing::debug!(%peer, %workspace, since, last_sequence, more, entries = entries.len(), "index page");
            if entries.len() > INDEX_ENTRIES_MAX
                || last_sequence < since
                || (more && last_sequence == since)
            {
                return Err("a peer sent a malformed index page".into());
            }
            let failed = if entries.is_empty() {
                None
            } else {
                self.apply(workspace, peer, entries).await?
            };
            // Progress never passes an entry that is not applied: it is asked
            // for again on the next round.
            let progress = match failed {
                Some(sequence) => sequence.saturating_sub(1).max(since),
                None => last_sequence,
            };
            self.daemon()?
                .store
                .meta_put(&progress_key, Some(&progress.to_le_bytes()))
                .map_err(|e| e.to_string())?;
            if failed.is_some() {
                return Err("some entries could not be applied yet".into());
            }
            if !more {
                if last_sequence > since {
                    // Ask once more: it acknowledges what we just applied.
                    continue;
                }
                return Ok(());
            }
        }
    }

    /// Fetches what `entries` need and has the worker apply them, in groups
    /// whose new chunks fit in memory. Returns the peer's sequence of the
    /// first entry not applied, if any.
    async fn apply(
        &self,
        workspace: WorkspaceId,
        peer: PeerId,
        entries: Vec<FileEntry>,
    ) -> Result<Option<u64>, String> {
        let mut first_failed: Option<u64> = None;
        let mut group: Vec<FileEntry> = Vec::new();
        let mut group_bytes = 0u64;
        let mut rest = entries.into_iter().peekable();
        while let Some(entry) = rest.next() {
            group_bytes += entry.size;
            group.push(entry);
            if group_bytes >= APPLY_CHUNK_BYTES_MAX || rest.peek().is_none() {
                let missing = self
                    .job(workspace, |reply| Job::Plan {
                        entries: group.clone(),
                        reply,
                    })
                    .await?;
                let chunks = self.fetch(peer, &missing).await?;
                let entries = std::mem::take(&mut group);
                let (reply, answer) = oneshot::channel();
                self.daemon()?
                    .send_job(
                        workspace,
                        Job::Apply {
                            entries,
                            chunks,
                            reply,
                        },
                    )
                    .map_err(|e| e.to_string())?;
                let failed = answer
                    .await
                    .map_err(|_| "the workspace stopped".to_string())?
                    .map_err(|e| e.to_string())?;
                if let Some(failed) = failed {
                    first_failed = Some(first_failed.map_or(failed, |f| f.min(failed)));
                }
                group_bytes = 0;
            }
        }
        Ok(first_failed)
    }

    async fn job<T>(
        &self,
        workspace: WorkspaceId,
        make: impl FnOnce(oneshot::Sender<T>) -> Job,
    ) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.daemon()?
            .send_job(workspace, make(reply))
            .map_err(|e| e.to_string())?;
        answer
            .await
            .map_err(|_| "the workspace stopped".to_string())
    }

    /// Fetches chunks from `peer`, verifying each against its hash and
    /// length before it is kept.
    async fn fetch(
        &self,
        peer: PeerId,
        wanted: &[mariesync_protocol::index::ChunkRef],
    ) -> Result<Vec<EncodedChunk>, String> {
        let mut out = Vec::with_capacity(wanted.len());
        let mut pending: Vec<_> = wanted.to_vec();
        while !pending.is_empty() {
            let ask: Vec<ChunkHash> = pending
                .iter()
                .take(CHUNK_REQUEST_MAX)
                .map(|c| c.hash)
                .collect();
            let chunks = match self
                .network
                .request(
                    peer,
                    Request::Chunks {
                        hashes: ask.clone(),
                    },
                )
                .await?
            {
                Response::Chunks { chunks } => chunks,
                Response::Error { message } => return Err(message),
                other => return Err(format!("unexpected answer {other:?}")),
            };
            if chunks.is_empty() {
                return Err(format!("the peer no longer has chunk {}", ask[0]));
            }
            let lengths: HashMap<ChunkHash, u32> =
                pending.iter().map(|c| (c.hash, c.len)).collect();
            let verified =
                tokio::task::spawn_blocking(move || -> Result<Vec<EncodedChunk>, String> {
                    let mut out = Vec::new();
                    for (hash, stored) in chunks {
                        let Some(&len) = lengths.get(&hash) else {
                            return Err(format!(
                                "the peer sent chunk {hash} that was not asked for"
                            ));
                        };
                        crate::store::decode_chunk(&hash, len, &stored)
                            .map_err(|e| format!("the peer sent a bad chunk: {e}"))?;
                        out.push(EncodedChunk {
                            hash,
                            raw_len: len,
                            stored,
                        });
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| e.to_string())??;
            let got: HashSet<ChunkHash> = verified.iter().map(|c| c.hash).collect();
            pending.retain(|c| !got.contains(&c.hash));
            out.extend(verified);
        }
        Ok(out)
    }

    /// Sends `Changed` to one peer without waiting for its answer.
    fn tell_changed(&self, peer: PeerId, workspace: WorkspaceId, sequence: u64) {
        let network = self.network.clone();
        tokio::spawn(async move {
            let _ = network
                .request(
                    peer,
                    Request::Changed {
                        workspace,
                        sequence,
                    },
                )
                .await;
        });
    }

    /// Tells connected peers that `workspace` changed.
    pub fn announce(self: &Arc<Self>, workspace: WorkspaceId, sequence: u64) {
        let peers: Vec<PeerId> = self
            .network
            .snapshot(|s| s.connected.keys().copied().collect());
        for peer in peers {
            self.tell_changed(peer, workspace, sequence);
        }
    }

    /// Waits until every connected peer that shares `workspace` has
    /// acknowledged `sequence`.
    pub async fn wait_acknowledged(
        self: &Arc<Self>,
        workspace: WorkspaceId,
        sequence: u64,
    ) -> Result<(), RpcError> {
        let deadline = tokio::time::Instant::now() + FLUSH_ACK_TIMEOUT;
        loop {
            // Registered before the check, so no acknowledgement is missed.
            let notified = self.acked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let connected: HashSet<PeerId> = self
                .network
                .snapshot(|s| s.connected.keys().copied().collect());
            let behind: Vec<PeerId> = self
                .acks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|((ws, peer), ack)| {
                    *ws == workspace && connected.contains(peer) && **ack < sequence
                })
                .map(|((_, peer), _)| *peer)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            for peer in &behind {
                self.tell_changed(*peer, workspace, sequence);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(RpcError::new(
                    ErrorCode::Io,
                    format!(
                        "{} connected peer(s) did not acknowledge within {}s",
                        behind.len(),
                        FLUSH_ACK_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
    }
}
