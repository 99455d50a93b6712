//! `settings bind FILE`: a JSON-with-comments settings file (the kind IDEs
//! write: top-level keys are settings) kept in step with the active
//! profile, both ways.
//!
//! Three states meet: the file, the document, and the *base*, what both
//! last agreed on (stored with the binding). An edit of the file is what
//! differs between the file and the base; a change of the document is
//! what differs between the document and the base. File edits go in as
//! one change; document changes go out by editing the file's syntax tree,
//! so comments and the formatting of untouched entries stay as they were.
//!
//! **Architecture Invariant:** a file that does not parse (a half-saved
//! edit, a syntax error, a missing file) is reported and ignored: nothing
//! is read from it and nothing is written over it until it parses again.
//! It is never taken for "everything was deleted".

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonc_parser::ParseOptions;
use jsonc_parser::cst::{CstInputValue, CstRootNode};
use mariesync_protocol::ipc::{ErrorCode, RpcError, event_kind};
use notify::Watcher;
use serde_json::{Value, json};

use super::doc::SETTINGS;
use super::{DocKind, Edit, Settings, store_err};

const META_BIND: &str = "settings/bind";

pub struct Binding {
    pub path: PathBuf,
    /// The settings the file and the document last agreed on.
    base: BTreeMap<String, Value>,
    /// The file's text as this daemon last read or wrote it.
    last_text: Option<String>,
    /// The file did not parse when last read: it is left alone.
    invalid: bool,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// What VS Code accepts in settings.json: comments and trailing commas,
/// nothing looser (a missing comma is a half-typed edit, not a style).
fn parse_options() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    }
}

/// The settings a file's text holds, or why it holds none.
pub fn parse_settings(text: &str) -> Result<BTreeMap<String, Value>, String> {
    let value: Option<Value> =
        jsonc_parser::parse_to_serde_value(text, &parse_options()).map_err(|e| e.to_string())?;
    match value {
        Some(Value::Object(map)) => Ok(map.into_iter().collect()),
        Some(_) => Err("the file must hold one JSON object".into()),
        None => Err("the file is empty".into()),
    }
}

fn to_cst(value: &Value) -> CstInputValue {
    match value {
        Value::Null => CstInputValue::Null,
        Value::Bool(b) => CstInputValue::Bool(*b),
        Value::Number(n) => CstInputValue::Number(n.to_string()),
        Value::String(s) => CstInputValue::String(s.clone()),
        Value::Array(items) => CstInputValue::Array(items.iter().map(to_cst).collect()),
        Value::Object(map) => {
            CstInputValue::Object(map.iter().map(|(k, v)| (k.clone(), to_cst(v))).collect())
        }
    }
}

/// Applies `changes` (key -> new value, or removal) to a settings file's
/// text, leaving everything else byte for byte.
pub fn edit_text(text: &str, changes: &[(String, Option<Value>)]) -> Result<String, String> {
    let text = if text.trim().is_empty() {
        "{\n}\n"
    } else {
        text
    };
    let root = CstRootNode::parse(text, &parse_options()).map_err(|e| e.to_string())?;
    let object = root.object_value_or_set();
    for (key, value) in changes {
        match (object.get(key), value) {
            (Some(prop), Some(value)) => prop.set_value(to_cst(value)),
            (None, Some(value)) => {
                object.append(key, to_cst(value));
            }
            (Some(prop), None) => prop.remove(),
            (None, None) => {}
        }
    }
    Ok(root.to_string())
}

fn read(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Temp file, fsync, rename, directory fsync: an IDE never sees half a file.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.mariesync-tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    crate::materialize::sync_dir(dir);
    Ok(())
}

fn changes_between(
    from: &BTreeMap<String, Value>,
    to: &BTreeMap<String, Value>,
) -> Vec<(String, Option<Value>)> {
    let mut out: Vec<(String, Option<Value>)> = to
        .iter()
        .filter(|(k, v)| from.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    out.extend(
        from.keys()
            .filter(|k| !to.contains_key(*k))
            .map(|k| (k.clone(), None)),
    );
    out
}

impl Settings {
    pub fn bind(&self, file: &str) -> Result<Value, RpcError> {
        let path = PathBuf::from(file);
        if !path.is_absolute() {
            return Err(RpcError::new(
                ErrorCode::InvalidPath,
                format!("'{file}' is not an absolute path"),
            ));
        }
        if !path.parent().is_some_and(Path::is_dir) {
            return Err(RpcError::new(
                ErrorCode::InvalidPath,
                format!("the folder of {file} does not exist"),
            ));
        }
        let io = |e: String| RpcError::new(ErrorCode::Io, e);
        let text = read(&path).map_err(io)?;
        let from_file = match &text {
            Some(text) => parse_settings(text).map_err(|e| {
                RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("{file} does not parse ({e}); fix it and bind again"),
                )
            })?,
            None => BTreeMap::new(),
        };
        let profile = self.active_profile();
        let before = self.effective(&profile)?;
        // The first sync merges: what the file has goes in (its values win
        // where both have a key: they are what this IDE uses now; the
        // document's old values stay in history), what the document has
        // goes out to the file.
        let replaced: Vec<Value> = from_file
            .iter()
            .filter_map(|(k, v)| {
                let old = before.get(k)?;
                (old != v).then(|| json!({"key": k, "was": old, "now": v}))
            })
            .collect();
        let imported = from_file
            .keys()
            .filter(|k| !before.contains_key(*k))
            .count();
        let exported = before
            .keys()
            .filter(|k| !from_file.contains_key(*k))
            .count();
        let changes: Vec<(String, Option<Value>)> = from_file
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        self.apply_file_changes(&profile, &changes, &format!("bind {file}"))?;

        let mut slot = self.binding.lock().unwrap_or_else(|e| e.into_inner());
        *slot = None;
        let mut binding = Binding {
            path: path.clone(),
            base: from_file,
            last_text: text,
            invalid: false,
            _watcher: None,
        };
        self.write_back(&mut binding).map_err(io)?;
        binding._watcher = Some(self.watch(&path).map_err(io)?);
        *slot = Some(binding);
        Ok(json!({
            "file": file,
            "profile": profile,
            "imported": imported,
            "exported": exported,
            "replaced": replaced,
        }))
    }

    pub fn unbind(&self) -> Result<Value, RpcError> {
        let old = self
            .binding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.store.meta_put(META_BIND, None).map_err(store_err)?;
        Ok(json!({"file": old.map(|b| b.path.display().to_string())}))
    }

    /// At start: watch the bound file again and take the edits made to it
    /// while the daemon was not running.
    pub(super) fn resume_binding(&self) -> Result<(), String> {
        let Some(bytes) = self.store.meta_get(META_BIND).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let saved: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let path = PathBuf::from(saved["file"].as_str().unwrap_or_default());
        let base: BTreeMap<String, Value> =
            serde_json::from_value(saved["base"].clone()).unwrap_or_default();
        let mut binding = Binding {
            path: path.clone(),
            base,
            last_text: None,
            invalid: false,
            _watcher: None,
        };
        binding._watcher = Some(self.watch(&path)?);
        self.sync_file(&mut binding);
        *self.binding.lock().unwrap_or_else(|e| e.into_inner()) = Some(binding);
        Ok(())
    }

    fn watch(&self, path: &Path) -> Result<notify::RecommendedWatcher, String> {
        let (sender, receiver) = std::sync::mpsc::channel::<()>();
        let target = path.to_path_buf();
        let handler = move |result: notify::Result<notify::Event>| {
            if let Ok(event) = result
                && event.paths.contains(&target)
            {
                let _ = sender.send(());
            }
        };
        let config = notify::Config::default().with_event_kinds(notify::EventKindMask::CORE);
        let mut watcher = notify::RecommendedWatcher::new(handler, config)
            .map_err(|e| format!("cannot watch {}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        let me = self.me.clone();
        std::thread::Builder::new()
            .name("settings-file".into())
            .spawn(move || {
                // Ends when the watcher (and so the sender) is dropped.
                while receiver.recv().is_ok() {
                    while receiver.try_recv().is_ok() {}
                    let Some(settings) = me.upgrade() else { return };
                    settings.file_changed();
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(watcher)
    }

    fn file_changed(self: Arc<Self>) {
        let mut slot = self.binding.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(binding) = slot.as_mut() {
            self.sync_file(binding);
        }
    }

    /// Reads the file: its edits go in, then the document's changes out.
    fn sync_file(&self, binding: &mut Binding) {
        if let Err(e) = self
            .read_file(binding)
            .and_then(|()| self.write_back(binding))
        {
            tracing::warn!(file = %binding.path.display(), "bound settings file: {e}");
        }
    }

    /// Takes the file's edits since the base, unless it does not parse.
    fn read_file(&self, binding: &mut Binding) -> Result<(), String> {
        let text = read(&binding.path)?;
        if text.is_some() && text == binding.last_text && !binding.invalid {
            return Ok(());
        }
        let parsed = match &text {
            Some(text) => parse_settings(text),
            None => {
                // A file that comes back is merged as at the first bind
                // (nothing in it is taken as deleted), not diffed against
                // what was there before.
                if !binding.base.is_empty() {
                    binding.base.clear();
                    self.save_binding(binding)?;
                }
                Err("the file is missing".into())
            }
        };
        let from_file = match parsed {
            Ok(map) => map,
            Err(message) => {
                if !binding.invalid || text != binding.last_text {
                    tracing::warn!(file = %binding.path.display(), "the bound settings file is invalid, ignored until fixed: {message}");
                    self.events.publish(
                        event_kind::SETTINGS_FILE_INVALID,
                        json!({"file": binding.path.display().to_string(), "message": message}),
                    );
                }
                binding.invalid = true;
                binding.last_text = text;
                return Ok(());
            }
        };
        let changes = if binding.base.is_empty() {
            // Merging: what the file has goes in, nothing is removed.
            changes_between(&BTreeMap::new(), &from_file)
                .into_iter()
                .filter(|(_, v)| v.is_some())
                .collect()
        } else {
            changes_between(&binding.base, &from_file)
        };
        let name = binding
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let profile = self.active_profile();
        // Taken only once stored: a failure leaves the edit to be read again.
        self.apply_file_changes(&profile, &changes, &format!("edit {name}"))
            .map_err(|e| e.message)?;
        binding.invalid = false;
        binding.base = from_file;
        binding.last_text = text;
        self.save_binding(binding)
    }

    /// Writes the document's changes since the base into the file.
    pub(super) fn write_back(&self, binding: &mut Binding) -> Result<(), String> {
        // A few rounds at most: an edit that lands while the new text is
        // made is read first; a file that keeps changing brings its
        // watcher back here anyway.
        for _ in 0..3 {
            // An edit not seen yet goes in first, so that it is not written over.
            if read(&binding.path)? != binding.last_text {
                self.read_file(binding)?;
            }
            if binding.invalid {
                return Ok(());
            }
            let effective = self
                .effective(&self.active_profile())
                .map_err(|e| e.message)?;
            let changes = changes_between(&binding.base, &effective);
            if changes.is_empty() && binding.last_text.is_some() {
                return self.save_binding(binding);
            }
            let text = edit_text(binding.last_text.as_deref().unwrap_or(""), &changes)?;
            if read(&binding.path)? != binding.last_text {
                continue;
            }
            write_atomic(&binding.path, &text)
                .map_err(|e| format!("cannot write {}: {e}", binding.path.display()))?;
            binding.last_text = Some(text);
            binding.base = effective;
            return self.save_binding(binding);
        }
        Ok(())
    }

    fn save_binding(&self, binding: &Binding) -> Result<(), String> {
        let saved = json!({"file": binding.path.display().to_string(), "base": binding.base});
        self.store
            .meta_put(META_BIND, Some(saved.to_string().as_bytes()))
            .map_err(|e| e.to_string())
    }

    /// File edits as one change; device-only keys stay device-only.
    fn apply_file_changes(
        &self,
        profile: &str,
        changes: &[(String, Option<Value>)],
        summary: &str,
    ) -> Result<(), RpcError> {
        let mut edits = Vec::new();
        let mut local = Vec::new();
        for (key, value) in changes {
            if self.is_device_only(profile, key)? {
                local.push((key.clone(), value.clone()));
                continue;
            }
            let key = format!("{profile}:{key}");
            edits.push(match value {
                Some(value) => Edit::Put {
                    section: SETTINGS,
                    key,
                    value: value.clone(),
                },
                None => Edit::Delete {
                    section: SETTINGS,
                    key,
                },
            });
        }
        self.write_device_only(profile, &local)?;
        if !edits.is_empty() {
            self.commit(DocKind::Settings, &edits, summary)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_comments_and_untouched_formatting() {
        let text = "{\n  // my font\n  \"editor.fontSize\": 14,\n  \"editor.tabSize\":    4, // odd spacing\n  \"gone\": true,\n}\n";
        let edited = edit_text(
            text,
            &[
                ("editor.fontSize".into(), Some(json!(16))),
                ("gone".into(), None),
                ("new.key".into(), Some(json!({"a": [1, 2]}))),
            ],
        )
        .unwrap();
        assert!(edited.contains("// my font"), "{edited}");
        assert!(
            edited.contains("\"editor.tabSize\":    4, // odd spacing"),
            "{edited}"
        );
        let parsed = parse_settings(&edited).unwrap();
        assert_eq!(parsed["editor.fontSize"], json!(16));
        assert_eq!(parsed["new.key"], json!({"a": [1, 2]}));
        assert!(!parsed.contains_key("gone"));
    }

    #[test]
    fn half_saved_files_do_not_parse() {
        for bad in ["", "{", "{\"a\": 1 \"b\": 2}", "[1]", "{\"a\": }"] {
            assert!(parse_settings(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            parse_settings("{ /* c */ \"a\": 1, }").unwrap()["a"],
            json!(1)
        );
    }
}
