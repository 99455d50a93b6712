//! The local IPC contract: JSON-RPC 2.0 messages, stable error codes, method
//! parameters and event kinds. Results are the JSON objects that the CLI
//! prints with `--json` (SPEC.md sections 3 to 9).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Frames above this size are refused and the connection closed.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Events a subscriber can ask to replay with `since`.
pub const EVENT_BACKLOG_MAX: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    /// Absent for notifications, which get no response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    pub fn ok(id: Value, result: Value) -> Response {
        Response {
            jsonrpc: "2.0".into(),
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: Value, error: RpcError) -> Response {
        Response {
            jsonrpc: "2.0".into(),
            id,
            result: None,
            error: Some(error),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    pub jsonrpc: String,
    pub method: String,
    pub params: Value,
}

/// A JSON-RPC error object. `data.name` carries the code's stable name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code: code.code(),
            message: message.into(),
            data: Some(serde_json::json!({ "name": code.name() })),
        }
    }

    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.code() == self.code)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Stable error codes. JSON-RPC's own where they apply; MarieSync's in the
/// server-error range -32000..-32099. Never renumber one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    FrameTooLarge,
    ShuttingDown,
    WorkspaceNotFound,
    WorkspaceExists,
    CheckpointNotFound,
    InvalidPath,
    WorkspacePaused,
    StoreCorrupt,
    Io,
    StoreFailed,
    Unsupported,
    Forbidden,
    TicketRefused,
    PeerUnreachable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::MethodNotFound,
        ErrorCode::InvalidParams,
        ErrorCode::Internal,
        ErrorCode::FrameTooLarge,
        ErrorCode::ShuttingDown,
        ErrorCode::WorkspaceNotFound,
        ErrorCode::WorkspaceExists,
        ErrorCode::CheckpointNotFound,
        ErrorCode::InvalidPath,
        ErrorCode::WorkspacePaused,
        ErrorCode::StoreCorrupt,
        ErrorCode::Io,
        ErrorCode::StoreFailed,
        ErrorCode::Unsupported,
        ErrorCode::Forbidden,
        ErrorCode::TicketRefused,
        ErrorCode::PeerUnreachable,
    ];

    pub fn code(self) -> i64 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::Internal => -32603,
            ErrorCode::FrameTooLarge => -32001,
            ErrorCode::ShuttingDown => -32002,
            ErrorCode::WorkspaceNotFound => -32010,
            ErrorCode::WorkspaceExists => -32011,
            ErrorCode::CheckpointNotFound => -32012,
            ErrorCode::InvalidPath => -32013,
            ErrorCode::WorkspacePaused => -32014,
            ErrorCode::StoreCorrupt => -32020,
            ErrorCode::Io => -32021,
            ErrorCode::StoreFailed => -32022,
            ErrorCode::Unsupported => -32030,
            ErrorCode::Forbidden => -32031,
            ErrorCode::TicketRefused => -32032,
            ErrorCode::PeerUnreachable => -32033,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MethodNotFound => "method_not_found",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::Internal => "internal_error",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::WorkspaceNotFound => "workspace_not_found",
            ErrorCode::WorkspaceExists => "workspace_exists",
            ErrorCode::CheckpointNotFound => "checkpoint_not_found",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::WorkspacePaused => "workspace_paused",
            ErrorCode::StoreCorrupt => "store_corrupt",
            ErrorCode::Io => "io_error",
            ErrorCode::StoreFailed => "store_failed",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TicketRefused => "ticket_refused",
            ErrorCode::PeerUnreachable => "peer_unreachable",
        }
    }
}

/// Method names. The CLI command `a b` is the method `a.b`.
pub mod method {
    pub const ID: &str = "id";
    pub const STATUS: &str = "status";
    pub const SHUTDOWN: &str = "shutdown";
    pub const FLUSH: &str = "flush";
    pub const CONFLICTS: &str = "conflicts";
    pub const WORKSPACE_ADD: &str = "workspace.add";
    pub const WORKSPACE_LIST: &str = "workspace.list";
    pub const WORKSPACE_REMOVE: &str = "workspace.remove";
    pub const WORKSPACE_RESUME: &str = "workspace.resume";
    pub const WORKSPACE_RESCAN: &str = "workspace.rescan";
    pub const WORKSPACE_FILES: &str = "workspace.files";
    pub const WORKSPACE_TOUCHED: &str = "workspace.touched";
    pub const CHECKPOINT_CREATE: &str = "checkpoint.create";
    pub const CHECKPOINT_LIST: &str = "checkpoint.list";
    pub const CHECKPOINT_DIFF: &str = "checkpoint.diff";
    pub const CHECKPOINT_RESTORE: &str = "checkpoint.restore";
    pub const PEER_ADD: &str = "peer.add";
    pub const PEER_LIST: &str = "peer.list";
    pub const PEER_REMOVE: &str = "peer.remove";
    pub const SHARE: &str = "share";
    pub const INVITE: &str = "invite";
    pub const JOIN: &str = "join";
    pub const SETTINGS_GET: &str = "settings.get";
    pub const SETTINGS_SET: &str = "settings.set";
    pub const SETTINGS_UNSET: &str = "settings.unset";
    pub const SETTINGS_HISTORY: &str = "settings.history";
    pub const SETTINGS_RESTORE: &str = "settings.restore";
    pub const SETTINGS_BIND: &str = "settings.bind";
    pub const SETTINGS_UNBIND: &str = "settings.unbind";
    pub const SETTINGS_KEYBINDING_LIST: &str = "settings.keybinding.list";
    pub const SETTINGS_KEYBINDING_ADD: &str = "settings.keybinding.add";
    pub const SETTINGS_KEYBINDING_REMOVE: &str = "settings.keybinding.remove";
    pub const SETTINGS_SNIPPET_LIST: &str = "settings.snippet.list";
    pub const SETTINGS_SNIPPET_SET: &str = "settings.snippet.set";
    pub const SETTINGS_SNIPPET_UNSET: &str = "settings.snippet.unset";
    pub const SETTINGS_EXTENSION_LIST: &str = "settings.extension.list";
    pub const SETTINGS_EXTENSION_INSTALL: &str = "settings.extension.install";
    pub const SETTINGS_EXTENSION_UNINSTALL: &str = "settings.extension.uninstall";
    pub const SETTINGS_PROFILE_LIST: &str = "settings.profile.list";
    pub const SETTINGS_PROFILE_CREATE: &str = "settings.profile.create";
    pub const SETTINGS_PROFILE_USE: &str = "settings.profile.use";
    pub const SETTINGS_PROFILE_DELETE: &str = "settings.profile.delete";
    pub const STORE_STATS: &str = "store.stats";
    pub const STORE_VERIFY: &str = "store.verify";
    pub const STORE_GC: &str = "store.gc";
    pub const EVENTS_SUBSCRIBE: &str = "events.subscribe";
    /// The notification that carries events to subscribers.
    pub const EVENT: &str = "event";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceAddParams {
    pub path: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Accept a workspace offered by a peer under this id.
    #[serde(default)]
    pub id: Option<String>,
}

/// Parameters of every method that acts on one workspace (`WS`: id or name).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceParams {
    pub workspace: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceFilesParams {
    pub workspace: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouchedParams {
    pub workspace: String,
    pub paths: Vec<String>,
    /// Answer only once every connected peer sharing the workspace has
    /// these changes (as `flush` does for all of them).
    #[serde(default)]
    pub wait: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCreateParams {
    pub workspace: String,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointDiffParams {
    pub workspace: String,
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRestoreParams {
    pub workspace: String,
    pub checkpoint_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddParams {
    pub device_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerParams {
    pub device_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareParams {
    pub workspace: String,
    pub device_id: String,
    /// owner, editor or viewer.
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteParams {
    /// The workspace to invite into; absent with `device`.
    #[serde(default)]
    pub workspace: Option<String>,
    /// editor (default) or viewer.
    #[serde(default)]
    pub role: Option<String>,
    /// How long the ticket stays good: `30m`, `24h`, `7d` (default 24h).
    #[serde(default)]
    pub expires: Option<String>,
    /// A device-group ticket instead of a workspace one.
    #[serde(default)]
    pub device: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinParams {
    pub ticket: String,
    /// Where the workspace goes; required for a workspace ticket.
    #[serde(default)]
    pub path: Option<String>,
}

/// `settings.get`, and the list methods: `profile` defaults to the
/// device's active profile.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsGetParams {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsSetParams {
    pub key: String,
    pub value: Value,
    #[serde(default)]
    pub device_only: bool,
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUnsetParams {
    pub key: String,
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsHistoryParams {
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsRestoreParams {
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsBindParams {
    pub file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeybindingParams {
    pub key: String,
    pub command: String,
    #[serde(default)]
    pub when: Option<String>,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnippetParams {
    pub name: String,
    /// For `settings.snippet.set`.
    #[serde(default)]
    pub value: Option<Value>,
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionParams {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileParams {
    pub name: String,
    /// For `settings.profile.create`: copy this profile.
    #[serde(default)]
    pub from: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    #[serde(default)]
    pub since: Option<u64>,
}

/// Event kinds carried in `event` notifications (`params.kind`).
pub mod event_kind {
    pub const GAP: &str = "gap";
    pub const WORKSPACE_ADDED: &str = "workspace_added";
    pub const WORKSPACE_REMOVED: &str = "workspace_removed";
    /// A peer offered a workspace (`workspace_id`, `name`, `role`, `device_id`).
    pub const WORKSPACE_OFFERED: &str = "workspace_offered";
    /// A workspace's members or roles changed (`workspace_id`, `members`).
    pub const MEMBERSHIP_CHANGED: &str = "membership_changed";
    /// Changes from a peer were not accepted (`workspace_id`, `device_id`, `reason`).
    pub const CHANGES_REFUSED: &str = "changes_refused";
    pub const WORKSPACE_STATE: &str = "workspace_state";
    pub const SCAN_PROGRESS: &str = "scan_progress";
    pub const SCAN_FINISHED: &str = "scan_finished";
    pub const LOCAL_CHANGE: &str = "local_change";
    pub const CHECKPOINT_CREATED: &str = "checkpoint_created";
    /// Settings changed: `keys`, `section`, `profile`, `device_id` (who
    /// made the change), `origin` (`local` or `remote`).
    pub const SETTINGS_CHANGED: &str = "settings_changed";
    /// A bound settings file does not parse: `file`, `message`. Nothing
    /// syncs from it until it does.
    pub const SETTINGS_FILE_INVALID: &str = "settings_file_invalid";
    /// A device joined this device's group: `device_id`, `name`.
    pub const DEVICE_JOINED: &str = "device_joined";
    pub const RESTORE_FINISHED: &str = "restore_finished";
    pub const WATCHER_DEGRADED: &str = "watcher_degraded";
    pub const STORE_CORRUPT: &str = "store_corrupt";
    pub const FILE_RECEIVED: &str = "file_received";
    pub const CONFLICT: &str = "conflict";
    pub const ERROR: &str = "error";
}

/// Parses `params` (absent means `{}`) into `T`, or an `InvalidParams` error
/// that says what was wrong.
pub fn parse_params<T: serde::de::DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let params = params.unwrap_or_else(|| Value::Object(Default::default()));
    serde_json::from_value(params)
        .map_err(|e| RpcError::new(ErrorCode::InvalidParams, format!("invalid params: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_stable_and_distinct() {
        let mut codes: Vec<i64> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        let err = RpcError::new(ErrorCode::WorkspaceNotFound, "no workspace 'x'");
        expect_test::expect![[
            r#"{"code":-32010,"message":"no workspace 'x'","data":{"name":"workspace_not_found"}}"#
        ]]
        .assert_eq(&serde_json::to_string(&err).unwrap());
        assert_eq!(err.error_code(), Some(ErrorCode::WorkspaceNotFound));
    }

    #[test]
    fn wrong_params_say_what_is_wrong() {
        let err =
            parse_params::<WorkspaceParams>(Some(serde_json::json!({"workspace": 3}))).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidParams.code());
        assert!(err.message.contains("invalid type"), "{}", err.message);
        assert!(parse_params::<WorkspaceParams>(None).is_err());
    }
}
