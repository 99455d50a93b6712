//! Settings sync across the devices of one user (SPEC.md section 6).
//!
//! Two Automerge documents ([`doc`]), kept in the store (a full save plus
//! incremental saves, compacted now and then) and synced with the
//! Automerge sync protocol over the sync protocol's `Settings` message,
//! with the devices of the group only:
//! - `settings`: settings per profile (`PROFILE:KEY`), keybindings,
//!   snippets, extension intents, the profiles themselves;
//! - `devices`: the group, device ID -> name and addresses. A device that
//!   appears there is trusted and dialed; one with a `removed:ID` key is
//!   forgotten.
//!
//! Device-only keys and the active profile never enter a document: they
//! live in the metadata table (`settings/local/...`, `settings/profile`).
//!
//! **Architecture Invariant:** a change is durable before anyone hears of
//! it: local changes are committed before the call returns or any peer
//! is sent them; received changes before the answer or the event. A
//! message that fails to apply reloads the document from the store, so a
//! half-applied message never reaches disk.

pub mod bind;
pub mod doc;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::sync;
use libp2p::PeerId;
use mariesync_protocol::ipc::{ErrorCode, RpcError, event_kind};
use mariesync_protocol::wire::{Request, Response};
use serde_json::{Value, json};

use crate::events::EventLog;
use crate::network::{Command, Network};
use crate::store::{PeerRecord, Store};
use doc::{DEVICES, EXTENSIONS, KEYBINDINGS, PROFILES, SETTINGS, SNIPPETS};
pub use doc::{Doc, DocKind, Edit, Entries};

/// Incremental saves kept before a document is compacted into one.
const COMPACT_PARTS: u64 = 256;
/// Sync messages one session exchanges per document at most before it
/// yields (a guard against two peers that never settle).
const SESSION_ROUNDS_MAX: usize = 64;
/// No setting value may be larger, as JSON text.
const VALUE_BYTES_MAX: usize = 256 * 1024;
const KEY_BYTES_MAX: usize = 256;
pub const DEFAULT_PROFILE: &str = "default";

const META_PROFILE: &str = "settings/profile";
const META_LOCAL: &str = "settings/local/";
const META_PREMERGE: &str = "settings/premerge";

fn invalid(message: impl Into<String>) -> RpcError {
    RpcError::new(ErrorCode::InvalidParams, message)
}

/// A failed commit may still have reached the disk whole (the database's
/// new header can be written before a later page fails), so a refused
/// change may show up once the database opens again, as after a crash
/// right before an answer; the message says so.
fn store_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(
        ErrorCode::StoreFailed,
        format!(
            "cannot save settings: {e} (whether this change was kept shows once the database opens again)"
        ),
    )
}

/// The actor of this device in every document.
fn actor_of(device_id: &str) -> [u8; 16] {
    let hash = blake3::hash(device_id.as_bytes());
    hash.as_bytes()[..16].try_into().expect("16 bytes")
}

struct State {
    settings: Doc,
    devices: Doc,
    /// Stored parts per document, to know when to compact.
    parts: HashMap<DocKind, u64>,
    /// Automerge sync state per peer and document, for this connection.
    peers: HashMap<(PeerId, DocKind), sync::State>,
}

impl State {
    fn doc(&mut self, kind: DocKind) -> &mut Doc {
        match kind {
            DocKind::Settings => &mut self.settings,
            DocKind::Devices => &mut self.devices,
        }
    }

    /// A document and the sync state with `peer` for it (made if new).
    fn doc_and_sync(&mut self, kind: DocKind, peer: PeerId) -> (&mut Doc, &mut sync::State) {
        let doc = match kind {
            DocKind::Settings => &mut self.settings,
            DocKind::Devices => &mut self.devices,
        };
        let sync_state = self.peers.entry((peer, kind)).or_default();
        (doc, sync_state)
    }
}

/// What a committed change did, for events and the bound file.
struct Committed {
    changes: Vec<(String, String, Option<Value>)>,
    device_ids: Vec<String>,
}

pub struct Settings {
    store: Arc<Store>,
    device_id: String,
    events: Arc<EventLog>,
    network: std::sync::OnceLock<Network>,
    /// The runtime sync sessions run on (changes also come from the bound
    /// file's thread).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    state: Mutex<State>,
    /// Sync sessions under way per peer, and whether another was asked for.
    running: Mutex<HashMap<PeerId, bool>>,
    binding: Mutex<Option<bind::Binding>>,
    /// Set when a document could not be reloaded after a failed write.
    failed: std::sync::atomic::AtomicBool,
    me: std::sync::Weak<Settings>,
}

impl Settings {
    pub fn load(
        store: Arc<Store>,
        device_id: String,
        events: Arc<EventLog>,
    ) -> anyhow::Result<Arc<Settings>> {
        let actor = actor_of(&device_id);
        let mut parts = HashMap::new();
        let mut load = |kind: DocKind| -> anyhow::Result<Doc> {
            let stored = store.doc_parts(kind.name())?;
            parts.insert(kind, stored.len() as u64);
            Ok(Doc::load(kind, actor, &stored)?)
        };
        let state = State {
            settings: load(DocKind::Settings)?,
            devices: load(DocKind::Devices)?,
            parts,
            peers: HashMap::new(),
        };
        let settings = Arc::new_cyclic(|me| Settings {
            store,
            device_id,
            events,
            network: std::sync::OnceLock::new(),
            runtime: std::sync::OnceLock::new(),
            state: Mutex::new(state),
            running: Mutex::new(HashMap::new()),
            binding: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
        });
        // Every device is in its own group.
        let me = settings.device_id.clone();
        if settings.device_entry(&me).is_none() {
            settings
                .commit(
                    DocKind::Devices,
                    &[device_put(&me, &crate::network::host_name())],
                    "this device",
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // Documents from before compaction existed are compacted now.
        for kind in DocKind::ALL {
            let mut state = settings.lock();
            if state.parts.get(&kind).copied().unwrap_or(0) > COMPACT_PARTS {
                let full = state.doc(kind).save();
                settings.store.doc_replace(kind.name(), &full)?;
                state.parts.insert(kind, 1);
            }
        }
        Ok(settings)
    }

    /// Starts syncing, and the bound file if there is one.
    pub fn start(&self, network: Network) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        let _ = self.network.set(network);
        if let Err(e) = self.resume_binding() {
            tracing::warn!("cannot watch the bound settings file: {e}");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arc(&self) -> Option<Arc<Settings>> {
        self.me.upgrade()
    }

    // ---- documents and storage -------------------------------------------

    /// Appends what changed in `kind` since the last save to the store,
    /// compacting now and then. On failure the document is reloaded from
    /// the store: what did not reach disk did not happen.
    fn persist(
        &self,
        state: &mut State,
        kind: DocKind,
        meta: &[(&str, Option<&[u8]>)],
    ) -> Result<(), RpcError> {
        self.check_failed()?;
        let (part, heads) = state.doc(kind).unsaved();
        let appended = if part.is_empty() {
            if meta.is_empty() {
                Ok(None)
            } else {
                self.store.meta_put_all(meta).map(|()| None)
            }
        } else {
            self.store.doc_append(kind.name(), &part, meta).map(Some)
        };
        let parts = match appended {
            Ok(parts) => parts,
            Err(e) => {
                self.reload(state, kind);
                return Err(store_err(e));
            }
        };
        state.doc(kind).mark_saved(heads);
        if let Some(parts) = parts {
            state.parts.insert(kind, parts);
            // Compaction is an optimisation: the change is durable already.
            if parts > COMPACT_PARTS {
                let full = state.doc(kind).save();
                match self.store.doc_replace(kind.name(), &full) {
                    Ok(()) => {
                        state.parts.insert(kind, 1);
                    }
                    Err(e) => tracing::warn!("cannot compact the {} document: {e}", kind.name()),
                }
            }
        }
        Ok(())
    }

    /// After a store failure the documents in memory may hold what the
    /// store does not: nothing is served or changed until they are read
    /// again from the store (tried on use, once it is open again).
    fn check_failed(&self) -> Result<(), RpcError> {
        if self.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(RpcError::new(
                ErrorCode::StoreFailed,
                "settings are read-only after a storage failure until the database opens again",
            ));
        }
        Ok(())
    }

    /// Reads every document again after a store failure, if the store
    /// reads again; the in-memory ones are dropped, sync sessions restart.
    fn recover(&self) {
        use std::sync::atomic::Ordering;
        if !self.failed.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        let mut loaded = Vec::new();
        for kind in [DocKind::Settings, DocKind::Devices] {
            match self.load_stored(kind) {
                Ok((doc, parts)) => loaded.push((kind, doc, parts)),
                Err(_) => return,
            }
        }
        for (kind, doc, parts) in loaded {
            *state.doc(kind) = doc;
            state.parts.insert(kind, parts);
        }
        state.peers.clear();
        self.failed.store(false, Ordering::Release);
        tracing::info!("settings are read again from the store and accept changes");
    }

    /// A document as the store has it, and how many parts it is in.
    fn load_stored(&self, kind: DocKind) -> Result<(Doc, u64), String> {
        let parts = self
            .store
            .doc_parts(kind.name())
            .map_err(|e| e.to_string())?;
        let doc = Doc::load(kind, actor_of(&self.device_id), &parts).map_err(|e| e.to_string())?;
        Ok((doc, parts.len() as u64))
    }

    fn reload(&self, state: &mut State, kind: DocKind) {
        match self.load_stored(kind) {
            Ok((doc, _)) => *state.doc(kind) = doc,
            Err(e) => {
                tracing::error!("cannot reload the {} document: {e}", kind.name());
                self.failed
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        state.peers.retain(|(_, k), _| *k != kind);
    }

    /// Makes one local change and stores it. Publishes events and tells
    /// peers; does not touch the bound file (see [`Settings::changed`]).
    fn commit(
        &self,
        kind: DocKind,
        edits: &[Edit],
        summary: &str,
    ) -> Result<Option<Committed>, RpcError> {
        self.recover();
        let committed = {
            let mut state = self.lock();
            let before = state.doc(kind).entries();
            let now = crate::workspace::now_ms();
            if state
                .doc(kind)
                .change(edits, &self.device_id, summary, now)
                .is_none()
            {
                return Ok(None);
            }
            self.persist(&mut state, kind, &[])?;
            let after = state.doc(kind).entries();
            Committed {
                changes: doc::diff(&before, &after),
                device_ids: vec![self.device_id.clone()],
            }
        };
        self.announce(kind, &committed, "local");
        if let Some(this) = self.arc() {
            this.kick_all(None);
        }
        Ok(Some(committed))
    }

    /// After a change: events, and the group's trust for the devices list.
    fn announce(&self, kind: DocKind, committed: &Committed, origin: &str) {
        if kind == DocKind::Devices {
            self.apply_group();
            return;
        }
        // One event per section and profile.
        let mut groups: BTreeMap<(String, Option<String>), Vec<Value>> = BTreeMap::new();
        for (section, key, value) in &committed.changes {
            let (profile, key) = match section.as_str() {
                SETTINGS | KEYBINDINGS | SNIPPETS => match key.split_once(':') {
                    Some((p, k)) => (Some(p.to_owned()), k.to_owned()),
                    None => continue,
                },
                _ => (None, key.clone()),
            };
            let entry = groups.entry((section.clone(), profile)).or_default();
            if section == EXTENSIONS {
                entry.push(json!({"id": key, "state": value.as_ref().and_then(|v| v.get("state")).cloned().unwrap_or(Value::Null)}));
            } else {
                entry.push(Value::String(key));
            }
        }
        let device_id = committed.device_ids.first().cloned().unwrap_or_default();
        for ((section, profile), keys) in groups {
            let mut fields = json!({
                "section": section,
                "keys": keys,
                "device_id": device_id,
                "device_ids": committed.device_ids,
                "origin": origin,
            });
            if let Some(profile) = profile {
                fields["profile"] = json!(profile);
            }
            self.events.publish(event_kind::SETTINGS_CHANGED, fields);
        }
    }

    // ---- the device group ------------------------------------------------

    fn device_entry(&self, device_id: &str) -> Option<Value> {
        self.lock().devices.get(DEVICES, device_id)
    }

    /// Whether `device_id` is a device of this group: listed, and not
    /// removed. A removal is a key of its own (`removed:ID`) that only a new
    /// invitation deletes, so no concurrent rewrite of the device's entry
    /// (its addresses) can undo it.
    fn listed(&self, device_id: &str) -> bool {
        let state = self.lock();
        state.devices.get(DEVICES, device_id).is_some()
            && state.devices.get(DEVICES, &tombstone(device_id)).is_none()
    }

    /// Whether `peer` is a device of this group.
    pub fn in_group(&self, peer: &PeerId) -> bool {
        self.listed(&peer.to_string())
    }

    /// The other devices of the group.
    pub fn group(&self) -> Vec<String> {
        let entries = self.lock().devices.section_entries(DEVICES);
        entries
            .keys()
            .filter(|id| {
                !id.starts_with(TOMBSTONE)
                    && **id != self.device_id
                    && !entries.contains_key(&tombstone(id))
            })
            .cloned()
            .collect()
    }

    /// Adds a device to the group (both sides of a device ticket); a
    /// device removed before comes back.
    pub fn add_device(&self, device_id: &str, name: &str) -> Result<(), RpcError> {
        self.commit(
            DocKind::Devices,
            &[
                device_put(device_id, name),
                Edit::Delete {
                    section: DEVICES,
                    key: tombstone(device_id),
                },
            ],
            &format!("add device {name}"),
        )?;
        Ok(())
    }

    /// `peer remove` of a device of the group: it leaves the group on every
    /// device, not just here.
    pub fn remove_device(&self, device_id: &str) -> Result<(), RpcError> {
        let Some(entry) = self.device_entry(device_id) else {
            return Ok(());
        };
        let name = entry["name"].as_str().unwrap_or("").to_owned();
        let edit = Edit::Put {
            section: DEVICES,
            key: tombstone(device_id),
            value: json!({"removed_ms": crate::workspace::now_ms()}),
        };
        self.commit(DocKind::Devices, &[edit], &format!("remove device {name}"))?;
        Ok(())
    }

    /// Trusts every device of the group, forgets removed ones.
    fn apply_group(&self) {
        let devices = self.lock().devices.section_entries(DEVICES);
        for (id, entry) in &devices {
            let id = id.clone();
            if id.starts_with(TOMBSTONE) || id == self.device_id {
                continue;
            }
            let Ok(peer) = id.parse::<PeerId>() else {
                continue;
            };
            let known = self.store.peer(&id).ok().flatten();
            if devices.contains_key(&tombstone(&id)) {
                if known.is_some() {
                    tracing::info!(%peer, "a device was removed from the group");
                    let _ = self.store.remove_peer(&id);
                    if let Some(network) = self.network.get() {
                        network.send(Command::Distrust { peer });
                    }
                }
                continue;
            }
            if known.is_some() {
                continue;
            }
            let name = entry["name"].as_str().unwrap_or("").to_owned();
            let mut record = PeerRecord::new(name.clone(), crate::workspace::now_ms());
            let addrs: Vec<String> = entry["addrs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for addr in &addrs {
                record.add_addr(addr.clone());
            }
            if let Err(e) = self.store.put_peer(&id, &record) {
                tracing::warn!(%peer, "cannot trust a device of the group: {e}");
                continue;
            }
            tracing::info!(%peer, name, "trusting a device of the group");
            self.events.publish(
                event_kind::DEVICE_JOINED,
                json!({"device_id": id, "name": name}),
            );
            if let Some(network) = self.network.get() {
                network.send(Command::Trust {
                    peer,
                    addrs: addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                });
            }
        }
    }

    /// Keeps this device's addresses in the group's list current, so that
    /// a device that joins later can dial it.
    fn refresh_own_addrs(&self) {
        let Some(network) = self.network.get() else {
            return;
        };
        let addrs: Vec<String> = network.snapshot(|s| {
            s.listen_addrs
                .iter()
                .take(mariesync_protocol::ticket::TICKET_ADDRS_MAX)
                .map(|a| a.to_string())
                .collect()
        });
        let Some(mut entry) = self.device_entry(&self.device_id) else {
            return;
        };
        // What a peer put there may be anything.
        if !entry.is_object() || !self.listed(&self.device_id) {
            return;
        }
        if addrs.is_empty() || entry["addrs"] == json!(addrs) {
            return;
        }
        entry["addrs"] = json!(addrs);
        let edit = Edit::Put {
            section: DEVICES,
            key: self.device_id.clone(),
            value: entry,
        };
        if let Err(e) = self.commit(DocKind::Devices, &[edit], "addresses") {
            tracing::warn!("cannot record this device's addresses: {e}");
        }
    }

    /// The joiner's state before its first sync with a group, kept as a
    /// version to restore.
    pub fn mark_premerge(&self) -> Result<(), RpcError> {
        let head = {
            let mut state = self.lock();
            let now = crate::workspace::now_ms();
            let head =
                state
                    .settings
                    .single_head(&self.device_id, "before joining a device group", now);
            self.persist(&mut state, DocKind::Settings, &[])?;
            head
        };
        self.store
            .meta_put(META_PREMERGE, Some(doc::hex(&head).as_bytes()))
            .map_err(store_err)
    }

    // ---- sync with peers -------------------------------------------------

    pub fn peer_up(self: &Arc<Self>, peer: PeerId) {
        if !self.in_group(&peer) {
            return;
        }
        // Storing goes off the async threads; the session starts after.
        let this = self.clone();
        let Some(runtime) = self.runtime.get() else {
            return;
        };
        runtime.spawn_blocking(move || {
            this.refresh_own_addrs();
            this.kick(peer);
        });
    }

    pub fn peer_down(&self, peer: PeerId) {
        self.lock().peers.retain(|(p, _), _| *p != peer);
    }

    fn kick_all(self: &Arc<Self>, except: Option<PeerId>) {
        let Some(network) = self.network.get() else {
            return;
        };
        let connected: Vec<PeerId> = network.snapshot(|s| s.connected.keys().copied().collect());
        for peer in connected {
            if Some(peer) != except && self.in_group(&peer) {
                self.kick(peer);
            }
        }
    }

    /// Runs a sync session with `peer`, or asks the running one for
    /// another round.
    fn kick(self: &Arc<Self>, peer: PeerId) {
        let Some(runtime) = self.runtime.get() else {
            return;
        };
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = running.get_mut(&peer) {
                *again = true;
                return;
            }
            running.insert(peer, false);
        }
        let this = self.clone();
        runtime.spawn(async move { this.session(peer).await });
    }

    async fn session(self: Arc<Self>, peer: PeerId) {
        loop {
            for kind in DocKind::ALL {
                if let Err(e) = self.sync_doc(peer, kind).await {
                    tracing::debug!(%peer, "settings sync stopped: {e}");
                    self.lock().peers.remove(&(peer, kind));
                }
            }
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            match running.get_mut(&peer) {
                Some(again) if *again => *again = false,
                _ => {
                    running.remove(&peer);
                    return;
                }
            }
        }
    }

    async fn sync_doc(self: &Arc<Self>, peer: PeerId, kind: DocKind) -> Result<(), String> {
        let network = self.network.get().ok_or("no network")?.clone();
        self.recover();
        self.check_failed().map_err(|e| e.message)?;
        for _ in 0..SESSION_ROUNDS_MAX {
            let (message, new_session) = {
                let mut state = self.lock();
                let new_session = !state.peers.contains_key(&(peer, kind));
                let (doc, sync_state) = state.doc_and_sync(kind, peer);
                (doc.generate_sync(sync_state), new_session)
            };
            let Some(message) = message else {
                return Ok(());
            };
            let request = Request::Settings {
                doc: kind.name().to_owned(),
                new_session,
                message,
            };
            match network.request(peer, request).await? {
                Response::Settings {
                    message: Some(reply),
                } => {
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || this.receive(peer, kind, &reply))
                        .await
                        .map_err(|e| e.to_string())??;
                }
                Response::Settings { message: None } => {}
                Response::Error { message } => return Err(message),
                other => return Err(format!("unexpected answer {other:?}")),
            }
        }
        Ok(())
    }

    /// The sync protocol's `Settings` request (blocking: it stores).
    pub fn serve(&self, peer: PeerId, doc: &str, new_session: bool, message: &[u8]) -> Response {
        let error = |message: String| Response::Error { message };
        self.recover();
        if let Err(e) = self.check_failed() {
            return error(e.message);
        }
        if !self.in_group(&peer) {
            return error(format!("{peer} is not a device of this device's group"));
        }
        let Some(kind) = DocKind::from_name(doc) else {
            return error(format!("no settings document '{doc}'"));
        };
        if new_session {
            self.lock().peers.remove(&(peer, kind));
        }
        if let Err(e) = self.receive(peer, kind, message) {
            return error(e);
        }
        let mut state = self.lock();
        let (doc, sync_state) = state.doc_and_sync(kind, peer);
        Response::Settings {
            message: doc.generate_sync(sync_state),
        }
    }

    /// Applies and stores a peer's sync message.
    fn receive(&self, peer: PeerId, kind: DocKind, message: &[u8]) -> Result<(), String> {
        let committed = {
            let mut state = self.lock();
            let (doc, sync_state) = state.doc_and_sync(kind, peer);
            let before = doc.entries();
            let heads = doc.heads();
            match doc.receive_sync(sync_state, message) {
                Ok(false) => return Ok(()),
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(%peer, "refused a settings message: {e}");
                    self.reload(&mut state, kind);
                    return Err(format!("refused: {e}"));
                }
            }
            self.persist(&mut state, kind, &[]).map_err(|e| e.message)?;
            let doc = state.doc(kind);
            let after = doc.entries();
            let mut device_ids: Vec<String> = Vec::new();
            for version in doc.versions_since(&heads) {
                if !device_ids.contains(&version.device_id) {
                    device_ids.push(version.device_id);
                }
            }
            Committed {
                changes: doc::diff(&before, &after),
                device_ids,
            }
        };
        self.announce(kind, &committed, "remote");
        if let Some(this) = self.arc() {
            this.kick_all(Some(peer));
        }
        if kind == DocKind::Settings {
            self.refresh_bound_file();
        }
        Ok(())
    }

    // ---- settings, as the CLI and IPC see them ---------------------------

    pub fn active_profile(&self) -> String {
        self.store
            .meta_get(META_PROFILE)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_else(|| DEFAULT_PROFILE.to_owned())
    }

    fn profile_or_active(&self, profile: Option<String>) -> Result<String, RpcError> {
        match profile {
            None => Ok(self.active_profile()),
            Some(p) => {
                check_profile_name(&p)?;
                if !self.profile_exists(&p) {
                    return Err(invalid(format!(
                        "no profile '{p}'; create it with `mariesync settings profile create {p}`"
                    )));
                }
                Ok(p)
            }
        }
    }

    fn profile_exists(&self, name: &str) -> bool {
        name == DEFAULT_PROFILE || self.lock().settings.get(PROFILES, name).is_some()
    }

    fn device_only(&self, profile: &str) -> Result<BTreeMap<String, Value>, RpcError> {
        let prefix = format!("{META_LOCAL}{profile}:");
        Ok(self
            .store
            .meta_scan(&prefix)
            .map_err(store_err)?
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    k[prefix.len()..].to_owned(),
                    serde_json::from_slice(&v).ok()?,
                ))
            })
            .collect())
    }

    /// A profile's settings as this device sees them: synced ones with
    /// device-only ones over them.
    pub fn effective(&self, profile: &str) -> Result<BTreeMap<String, Value>, RpcError> {
        let prefix = format!("{profile}:");
        let mut out: BTreeMap<String, Value> = self
            .lock()
            .settings
            .section_entries(SETTINGS)
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_owned(), v)))
            .collect();
        out.extend(self.device_only(profile)?);
        Ok(out)
    }

    pub fn get(&self, key: Option<String>, profile: Option<String>) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(profile)?;
        let local = self.device_only(&profile)?;
        let all = self.effective(&profile)?;
        let Some(key) = key else {
            return Ok(json!({
                "key": null,
                "profile": profile,
                "value": all,
                "device_only": local.keys().collect::<Vec<_>>(),
            }));
        };
        check_key(&key)?;
        if let Some(value) = all.get(&key) {
            let mut out = json!({
                "key": key,
                "profile": profile,
                "value": value,
                "device_only": local.contains_key(&key),
            });
            if !local.contains_key(&key) {
                let every = self
                    .lock()
                    .settings
                    .get_all(SETTINGS, &format!("{profile}:{key}"));
                if every.len() > 1 {
                    out["conflicts"] = json!(every[1..]);
                }
            }
            return Ok(out);
        }
        // A prefix: the keys under it, as an object.
        let under = format!("{key}.");
        let nested: BTreeMap<&str, &Value> = all
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&under).map(|rest| (rest, v)))
            .collect();
        let value = if nested.is_empty() {
            Value::Null
        } else {
            json!(nested)
        };
        Ok(json!({"key": key, "profile": profile, "value": value, "device_only": false}))
    }

    pub fn set(
        &self,
        key: String,
        value: Value,
        device_only: bool,
        profile: Option<String>,
    ) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(profile)?;
        check_key(&key)?;
        check_value(&value)?;
        // A key that is device-only here stays so until it is unset.
        if device_only || self.is_device_only(&profile, &key)? {
            self.write_device_only(&profile, &[(key.clone(), Some(value.clone()))])?;
            self.refresh_bound_file();
            return Ok(
                json!({"key": key, "profile": profile, "value": value, "device_only": true}),
            );
        }
        let edit = Edit::Put {
            section: SETTINGS,
            key: format!("{profile}:{key}"),
            value: value.clone(),
        };
        let version = self.change(&[edit], &format!("set {key}"))?;
        Ok(
            json!({"key": key, "profile": profile, "value": value, "device_only": false,
                  "version": version}),
        )
    }

    pub fn unset(&self, key: String, profile: Option<String>) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(profile)?;
        check_key(&key)?;
        if self.is_device_only(&profile, &key)? {
            self.write_device_only(&profile, &[(key.clone(), None)])?;
            self.refresh_bound_file();
            return Ok(
                json!({"key": key, "profile": profile, "removed": true, "device_only": true}),
            );
        }
        let edit = Edit::Delete {
            section: SETTINGS,
            key: format!("{profile}:{key}"),
        };
        let version = self.change(&[edit], &format!("unset {key}"))?;
        Ok(
            json!({"key": key, "profile": profile, "removed": version.is_some(),
                  "device_only": false, "version": version}),
        )
    }

    pub(super) fn is_device_only(&self, profile: &str, key: &str) -> Result<bool, RpcError> {
        Ok(self
            .store
            .meta_get(&local_key(profile, key))
            .map_err(store_err)?
            .is_some())
    }

    /// Sets (or, with `None`, removes) device-only values in one commit and
    /// announces them; the caller refreshes the bound file if it must.
    pub(super) fn write_device_only(
        &self,
        profile: &str,
        changes: &[(String, Option<Value>)],
    ) -> Result<(), RpcError> {
        if changes.is_empty() {
            return Ok(());
        }
        let entries: Vec<(String, Option<Vec<u8>>)> = changes
            .iter()
            .map(|(key, value)| {
                (
                    local_key(profile, key),
                    value.as_ref().map(|v| v.to_string().into_bytes()),
                )
            })
            .collect();
        let entries: Vec<(&str, Option<&[u8]>)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        self.store.meta_put_all(&entries).map_err(store_err)?;
        let keys: Vec<&String> = changes.iter().map(|(key, _)| key).collect();
        self.events.publish(
            event_kind::SETTINGS_CHANGED,
            json!({"section": SETTINGS, "profile": profile, "keys": keys,
                   "device_id": self.device_id, "device_ids": [self.device_id],
                   "origin": "local", "device_only": true}),
        );
        Ok(())
    }

    /// A local change of the settings document, then the bound file.
    fn change(&self, edits: &[Edit], summary: &str) -> Result<Option<String>, RpcError> {
        let committed = self.commit(DocKind::Settings, edits, summary)?;
        if committed.is_none() {
            return Ok(None);
        }
        self.refresh_bound_file();
        let head = self.lock().settings.heads();
        Ok(head.first().map(doc::hex))
    }

    // -- keybindings, snippets, extensions, profiles

    pub fn keybindings(&self, profile: Option<String>) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(profile)?;
        let list = self.scoped(KEYBINDINGS, &profile);
        Ok(json!({"profile": profile, "keybindings": list.into_values().collect::<Vec<_>>()}))
    }

    fn scoped(&self, section: &str, profile: &str) -> BTreeMap<String, Value> {
        let prefix = format!("{profile}:");
        self.lock()
            .settings
            .section_entries(section)
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_owned(), v)))
            .collect()
    }

    pub fn keybinding(
        &self,
        add: bool,
        p: mariesync_protocol::ipc::KeybindingParams,
    ) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(p.profile)?;
        for (what, text) in [("key", &p.key), ("command", &p.command)] {
            if text.trim().is_empty() || text.len() > KEY_BYTES_MAX {
                return Err(invalid(format!(
                    "a keybinding's {what} is 1 to {KEY_BYTES_MAX} bytes"
                )));
            }
        }
        let when = p.when.unwrap_or_default();
        let id = blake3::hash(format!("{}\0{}\0{}", p.key, p.command, when).as_bytes()).to_hex()
            [..16]
            .to_owned();
        let mut value = json!({"key": p.key, "command": p.command});
        if !when.is_empty() {
            value["when"] = json!(when);
        }
        if let Some(args) = p.args {
            value["args"] = args;
        }
        check_value(&value)?;
        let key = format!("{profile}:{id}");
        let (edit, summary) = if add {
            (
                Edit::Put {
                    section: KEYBINDINGS,
                    key,
                    value: value.clone(),
                },
                format!("bind {} to {}", p.key, p.command),
            )
        } else {
            (
                Edit::Delete {
                    section: KEYBINDINGS,
                    key,
                },
                format!("unbind {} from {}", p.key, p.command),
            )
        };
        let version = self.change(&[edit], &summary)?;
        Ok(
            json!({"profile": profile, "keybinding": value, "changed": version.is_some(),
                  "version": version}),
        )
    }

    pub fn snippets(&self, profile: Option<String>) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(profile)?;
        Ok(json!({"profile": profile, "snippets": self.scoped(SNIPPETS, &profile)}))
    }

    pub fn snippet(
        &self,
        p: mariesync_protocol::ipc::SnippetParams,
        set: bool,
    ) -> Result<Value, RpcError> {
        let profile = self.profile_or_active(p.profile)?;
        check_key(&p.name)?;
        let key = format!("{profile}:{}", p.name);
        let (edit, summary) = if set {
            let value = p
                .value
                .ok_or_else(|| invalid("give the snippet as a JSON value"))?;
            check_value(&value)?;
            (
                Edit::Put {
                    section: SNIPPETS,
                    key,
                    value,
                },
                format!("set snippet {}", p.name),
            )
        } else {
            (
                Edit::Delete {
                    section: SNIPPETS,
                    key,
                },
                format!("remove snippet {}", p.name),
            )
        };
        let version = self.change(&[edit], &summary)?;
        Ok(
            json!({"profile": profile, "name": p.name, "changed": version.is_some(),
                  "version": version}),
        )
    }

    pub fn extensions(&self) -> Value {
        let all = self.lock().settings.section_entries(EXTENSIONS);
        let installed: Vec<&String> = all
            .iter()
            .filter(|(_, v)| v["state"] == "installed")
            .map(|(k, _)| k)
            .collect();
        let list: Vec<Value> = all
            .iter()
            .map(|(k, v)| json!({"id": k, "state": v["state"]}))
            .collect();
        json!({"extensions": list, "installed": installed})
    }

    /// An install or uninstall intent. Repeating what the document already
    /// says writes nothing: a device that was offline and still lists an
    /// extension cannot bring it back by reporting it again.
    pub fn extension(&self, id: &str, install: bool) -> Result<Value, RpcError> {
        let id = id.trim().to_ascii_lowercase();
        if id.is_empty()
            || id.len() > KEY_BYTES_MAX
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        {
            return Err(invalid(format!(
                "'{id}' is not an extension ID (publisher.name)"
            )));
        }
        let state = if install { "installed" } else { "uninstalled" };
        let current = self.lock().settings.get(EXTENSIONS, &id);
        let current_state = current.as_ref().map(|v| v["state"].clone());
        let already = match current_state {
            Some(s) => s == state,
            // Never heard of: an uninstall is a no-op.
            None => !install,
        };
        if already {
            return Ok(json!({"id": id, "state": state, "changed": false}));
        }
        let edit = Edit::Put {
            section: EXTENSIONS,
            key: id.clone(),
            value: json!({"state": state}),
        };
        let verb = if install { "install" } else { "uninstall" };
        let version = self.change(&[edit], &format!("{verb} {id}"))?;
        Ok(json!({"id": id, "state": state, "changed": true, "version": version}))
    }

    pub fn profiles(&self) -> Value {
        let mut names = vec![DEFAULT_PROFILE.to_owned()];
        names.extend(
            self.lock()
                .settings
                .section_entries(PROFILES)
                .into_keys()
                .filter(|n| n != DEFAULT_PROFILE),
        );
        json!({"profiles": names, "active": self.active_profile()})
    }

    pub fn profile_create(&self, name: &str, from: Option<String>) -> Result<Value, RpcError> {
        check_profile_name(name)?;
        if self.profile_exists(name) {
            return Err(invalid(format!("profile '{name}' exists")));
        }
        let from = self.profile_or_active(from)?;
        let mut edits = vec![Edit::Put {
            section: PROFILES,
            key: name.to_owned(),
            value: json!({"from": from}),
        }];
        for section in [SETTINGS, KEYBINDINGS, SNIPPETS] {
            for (key, value) in self.scoped(section, &from) {
                edits.push(Edit::Put {
                    section,
                    key: format!("{name}:{key}"),
                    value,
                });
            }
        }
        let version = self.change(&edits, &format!("create profile {name} from {from}"))?;
        Ok(json!({"profile": name, "from": from, "version": version}))
    }

    pub fn profile_use(&self, name: &str) -> Result<Value, RpcError> {
        let name = self.profile_or_active(Some(name.to_owned()))?;
        self.store
            .meta_put(META_PROFILE, Some(name.as_bytes()))
            .map_err(store_err)?;
        self.refresh_bound_file();
        Ok(json!({"active": name}))
    }

    pub fn profile_delete(&self, name: &str) -> Result<Value, RpcError> {
        let name = self.profile_or_active(Some(name.to_owned()))?;
        if name == DEFAULT_PROFILE {
            return Err(invalid("the default profile cannot be deleted"));
        }
        if name == self.active_profile() {
            return Err(invalid(format!(
                "profile '{name}' is active on this device; `settings profile use` another first"
            )));
        }
        let mut edits = vec![Edit::Delete {
            section: PROFILES,
            key: name.clone(),
        }];
        for section in [SETTINGS, KEYBINDINGS, SNIPPETS] {
            for key in self.scoped(section, &name).into_keys() {
                edits.push(Edit::Delete {
                    section,
                    key: format!("{name}:{key}"),
                });
            }
        }
        let version = self.change(&edits, &format!("delete profile {name}"))?;
        Ok(json!({"profile": name, "deleted": true, "version": version}))
    }

    // -- history

    pub fn history(&self, limit: Option<usize>) -> Value {
        let premerge = self
            .store
            .meta_get(META_PREMERGE)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok());
        let versions = self.lock().settings.history();
        let list: Vec<Value> = versions
            .iter()
            .rev()
            .take(limit.unwrap_or(100))
            .map(|v| {
                let version = doc::hex(&v.hash);
                let mut out = json!({
                    "version": version,
                    "time": crate::daemon::format_time(v.time_ms),
                    "time_ms": v.time_ms,
                    "device_id": v.device_id,
                    "summary": v.summary,
                });
                if premerge.as_deref() == Some(version.as_str()) {
                    out["before_joining_group"] = json!(true);
                }
                out
            })
            .collect();
        json!({"versions": list, "total": versions.len()})
    }

    /// Puts every entry back as it was at `version`, as a new change; the
    /// answer names the version to restore to undo it.
    pub fn restore(&self, version: &str) -> Result<Value, RpcError> {
        let not_found = |e: doc::DocError| invalid(e.to_string());
        let (target, undo, edits) = {
            let mut state = self.lock();
            let target = state.settings.resolve_version(version).map_err(not_found)?;
            let old = state.settings.entries_at(target).map_err(not_found)?;
            let now = crate::workspace::now_ms();
            let undo = state
                .settings
                .single_head(&self.device_id, "before a restore", now);
            self.persist(&mut state, DocKind::Settings, &[])?;
            let current = state.settings.entries();
            let edits: Vec<Edit> = doc::diff(&current, &old)
                .into_iter()
                .filter_map(|(section, key, value)| {
                    let section = DocKind::Settings
                        .sections()
                        .iter()
                        .copied()
                        .find(|s| *s == section)?;
                    Some(match value {
                        Some(value) => Edit::Put {
                            section,
                            key,
                            value,
                        },
                        None => Edit::Delete { section, key },
                    })
                })
                .collect();
            (target, undo, edits)
        };
        let target = doc::hex(&target);
        let version = self.change(&edits, &format!("restore {}", &target[..12]))?;
        Ok(json!({
            "restored": target,
            "version": version,
            "changed": version.is_some(),
            "undo": doc::hex(&undo),
        }))
    }

    // -- the bound file

    /// Writes the bound file if the settings moved away from it.
    fn refresh_bound_file(&self) {
        let mut binding = self.binding.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(binding) = binding.as_mut()
            && let Err(e) = self.write_back(binding)
        {
            tracing::warn!(file = %binding.path.display(), "cannot update the bound settings file: {e}");
        }
    }
}

const TOMBSTONE: &str = "removed:";

fn tombstone(device_id: &str) -> String {
    format!("{TOMBSTONE}{device_id}")
}

fn device_put(device_id: &str, name: &str) -> Edit {
    let value = json!({"name": name});
    Edit::Put {
        section: DEVICES,
        key: device_id.to_owned(),
        value,
    }
}

/// The metadata key of a device-only value.
fn local_key(profile: &str, key: &str) -> String {
    format!("{META_LOCAL}{profile}:{key}")
}

fn check_key(key: &str) -> Result<(), RpcError> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX || key.chars().any(char::is_control) {
        return Err(invalid(format!(
            "'{key}' is not a settings key (1 to {KEY_BYTES_MAX} bytes, no control characters)"
        )));
    }
    Ok(())
}

fn check_value(value: &Value) -> Result<(), RpcError> {
    let len = value.to_string().len();
    if len > VALUE_BYTES_MAX {
        return Err(invalid(format!(
            "a value of {len} bytes; at most {VALUE_BYTES_MAX}"
        )));
    }
    Ok(())
}

fn check_profile_name(name: &str) -> Result<(), RpcError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" ._-".contains(&b))
        && !name.starts_with([' ', '.']);
    if !ok {
        return Err(invalid(format!(
            "'{name}' is not a profile name (letters, digits, space, '.', '_', '-'; at most 64)"
        )));
    }
    Ok(())
}
