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
//!
//! **Architecture Invariant:** roles are enforced by the receiver. A peer is
//! served a workspace only if it is a member; entries are pulled only from
//! members that may write (owners and editors), and an entry last changed by
//! a viewer is refused whoever relays it. Only owners change membership
//! (`protocol::membership`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use mariesync_protocol::index::ChunkRef;
use mariesync_protocol::ipc::{ErrorCode, RpcError, event_kind};
use mariesync_protocol::membership::Role;
use mariesync_protocol::wire::{
    self as wire, CHUNK_REQUEST_MAX, CHUNK_RESPONSE_BYTES_MAX, INDEX_ENTRIES_MAX, JoinRequest,
    JoinResponse, PUSH_BYTES_MAX, PUSH_ENTRIES_MAX, Pushed, Request, Response,
};
use mariesync_protocol::{ChunkHash, FileEntry, WorkspaceId};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::daemon::Daemon;
use crate::network::{NetEvent, Network, Outgoing};
use crate::store::EncodedChunk;
use crate::workspace::Job;

/// Chunks found corrupt while reading them, and why.
type Corrupt = Vec<(ChunkHash, String)>;

/// Entries are applied in groups of about this many bytes of files: what a
/// group needs is fetched (and committed) first, then the group applied.
const APPLY_CHUNK_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// `Chunks` requests in flight to one peer at most.
const FETCHES_IN_FLIGHT: usize = 4;
/// A failed pull is retried after these delays (doubling) while connected.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(60);
/// How long `flush` waits for peers to acknowledge.
const FLUSH_ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `flush` trusts a peer told of its changes to pull them
/// before telling it again.
const RETELL_AFTER: Duration = Duration::from_secs(1);

/// The worker's answer to an `Apply` job: the first entry not applied.
struct ApplyAnswer(oneshot::Receiver<Result<Option<u64>, RpcError>>);

impl std::future::Future for ApplyAnswer {
    type Output = Result<Option<u64>, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|answer| {
            answer
                .map_err(|_| "the workspace stopped".to_string())?
                .map_err(|e| e.to_string())
        })
    }
}

/// Chunks from `peer`, each checked against its hash and the length
/// expected of it (`lengths`). One not expected, or bad, is an offence:
/// the peer is cut off.
fn verify_chunks(
    network: &Network,
    peer: PeerId,
    chunks: Vec<(ChunkHash, Vec<u8>)>,
    lengths: &HashMap<ChunkHash, u32>,
    arrival: Arrival,
) -> Result<Vec<EncodedChunk>, String> {
    let verb = match arrival {
        Arrival::Fetched => "sent",
        Arrival::Pushed => "pushed",
    };
    let mut verified = Vec::with_capacity(chunks.len());
    for (hash, stored) in chunks {
        let Some(&len) = lengths.get(&hash) else {
            return Err(network.cut_off(
                peer,
                format!("the peer {verb} chunk {hash} that was not asked for"),
            ));
        };
        crate::store::verify_chunk(&hash, len, &stored)
            .map_err(|e| network.cut_off(peer, format!("the peer {verb} a bad chunk: {e}")))?;
        verified.push(EncodedChunk {
            hash,
            raw_len: len,
            stored,
        });
    }
    Ok(verified)
}

/// The answer to a request about a workspace not shared with `peer`.
fn refused(workspace: WorkspaceId, peer: PeerId) -> Response {
    Response::Error {
        message: format!("workspace {workspace} {NOT_SHARED} with {peer}"),
    }
}

/// In the answers of a device that does not have the workspace (yet): it
/// has not accepted an offer, or does not count us as a member.
const NOT_SHARED: &str = "is not shared";

/// A pull's applying: at most one group with the worker at a time, and
/// how far the peer's index is applied here.
struct Pipeline {
    /// Every entry up to this sequence is applied (or refused, or was
    /// already here).
    applied: u64,
    /// The group with the worker: its answer, the pins of its chunks, and
    /// where progress reaches once it is applied.
    applying: Option<(ApplyAnswer, crate::store::Pins, u64)>,
    /// The first entry that could not be applied: progress stops before it.
    failed: Option<u64>,
}

impl Pipeline {
    /// Waits for the group with the worker; its pins go once its entries
    /// are committed.
    async fn finish(&mut self) -> Result<(), String> {
        let Some((answer, pins, end)) = self.applying.take() else {
            return Ok(());
        };
        let failed = answer.await;
        drop(pins);
        if let Some(failed) = failed? {
            self.failed = Some(self.failed.map_or(failed, |f| f.min(failed)));
        }
        self.advance(end);
        Ok(())
    }

    fn advance(&mut self, end: u64) {
        let limit = self.failed.map_or(u64::MAX, |f| f.saturating_sub(1));
        self.applied = self.applied.max(end.min(limit));
    }
}

/// How far one pull that brought something is (for `status`).
#[derive(Clone, Copy, Debug, Default)]
struct PullProgress {
    /// The peer's sequence applied here when the pull began.
    base: u64,
    /// Applied here now.
    applied: u64,
    /// The peer's last sequence, as its last answer said.
    head: u64,
    /// Stored bytes this pull fetched.
    bytes: u64,
}

/// A workspace's syncs under way, summed over the peers it pulls from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Of the changes in the peers' indexes to bring here (sequence
    /// numbers: a change superseded meanwhile counts once), how many are
    /// applied.
    pub changes_done: u64,
    pub changes_total: u64,
    pub bytes_received: u64,
    pub peers: Vec<String>,
}

pub struct Replicator {
    /// Weak: the daemon owns the replicator; a strong reference back would
    /// keep the store open forever (and redb unclosed at exit).
    daemon: std::sync::Weak<Daemon>,
    network: Network,
    /// Pulls under way: whether another round was asked for meanwhile,
    /// and the last page the peer pushed, for the pull to start from.
    running: Mutex<HashMap<(WorkspaceId, PeerId), Running>>,
    /// What each peer acknowledged of each workspace (its last `applied`).
    acks: Mutex<HashMap<(WorkspaceId, PeerId), u64>>,
    acked: Notify,
    /// Chunks some pull is fetching now: when several peers have the same
    /// data, each chunk is asked of one of them, and the pulls share the
    /// work request by request.
    claimed: Mutex<HashSet<ChunkHash>>,
    released: Notify,
    /// Stored bytes fetched from each peer since the daemon started.
    fetched_from: Mutex<HashMap<PeerId, u64>>,
    /// Pulls that are bringing something, and how far they are.
    progress: Mutex<HashMap<(WorkspaceId, PeerId), PullProgress>>,
    /// `Changed` requests in flight, and the newest sequence to send when
    /// each returns (see [`Replicator::tell_changed`]).
    telling: Mutex<HashMap<(PeerId, WorkspaceId), Option<u64>>>,
    /// The last sequence of the newest page each peer took with a
    /// `Changed`: it is pulling up to there already, so a `flush` waiting
    /// for it need not tell it again (not before [`RETELL_AFTER`]).
    pushed_through: Mutex<HashMap<(PeerId, WorkspaceId), (u64, std::time::Instant)>>,
    this: std::sync::Weak<Replicator>,
}

/// How chunks from a peer came: asked for (committed durably: fetched
/// once, even across a crash) or pushed with a change (stored by the
/// commit of the entries that use them).
#[derive(Clone, Copy)]
enum Arrival {
    Fetched,
    Pushed,
}

struct Running {
    again: bool,
    pushed: Option<Box<Pushed>>,
    /// Cuts the wait after a refusal short: the peer just showed it has
    /// the workspace now (it announced a change, or pulls from us).
    wake: Arc<tokio::sync::Notify>,
}

/// Chunks claimed by one `Chunks` request, released when it ends however
/// it ends.
struct Claim<'a> {
    replicator: &'a Replicator,
    hashes: Vec<ChunkHash>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claimed = self
            .replicator
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for hash in &self.hashes {
            claimed.remove(hash);
        }
        drop(claimed);
        self.replicator.released.notify_waiters();
    }
}

impl Replicator {
    pub fn new(daemon: &Arc<Daemon>, network: Network) -> Arc<Replicator> {
        Arc::new_cyclic(|this| Replicator {
            this: this.clone(),
            telling: Mutex::new(HashMap::new()),
            pushed_through: Mutex::new(HashMap::new()),
            daemon: Arc::downgrade(daemon),
            network,
            running: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            acked: Notify::new(),
            claimed: Mutex::new(HashSet::new()),
            released: Notify::new(),
            fetched_from: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
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
                    daemon.settings.peer_up(peer);
                    for (workspace, _) in daemon.sharing.shared_with(&peer.to_string()) {
                        // Owners bring members up to date (and repeat offers
                        // the peer has not accepted yet).
                        if daemon.sharing.my_role(workspace) == Some(Role::Owner) {
                            self.send_membership(&daemon, workspace, peer);
                        }
                        self.clone().pull(workspace, peer);
                    }
                }
                NetEvent::JoinRequest {
                    peer,
                    request,
                    channel,
                } => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let response = this.serve_join(peer, request).await;
                        this.network.respond_join(channel, response).await;
                    });
                }
                NetEvent::Addresses { peer, addrs } => {
                    let Ok(daemon) = self.daemon() else { return };
                    let _ = tokio::task::spawn_blocking(move || daemon.remember_addrs(peer, addrs))
                        .await;
                }
                NetEvent::PeerDown(peer) => {
                    if let Ok(daemon) = self.daemon() {
                        daemon.settings.peer_down(peer);
                    }
                    self.acks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(_, p), _| *p != peer);
                    self.pushed_through
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(p, _), _| *p != peer);
                    self.acked.notify_waiters();
                }
                NetEvent::Request {
                    peer,
                    request,
                    channel,
                } => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let response = match request {
                            Request::Chunks { workspace, hashes } => {
                                this.serve_chunks(peer, workspace, hashes).await
                            }
                            request => Outgoing::Message(this.serve(peer, request).await),
                        };
                        this.network.respond(channel, response).await;
                    });
                }
            }
        }
    }

    async fn serve(self: &Arc<Self>, peer: PeerId, request: Request) -> Response {
        let Ok(daemon) = self.daemon() else {
            return Response::Error {
                message: "shutting down".into(),
            };
        };
        match request {
            Request::Hello { .. } => Response::Ack,
            Request::Settings {
                doc,
                new_session,
                message,
            } => {
                let settings = daemon.settings.clone();
                tokio::task::spawn_blocking(move || {
                    settings.serve(peer, &doc, new_session, &message)
                })
                .await
                .unwrap_or_else(|e| Response::Error {
                    message: e.to_string(),
                })
            }
            Request::Membership {
                workspace,
                name,
                membership,
            } => {
                let sharing = &daemon.sharing;
                match sharing.receive(
                    &peer.to_string(),
                    workspace,
                    &name,
                    membership,
                    crate::workspace::now_ms(),
                ) {
                    Ok(received) => {
                        tracing::debug!(%peer, %workspace, ?received, "membership from a peer");
                        if received != crate::sharing::Received::Offered {
                            // An owner: it has the workspace.
                            self.expect_acks(&daemon, workspace, peer);
                        }
                        if received == crate::sharing::Received::Updated {
                            // Someone may have been added: pull from them.
                            self.pull_all(&daemon, workspace);
                        }
                        Response::Ack
                    }
                    Err(message) => {
                        tracing::warn!(%peer, %workspace, "membership refused: {message}");
                        Response::Error { message }
                    }
                }
            }
            Request::Changed {
                workspace, pushed, ..
            } => {
                tracing::debug!(%peer, %workspace, pushed = pushed.is_some(), "peer announced changes");
                match daemon.sharing.role(workspace, &peer.to_string()) {
                    Some(role) if role.can_write() => {
                        self.expect_acks(&daemon, workspace, peer);
                        let pushed = pushed.filter(|p| {
                            let ok = p.within_limits();
                            if !ok {
                                tracing::warn!(%peer, %workspace, "ignoring a pushed change beyond the limits");
                            }
                            ok
                        });
                        self.clone().pull_with(workspace, peer, pushed)
                    }
                    Some(role) => {
                        // It still pulls from us.
                        self.expect_acks(&daemon, workspace, peer);
                        tracing::info!(%peer, %workspace, "not accepting changes from a {role}");
                        daemon.events.publish(
                            event_kind::CHANGES_REFUSED,
                            serde_json::json!({
                                "workspace_id": workspace.to_string(),
                                "device_id": peer.to_string(),
                                "reason": format!("the device is a {role} of this workspace"),
                            }),
                        );
                    }
                    None => return refused(workspace, peer),
                }
                Response::Ack
            }
            Request::IndexAfter {
                workspace,
                after,
                applied,
            } => {
                if daemon.sharing.role(workspace, &peer.to_string()).is_none() {
                    return refused(workspace, peer);
                }
                let Some(number) = daemon.workspace_number(workspace) else {
                    return Response::Error {
                        message: format!("workspace {workspace} {NOT_SHARED} here"),
                    };
                };
                {
                    let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
                    let ack = acks.entry((workspace, peer)).or_insert(0);
                    *ack = (*ack).max(applied);
                }
                self.acked.notify_waiters();
                // It has the workspace now: a pull from it waiting to try
                // again (it had refused us) need not wait any longer.
                if let Some(run) = self
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(workspace, peer))
                {
                    run.wake.notify_one();
                }
                let store = daemon.store.clone();
                let read = tokio::task::spawn_blocking(move || {
                    store.changes_since(number, after, INDEX_ENTRIES_MAX)
                })
                .await;
                match read {
                    Ok(Ok(changes)) => {
                        tracing::debug!(%peer, %workspace, number, after, applied, covered = changes.covered, head = changes.head, entries = changes.entries.len(), "serving index entries");
                        Response::Index {
                            entries: changes.entries,
                            last_sequence: changes.covered,
                            more: changes.more,
                            head: changes.head,
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
            Request::Chunks { .. } => unreachable!("answered by serve_chunks"),
        }
    }

    /// Answers a `Chunks` request: the chunks found (missing or corrupt
    /// ones left out), up to an answer's size, read from the store straight
    /// into the answer's frame.
    async fn serve_chunks(
        &self,
        peer: PeerId,
        workspace: WorkspaceId,
        hashes: Vec<ChunkHash>,
    ) -> Outgoing<Response> {
        let error = |message: String| Outgoing::Message(Response::Error { message });
        if hashes.len() > CHUNK_REQUEST_MAX {
            return error(format!("at most {CHUNK_REQUEST_MAX} chunks per request"));
        }
        let daemon = match self.daemon() {
            Ok(daemon) => daemon,
            Err(message) => return error(message),
        };
        if daemon.sharing.role(workspace, &peer.to_string()).is_none() {
            return Outgoing::Message(refused(workspace, peer));
        }
        let store = daemon.store.clone();
        drop(daemon);
        let read = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Corrupt), String> {
            let reader = store.reader().map_err(|e| e.to_string())?;
            let mut corrupt = Vec::new();
            let mut found = Vec::new();
            let mut bytes = 0;
            for hash in hashes {
                match reader.stored_at(&hash) {
                    Ok(Some(at)) => {
                        bytes += at.stored as usize;
                        found.push((hash, at));
                        if bytes >= CHUNK_RESPONSE_BYTES_MAX {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("not serving chunk {hash}: {e}"),
                }
            }
            // A chunk that fails its check is left out and the rest laid
            // out again (rare: the store is damaged).
            loop {
                let layout: Vec<(ChunkHash, usize)> = found
                    .iter()
                    .map(|(h, at)| (*h, at.stored as usize))
                    .collect();
                let mut bad = None;
                let frame = wire::encode_chunks_with(&layout, |i, out| {
                    let (hash, at) = &found[i];
                    reader.read_stored_into(hash, at, out).map_err(|e| {
                        tracing::error!("not serving chunk {hash}: {e}");
                        bad = Some((i, e));
                        wire::WireError::Malformed(format!("chunk {hash} unreadable"))
                    })
                });
                match (frame, bad) {
                    (Ok(frame), _) => return Ok((frame, corrupt)),
                    (Err(_), Some((i, e))) => {
                        let (hash, _) = found.remove(i);
                        if matches!(e, crate::store::StoreError::CorruptChunk { .. }) {
                            corrupt.push((hash, e.to_string()));
                        }
                    }
                    (Err(e), None) => return Err(e.to_string()),
                }
            }
        })
        .await;
        match read {
            Ok(Ok((frame, corrupt))) => {
                // The peer asks again later (a missing chunk); meanwhile
                // the bad copy is dropped and the files that have the
                // content are read again, which stores it afresh.
                if !corrupt.is_empty()
                    && let Ok(daemon) = self.daemon()
                {
                    // Not awaited: the answer need not wait for the repair.
                    drop(tokio::task::spawn_blocking(move || {
                        if let Err(e) = daemon.chunks_found_corrupt(&corrupt) {
                            tracing::error!("cannot drop corrupt chunks: {e}");
                        }
                    }));
                }
                Outgoing::Encoded(frame)
            }
            Ok(Err(message)) => error(message),
            Err(e) => error(e.to_string()),
        }
    }

    /// `peer` has `workspace` (it announced changes or sent its
    /// membership), so it pulls what we change: `flush` waits for its
    /// acknowledgement even before its first pull. Not for a viewer here,
    /// whose changes nobody pulls.
    fn expect_acks(&self, daemon: &Daemon, workspace: WorkspaceId, peer: PeerId) {
        if daemon.workspace_number(workspace).is_none()
            || !daemon
                .sharing
                .my_role(workspace)
                .is_some_and(Role::can_write)
        {
            return;
        }
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((workspace, peer))
            .or_insert(0);
    }

    /// A device presents a ticket.
    async fn serve_join(&self, peer: PeerId, request: JoinRequest) -> JoinResponse {
        let refuse = |message: String| JoinResponse::Refused { message };
        let Ok(daemon) = self.daemon() else {
            return refuse("the inviting device is shutting down".into());
        };
        let name: String = request.device_name.chars().take(255).collect();
        let answer =
            tokio::task::spawn_blocking(move || daemon.admit_joiner(peer, &request.secret, &name))
                .await;
        match answer {
            Ok(Ok(response)) => response,
            Ok(Err(message)) => {
                tracing::info!(%peer, "refused a ticket: {message}");
                refuse(message)
            }
            Err(e) => refuse(e.to_string()),
        }
    }

    /// Sends `workspace`'s membership to `peer` (which may not have the
    /// workspace yet: then it is an offer).
    pub fn send_membership(&self, daemon: &Daemon, workspace: WorkspaceId, peer: PeerId) {
        let (Some(membership), Some(name)) = (
            daemon.sharing.membership(workspace),
            daemon.workspace_name(workspace),
        ) else {
            return;
        };
        let network = self.network.clone();
        tokio::spawn(async move {
            let request = Request::Membership {
                workspace,
                name,
                membership,
            };
            if let Ok(Response::Error { message }) = network.request(peer, request).await {
                tracing::warn!(%peer, %workspace, "the peer refused our membership: {message}");
            }
        });
    }

    /// Sends `workspace`'s membership to every connected peer it names.
    pub fn push_membership(&self, daemon: &Daemon, workspace: WorkspaceId) {
        let Some(membership) = daemon.sharing.membership(workspace) else {
            return;
        };
        let connected: Vec<PeerId> = self
            .network
            .snapshot(|s| s.connected.keys().copied().collect());
        for peer in connected {
            if membership.role(&peer.to_string()).is_some() {
                self.send_membership(daemon, workspace, peer);
            }
        }
    }

    /// Pulls `workspace` from every connected member that may write.
    fn pull_all(self: &Arc<Self>, daemon: &Daemon, workspace: WorkspaceId) {
        let connected: Vec<PeerId> = self
            .network
            .snapshot(|s| s.connected.keys().copied().collect());
        for peer in connected {
            if daemon
                .sharing
                .role(workspace, &peer.to_string())
                .is_some_and(Role::can_write)
            {
                self.clone().pull(workspace, peer);
            }
        }
    }

    /// Starts pulling `workspace` from `peer`, or asks the running pull to
    /// go round once more. Only members that may write are pulled from.
    pub fn pull(self: Arc<Self>, workspace: WorkspaceId, peer: PeerId) {
        self.pull_with(workspace, peer, None);
    }

    /// [`Replicator::pull`], starting from a page the peer pushed (used if
    /// it follows what is applied here when the pull next asks for a page).
    fn pull_with(
        self: Arc<Self>,
        workspace: WorkspaceId,
        peer: PeerId,
        pushed: Option<Box<Pushed>>,
    ) {
        let Ok(daemon) = self.daemon() else { return };
        if daemon.workspace_number(workspace).is_none()
            || !daemon
                .sharing
                .role(workspace, &peer.to_string())
                .is_some_and(Role::can_write)
        {
            return;
        }
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run) = running.get_mut(&(workspace, peer)) {
                run.again = true;
                if pushed.is_some() {
                    run.pushed = pushed;
                }
                run.wake.notify_one();
                return;
            }
            running.insert(
                (workspace, peer),
                Running {
                    again: false,
                    pushed,
                    wake: Arc::new(tokio::sync::Notify::new()),
                },
            );
        }
        tokio::spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                if let Err(e) = self.pull_once(workspace, peer).await {
                    tracing::debug!(%peer, %workspace, "pull stopped: {e}");
                    // Again later while the peer is there: a busy peer, a
                    // file being saved, a full disk all pass. A peer that
                    // refused us for not having the workspace is asked
                    // again as soon as it shows it has it (it pulls from
                    // us, or announces a change); other failures wait.
                    if self.network.snapshot(|s| s.connected.contains_key(&peer)) {
                        let wake = self
                            .running
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&(workspace, peer))
                            .filter(|_| e.contains(NOT_SHARED))
                            .map(|run| run.wake.clone());
                        match wake {
                            Some(wake) => {
                                tokio::select! {
                                    () = tokio::time::sleep(retry) => {}
                                    () = wake.notified() => {}
                                }
                            }
                            None => tokio::time::sleep(retry).await,
                        }
                        retry = (retry * 2).min(RETRY_LAST);
                        continue;
                    }
                }
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(run) = running.get_mut(&(workspace, peer))
                    && run.again
                {
                    run.again = false;
                    continue;
                }
                running.remove(&(workspace, peer));
                return;
            }
        });
    }

    /// Pulls `workspace` from `peer` until caught up. Pages of the index
    /// overlap: the next page is asked for (and its chunks fetched) while
    /// the worker still applies the last one; each request acknowledges
    /// what is applied so far, never more.
    async fn pull_once(&self, workspace: WorkspaceId, peer: PeerId) -> Result<(), String> {
        let result = self.pull_pages(workspace, peer).await;
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(workspace, peer));
        result
    }

    async fn pull_pages(&self, workspace: WorkspaceId, peer: PeerId) -> Result<(), String> {
        let progress_key = format!("progress/{workspace}/{peer}");
        tracing::debug!(%peer, %workspace, "pulling");
        let daemon = self.daemon()?;
        let store = daemon.store.clone();
        let number = daemon
            .workspace_number(workspace)
            .ok_or("the workspace was removed")?;
        drop(daemon);
        let mut pipeline = Pipeline {
            applied: store
                .meta_get(&progress_key)
                .map_err(|e| e.to_string())?
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .unwrap_or(0),
            applying: None,
            failed: None,
        };
        let (mut after, mut saved) = (pipeline.applied, pipeline.applied);
        let mut expecting = false;
        let result = loop {
            let applied = pipeline.applied;
            // A page pushed with the announcement is the one we would ask
            // for, if it follows what is applied here.
            let mut prefetched = HashMap::new();
            let mut from_push = false;
            let pushed = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&(workspace, peer))
                .and_then(|run| run.pushed.take());
            let (entries, last_sequence, more, head) = match pushed {
                Some(page) if page.after == after => {
                    let page = *page;
                    from_push = true;
                    prefetched.extend(page.chunks);
                    (page.entries, page.last_sequence, false, page.head)
                }
                _ => match self
                    .network
                    .request(
                        peer,
                        Request::IndexAfter {
                            workspace,
                            after,
                            applied,
                        },
                    )
                    .await
                {
                    Ok(Response::Index {
                        entries,
                        last_sequence,
                        more,
                        head,
                    }) => (entries, last_sequence, more, head),
                    Ok(Response::Error { message }) => break Err(message),
                    Ok(other) => break Err(format!("unexpected answer {other:?}")),
                    Err(e) => break Err(e),
                },
            };
            tracing::debug!(%peer, %workspace, after, applied, last_sequence, more, entries = entries.len(), pushed = from_push, "index page");
            if entries.len() > INDEX_ENTRIES_MAX
                || last_sequence < after
                || (more && last_sequence == after)
                || head < last_sequence
            {
                // More entries than a page holds (millions, say) or
                // sequences that contradict themselves: no honest peer
                // sends that.
                let reason = format!(
                    "a malformed index page ({} entries, after {after}, last {last_sequence}, head {head})",
                    entries.len()
                );
                break Err(self.network.cut_off(peer, reason));
            }
            if !expecting {
                // It serves the workspace, so it has it and pulls from us
                // too: `flush` waits for it from now on, even before its
                // first pull reaches us.
                expecting = true;
                if let Ok(daemon) = self.daemon() {
                    self.expect_acks(&daemon, workspace, peer);
                }
            }
            if !entries.is_empty() {
                let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                let p = progress.entry((workspace, peer)).or_insert(PullProgress {
                    base: applied,
                    applied,
                    ..PullProgress::default()
                });
                p.head = p.head.max(head);
            }
            if !entries.is_empty()
                && let Err(e) = self
                    .apply(
                        workspace,
                        peer,
                        entries,
                        last_sequence,
                        &mut pipeline,
                        prefetched,
                    )
                    .await
            {
                break Err(e);
            }
            let asked_after = after;
            after = last_sequence;
            // At the end of what there is, everything asked for is applied
            // before asking once more (which acknowledges it, and brings
            // what changed meanwhile).
            if !more && let Err(e) = pipeline.finish().await {
                break Err(e);
            }
            if pipeline.applied > saved {
                self.save_progress(workspace, number, &store, &progress_key, pipeline.applied)?;
                saved = pipeline.applied;
                self.update_progress(workspace, peer, |p| p.applied = p.applied.max(saved));
            }
            if pipeline.failed.is_some() {
                break Err("some entries could not be applied yet".into());
            }
            // Caught up: nothing new, and all of it acknowledged.
            if !more && last_sequence == asked_after && pipeline.applied == applied {
                break Ok(());
            }
        };
        // Whatever happened, the group under way finishes before its pins
        // go, and what it applied counts.
        let finished = pipeline.finish().await;
        if pipeline.applied > saved {
            self.save_progress(workspace, number, &store, &progress_key, pipeline.applied)?;
        }
        result.and(finished)
    }

    /// Progress is saved lazily: the entries it covers are committed
    /// durably already, and progress lost to a crash only means reading
    /// them again (applying is idempotent).
    ///
    /// Not once the workspace is removed here: `workspace remove` forgets
    /// its progress, and a pull ending after that would bring it back, so
    /// that a later re-add would skip the peer's entries up to it. The
    /// check is made in the commit that saves it, against the workspace
    /// `number` the pull began with (never given to another workspace).
    fn save_progress(
        &self,
        workspace: WorkspaceId,
        number: u32,
        store: &crate::store::Store,
        key: &str,
        applied: u64,
    ) -> Result<(), String> {
        store
            .meta_put_lazy_for(number, workspace, key, Some(&applied.to_le_bytes()))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Fetches what one page's `entries` need and has the worker apply
    /// them, in groups whose new chunks fit in memory: while the worker
    /// applies one group (of this page or the last), the next one's chunks
    /// are fetched. `last_sequence` is the page's; `prefetched`, chunks
    /// the peer pushed with it (stored form, not yet checked).
    async fn apply(
        &self,
        workspace: WorkspaceId,
        peer: PeerId,
        entries: Vec<FileEntry>,
        last_sequence: u64,
        pipeline: &mut Pipeline,
        mut prefetched: HashMap<ChunkHash, Vec<u8>>,
    ) -> Result<(), String> {
        // A viewer's changes are never accepted, whoever relays them.
        let daemon = self.daemon()?;
        let (entries, refused): (Vec<FileEntry>, Vec<FileEntry>) = entries
            .into_iter()
            .partition(|e| daemon.sharing.role(workspace, &e.modified_by) != Some(Role::Viewer));
        if !refused.is_empty() {
            tracing::warn!(%peer, %workspace, count = refused.len(), "refused entries last changed by a viewer");
        }
        let store = daemon.store.clone();
        let number = daemon
            .workspace_number(workspace)
            .ok_or("the workspace was removed")?;
        drop(daemon);
        let mut groups: Vec<Vec<FileEntry>> = vec![Vec::new()];
        let mut group_bytes = 0u64;
        for entry in entries {
            if group_bytes >= APPLY_CHUNK_BYTES_MAX {
                groups.push(Vec::new());
                group_bytes = 0;
            }
            group_bytes += entry.size;
            groups.last_mut().expect("a group").push(entry);
        }
        groups.retain(|g| !g.is_empty());
        if groups.is_empty() {
            // Nothing to apply: the page counts once what is under way does.
            pipeline.finish().await?;
            pipeline.advance(last_sequence);
            return Ok(());
        }
        // Once a group and all before it are applied, progress reaches the
        // entry before the next group (refused entries included), or the
        // page's end.
        let ends: Vec<u64> = groups
            .iter()
            .skip(1)
            .map(|g| g[0].sequence.saturating_sub(1).min(last_sequence))
            .chain(std::iter::once(last_sequence))
            .collect();
        for (group, end) in groups.into_iter().zip(ends) {
            let plan_store = store.clone();
            let (group, missing) =
                crate::run_blocking(group.len() <= PUSH_ENTRIES_MAX, move || {
                    let missing = crate::workspace::plan_remote(&plan_store, number, &group);
                    (group, missing)
                })
                .await
                .map_err(|e| e.to_string())?;
            let missing = missing.map_err(|e| e.to_string())?;
            // Pinned from before they are stored until the entries that
            // reference them are committed: GC keeps them, and a crash in
            // between leaves them stored, not fetched again.
            let pins = store.pin(missing.iter().map(|c| c.hash).collect());
            let started = std::time::Instant::now();
            let received = self
                .fetch(peer, workspace, &missing, &mut prefetched)
                .await?;
            tracing::debug!(%peer, %workspace, entries = group.len(), chunks = missing.len(), ms = started.elapsed().as_millis() as u64, "fetched a group's chunks");
            // One group applies at a time, in order.
            pipeline.finish().await?;
            let (reply, answer) = oneshot::channel();
            self.daemon()?
                .send_job(
                    workspace,
                    Job::Apply {
                        entries: group,
                        received,
                        reply,
                    },
                )
                .map_err(|e| e.to_string())?;
            pipeline.applying = Some((ApplyAnswer(answer), pins, end));
        }
        Ok(())
    }

    /// Fetches chunks from `peer`, several requests in flight, verifying
    /// each chunk against its hash and length and committing it durably as
    /// each answer arrives (pinned by the caller). Chunks another pull is
    /// fetching at the same time (from another peer) are not asked for:
    /// their arrival is awaited, and asked for here only if that pull fails.
    ///
    /// Those among `pushed` (what the peer sent with the page: a save's few
    /// small chunks) are taken from there instead, checked the same way,
    /// and returned, not stored: the apply writes the files from them and
    /// stores them with its entries, a commit fewer on a save's way to the
    /// disk here (0.2 to 0.8 ms). A crash before that only means asking
    /// for them.
    async fn fetch(
        &self,
        peer: PeerId,
        workspace: WorkspaceId,
        wanted: &[ChunkRef],
        pushed: &mut HashMap<ChunkHash, Vec<u8>>,
    ) -> Result<Vec<EncodedChunk>, String> {
        use futures::StreamExt;
        let store = self.daemon()?.store.clone();
        let lengths: Arc<HashMap<ChunkHash, u32>> =
            Arc::new(wanted.iter().map(|c| (c.hash, c.len)).collect());
        // Those the peer pushed with the page come first, without asking.
        let came: Vec<(ChunkHash, Vec<u8>)> = wanted
            .iter()
            .filter_map(|c| pushed.remove(&c.hash).map(|bytes| (c.hash, bytes)))
            .collect();
        let received = crate::short_blocking(|| {
            verify_chunks(&self.network, peer, came, &lengths, Arrival::Pushed)
        })?;
        self.count_received(peer, workspace, &received);
        let mut pending: Vec<ChunkRef> = wanted
            .iter()
            .filter(|c| !received.iter().any(|r| r.hash == c.hash))
            .copied()
            .collect();
        loop {
            // What arrived meanwhile, through another pull, is not asked for.
            let reader = store.reader().map_err(|e| e.to_string())?;
            pending.retain(|c| !reader.contains(&c.hash).unwrap_or(false));
            drop(reader);
            if pending.is_empty() {
                return Ok(received);
            }
            // Requests sized to what one answer carries, and at least as
            // many as may be in flight: the peer reads each on its own
            // thread (many small chunks cost it more than their bytes).
            let per_request = pending
                .len()
                .div_ceil(FETCHES_IN_FLIGHT)
                .clamp(1, CHUNK_REQUEST_MAX);
            let mut requests: Vec<Vec<ChunkHash>> = Vec::new();
            let mut bytes = 0;
            for chunk in &pending {
                let len = chunk.len as usize;
                match requests.last_mut() {
                    Some(last)
                        if last.len() < per_request && bytes + len <= CHUNK_RESPONSE_BYTES_MAX =>
                    {
                        last.push(chunk.hash);
                        bytes += len;
                    }
                    _ => {
                        requests.push(vec![chunk.hash]);
                        bytes = len;
                    }
                }
            }
            // Each request claims its chunks when it is sent, not before:
            // two pulls of the same data take turns.
            let mut answers = futures::stream::iter(requests)
                .map(|ask| self.fetch_claimed(peer, workspace, ask, &lengths, &store))
                .buffer_unordered(FETCHES_IN_FLIGHT);
            let mut progress = false;
            while let Some(answer) = answers.next().await {
                progress |= answer?;
            }
            drop(answers);
            self.wait_unclaimed(&pending).await;
            if !progress {
                return Err(format!("the peer no longer has chunk {}", pending[0].hash));
            }
        }
    }

    /// Fetches the chunks of `ask` no other pull has claimed; whether
    /// anything moved (chunks came, or another pull has them in hand).
    async fn fetch_claimed(
        &self,
        peer: PeerId,
        workspace: WorkspaceId,
        ask: Vec<ChunkHash>,
        lengths: &Arc<HashMap<ChunkHash, u32>>,
        store: &Arc<crate::store::Store>,
    ) -> Result<bool, String> {
        let asked = ask.len();
        let mut claim = {
            let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
            Claim {
                replicator: self,
                hashes: ask.into_iter().filter(|h| claimed.insert(*h)).collect(),
            }
        };
        // A chunk is committed before its claim is released: one neither
        // claimed nor stored now is fetched by nobody else. Stored ones
        // (fetched since this pass began) are not asked again.
        let reader = store.reader().map_err(|e| e.to_string())?;
        let stored: Vec<ChunkHash> = claim
            .hashes
            .iter()
            .copied()
            .filter(|h| reader.contains(h).unwrap_or(false))
            .collect();
        drop(reader);
        if !stored.is_empty() {
            claim.hashes.retain(|h| !stored.contains(h));
            let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
            for hash in &stored {
                claimed.remove(hash);
            }
        }
        let others = claim.hashes.len() < asked;
        if claim.hashes.is_empty() {
            return Ok(others);
        }
        let got = self
            .fetch_some(peer, workspace, claim.hashes.clone(), lengths, store)
            .await?;
        drop(claim);
        Ok(!got.is_empty() || others)
    }

    /// Waits until no pull holds a claim on any of `chunks`.
    async fn wait_unclaimed(&self, chunks: &[ChunkRef]) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy = {
                let claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
                chunks.iter().any(|c| claimed.contains(&c.hash))
            };
            if !busy {
                return;
            }
            notified.await;
        }
    }

    /// Updates the progress of the pull of `workspace` from `peer`, if it
    /// is bringing something.
    fn update_progress(
        &self,
        workspace: WorkspaceId,
        peer: PeerId,
        update: impl FnOnce(&mut PullProgress),
    ) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = progress.get_mut(&(workspace, peer)) {
            update(p);
        }
    }

    /// The syncs of `workspace` under way, if any pull is bringing
    /// something.
    pub fn sync_progress(&self, workspace: WorkspaceId) -> Option<SyncProgress> {
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum: Option<SyncProgress> = None;
        for ((ws, peer), p) in progress.iter() {
            if *ws != workspace || p.head <= p.base {
                continue;
            }
            let sum = sum.get_or_insert_with(SyncProgress::default);
            sum.changes_done += p.applied.min(p.head) - p.base;
            sum.changes_total += p.head - p.base;
            sum.bytes_received += p.bytes;
            sum.peers.push(peer.to_string());
        }
        if let Some(sum) = &mut sum {
            sum.peers.sort();
        }
        sum
    }

    /// Stored bytes fetched from `peer` since the daemon started.
    pub fn fetched_from(&self, peer: &PeerId) -> u64 {
        self.fetched_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }

    /// One `Chunks` request: what came back, verified and committed.
    async fn fetch_some(
        &self,
        peer: PeerId,
        workspace: WorkspaceId,
        ask: Vec<ChunkHash>,
        lengths: &Arc<HashMap<ChunkHash, u32>>,
        store: &Arc<crate::store::Store>,
    ) -> Result<Vec<ChunkHash>, String> {
        let chunks = match self
            .network
            .request(
                peer,
                Request::Chunks {
                    workspace,
                    hashes: ask,
                },
            )
            .await?
        {
            Response::Chunks { chunks } => chunks,
            Response::Error { message } => return Err(message),
            other => return Err(format!("unexpected answer {other:?}")),
        };
        self.receive_chunks(peer, workspace, chunks, lengths.clone(), store)
            .await
    }

    /// Chunks `peer` sent when asked, verified (see [`verify_chunks`]),
    /// then committed durably and counted; which were.
    async fn receive_chunks(
        &self,
        peer: PeerId,
        workspace: WorkspaceId,
        chunks: Vec<(ChunkHash, Vec<u8>)>,
        lengths: Arc<HashMap<ChunkHash, u32>>,
        store: &Arc<crate::store::Store>,
    ) -> Result<Vec<ChunkHash>, String> {
        let store = store.clone();
        let network = self.network.clone();
        let verified = crate::run_blocking(false, move || -> Result<_, String> {
            let verified = verify_chunks(&network, peer, chunks, &lengths, Arrival::Fetched)?;
            if !verified.is_empty() {
                store
                    .commit_fetched_chunks(&verified)
                    .map_err(|e| e.to_string())?;
            }
            Ok(verified)
        })
        .await
        .map_err(|e| e.to_string())??;
        self.count_received(peer, workspace, &verified);
        Ok(verified.iter().map(|c| c.hash).collect())
    }

    /// Counts what `chunks` from `peer` weighed, for `status` and the
    /// progress of the pull.
    fn count_received(&self, peer: PeerId, workspace: WorkspaceId, chunks: &[EncodedChunk]) {
        let bytes: u64 = chunks.iter().map(|c| c.stored.len() as u64).sum();
        if bytes == 0 {
            return;
        }
        *self
            .fetched_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_insert(0) += bytes;
        self.update_progress(workspace, peer, |p| p.bytes += bytes);
    }

    /// Sends `Changed` to one peer without waiting for its answer. One is
    /// in flight per peer and workspace at most: news that comes meanwhile
    /// is sent once when it returns (a receiver writing thousands of files
    /// announced each batch, and flooded the sender with requests).
    fn tell_changed(&self, peer: PeerId, workspace: WorkspaceId, sequence: u64) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        {
            let mut telling = self.telling.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = telling.get_mut(&(peer, workspace)) {
                *again = Some(again.map_or(sequence, |s| s.max(sequence)));
                return;
            }
            telling.insert((peer, workspace), None);
        }
        let network = self.network.clone();
        tokio::spawn(async move {
            let mut sequence = sequence;
            loop {
                let pushed = this.page_to_push(peer, workspace).await;
                let through = pushed.as_ref().map(|p| p.last_sequence);
                let told = network
                    .request(
                        peer,
                        Request::Changed {
                            workspace,
                            sequence,
                            pushed,
                        },
                    )
                    .await;
                if let (Some(through), Ok(Response::Ack)) = (through, told) {
                    let mut pushed = this
                        .pushed_through
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let now = std::time::Instant::now();
                    pushed
                        .entry((peer, workspace))
                        .and_modify(|(at, when)| (*at, *when) = ((*at).max(through), now))
                        .or_insert((through, now));
                }
                let mut telling = this.telling.lock().unwrap_or_else(|e| e.into_inner());
                match telling.get_mut(&(peer, workspace)) {
                    Some(again @ Some(_)) => sequence = again.take().unwrap_or(sequence),
                    _ => {
                        telling.remove(&(peer, workspace));
                        return;
                    }
                }
            }
        });
    }

    /// What `peer` would pull next of `workspace`, if it is little: the
    /// entries after what it last acknowledged, all in one page, and the
    /// chunks they name up to [`PUSH_BYTES_MAX`] (the receiver fetches
    /// any it lacks beyond them).
    async fn page_to_push(&self, peer: PeerId, workspace: WorkspaceId) -> Option<Box<Pushed>> {
        let daemon = self.daemon().ok()?;
        if !daemon
            .sharing
            .my_role(workspace)
            .is_some_and(Role::can_write)
            || daemon.sharing.role(workspace, &peer.to_string()).is_none()
        {
            return None;
        }
        let number = daemon.workspace_number(workspace)?;
        let after = *self
            .acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(workspace, peer))?;
        let store = daemon.store.clone();
        drop(daemon);
        // A page is small (PUSH_ENTRIES_MAX, PUSH_BYTES_MAX): read on this
        // thread, a save's way to the peer waits for it (see
        // `crate::short_blocking`).
        let page = crate::short_blocking(move || -> crate::store::Result<_> {
            let changes = store.changes_since(number, after, PUSH_ENTRIES_MAX)?;
            if changes.more || changes.entries.is_empty() {
                return Ok(None);
            }
            let reader = store.reader()?;
            let mut chunks: Vec<(ChunkHash, Vec<u8>)> = Vec::new();
            let mut seen = HashSet::new();
            let mut bytes = 0;
            // The peer made some of these versions: it has their chunks.
            let theirs = peer.to_string();
            let wanted = changes
                .entries
                .iter()
                .filter(|e| !e.deleted && e.modified_by != theirs);
            'entries: for entry in wanted {
                for chunk in &entry.chunks {
                    if !seen.insert(chunk.hash) {
                        continue;
                    }
                    let Some(at) = reader.stored_at(&chunk.hash)? else {
                        continue;
                    };
                    if bytes + at.stored as usize > PUSH_BYTES_MAX
                        || chunks.len() == CHUNK_REQUEST_MAX
                    {
                        break 'entries;
                    }
                    let mut stored = vec![0; at.stored as usize];
                    reader.read_stored_into(&chunk.hash, &at, &mut stored)?;
                    bytes += stored.len();
                    chunks.push((chunk.hash, stored));
                }
            }
            Ok(Some(Box::new(Pushed {
                after,
                entries: changes.entries,
                last_sequence: changes.covered,
                head: changes.head,
                chunks,
            })))
        });
        match page {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(%peer, %workspace, "not pushing a change: {e}");
                None
            }
        }
    }

    /// Tells connected members that `workspace` changed.
    pub fn announce(self: &Arc<Self>, workspace: WorkspaceId, sequence: u64) {
        let Some(membership) = self
            .daemon()
            .ok()
            .and_then(|d| d.sharing.membership(workspace))
        else {
            return;
        };
        let peers: Vec<PeerId> = self
            .network
            .snapshot(|s| s.connected.keys().copied().collect());
        for peer in peers {
            if membership.role(&peer.to_string()).is_some() {
                self.tell_changed(peer, workspace, sequence);
            }
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
            // A peer being told already pulls once it hears (and the
            // change that made it behind tells it again if need be), and
            // so does one that took a page through `sequence`: told again
            // now, it would only go round once more; unless that page left
            // a while ago.
            let untold: Vec<PeerId> = {
                let telling = self.telling.lock().unwrap_or_else(|e| e.into_inner());
                let pushed = self
                    .pushed_through
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                behind
                    .iter()
                    .copied()
                    .filter(|peer| !telling.contains_key(&(*peer, workspace)))
                    .filter(|peer| {
                        pushed.get(&(*peer, workspace)).is_none_or(|(at, when)| {
                            *at < sequence || when.elapsed() >= RETELL_AFTER
                        })
                    })
                    .collect()
            };
            for peer in untold {
                self.tell_changed(peer, workspace, sequence);
            }
            let again = tokio::time::Instant::now() + RETELL_AFTER;
            let woken = tokio::time::timeout_at(deadline.min(again), notified).await;
            if woken.is_err() && tokio::time::Instant::now() >= deadline {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A group sent to the worker, answered with `failed`.
    fn answered(
        store: &Arc<crate::store::Store>,
        failed: Option<u64>,
        end: u64,
    ) -> (ApplyAnswer, crate::store::Pins, u64) {
        let (reply, answer) = oneshot::channel();
        reply.send(Ok(failed)).expect("the answer is awaited");
        (ApplyAnswer(answer), store.pin(Vec::new()), end)
    }

    /// What a request acknowledges never passes an entry not applied: a
    /// group counts once its answer is in, and a failed entry holds
    /// progress before it whatever is applied after.
    #[test]
    fn progress_stops_before_the_first_entry_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::Store::open(&dir.path().join("s.redb")).unwrap());
        let mut pipeline = Pipeline {
            applied: 4,
            applying: Some(answered(&store, None, 10)),
            failed: None,
        };
        assert_eq!(pipeline.applied, 4, "sent to the worker is not applied");
        futures::executor::block_on(pipeline.finish()).unwrap();
        assert_eq!(pipeline.applied, 10);
        pipeline.applying = Some(answered(&store, Some(15), 20));
        futures::executor::block_on(pipeline.finish()).unwrap();
        assert_eq!((pipeline.applied, pipeline.failed), (14, Some(15)));
        pipeline.applying = Some(answered(&store, None, 30));
        futures::executor::block_on(pipeline.finish()).unwrap();
        pipeline.advance(40);
        assert_eq!(pipeline.applied, 14);
        // A worker that stopped is an error, and nothing advances.
        let (reply, answer) = oneshot::channel::<Result<Option<u64>, RpcError>>();
        drop(reply);
        pipeline.applying = Some((ApplyAnswer(answer), store.pin(Vec::new()), 50));
        assert!(futures::executor::block_on(pipeline.finish()).is_err());
        assert_eq!(pipeline.applied, 14);
    }
}
