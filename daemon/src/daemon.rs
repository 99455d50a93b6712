//! The daemon: owns the store, the workspace workers and the IPC server, and
//! answers every IPC method.
//!
//! Startup takes the home's lock, opens the store, restarts every
//! workspace's worker (each begins with a full scan that also finishes
//! interrupted restores and removes leftover temporary files) and only then
//! opens the socket. Shutdown closes the socket, stops the workers between
//! two commits and closes the database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use mariesync_ffi::HomePaths;
use mariesync_protocol::ipc::{
    CheckpointCreateParams, CheckpointDiffParams, CheckpointRestoreParams, ErrorCode,
    PeerAddParams, PeerParams, RpcError, TouchedParams, WorkspaceAddParams, WorkspaceFilesParams,
    WorkspaceParams, event_kind, method, parse_params,
};
use mariesync_protocol::{CheckpointId, ChunkHash, DeviceKey, FileKind, RelPath, WorkspaceId};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::checkpoint;
use crate::events::EventLog;
use crate::scan::Scope;
use crate::store::{PeerRecord, Store, StoreError, WorkspaceRecord, WorkspaceState};
use crate::workspace::{self, Activity, Job, store_rpc_error};

pub struct Options {
    pub paths: HomePaths,
    pub listen: Vec<String>,
    pub mdns: bool,
    pub relay: Option<String>,
}

pub struct Daemon {
    pub paths: HomePaths,
    pub store: Arc<Store>,
    pub device_id: String,
    pub device_key: DeviceKey,
    pub events: Arc<EventLog>,
    /// Memberships, offers and tickets.
    pub sharing: crate::sharing::Sharing,
    /// The settings documents of the device group.
    pub settings: Arc<crate::settings::Settings>,
    workspaces: Mutex<BTreeMap<u32, workspace::Handle>>,
    /// The libp2p node, once started.
    pub(crate) network: std::sync::OnceLock<crate::network::Network>,
    pub(crate) replicator: std::sync::OnceLock<Arc<crate::replicate::Replicator>>,
    shutdown: watch::Sender<bool>,
    /// Set when chunks may have become unreferenced since the last GC.
    garbage: Arc<AtomicBool>,
}

/// Paths one `workspace.touched` call may name.
const TOUCHED_PATHS_MAX: usize = 10_000;

/// Paths of a `workspace.touched` call resolved without a thread hop.
const TOUCHED_PATHS_INLINE_MAX: usize = 16;

/// How often unreferenced chunks are collected, when there may be some.
const GC_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Runs the daemon until SIGINT, SIGTERM or the `shutdown` method.
pub fn run(options: Options) -> anyhow::Result<()> {
    limit_malloc_arenas();
    let paths = options.paths;
    for dir in [&paths.config_dir, &paths.data_dir, &paths.runtime_dir] {
        create_private_dir(dir)?;
    }
    let _lock = lock_home(&paths)?;
    let identity = crate::identity::load_or_create(&paths.device_key())?;
    let store = Arc::new(
        Store::open(&paths.database())
            .with_context(|| format!("cannot open the database {}", paths.database().display()))?,
    );
    let listen: Vec<libp2p::Multiaddr> = if options.listen.is_empty() {
        crate::network::default_listen_addrs()
    } else {
        options
            .listen
            .iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("--listen {a} is not a multiaddr"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(relay) = &options.relay {
        tracing::warn!(
            "--relay {relay}: relays are not supported by this build yet; connecting directly only"
        );
    }
    let keypair = identity.keypair.clone();

    // Event sequence numbers continue across restarts: each run starts a new
    // epoch above everything handed out before.
    let epoch = store
        .meta_get("event_epoch")?
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0)
        + 1;
    store.meta_put("event_epoch", Some(&epoch.to_le_bytes()))?;
    let events = Arc::new(EventLog::new(epoch << 32));

    let ids: Vec<WorkspaceId> = store.workspaces()?.iter().map(|(_, r)| r.id).collect();
    let sharing = crate::sharing::Sharing::load(
        store.clone(),
        identity.device_id.clone(),
        events.clone(),
        &ids,
    )?;
    let settings =
        crate::settings::Settings::load(store.clone(), identity.device_id.clone(), events.clone())
            .context("cannot load the settings documents")?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let daemon = Arc::new(Daemon {
        sharing,
        settings,
        paths: paths.clone(),
        store: store.clone(),
        device_key: DeviceKey::of_device_id(&identity.device_id),
        device_id: identity.device_id,
        events,
        workspaces: Mutex::new(BTreeMap::new()),
        network: std::sync::OnceLock::new(),
        replicator: std::sync::OnceLock::new(),
        shutdown,
        garbage: Arc::new(AtomicBool::new(true)),
    });
    for (number, record) in store.workspaces()? {
        daemon.start_worker(number, &record, true);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let socket = paths.socket();
        let name = socket.as_os_str().to_fs_name::<GenericFilePath>()?;
        let mut listener_options = ListenerOptions::new().name(name).try_overwrite(true);
        #[cfg(unix)]
        {
            use interprocess::os::unix::local_socket::ListenerOptionsExt;
            listener_options = listener_options.mode(0o600);
        }
        let listener = listener_options
            .create_tokio()
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
                let trusted = store
            .peers()?
            .into_iter()
            .filter_map(|(id, record)| {
                let peer = id.parse::<libp2p::PeerId>().ok()?;
                Some((peer, record.addrs.iter().filter_map(|a| a.parse().ok()).collect()))
            })
            .collect();
                let (net_sender, net_events) = tokio::sync::mpsc::channel(1024);
        let network = crate::network::start(
            keypair,
            crate::network::Options { listen, mdns: options.mdns, device_name: crate::network::host_name() },
                        trusted,
            daemon.events.clone(),
            net_sender,
            shutdown_rx.clone(),
        )?;
        let _ = daemon.network.set(network.clone());
        daemon.settings.start(network.clone());
        let replicator = crate::replicate::Replicator::new(&daemon, network);
        tokio::spawn(replicator.clone().run(net_events));
        tokio::spawn(announce_changes(daemon.clone(), replicator.clone()));
        let _ = daemon.replicator.set(replicator);
        tracing::info!(device_id = %daemon.device_id, socket = %socket.display(), "mariesync daemon ready");
        let server = tokio::spawn(crate::ipc::serve(listener, daemon.clone(), shutdown_rx.clone()));
        let collector = tokio::spawn(collect_garbage_periodically(daemon.clone()));
        let tickets = tokio::spawn(watch_tickets(daemon.clone()));
        wait_for_shutdown(shutdown_rx).await;
        tracing::info!("shutting down");
        let _ = daemon.shutdown.send(true);
        collector.abort();
        tickets.abort();
        let _ = server.await;
        anyhow::Ok(())
    });
    let handles: Vec<workspace::Handle> =
        std::mem::take(&mut *daemon.workspaces.lock().unwrap_or_else(|e| e.into_inner()))
            .into_values()
            .collect();
    for handle in handles {
        handle.stop();
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    let _ = std::fs::remove_file(paths.socket());
    // The store must be closed here, not leaked: redb marks a clean close,
    // without which the next start runs a full repair.
    drop(daemon);
    match Arc::try_unwrap(store) {
        Ok(store) => drop(store),
        Err(_) => tracing::error!(
            "the database is still referenced at shutdown; it will be checked at the next start"
        ),
    }
    result
}

/// glibc gives each thread that allocates its own arena (up to 8 per
/// core), and each keeps the peak of what its thread once held: with the
/// apply pool and tokio's threads, a receiver's peak RSS was 126 MiB with
/// them and 77 MiB with two (`e2e_sync`). Called before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Tells peers about local changes and pulls newly added workspaces. Events
/// that arrive together are coalesced into one announcement per workspace.
async fn announce_changes(daemon: Arc<Daemon>, replicator: Arc<crate::replicate::Replicator>) {
    let mut events = daemon.events.subscribe(None).live;
    loop {
        let first = match events.recv().await {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let mut batch = vec![first];
        while let Ok(event) = events.try_recv() {
            batch.push(event);
        }
        let mut changed = std::collections::BTreeSet::new();
        let mut added = std::collections::BTreeSet::new();
        for event in batch {
            let Some(id) = event["workspace_id"]
                .as_str()
                .and_then(|s| s.parse::<WorkspaceId>().ok())
            else {
                continue;
            };
            match event["kind"].as_str() {
                // A long scan's durable progress is servable already.
                Some(event_kind::LOCAL_CHANGE)
                | Some(event_kind::FILE_RECEIVED)
                | Some(event_kind::SCAN_PROGRESS) => {
                    changed.insert(id);
                }
                Some(event_kind::WORKSPACE_ADDED) => {
                    added.insert(id);
                }
                _ => {}
            }
        }
        for id in changed {
            replicator.announce(id, 0);
        }
        for id in added {
            replicator.announce(id, 0);
            let peers: Vec<libp2p::PeerId> = daemon
                .network
                .get()
                .map(|n| n.snapshot(|s| s.connected.keys().copied().collect()))
                .unwrap_or_default();
            for peer in peers {
                replicator.clone().pull(id, peer);
            }
        }
    }
}

async fn collect_garbage_periodically(daemon: Arc<Daemon>) {
    let mut interval = tokio::time::interval(GC_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        if !daemon.garbage.swap(false, Ordering::Relaxed) {
            continue;
        }
        let store = daemon.store.clone();
        match tokio::task::spawn_blocking(move || store.collect_garbage()).await {
            Ok(Ok((chunks, bytes))) if chunks > 0 => {
                tracing::info!("garbage collection removed {chunks} chunks ({bytes} bytes)")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("garbage collection failed: {e}"),
            Err(e) => tracing::error!("garbage collection panicked: {e}"),
        }
    }
}

/// Forgets old tickets, and keeps the gate open to unknown devices only
/// while some are known.
async fn watch_tickets(daemon: Arc<Daemon>) {
    let mut interval = tokio::time::interval(Duration::from_secs(30));
    loop {
        interval.tick().await;
        let this = daemon.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let now = workspace::now_ms();
            if let Err(e) = this.sharing.prune_tickets(now) {
                tracing::warn!("cannot prune old tickets: {e}");
            }
            this.update_gate();
        })
        .await;
    }
}

async fn wait_for_shutdown(mut shutdown: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {} to this user", dir.display()))?;
    }
    Ok(())
}

/// Takes the home's exclusive lock for the daemon's lifetime, and records
/// the holder's pid in it for the message a second daemon prints.
fn lock_home(paths: &HomePaths) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = paths.lock_file();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "another mariesync daemon (pid {}) already runs for home {}; stop it with `mariesync stop --home {}` first",
                if holder.is_empty() { "unknown" } else { holder },
                paths.home.display(),
                paths.home.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(file)
}

impl Daemon {
    fn start_worker(&self, number: u32, record: &WorkspaceRecord, startup: bool) {
        let paused = match &record.state {
            WorkspaceState::Paused { reason } => Some(reason.clone()),
            WorkspaceState::Active => None,
        };
        let context = workspace::Context {
            store: self.store.clone(),
            events: self.events.clone(),
            device: self.device_key,
            device_id: self.device_id.clone(),
            garbage: self.garbage.clone(),
        };
        let handle = workspace::start(
            context,
            number,
            record.id,
            record.name.clone(),
            PathBuf::from(&record.path),
            paused,
            startup,
        );
        self.workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(number, handle);
    }

    /// Answers one IPC request.
    pub async fn handle(
        self: &Arc<Self>,
        method_name: &str,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        if *self.shutdown.borrow() {
            return Err(RpcError::new(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            ));
        }
        match method_name {
            method::SHUTDOWN => {
                let _ = self.shutdown.send(true);
                Ok(json!({}))
            }
            method::FLUSH => {
                let p: WorkspaceParams = parse_params(params)?;
                self.job(&p.workspace, |reply| Job::Flush { reply }).await?;
                self.wait_peers(&p.workspace).await?;
                Ok(json!({}))
            }
            method::WORKSPACE_RESCAN => {
                let p: WorkspaceParams = parse_params(params)?;
                self.job(&p.workspace, |reply| Job::Scan {
                    scope: Scope::Full,
                    reply: Some(reply),
                    early: false,
                })
                .await
            }
            method::WORKSPACE_TOUCHED => {
                let p: TouchedParams = parse_params(params)?;
                if p.paths.len() > TOUCHED_PATHS_MAX {
                    return Err(RpcError::new(
                        ErrorCode::InvalidParams,
                        format!("at most {TOUCHED_PATHS_MAX} paths per call; use flush for more"),
                    ));
                }
                let root = self.resolve(&p.workspace)?.root.clone();
                // Resolving paths touches the file system: not on the
                // async threads, unless they are few (a save's).
                let few = p.paths.len() <= TOUCHED_PATHS_INLINE_MAX;
                let paths = crate::run_blocking(few, move || {
                    p.paths
                        .iter()
                        .map(|path| relative_to(&root, path))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??;
                let scanned = self
                    .job(&p.workspace, |reply| Job::Scan {
                        scope: Scope::Paths(paths),
                        reply: Some(reply),
                        // Without `--wait`, answered once peers are told.
                        early: !p.wait,
                    })
                    .await?;
                if p.wait {
                    self.wait_peers(&p.workspace).await?;
                }
                Ok(scanned)
            }
            method::CHECKPOINT_CREATE => {
                let p: CheckpointCreateParams = parse_params(params)?;
                let message = p.message.unwrap_or_default();
                self.job(&p.workspace, |reply| Job::Checkpoint { message, reply })
                    .await
            }
            method::CHECKPOINT_RESTORE => {
                let p: CheckpointRestoreParams = parse_params(params)?;
                let id = parse_checkpoint_id(&p.checkpoint_id)?;
                self.job(&p.workspace, |reply| Job::Restore { id, reply })
                    .await
            }
            method::CHECKPOINT_DIFF => {
                // "The current state" is what is on disk now: index it first.
                let p: CheckpointDiffParams = parse_params(params.clone())?;
                if p.to.is_none() {
                    self.job(&p.workspace, |reply| Job::Flush { reply }).await?;
                }
                let this = self.clone();
                tokio::task::spawn_blocking(move || {
                    this.handle_blocking(method::CHECKPOINT_DIFF, params)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(RpcError::new(
                        ErrorCode::Internal,
                        format!("request failed: {e}"),
                    ))
                })
            }
            method::WORKSPACE_RESUME => {
                let p: WorkspaceParams = parse_params(params)?;
                self.job(&p.workspace, |reply| Job::Resume { reply }).await
            }
            method::JOIN => self.join(parse_params(params)?).await,
            _ => {
                let this = self.clone();
                let method_name = method_name.to_owned();
                tokio::task::spawn_blocking(move || this.handle_blocking(&method_name, params))
                    .await
                    .unwrap_or_else(|e| {
                        Err(RpcError::new(
                            ErrorCode::Internal,
                            format!("request failed: {e}"),
                        ))
                    })
            }
        }
    }

    /// Waits until every connected peer sharing `workspace` has all of
    /// what is indexed here now.
    async fn wait_peers(&self, workspace: &str) -> Result<(), RpcError> {
        let shared = self.resolve(workspace)?;
        if let Some(replicator) = self.replicator.get() {
            let target = self
                .store
                .workspace(shared.number)
                .map_err(|e| store_rpc_error(&e))?
                .map(|r| r.next_sequence.saturating_sub(1))
                .unwrap_or(0);
            replicator.wait_acknowledged(shared.id, target).await?;
        }
        Ok(())
    }

    async fn job(
        &self,
        workspace: &str,
        make: impl FnOnce(workspace::Reply) -> Job,
    ) -> Result<Value, RpcError> {
        let (reply, answer) = oneshot::channel();
        {
            let shared = self.resolve(workspace)?;
            let workspaces = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
            let handle = workspaces
                .get(&shared.number)
                .ok_or_else(|| not_found(workspace))?;
            handle.send(make(reply))?;
        }
        answer.await.unwrap_or_else(|_| {
            Err(RpcError::new(
                ErrorCode::ShuttingDown,
                "the workspace stopped before answering",
            ))
        })
    }

    /// Methods that only read or change the store: run off the async threads.
    fn handle_blocking(
        self: &Arc<Self>,
        method_name: &str,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let store_err = |e: crate::store::StoreError| store_rpc_error(&e);
        match method_name {
            method::ID => Ok(json!({ "device_id": self.device_id })),
            method::STATUS => {
                let workspaces = self.workspace_statuses(true)?;
                let listen_addrs: Vec<String> = self
                    .network
                    .get()
                    .map(|n| n.snapshot(|s| s.listen_addrs.iter().map(|a| a.to_string()).collect()))
                    .unwrap_or_default();
                Ok(json!({
                    "device_id": self.device_id,
                    "home": self.paths.home.display().to_string(),
                    "listen_addrs": listen_addrs,
                    "peers": self.peer_list()?,
                    "workspaces": workspaces,
                }))
            }
            method::WORKSPACE_LIST => Ok(json!({ "workspaces": self.workspace_statuses(false)? })),
            method::PEER_LIST => Ok(json!({ "peers": self.peer_list()? })),
            method::CONFLICTS => {
                let p: WorkspaceParams = parse_params(params)?;
                let number = self.resolve(&p.workspace)?.number;
                let files = self.store.files(number, None).map_err(store_err)?;
                let peers = self.store.peers().map_err(store_err)?;
                let full_id = |prefix: &str| {
                    std::iter::once(self.device_id.clone())
                        .chain(peers.iter().map(|(id, _)| id.clone()))
                        .find(|id| mariesync_protocol::sync::device_prefix(id) == prefix)
                        .unwrap_or_else(|| prefix.to_owned())
                };
                let conflicts: Vec<Value> = files
                    .iter()
                    .filter(|f| !f.entry.deleted)
                    .filter_map(|f| {
                        let (original, device) =
                            mariesync_protocol::sync::parse_conflict_path(&f.entry.path)?;
                        Some(json!({
                            "path": original.as_str(),
                            "conflict_path": f.entry.path.as_str(),
                            "device_id": full_id(&device),
                        }))
                    })
                    .collect();
                Ok(json!({ "conflicts": conflicts }))
            }
            method::PEER_ADD => {
                let p: PeerAddParams = parse_params(params)?;
                let peer: libp2p::PeerId = p.device_id.parse().map_err(|_| {
                    RpcError::new(
                        ErrorCode::InvalidParams,
                        format!("'{}' is not a device ID", p.device_id),
                    )
                })?;
                if peer.to_string() == self.device_id {
                    return Err(RpcError::new(
                        ErrorCode::InvalidParams,
                        "that is this device's own ID",
                    ));
                }
                let addrs = p
                    .addrs
                    .iter()
                    .map(|a| {
                        a.parse::<libp2p::Multiaddr>().map_err(|_| {
                            RpcError::new(
                                ErrorCode::InvalidParams,
                                format!("'{a}' is not a multiaddr"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut record = self
                    .store
                    .peer(&p.device_id)
                    .map_err(store_err)?
                    .unwrap_or_else(|| PeerRecord::new(String::new(), workspace::now_ms()));
                if let Some(name) = p.name {
                    record.name = name;
                }
                for addr in &addrs {
                    record.add_addr(addr.to_string());
                }
                self.store
                    .put_peer(&p.device_id, &record)
                    .map_err(store_err)?;
                if let Some(network) = self.network.get() {
                    network.send(crate::network::Command::Trust { peer, addrs });
                }
                Ok(json!({}))
            }
            method::PEER_REMOVE => {
                let p: PeerParams = parse_params(params)?;
                if !self.store.remove_peer(&p.device_id).map_err(store_err)? {
                    return Err(RpcError::new(
                        ErrorCode::InvalidParams,
                        format!("{} is not a trusted device", p.device_id),
                    ));
                }
                if let (Some(network), Ok(peer)) = (self.network.get(), p.device_id.parse()) {
                    network.send(crate::network::Command::Distrust { peer });
                }
                // A device of the group leaves it everywhere.
                self.settings.remove_device(&p.device_id)?;
                Ok(json!({}))
            }
            m if m.starts_with("settings.") => self.handle_settings(m, params),
            method::WORKSPACE_ADD => {
                let p: WorkspaceAddParams = parse_params(params)?;
                self.add_workspace(p)
            }
            method::SHARE => self.share(parse_params(params)?),
            method::INVITE => self.invite(parse_params(params)?),
            method::WORKSPACE_REMOVE => {
                let p: WorkspaceParams = parse_params(params)?;
                let number = self.resolve(&p.workspace)?.number;
                let handle = self
                    .workspaces
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&number);
                let id = handle.as_ref().map(|h| h.shared.id);
                if let Some(handle) = handle {
                    handle.stop();
                }
                self.store.remove_workspace(number).map_err(store_err)?;
                if let Some(id) = id {
                    self.sharing.forget(id).map_err(store_err)?;
                }
                let id = id.map(|id| id.to_string());
                self.events
                    .publish(event_kind::WORKSPACE_REMOVED, json!({ "workspace_id": id }));
                self.garbage.store(true, Ordering::Relaxed);
                Ok(json!({}))
            }
            method::WORKSPACE_FILES => {
                let p: WorkspaceFilesParams = parse_params(params)?;
                let number = self.resolve(&p.workspace)?.number;
                let prefix = p
                    .prefix
                    .map(RelPath::new)
                    .transpose()
                    .map_err(|e| RpcError::new(ErrorCode::InvalidPath, e.to_string()))?;
                let files = self
                    .store
                    .files(number, prefix.as_ref())
                    .map_err(store_err)?;
                let listed: Vec<Value> = files
                    .iter()
                    .filter(|f| !f.entry.deleted)
                    .map(|f| {
                        let e = &f.entry;
                        let mut v = json!({
                            "path": e.path.as_str(),
                            "kind": e.kind.as_str(),
                            "size": e.size,
                            "executable": e.executable,
                            "content_hash": e.content_hash.to_hex(),
                            "sequence": e.sequence,
                        });
                        if let Some(target) = &e.symlink_target {
                            v["symlink_target"] = target.clone().into();
                        }
                        v
                    })
                    .collect();
                // The whole index was read: give that memory back. (Here
                // only, not after every answer: a trim hands back every
                // free page of every arena and the next buffers fault them
                // in again; a receiver whose `status` an IDE polled took a
                // page fault per 4 KiB it received, 17% of its CPU.)
                drop(files);
                crate::release_memory();
                Ok(json!({ "files": listed }))
            }
            method::CHECKPOINT_LIST => {
                let p: WorkspaceParams = parse_params(params)?;
                let number = self.resolve(&p.workspace)?.number;
                let list: Vec<Value> = self
                    .store
                    .checkpoints(number)
                    .map_err(store_err)?
                    .iter()
                    .map(|c| {
                        json!({
                            "checkpoint_id": c.id.to_string(),
                            "created": format_time(c.created_ms),
                            "created_ms": c.created_ms,
                            "message": c.message,
                            "files": c.files,
                            "bytes": c.bytes,
                        })
                    })
                    .collect();
                Ok(json!({ "checkpoints": list }))
            }
            method::CHECKPOINT_DIFF => {
                let p: CheckpointDiffParams = parse_params(params)?;
                let number = self.resolve(&p.workspace)?.number;
                let load = |id: &str| -> Result<Vec<crate::store::ManifestEntry>, RpcError> {
                    let id = parse_checkpoint_id(id)?;
                    checkpoint::load(&self.store, number, id)
                        .map_err(store_err)?
                        .map(|(_, entries)| entries)
                        .ok_or_else(|| {
                            RpcError::new(
                                ErrorCode::CheckpointNotFound,
                                format!("no checkpoint {id}"),
                            )
                        })
                };
                let from = load(&p.from)?;
                let to = match &p.to {
                    Some(id) => load(id)?,
                    None => checkpoint::live_manifest(&self.store, number).map_err(store_err)?,
                };
                let diff = checkpoint::diff(&from, &to);
                Ok(
                    json!({ "added": diff.added, "modified": diff.modified, "deleted": diff.deleted }),
                )
            }
            method::STORE_STATS => {
                let stats = self.store.stats().map_err(store_err)?;
                let db_bytes = std::fs::metadata(self.paths.database())
                    .map(|m| m.len())
                    .unwrap_or(0);
                Ok(json!({
                    "chunks": stats.chunks,
                    "stored_bytes": stats.stored_bytes,
                    "raw_bytes": stats.raw_bytes,
                    "database_bytes": db_bytes,
                    "database_stored_bytes": stats.database_stored_bytes,
                    "database_metadata_bytes": stats.database_metadata_bytes,
                    "database_fragmented_bytes": stats.database_fragmented_bytes,
                    "fetched_chunks": stats.fetched_chunks,
                    "fetched_bytes": stats.fetched_bytes,
                }))
            }
            method::STORE_VERIFY => {
                let report = self.store.verify().map_err(store_err)?;
                let corrupt: Vec<Value> = report
                    .corrupt
                    .iter()
                    .map(|(h, why)| json!({"chunk": h.to_hex(), "reason": why}))
                    .collect();
                let missing: Vec<Value> = report
                    .missing
                    .iter()
                    .map(|(h, owner)| json!({"chunk": h.to_hex(), "owner": owner}))
                    .collect();
                self.chunks_found_corrupt(&report.corrupt)
                    .map_err(store_err)?;
                if !report.missing.is_empty() {
                    self.rescan_all_for_repair();
                }
                Ok(json!({
                    "ok": corrupt.is_empty() && missing.is_empty(),
                    "chunks_checked": report.chunks_checked,
                    "corrupt": corrupt,
                    "missing": missing,
                }))
            }
            method::STORE_GC => {
                let (chunks, bytes) = self.store.collect_garbage().map_err(store_err)?;
                Ok(json!({ "chunks_removed": chunks, "bytes_freed": bytes }))
            }
            other => Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("unknown method '{other}'"),
            )),
        }
    }

    fn handle_settings(&self, name: &str, params: Option<Value>) -> Result<Value, RpcError> {
        use mariesync_protocol::ipc::{
            ExtensionParams, KeybindingParams, ProfileParams, SettingsBindParams,
            SettingsGetParams, SettingsHistoryParams, SettingsRestoreParams, SettingsSetParams,
            SettingsUnsetParams, SnippetParams,
        };
        let settings = &self.settings;
        // The list methods take no parameters but a profile.
        let scope = |params: Option<Value>| -> Result<Option<String>, RpcError> {
            let p: SettingsGetParams = parse_params(Some(params.unwrap_or_else(|| json!({}))))?;
            Ok(p.profile)
        };
        match name {
            method::SETTINGS_GET => {
                let p: SettingsGetParams = parse_params(Some(params.unwrap_or_else(|| json!({}))))?;
                settings.get(p.key, p.profile)
            }
            method::SETTINGS_SET => {
                let p: SettingsSetParams = parse_params(params)?;
                settings.set(p.key, p.value, p.device_only, p.profile)
            }
            method::SETTINGS_UNSET => {
                let p: SettingsUnsetParams = parse_params(params)?;
                settings.unset(p.key, p.profile)
            }
            method::SETTINGS_HISTORY => {
                let p: SettingsHistoryParams =
                    parse_params(Some(params.unwrap_or_else(|| json!({}))))?;
                Ok(settings.history(p.limit))
            }
            method::SETTINGS_RESTORE => {
                let p: SettingsRestoreParams = parse_params(params)?;
                settings.restore(&p.version)
            }
            method::SETTINGS_BIND => {
                let p: SettingsBindParams = parse_params(params)?;
                settings.bind(&p.file)
            }
            method::SETTINGS_UNBIND => settings.unbind(),
            method::SETTINGS_KEYBINDING_LIST => settings.keybindings(scope(params)?),
            method::SETTINGS_KEYBINDING_ADD => {
                settings.keybinding(true, parse_params::<KeybindingParams>(params)?)
            }
            method::SETTINGS_KEYBINDING_REMOVE => {
                settings.keybinding(false, parse_params::<KeybindingParams>(params)?)
            }
            method::SETTINGS_SNIPPET_LIST => settings.snippets(scope(params)?),
            method::SETTINGS_SNIPPET_SET => {
                settings.snippet(parse_params::<SnippetParams>(params)?, true)
            }
            method::SETTINGS_SNIPPET_UNSET => {
                settings.snippet(parse_params::<SnippetParams>(params)?, false)
            }
            method::SETTINGS_EXTENSION_LIST => Ok(settings.extensions()),
            method::SETTINGS_EXTENSION_INSTALL => {
                settings.extension(&parse_params::<ExtensionParams>(params)?.id, true)
            }
            method::SETTINGS_EXTENSION_UNINSTALL => {
                settings.extension(&parse_params::<ExtensionParams>(params)?.id, false)
            }
            method::SETTINGS_PROFILE_LIST => Ok(settings.profiles()),
            method::SETTINGS_PROFILE_CREATE => {
                let p: ProfileParams = parse_params(params)?;
                settings.profile_create(&p.name, p.from)
            }
            method::SETTINGS_PROFILE_USE => {
                settings.profile_use(&parse_params::<ProfileParams>(params)?.name)
            }
            method::SETTINGS_PROFILE_DELETE => {
                settings.profile_delete(&parse_params::<ProfileParams>(params)?.name)
            }
            other => Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("unknown method '{other}'"),
            )),
        }
    }

    /// Chunks that failed their check when read (by `store verify`, or
    /// while serving a peer): reported, then dropped, so that a scan that
    /// still finds the content on disk stores it again instead of trusting
    /// the bad copy, and a peer's version that needs it fetches it again;
    /// every workspace then re-reads the files that used them.
    pub fn chunks_found_corrupt(&self, corrupt: &[(ChunkHash, String)]) -> Result<(), StoreError> {
        workspace::drop_corrupt_chunks(&self.store, &self.events, corrupt)?;
        if !corrupt.is_empty() {
            self.rescan_all_for_repair();
        }
        Ok(())
    }

    /// After chunks were dropped as corrupt, every workspace re-reads the
    /// files that used them (in its own worker: the only index writer).
    fn rescan_all_for_repair(&self) {
        let workspaces = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        for handle in workspaces.values() {
            let _ = handle.send(Job::Repair);
        }
    }

    fn add_workspace(self: &Arc<Self>, p: WorkspaceAddParams) -> Result<Value, RpcError> {
        // A workspace ID means accepting an offer.
        let (id, membership, offered_name) = match &p.id {
            Some(id) => {
                let id = id
                    .parse::<WorkspaceId>()
                    .map_err(|e| RpcError::new(ErrorCode::InvalidParams, e.to_string()))?;
                let offer = self.sharing.offer(id).map_err(|e| store_rpc_error(&e))?;
                match offer {
                    Some(offer) => (id, offer.membership, Some(offer.name)),
                    None if self.workspace_number(id).is_some() => {
                        return Err(RpcError::new(
                            ErrorCode::WorkspaceExists,
                            format!("workspace {id} is already added here"),
                        ));
                    }
                    None => {
                        return Err(RpcError::new(
                            ErrorCode::Forbidden,
                            format!(
                                "no device offered workspace {id} to this one: ask an owner to run `mariesync share {id} {}`, or use `mariesync join TICKET`",
                                self.device_id
                            ),
                        ));
                    }
                }
            }
            None => (
                WorkspaceId::from_random(random_bytes()),
                mariesync_protocol::membership::Membership::founded_by(&self.device_id),
                None,
            ),
        };
        // Accepting into a folder that does not exist yet makes it, as
        // `join` does.
        if offered_name.is_some() && !Path::new(&p.path).exists() {
            std::fs::create_dir_all(&p.path).map_err(|e| {
                RpcError::new(
                    ErrorCode::InvalidPath,
                    format!("cannot create {}: {e}", p.path),
                )
            })?;
        }
        let name = p.name.or(offered_name);
        self.create_workspace(&p.path, name, id, membership)
    }

    /// Adds workspace `id` at `path` with `membership` and starts syncing it.
    pub(crate) fn create_workspace(
        self: &Arc<Self>,
        path: &str,
        name: Option<String>,
        id: WorkspaceId,
        membership: mariesync_protocol::membership::Membership,
    ) -> Result<Value, RpcError> {
        let invalid = |m: String| RpcError::new(ErrorCode::InvalidPath, m);
        let path =
            std::fs::canonicalize(path).map_err(|e| invalid(format!("cannot use {path}: {e}")))?;
        if !path.is_dir() {
            return Err(invalid(format!("{} is not a directory", path.display())));
        }
        let path_text = path
            .to_str()
            .ok_or_else(|| invalid(format!("{} is not a UTF-8 path", path.display())))?
            .to_owned();
        let home = std::fs::canonicalize(&self.paths.data_dir)
            .unwrap_or_else(|_| self.paths.data_dir.clone());
        if home.starts_with(&path) || path.starts_with(&home) {
            return Err(invalid(format!(
                "{} overlaps this device's MarieSync home {}",
                path.display(),
                home.display()
            )));
        }
        let name = match name {
            Some(name) if name.trim().is_empty() => {
                return Err(RpcError::new(
                    ErrorCode::InvalidParams,
                    "name must not be empty",
                ));
            }
            Some(name) => name,
            None => path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("workspace")
                .to_owned(),
        };
        for (_, existing) in self.store.workspaces().map_err(|e| store_rpc_error(&e))? {
            let existing_path = Path::new(&existing.path);
            if existing.id == id {
                return Err(RpcError::new(
                    ErrorCode::WorkspaceExists,
                    format!("workspace {id} is already added at {}", existing.path),
                ));
            }
            if existing_path.starts_with(&path) || path.starts_with(existing_path) {
                return Err(RpcError::new(
                    ErrorCode::WorkspaceExists,
                    format!(
                        "{} overlaps workspace '{}' at {}",
                        path.display(),
                        existing.name,
                        existing.path
                    ),
                ));
            }
            if existing.name == name {
                return Err(RpcError::new(
                    ErrorCode::WorkspaceExists,
                    format!("a workspace is already named '{name}'; pick another with --name"),
                ));
            }
        }
        let record = WorkspaceRecord {
            id,
            name,
            path: path_text.clone(),
            state: WorkspaceState::Active,
            next_sequence: 1,
            created_ms: workspace::now_ms(),
        };
        // Membership first: a crash before the workspace record leaves a
        // stray membership (overwritten by the next add), never a workspace
        // without one.
        self.sharing
            .set_new(id, membership)
            .map_err(|e| store_rpc_error(&e))?;
        let number = match self.store.add_workspace(&record) {
            Ok(number) => number,
            Err(e) => {
                let _ = self.sharing.forget(id);
                return Err(store_rpc_error(&e));
            }
        };
        if let Err(e) = self.sharing.drop_offer(id) {
            tracing::warn!(%id, "cannot drop the accepted offer: {e}");
        }
        self.start_worker(number, &record, false);
        self.events.publish(
            event_kind::WORKSPACE_ADDED,
            json!({"workspace_id": id.to_string(), "name": record.name, "path": path_text}),
        );
        Ok(json!({ "workspace_id": id.to_string(), "path": path_text }))
    }

    pub fn workspace_ids(&self) -> Vec<WorkspaceId> {
        self.workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|h| h.shared.id)
            .collect()
    }

    pub fn workspace_name(&self, id: WorkspaceId) -> Option<String> {
        self.workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|h| h.shared.id == id)
            .map(|h| h.shared.name.clone())
    }

    pub fn workspace_number(&self, id: WorkspaceId) -> Option<u32> {
        self.workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|h| h.shared.id == id)
            .map(|h| h.shared.number)
    }

    pub fn send_job(&self, id: WorkspaceId, job: Job) -> Result<(), RpcError> {
        let workspaces = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let handle = workspaces
            .values()
            .find(|h| h.shared.id == id)
            .ok_or_else(|| not_found(&id.to_string()))?;
        handle.send(job)
    }

    /// Trusted peers as `peer list` shows them.
    fn peer_list(&self) -> Result<Vec<Value>, RpcError> {
        let peers = self.store.peers().map_err(|e| store_rpc_error(&e))?;
        let (connected, names) = self
            .network
            .get()
            .map(|n| n.snapshot(|s| (s.connected.clone(), s.names.clone())))
            .unwrap_or_default();
        Ok(peers
            .into_iter()
            .map(|(id, record)| {
                let peer = id.parse::<libp2p::PeerId>().ok();
                let address = peer.and_then(|p| connected.get(&p).map(|a| a.to_string()));
                let name = if record.name.is_empty() {
                    peer.and_then(|p| names.get(&p).cloned())
                        .unwrap_or_default()
                } else {
                    record.name
                };
                let mut v = json!({
                    "device_id": id,
                    "name": name,
                    "addrs": record.addrs,
                    "connected": address.is_some(),
                    "group": peer.is_some_and(|p| self.settings.in_group(&p)),
                    "fetched_bytes": peer.and_then(|p| self.replicator.get().map(|r| r.fetched_from(&p))).unwrap_or(0),
                });
                if let Some(address) = address {
                    v["address"] = address.into();
                }
                v
            })
            .collect())
    }

    /// The workspace `text` names (ID or name): its number and ID.
    pub(crate) fn resolve_workspace(&self, text: &str) -> Result<(u32, WorkspaceId), RpcError> {
        self.resolve(text).map(|s| (s.number, s.id))
    }

    fn resolve(&self, workspace: &str) -> Result<Arc<workspace::Shared>, RpcError> {
        let workspaces = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        workspaces
            .values()
            .find(|h| h.shared.id.to_string() == workspace)
            .or_else(|| workspaces.values().find(|h| h.shared.name == workspace))
            .map(|h| h.shared.clone())
            .ok_or_else(|| not_found(workspace))
    }

    fn workspace_statuses(&self, detailed: bool) -> Result<Vec<Value>, RpcError> {
        let shared: Vec<Arc<workspace::Shared>> = self
            .workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|h| h.shared.clone())
            .collect();
        let mut out = Vec::new();
        for shared in shared {
            let status = shared.status();
            let totals = match status.totals {
                Some(totals) => totals,
                None => {
                    let files = self
                        .store
                        .files(shared.number, None)
                        .map_err(|e| store_rpc_error(&e))?;
                    let mut totals = workspace::Totals::default();
                    for f in &files {
                        let entry = &f.entry;
                        totals.local_changes += u64::from(entry.modified_by == self.device_id);
                        if !entry.deleted && entry.kind == FileKind::File {
                            totals.files += 1;
                            totals.bytes += entry.size;
                            totals.conflicts += u64::from(
                                mariesync_protocol::sync::parse_conflict_path(&entry.path)
                                    .is_some(),
                            );
                        }
                    }
                    shared
                        .status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .keep_totals(status.totals_epoch, totals);
                    totals
                }
            };
            // Bringing a peer's changes shows over a scan (the files it
            // writes are scanned as they land).
            let syncing = self
                .replicator
                .get()
                .and_then(|r| r.sync_progress(shared.id));
            let state = match (&status.activity, &syncing) {
                (Activity::Paused(_), _) => "paused",
                (Activity::Restoring, _) => "restoring",
                (_, Some(_)) => "syncing",
                (Activity::Scanning, None) => "scanning",
                (Activity::Idle, None) => "idle",
            };
            let mut v = json!({
                "workspace_id": shared.id.to_string(),
                "name": shared.name,
                "path": shared.root.display().to_string(),
                "state": state,
                "files": totals.files,
                "bytes": totals.bytes,
                "conflicts": totals.conflicts,
            });
            if let Activity::Paused(reason) = &status.activity {
                v["reason"] = reason.clone().into();
            }
            let membership = self.sharing.membership(shared.id);
            let role = membership.as_ref().and_then(|m| m.role(&self.device_id));
            if let Some(role) = role {
                v["role"] = role.as_str().into();
            }
            if let Some(membership) = membership {
                v["members"] = membership
                    .members
                    .iter()
                    .map(|(device, role)| json!({"device_id": device, "role": role.as_str()}))
                    .collect();
            }
            if role == Some(mariesync_protocol::membership::Role::Viewer) {
                // What a viewer changed stays here: say how much.
                v["local_changes"] = totals.local_changes.into();
            }
            if detailed {
                if let (Some(p), "syncing") = (&syncing, state) {
                    v["progress"] = json!({
                        "changes_done": p.changes_done,
                        "changes_total": p.changes_total,
                        "bytes_received": p.bytes_received,
                        "peers": p.peers,
                    });
                } else if status.activity == Activity::Scanning {
                    use std::sync::atomic::Ordering::Relaxed;
                    let p = &shared.progress;
                    v["progress"] = json!({
                        "files_done": p.files_hashed.load(Relaxed),
                        "files_total": p.files_to_hash.load(Relaxed),
                        "bytes_done": p.bytes_hashed.load(Relaxed),
                        "bytes_total": p.bytes_to_hash.load(Relaxed),
                    });
                }
                v["watcher"] = match &status.watcher {
                    None => json!({"state": "ok"}),
                    Some(reason) => {
                        json!({"state": "degraded", "reason": reason, "fallback": "periodic rescans"})
                    }
                };
                v["skipped"] = json!(status.skipped);
                v["case_clashes"] = json!(
                    status
                        .case_clashes
                        .iter()
                        .map(|(a, b)| json!([a, b]))
                        .collect::<Vec<_>>()
                );
                if let Some(error) = &status.last_error {
                    v["last_error"] = error.clone().into();
                }
                v["not_applied"] = status
                    .not_applied
                    .iter()
                    .map(|(path, message)| json!({"path": path, "message": message}))
                    .collect();
            }
            out.push(v);
        }
        for (id, offer) in self.sharing.offers().map_err(|e| store_rpc_error(&e))? {
            out.push(json!({
                "workspace_id": id.to_string(),
                "name": offer.name,
                "path": null,
                "state": "offered",
                "files": 0,
                "bytes": 0,
                "conflicts": 0,
                "role": offer.membership.role(&self.device_id).map(|r| r.as_str()),
                "offered_by": offer.from,
            }));
        }
        Ok(out)
    }
}

fn not_found(workspace: &str) -> RpcError {
    RpcError::new(
        ErrorCode::WorkspaceNotFound,
        format!("no workspace '{workspace}'; see `mariesync workspace list`"),
    )
}

fn parse_checkpoint_id(text: &str) -> Result<CheckpointId, RpcError> {
    text.parse().map_err(|_| {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("'{text}' is not a checkpoint id"),
        )
    })
}

/// A path the IDE names, absolute or workspace-relative, as a workspace path.
fn relative_to(root: &Path, path: &str) -> Result<RelPath, RpcError> {
    let invalid = |m: String| RpcError::new(ErrorCode::InvalidPath, m);
    let candidate = Path::new(path);
    let relative = if candidate.is_absolute() {
        // The root is canonical; the IDE's path may pass through links.
        let canonical_parent = candidate
            .parent()
            .and_then(|p| std::fs::canonicalize(p).ok());
        let absolute = match (canonical_parent, candidate.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => candidate.to_path_buf(),
        };
        absolute
            .strip_prefix(root)
            .map(Path::to_path_buf)
            .map_err(|_| {
                invalid(format!(
                    "{path} is outside the workspace {}",
                    root.display()
                ))
            })?
    } else {
        candidate.to_path_buf()
    };
    let text = relative
        .to_str()
        .ok_or_else(|| invalid(format!("{path} is not UTF-8")))?;
    RelPath::new(text.replace(std::path::MAIN_SEPARATOR, "/"))
        .map_err(|e| invalid(format!("{path}: {e}")))
}

fn random_bytes() -> [u8; 16] {
    let mut out = [0u8; 16];
    getrandom::fill(&mut out).expect("the operating system's random source failed");
    out
}

pub(crate) fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}
