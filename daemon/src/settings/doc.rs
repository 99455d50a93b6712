//! One synced Automerge document, without IO: the settings of a user, or
//! the list of the devices of their group.
//!
//! A document is a few flat maps ("sections") of string keys to JSON
//! values kept as JSON text. Flat, because concurrent edits then merge per
//! key (last writer wins, the same winner everywhere, the losers kept in
//! history), and because nested objects created on two devices at once
//! would shadow each other.
//!
//! **Architecture Invariant:** every device starts from the same skeleton
//! change (a fixed actor, time 0, the sections created as maps), so two
//! documents born apart merge into one set of maps instead of two rival
//! ones; a device that already had settings merges them on its first sync.

use std::collections::BTreeMap;

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocKind {
    /// Settings, keybindings, snippets, extension intents, profiles.
    Settings,
    /// The devices of the group: device ID -> name, addresses.
    Devices,
}

pub const SETTINGS: &str = "settings";
pub const KEYBINDINGS: &str = "keybindings";
pub const SNIPPETS: &str = "snippets";
pub const EXTENSIONS: &str = "extensions";
pub const PROFILES: &str = "profiles";
pub const DEVICES: &str = "devices";

impl DocKind {
    pub const ALL: [DocKind; 2] = [DocKind::Settings, DocKind::Devices];

    pub fn name(self) -> &'static str {
        match self {
            DocKind::Settings => "settings",
            DocKind::Devices => "devices",
        }
    }

    pub fn from_name(name: &str) -> Option<DocKind> {
        DocKind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn sections(self) -> &'static [&'static str] {
        match self {
            DocKind::Settings => &[SETTINGS, KEYBINDINGS, SNIPPETS, EXTENSIONS, PROFILES],
            DocKind::Devices => &[DEVICES],
        }
    }

    /// The actor of the skeleton change, never used for anything else.
    fn skeleton_actor(self) -> ActorId {
        let mut bytes = [0u8; 16];
        bytes[15] = self as u8 + 1;
        ActorId::from(bytes)
    }
}

/// Every entry of a document: (section, key) -> value.
pub type Entries = BTreeMap<(String, String), Value>;

#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    Put {
        section: &'static str,
        key: String,
        value: Value,
    },
    Delete {
        section: &'static str,
        key: String,
    },
}

/// One change, as `settings history` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub hash: ChangeHash,
    pub time_ms: u64,
    pub device_id: String,
    pub summary: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("not an Automerge sync message: {0}")]
    Malformed(String),
    #[error("the document cannot take these changes: {0}")]
    Rejected(String),
    #[error("the stored document is damaged: {0}")]
    Damaged(String),
    #[error("no version {0}")]
    UnknownVersion(String),
    #[error("version {0} is ambiguous; give more of it")]
    AmbiguousVersion(String),
}

pub struct Doc {
    kind: DocKind,
    doc: AutoCommit,
    sections: BTreeMap<&'static str, ObjId>,
    /// The heads as last saved (or loaded).
    saved: Vec<ChangeHash>,
}

impl Doc {
    /// A new document (the skeleton), edited as `actor` from now on.
    pub fn new(kind: DocKind, actor: [u8; 16]) -> Doc {
        let mut doc = AutoCommit::new().with_actor(kind.skeleton_actor());
        for section in kind.sections() {
            doc.put_object(ROOT, *section, ObjType::Map)
                .expect("a map in the root of a new document");
        }
        doc.commit_with(
            CommitOptions::default()
                .with_message(format!("mariesync {} document", kind.name()))
                .with_time(0),
        );
        doc.set_actor(ActorId::from(actor));
        let mut doc = Doc::wrap(kind, doc).expect("the skeleton has its sections");
        // Nothing stored yet: the skeleton goes into the first save.
        doc.saved.clear();
        doc
    }

    /// A stored document: a full save, then incremental saves, in order.
    pub fn load(kind: DocKind, actor: [u8; 16], parts: &[Vec<u8>]) -> Result<Doc, DocError> {
        let Some((first, rest)) = parts.split_first() else {
            return Ok(Doc::new(kind, actor));
        };
        let damaged = |e: automerge::AutomergeError| DocError::Damaged(e.to_string());
        let mut doc = AutoCommit::load(first).map_err(damaged)?;
        for part in rest {
            doc.load_incremental(part).map_err(damaged)?;
        }
        doc.set_actor(ActorId::from(actor));
        Doc::wrap(kind, doc)
    }

    fn wrap(kind: DocKind, doc: AutoCommit) -> Result<Doc, DocError> {
        let mut sections = BTreeMap::new();
        for section in kind.sections() {
            match doc.get(ROOT, *section) {
                Ok(Some((automerge::Value::Object(ObjType::Map), id))) => {
                    sections.insert(*section, id);
                }
                _ => {
                    return Err(DocError::Damaged(format!(
                        "the {} document has no '{section}' map",
                        kind.name()
                    )));
                }
            }
        }
        let mut doc = doc;
        let saved = doc.get_heads();
        Ok(Doc {
            kind,
            doc,
            sections,
            saved,
        })
    }

    pub fn kind(&self) -> DocKind {
        self.kind
    }

    fn section(&self, section: &str) -> &ObjId {
        self.sections
            .get(section)
            .unwrap_or_else(|| panic!("no section {section} in the {:?} document", self.kind))
    }

    pub fn get(&self, section: &str, key: &str) -> Option<Value> {
        match self.doc.get(self.section(section), key) {
            Ok(Some((automerge::Value::Scalar(s), _))) => parse_scalar(&s),
            _ => None,
        }
    }

    /// Every value a key has: the winner first, then values set
    /// concurrently that lost (until a later change overwrites them all).
    pub fn get_all(&self, section: &str, key: &str) -> Vec<Value> {
        let mut all: Vec<(Value, automerge::ObjId)> = self
            .doc
            .get_all(self.section(section), key)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(v, id)| match v {
                automerge::Value::Scalar(s) => parse_scalar(&s).map(|v| (v, id)),
                _ => None,
            })
            .collect();
        // Automerge lists them with the winner last.
        all.reverse();
        all.into_iter().map(|(v, _)| v).collect()
    }

    /// The entries of one section.
    pub fn section_entries(&self, section: &str) -> BTreeMap<String, Value> {
        read_section(&self.doc, self.section(section))
    }

    /// Every entry of every section.
    pub fn entries(&self) -> Entries {
        let mut out = Entries::new();
        for (section, obj) in &self.sections {
            for (key, value) in read_section(&self.doc, obj) {
                out.insert((section.to_string(), key), value);
            }
        }
        out
    }

    /// Applies `edits` as one change, leaving out those that change
    /// nothing. `None` when nothing changed.
    pub fn change(
        &mut self,
        edits: &[Edit],
        device_id: &str,
        summary: &str,
        time_ms: u64,
    ) -> Option<ChangeHash> {
        let mut any = false;
        for edit in edits {
            match edit {
                Edit::Put {
                    section,
                    key,
                    value,
                } => {
                    if self.get(section, key).as_ref() == Some(value)
                        && self.get_all(section, key).len() == 1
                    {
                        continue;
                    }
                    let obj = self.section(section).clone();
                    self.doc
                        .put(&obj, key.as_str(), value.to_string())
                        .expect("a put into a map of this document");
                    any = true;
                }
                Edit::Delete { section, key } => {
                    let obj = self.section(section).clone();
                    if matches!(self.doc.get(&obj, key.as_str()), Ok(Some(_))) {
                        self.doc
                            .delete(&obj, key.as_str())
                            .expect("a delete from a map of this document");
                        any = true;
                    }
                }
            }
        }
        if !any {
            self.doc.rollback();
            return None;
        }
        self.doc.commit_with(
            CommitOptions::default()
                .with_message(format!("{device_id}\n{summary}"))
                .with_time(time_ms as i64),
        )
    }

    /// One head, so that "now" is a single version: an empty change joins
    /// concurrent heads.
    pub fn single_head(&mut self, device_id: &str, summary: &str, time_ms: u64) -> ChangeHash {
        let heads = self.doc.get_heads();
        if heads.len() == 1 {
            return heads[0];
        }
        self.doc.empty_change(
            CommitOptions::default()
                .with_message(format!("{device_id}\n{summary}"))
                .with_time(time_ms as i64),
        )
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Every change but the skeleton, oldest first.
    pub fn history(&mut self) -> Vec<Version> {
        let skeleton = self.kind.skeleton_actor();
        self.doc
            .get_changes_meta(&[])
            .into_iter()
            .filter(|c| *c.actor != skeleton)
            .map(|c| {
                let message = c.message.as_deref().unwrap_or("");
                let (device_id, summary) = message.split_once('\n').unwrap_or(("", message));
                Version {
                    hash: c.hash,
                    time_ms: u64::try_from(c.timestamp).unwrap_or(0),
                    device_id: device_id.to_owned(),
                    summary: summary.to_owned(),
                }
            })
            .collect()
    }

    /// Changes after `heads`, as versions (who changed what).
    pub fn versions_since(&mut self, heads: &[ChangeHash]) -> Vec<Version> {
        let wanted: std::collections::HashSet<ChangeHash> = self
            .doc
            .get_changes_meta(heads)
            .into_iter()
            .map(|c| c.hash)
            .collect();
        self.history()
            .into_iter()
            .filter(|v| wanted.contains(&v.hash))
            .collect()
    }

    /// The change whose hash starts with `prefix` (hex, 8 digits at least).
    pub fn resolve_version(&mut self, prefix: &str) -> Result<ChangeHash, DocError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DocError::UnknownVersion(format!(
                "'{prefix}' (a version is 8 to 64 hex digits)"
            )));
        }
        let mut found = self
            .history()
            .into_iter()
            .filter(|v| hex(&v.hash).starts_with(&prefix));
        match (found.next(), found.next()) {
            (Some(v), None) => Ok(v.hash),
            (Some(_), Some(_)) => Err(DocError::AmbiguousVersion(prefix)),
            (None, _) => Err(DocError::UnknownVersion(prefix)),
        }
    }

    /// The entries as they were at `version`.
    pub fn entries_at(&mut self, version: ChangeHash) -> Result<Entries, DocError> {
        let old = self
            .doc
            .fork_at(&[version])
            .map_err(|e| DocError::UnknownVersion(format!("{}: {e}", hex(&version))))?;
        let old = Doc::wrap(self.kind, old)?;
        Ok(old.entries())
    }

    /// Bytes of the changes since the last save (what to append to
    /// storage), and the heads to pass to [`Doc::mark_saved`] once they are.
    pub fn unsaved(&mut self) -> (Vec<u8>, Vec<ChangeHash>) {
        let heads = self.doc.get_heads();
        if heads == self.saved {
            return (Vec::new(), heads);
        }
        (self.doc.save_after(&self.saved), heads)
    }

    pub fn mark_saved(&mut self, heads: Vec<ChangeHash>) {
        self.saved = heads;
    }

    /// [`Doc::unsaved`], counted as saved at once (tests, benchmarks).
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let (bytes, heads) = self.unsaved();
        self.mark_saved(heads);
        bytes
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.saved = self.doc.get_heads();
        self.doc.save()
    }

    pub fn generate_sync(&mut self, state: &mut sync::State) -> Option<Vec<u8>> {
        self.doc
            .sync()
            .generate_sync_message(state)
            .map(|m| m.encode())
    }

    /// Takes a peer's sync message; whether the document changed. On an
    /// error the document may hold part of the message: reload it.
    pub fn receive_sync(
        &mut self,
        state: &mut sync::State,
        message: &[u8],
    ) -> Result<bool, DocError> {
        let message =
            sync::Message::decode(message).map_err(|e| DocError::Malformed(e.to_string()))?;
        let before = self.doc.get_heads();
        self.doc
            .sync()
            .receive_sync_message(state, message)
            .map_err(|e| DocError::Rejected(e.to_string()))?;
        // The message may name sections of its own: they must still be ours.
        for section in self.kind.sections() {
            match self.doc.get(ROOT, *section) {
                Ok(Some((_, id))) if Some(&id) == self.sections.get(section) => {}
                _ => {
                    return Err(DocError::Rejected(format!(
                        "it replaces the '{section}' map"
                    )));
                }
            }
        }
        Ok(self.doc.get_heads() != before)
    }
}

fn read_section(doc: &AutoCommit, obj: &ObjId) -> BTreeMap<String, Value> {
    doc.map_range(obj, ..)
        .filter_map(|item| match item.value.into_value() {
            automerge::Value::Scalar(s) => parse_scalar(&s).map(|v| (item.key.to_string(), v)),
            _ => None,
        })
        .collect()
}

fn parse_scalar(scalar: &ScalarValue) -> Option<Value> {
    match scalar {
        ScalarValue::Str(text) => serde_json::from_str(text).ok(),
        _ => None,
    }
}

pub fn hex(hash: &ChangeHash) -> String {
    hash.to_string()
}

/// What differs between two sets of entries: (section, key, new value or
/// `None` when removed).
pub fn diff(before: &Entries, after: &Entries) -> Vec<(String, String, Option<Value>)> {
    let mut out = Vec::new();
    for ((section, key), value) in after {
        if before.get(&(section.clone(), key.clone())) != Some(value) {
            out.push((section.clone(), key.clone(), Some(value.clone())));
        }
    }
    for (section, key) in before.keys() {
        if !after.contains_key(&(section.clone(), key.clone())) {
            out.push((section.clone(), key.clone(), None));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(key: &str, value: Value) -> Edit {
        Edit::Put {
            section: SETTINGS,
            key: key.into(),
            value,
        }
    }

    fn sync_pair(a: &mut Doc, b: &mut Doc) {
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        for _ in 0..20 {
            let mut quiet = true;
            if let Some(m) = a.generate_sync(&mut sa) {
                b.receive_sync(&mut sb, &m).unwrap();
                quiet = false;
            }
            if let Some(m) = b.generate_sync(&mut sb) {
                a.receive_sync(&mut sa, &m).unwrap();
                quiet = false;
            }
            if quiet {
                return;
            }
        }
        panic!("sync did not settle");
    }

    #[test]
    fn documents_born_apart_merge_their_keys() {
        let mut a = Doc::new(DocKind::Settings, [1; 16]);
        let mut b = Doc::new(DocKind::Settings, [2; 16]);
        a.change(&[put("default:editor.fontSize", json!(14))], "A", "set", 1);
        b.change(&[put("default:editor.tabSize", json!(2))], "B", "set", 2);
        sync_pair(&mut a, &mut b);
        assert_eq!(a.entries(), b.entries());
        assert_eq!(a.entries().len(), 2);
    }

    #[test]
    fn a_concurrent_write_has_one_winner_everywhere_and_the_loser_is_kept() {
        let mut a = Doc::new(DocKind::Settings, [1; 16]);
        let mut b = Doc::new(DocKind::Settings, [2; 16]);
        sync_pair(&mut a, &mut b);
        a.change(&[put("default:k", json!("from a"))], "A", "set k", 1);
        b.change(&[put("default:k", json!("from b"))], "B", "set k", 2);
        sync_pair(&mut a, &mut b);
        let winner = a.get(SETTINGS, "default:k").unwrap();
        assert_eq!(b.get(SETTINGS, "default:k").unwrap(), winner);
        assert_eq!(a.get_all(SETTINGS, "default:k").len(), 2);
        assert_eq!(a.get_all(SETTINGS, "default:k")[0], winner);
        let summaries: Vec<String> = a.history().into_iter().map(|v| v.device_id).collect();
        assert!(summaries.contains(&"A".into()) && summaries.contains(&"B".into()));
    }

    #[test]
    fn save_load_and_history_restore() {
        let mut a = Doc::new(DocKind::Settings, [1; 16]);
        let v1 = a
            .change(&[put("default:x", json!(1))], "A", "set x", 10)
            .unwrap();
        let mut parts = vec![a.save()];
        a.change(&[put("default:x", json!(2))], "A", "set x", 20);
        parts.push(a.save_incremental());
        // Nothing changes: no change.
        assert!(
            a.change(&[put("default:x", json!(2))], "A", "", 30)
                .is_none()
        );
        let mut loaded = Doc::load(DocKind::Settings, [1; 16], &parts).unwrap();
        // Loading counts as saved: the next incremental save holds only
        // what comes after.
        assert!(loaded.save_incremental().is_empty());
        assert_eq!(loaded.get(SETTINGS, "default:x"), Some(json!(2)));
        let old = loaded.entries_at(v1).unwrap();
        assert_eq!(
            old.get(&(SETTINGS.into(), "default:x".into())),
            Some(&json!(1))
        );
        let prefix = &hex(&v1)[..10];
        assert_eq!(loaded.resolve_version(prefix).unwrap(), v1);
        assert!(loaded.resolve_version("zz").is_err());
        assert_eq!(loaded.history().len(), 2);
        assert_eq!(loaded.history()[0].summary, "set x");
    }

    #[test]
    fn garbage_is_refused_and_changes_nothing() {
        let mut a = Doc::new(DocKind::Settings, [1; 16]);
        a.change(&[put("default:x", json!(1))], "A", "set x", 10);
        let before = a.entries();
        let mut state = sync::State::new();
        for garbage in [&b"\x42garbage"[..], &[][..], &[0x42, 0xff, 0xff, 0xff][..]] {
            assert!(a.receive_sync(&mut state, garbage).is_err());
        }
        assert_eq!(a.entries(), before);
    }

    #[test]
    fn a_rival_skeleton_is_refused() {
        // A document made without the shared skeleton has its own maps.
        let mut rogue = AutoCommit::new().with_actor(ActorId::from([9u8; 16]));
        rogue.put_object(ROOT, SETTINGS, ObjType::Map).unwrap();
        rogue.commit();
        let mut a = Doc::new(DocKind::Settings, [1; 16]);
        let (mut sa, mut sr) = (sync::State::new(), sync::State::new());
        let mut refused = false;
        for _ in 0..5 {
            if let Some(m) = rogue.sync().generate_sync_message(&mut sr)
                && a.receive_sync(&mut sa, &m.encode()).is_err()
            {
                refused = true;
                break;
            }
            if let Some(m) = a.generate_sync(&mut sa) {
                let m = sync::Message::decode(&m).unwrap();
                rogue.sync().receive_sync_message(&mut sr, m).unwrap();
            }
        }
        assert!(refused);
    }
}
