//! The command line. Every command but `daemon` is a thin client of the IPC
//! API: it sends one method with the same name and shape and prints the
//! result, as the JSON object itself with `--json`, for humans otherwise.
//!
//! Two binaries share it. `mariesync` ([`main`]) does not link the daemon:
//! its `daemon` command runs `mariesyncd` from the same directory in its
//! place (exec, so the process is the same one). `mariesyncd`
//! ([`daemon_main`]) runs the daemon itself. The whole daemon linked in
//! made every command start in 3.1 to 3.4 ms instead of 1.3 to 2: the
//! dynamic loader relocated 33,000 pointers and faulted their pages in.
//! For the same reason `touched`, run once per save, has a parser of its
//! own ([`HintCli`]), and `mariesync` is linked statically on Linux with
//! glibc (`daemon/rustc-wrapper.sh`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mariesync_ffi::{Client, ClientError, HOME_ENV, HomePaths};
use mariesync_protocol::ipc::method;
use serde_json::{Value, json};
use tracing_subscriber::Layer as _;

#[derive(Parser, Debug)]
#[command(
    name = "mariesync",
    version,
    about = "MarieSync: local-first sync of workspaces and settings"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// The options every command takes.
#[derive(Args, Debug, PartialEq)]
struct GlobalArgs {
    /// Keep all of this device's state under DIR [env: MARIESYNC_HOME].
    // The variable is read by `HomePaths::resolve`, which ignores it when
    // empty (clap would refuse every command for an empty one).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Print exactly one JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,
}

/// The command line of the IDE's hint alone: the same global options and
/// the same `touched`, without the rest of the commands.
///
/// An IDE runs `mariesync touched` on every save, and building the whole
/// command line (every command, every option, every help text) took about
/// half of the 1.5 ms this process spent between starting and sending its
/// request. What this parser accepts, [`Cli`] parses the same way (a test
/// checks it); anything else, `--help` included, goes to [`Cli`].
#[derive(Parser, Debug)]
#[command(name = "mariesync")]
struct HintCli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: HintCommand,
}

#[derive(Subcommand, Debug)]
enum HintCommand {
    Touched(TouchedArgs),
}

impl Cli {
    /// Parses this process's arguments, the IDE's hint without building
    /// the whole command line.
    fn parse_args() -> Result<Cli, clap::Error> {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if args.iter().any(|arg| arg == "touched")
            && let Ok(hint) = HintCli::try_parse_from(&args)
        {
            return Ok(hint.into());
        }
        Cli::try_parse_from(args)
    }
}

impl From<HintCli> for Cli {
    fn from(hint: HintCli) -> Cli {
        let HintCommand::Touched(touched) = hint.command;
        Cli {
            global: hint.global,
            command: Command::Touched(touched),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground until SIGINT or SIGTERM.
    Daemon(DaemonArgs),
    /// Print this device's ID.
    Id,
    /// Show the daemon, its workspaces and peers.
    Status,
    /// Stop the running daemon.
    Stop,
    /// Add, list and remove workspaces.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Trust, list and forget other devices.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Offer a workspace to a trusted device with a role (owners only).
    Share {
        workspace: String,
        device_id: String,
        /// owner, editor or viewer.
        #[arg(long, default_value = "editor")]
        role: String,
    },
    /// Make a single-use ticket another device joins with.
    Invite {
        /// The workspace to invite into (owners only).
        #[arg(required_unless_present = "device")]
        workspace: Option<String>,
        /// editor (the default) or viewer.
        #[arg(long, conflicts_with = "device")]
        role: Option<String>,
        /// How long the ticket stays good (`30m`, `24h`, `7d`).
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Link another of your own devices instead (settings sync).
        #[arg(long, conflicts_with = "workspace")]
        device: bool,
    },
    /// Use a ticket: trust the inviter and sync the workspace into PATH
    /// (a device ticket takes no PATH: it joins the inviter's device group).
    Join {
        ticket: String,
        path: Option<PathBuf>,
    },
    /// Tell the daemon these files were just saved.
    Touched(TouchedArgs),
    /// Wait until every local change made before this call is scanned, stored
    /// and acknowledged by every connected peer sharing the workspace.
    Flush { workspace: String },
    /// List conflict copies: the versions that lost a concurrent edit.
    Conflicts { workspace: String },
    /// The user's settings, synced across their device group.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Create, list, compare and restore checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Inspect and maintain the chunk store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print events as JSON lines as they happen.
    Events {
        /// Replay the events after this sequence number first.
        #[arg(long)]
        since: Option<u64>,
    },
    /// Send one raw IPC call and print its result.
    Ipc {
        method: String,
        params: Option<String>,
    },
    /// Bridge stdin/stdout to the daemon's socket (for IDEs).
    Proxy {
        #[arg(long, required = true)]
        stdio: bool,
    },
}

/// `touched`: the IDE's hint after a save.
#[derive(Args, Debug, PartialEq)]
struct TouchedArgs {
    workspace: String,
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Return only once every connected peer sharing the workspace has them.
    #[arg(long)]
    wait: bool,
}

/// The daemon's file name, beside `mariesync`.
pub const DAEMON_BINARY: &str = "mariesyncd";

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Listen on this multiaddr (repeatable); replaces the defaults.
    #[arg(long)]
    listen: Vec<String>,
    /// Don't discover peers on the LAN.
    #[arg(long)]
    no_mdns: bool,
    /// Reach peers through this relay.
    #[arg(long)]
    relay: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SettingsCommand {
    /// Print a setting, the settings under a prefix, or all of them.
    Get {
        key: Option<String>,
        #[arg(long)]
        profile: Option<String>,
    },
    /// Set KEY (a dotted path) to a JSON value (`14`, `'"dark"'`, `true`).
    Set {
        key: String,
        value: String,
        /// Keep this key on this device alone (machine-scoped).
        #[arg(long)]
        device_only: bool,
        #[arg(long)]
        profile: Option<String>,
    },
    /// Remove a setting.
    Unset {
        key: String,
        #[arg(long)]
        profile: Option<String>,
    },
    /// List the versions of the settings, newest first.
    History {
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Put the settings back as they were at VERSION (undo: restore the
    /// `undo` version it prints).
    Restore { version: String },
    /// Keep a JSON-with-comments settings file in step, both ways.
    Bind { file: PathBuf },
    /// Stop keeping the bound file in step.
    Unbind,
    /// Keybindings of a profile.
    #[command(subcommand)]
    Keybinding(KeybindingCommand),
    /// Snippets of a profile.
    #[command(subcommand)]
    Snippet(SnippetCommand),
    /// Extension intents: installs and uninstalls follow you.
    #[command(subcommand)]
    Extension(ExtensionCommand),
    /// Profiles: named sets of settings, one active per device.
    #[command(subcommand)]
    Profile(ProfileCommand),
}

#[derive(Subcommand, Debug)]
enum KeybindingCommand {
    List {
        #[arg(long)]
        profile: Option<String>,
    },
    Add {
        key: String,
        command: String,
        #[arg(long)]
        when: Option<String>,
        /// The command's arguments, as JSON.
        #[arg(long)]
        args: Option<String>,
        #[arg(long)]
        profile: Option<String>,
    },
    Remove {
        key: String,
        command: String,
        #[arg(long)]
        when: Option<String>,
        #[arg(long)]
        profile: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SnippetCommand {
    List {
        #[arg(long)]
        profile: Option<String>,
    },
    /// NAME (e.g. `rust/println`) and the snippet as JSON.
    Set {
        name: String,
        value: String,
        #[arg(long)]
        profile: Option<String>,
    },
    Unset {
        name: String,
        #[arg(long)]
        profile: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ExtensionCommand {
    List,
    Install { id: String },
    Uninstall { id: String },
}

#[derive(Subcommand, Debug)]
enum ProfileCommand {
    List,
    /// A new profile, a copy of --from (default: the active one).
    Create {
        name: String,
        #[arg(long)]
        from: Option<String>,
    },
    /// Make NAME this device's active profile.
    Use {
        name: String,
    },
    Delete {
        name: String,
    },
}

fn json_arg(what: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| {
        Failure::Other(format!(
            "{what} is not JSON ({e}); quote strings like '\"dark\"'"
        ))
    })
}

fn settings_call(command: SettingsCommand) -> Result<(&'static str, Value), Failure> {
    use SettingsCommand as S;
    Ok(match command {
        S::Get { key, profile } => (
            method::SETTINGS_GET,
            json!({"key": key, "profile": profile}),
        ),
        S::Set {
            key,
            value,
            device_only,
            profile,
        } => (
            method::SETTINGS_SET,
            json!({"key": key, "value": json_arg("VALUE", &value)?, "device_only": device_only, "profile": profile}),
        ),
        S::Unset { key, profile } => (
            method::SETTINGS_UNSET,
            json!({"key": key, "profile": profile}),
        ),
        S::History { limit } => (method::SETTINGS_HISTORY, json!({"limit": limit})),
        S::Restore { version } => (method::SETTINGS_RESTORE, json!({"version": version})),
        S::Bind { file } => {
            let file = std::path::absolute(&file).unwrap_or(file);
            (method::SETTINGS_BIND, json!({"file": file}))
        }
        S::Unbind => (method::SETTINGS_UNBIND, json!({})),
        S::Keybinding(KeybindingCommand::List { profile }) => (
            method::SETTINGS_KEYBINDING_LIST,
            json!({"profile": profile}),
        ),
        S::Keybinding(KeybindingCommand::Add {
            key,
            command,
            when,
            args,
            profile,
        }) => {
            let args = args.map(|a| json_arg("--args", &a)).transpose()?;
            (
                method::SETTINGS_KEYBINDING_ADD,
                json!({"key": key, "command": command, "when": when, "args": args, "profile": profile}),
            )
        }
        S::Keybinding(KeybindingCommand::Remove {
            key,
            command,
            when,
            profile,
        }) => (
            method::SETTINGS_KEYBINDING_REMOVE,
            json!({"key": key, "command": command, "when": when, "profile": profile}),
        ),
        S::Snippet(SnippetCommand::List { profile }) => {
            (method::SETTINGS_SNIPPET_LIST, json!({"profile": profile}))
        }
        S::Snippet(SnippetCommand::Set {
            name,
            value,
            profile,
        }) => (
            method::SETTINGS_SNIPPET_SET,
            json!({"name": name, "value": json_arg("VALUE", &value)?, "profile": profile}),
        ),
        S::Snippet(SnippetCommand::Unset { name, profile }) => (
            method::SETTINGS_SNIPPET_UNSET,
            json!({"name": name, "profile": profile}),
        ),
        S::Extension(ExtensionCommand::List) => (method::SETTINGS_EXTENSION_LIST, json!({})),
        S::Extension(ExtensionCommand::Install { id }) => {
            (method::SETTINGS_EXTENSION_INSTALL, json!({"id": id}))
        }
        S::Extension(ExtensionCommand::Uninstall { id }) => {
            (method::SETTINGS_EXTENSION_UNINSTALL, json!({"id": id}))
        }
        S::Profile(ProfileCommand::List) => (method::SETTINGS_PROFILE_LIST, json!({})),
        S::Profile(ProfileCommand::Create { name, from }) => (
            method::SETTINGS_PROFILE_CREATE,
            json!({"name": name, "from": from}),
        ),
        S::Profile(ProfileCommand::Use { name }) => {
            (method::SETTINGS_PROFILE_USE, json!({"name": name}))
        }
        S::Profile(ProfileCommand::Delete { name }) => {
            (method::SETTINGS_PROFILE_DELETE, json!({"name": name}))
        }
    })
}

#[derive(Subcommand, Debug)]
enum WorkspaceCommand {
    /// Start syncing the folder at PATH.
    Add {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// Accept a workspace offered by a peer under this ID.
        #[arg(long)]
        id: Option<String>,
    },
    List,
    /// Stop syncing; files stay where they are.
    Remove {
        workspace: String,
    },
    /// Resume a paused workspace, accepting its current contents.
    Resume {
        workspace: String,
    },
    /// Re-read the whole workspace (the watcher normally makes this unneeded).
    Rescan {
        workspace: String,
    },
    /// List the files indexed in a workspace.
    Files {
        workspace: String,
        #[arg(long)]
        prefix: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum PeerCommand {
    /// Trust a device: it may connect and sync.
    Add {
        device_id: String,
        #[arg(long)]
        name: Option<String>,
        /// Where to reach it (repeatable); without, LAN discovery finds it.
        #[arg(long = "addr")]
        addrs: Vec<String>,
    },
    List,
    /// Stop trusting a device; its connections close.
    Remove {
        device_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointCommand {
    Create {
        workspace: String,
        #[arg(short, long)]
        message: Option<String>,
    },
    List {
        workspace: String,
    },
    /// Compare checkpoint A with B (default: the current state).
    Diff {
        workspace: String,
        a: String,
        b: Option<String>,
    },
    /// Make the workspace equal to a checkpoint (undoable).
    Restore {
        workspace: String,
        checkpoint_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    Stats,
    /// Check every referenced chunk; drop corrupt ones so they are stored again.
    Verify,
    /// Delete chunks nothing references.
    Gc,
}

/// `mariesync`: `daemon` runs [`DAEMON_BINARY`] instead.
///
/// `static_runtime`: this binary is linked with a static C runtime. It then
/// never looks the user up in the system's user database, which only
/// happens when no home is given and `HOME` is unset: glibc would load an
/// NSS module into the static binary, and one it was not built with (as
/// for users that `/etc/passwd` does not list: systemd-homed, LDAP) crashes
/// it. The dynamically linked `mariesyncd` beside it, the same command
/// line, runs the command instead.
pub fn main(static_runtime: bool) -> ExitCode {
    main_with(exec_daemon, static_runtime)
}

/// `mariesyncd`: the same command line, whose `daemon` runs here.
pub fn daemon_main() -> ExitCode {
    main_with(run_daemon, false)
}

/// How the `daemon` command runs the daemon.
type RunDaemon = fn(HomePaths, DaemonArgs) -> Result<(), Failure>;

fn main_with(daemon: RunDaemon, static_runtime: bool) -> ExitCode {
    let cli = match Cli::parse_args() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let json_output = cli.global.json;
    let result = if static_runtime && cli.global.home.is_none() && needs_user_database() {
        exec_beside()
    } else {
        run(cli, daemon)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_output && !matches!(e, Failure::Reported(_)) {
                let error = match &e {
                    Failure::Client(ClientError::Rpc(rpc)) => json!({ "error": rpc }),
                    other => json!({ "error": { "message": other.to_string() } }),
                };
                println!("{error}");
            }
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Other(String),
    /// A failure whose JSON result was already printed.
    #[error("{0}")]
    Reported(String),
}

fn run(cli: Cli, daemon: RunDaemon) -> Result<(), Failure> {
    let paths = HomePaths::resolve(cli.global.home.as_deref()).map_err(Failure::Other)?;
    let json_output = cli.global.json;
    let (name, params) = match cli.command {
        Command::Daemon(args) => return daemon(paths, args),
        Command::Proxy { .. } => return proxy(&paths),
        Command::Events { since } => return follow_events(&paths, since),
        Command::Ipc { method, params } => {
            let params: Value = match params {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| Failure::Other(format!("PARAMS_JSON is not valid JSON: {e}")))?,
                None => json!({}),
            };
            let result = Client::connect(&paths)?.call(&method, params)?;
            println!(
                "{}",
                if json_output {
                    result.to_string()
                } else {
                    serde_json::to_string_pretty(&result).unwrap_or_default()
                }
            );
            return Ok(());
        }
        Command::Id => (method::ID, json!({})),
        Command::Status => (method::STATUS, json!({})),
        Command::Stop => (method::SHUTDOWN, json!({})),
        Command::Workspace(WorkspaceCommand::Add { path, name, id }) => {
            let path = std::path::absolute(&path).unwrap_or(path);
            (
                method::WORKSPACE_ADD,
                json!({"path": path, "name": name, "id": id}),
            )
        }
        Command::Peer(PeerCommand::Add {
            device_id,
            name,
            addrs,
        }) => (
            method::PEER_ADD,
            json!({"device_id": device_id, "name": name, "addrs": addrs}),
        ),
        Command::Peer(PeerCommand::List) => (method::PEER_LIST, json!({})),
        Command::Peer(PeerCommand::Remove { device_id }) => {
            (method::PEER_REMOVE, json!({"device_id": device_id}))
        }
        Command::Workspace(WorkspaceCommand::List) => (method::WORKSPACE_LIST, json!({})),
        Command::Workspace(WorkspaceCommand::Remove { workspace }) => {
            (method::WORKSPACE_REMOVE, json!({"workspace": workspace}))
        }
        Command::Workspace(WorkspaceCommand::Resume { workspace }) => {
            (method::WORKSPACE_RESUME, json!({"workspace": workspace}))
        }
        Command::Workspace(WorkspaceCommand::Rescan { workspace }) => {
            (method::WORKSPACE_RESCAN, json!({"workspace": workspace}))
        }
        Command::Workspace(WorkspaceCommand::Files { workspace, prefix }) => (
            method::WORKSPACE_FILES,
            json!({"workspace": workspace, "prefix": prefix}),
        ),
        Command::Touched(TouchedArgs {
            workspace,
            paths: files,
            wait,
        }) => {
            let files: Vec<PathBuf> = files
                .into_iter()
                .map(|p| std::path::absolute(&p).unwrap_or(p))
                .collect();
            (
                method::WORKSPACE_TOUCHED,
                json!({"workspace": workspace, "paths": files, "wait": wait}),
            )
        }
        Command::Share {
            workspace,
            device_id,
            role,
        } => (
            method::SHARE,
            json!({"workspace": workspace, "device_id": device_id, "role": role}),
        ),
        Command::Invite {
            workspace,
            role,
            expires,
            device,
        } => (
            method::INVITE,
            json!({"workspace": workspace, "role": role, "expires": expires, "device": device}),
        ),
        Command::Join { ticket, path } => {
            let path = path.map(|p| std::path::absolute(&p).unwrap_or(p));
            (method::JOIN, json!({"ticket": ticket, "path": path}))
        }
        Command::Settings(command) => settings_call(command)?,
        Command::Flush { workspace } => (method::FLUSH, json!({"workspace": workspace})),
        Command::Conflicts { workspace } => (method::CONFLICTS, json!({"workspace": workspace})),
        Command::Checkpoint(CheckpointCommand::Create { workspace, message }) => (
            method::CHECKPOINT_CREATE,
            json!({"workspace": workspace, "message": message}),
        ),
        Command::Checkpoint(CheckpointCommand::List { workspace }) => {
            (method::CHECKPOINT_LIST, json!({"workspace": workspace}))
        }
        Command::Checkpoint(CheckpointCommand::Diff { workspace, a, b }) => (
            method::CHECKPOINT_DIFF,
            json!({"workspace": workspace, "from": a, "to": b}),
        ),
        Command::Checkpoint(CheckpointCommand::Restore {
            workspace,
            checkpoint_id,
        }) => (
            method::CHECKPOINT_RESTORE,
            json!({"workspace": workspace, "checkpoint_id": checkpoint_id}),
        ),
        Command::Store(StoreCommand::Stats) => (method::STORE_STATS, json!({})),
        Command::Store(StoreCommand::Verify) => (method::STORE_VERIFY, json!({})),
        Command::Store(StoreCommand::Gc) => (method::STORE_GC, json!({})),
    };
    let params = strip_nulls(params);
    let mut client = Client::connect(&paths)?;
    let result = client.call(name, params)?;
    let verify_failed = name == method::STORE_VERIFY && result["ok"] == false;
    if json_output {
        println!("{result}");
    } else {
        print_human(name, &result);
    }
    if verify_failed {
        return Err(Failure::Reported(
            "the store has corrupt or missing chunks; they were dropped and will be stored again from files that still have them".into(),
        ));
    }
    if json_output {
        return Ok(());
    }
    if name == method::WORKSPACE_ADD
        && std::io::stderr().is_terminal()
        && let Some(id) = result["workspace_id"].as_str()
    {
        show_scan_progress(&mut client, id);
    }
    Ok(())
}

/// Whether finding the home takes the system's user database: with no
/// `MARIESYNC_HOME`, the platform directories start from `HOME`, and
/// without it from the user's entry (Linux; elsewhere no C runtime is
/// linked statically).
fn needs_user_database() -> bool {
    let unset = |name| std::env::var_os(name).is_none_or(|value| value.is_empty());
    cfg!(target_os = "linux") && unset(HOME_ENV) && unset("HOME")
}

fn exec_daemon(_: HomePaths, _: DaemonArgs) -> Result<(), Failure> {
    exec_beside()
}

/// Replaces this process with [`DAEMON_BINARY`] from this binary's
/// directory, given the same arguments (and environment).
fn exec_beside() -> Result<(), Failure> {
    let me = std::env::current_exe()
        .map_err(|e| Failure::Other(format!("cannot tell where this program is: {e}")))?;
    let daemon = me.with_file_name(format!("{DAEMON_BINARY}{}", std::env::consts::EXE_SUFFIX));
    let mut command = std::process::Command::new(&daemon);
    command.args(std::env::args_os().skip(1));
    let failed = |e: std::io::Error| {
        Failure::Other(format!(
            "cannot run the daemon {}: {e} (it is installed beside mariesync; `cargo build --release` builds both)",
            daemon.display()
        ))
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        Err(failed(command.exec()))
    }
    #[cfg(not(unix))]
    {
        let status = command.status().map_err(failed)?;
        if status.success() {
            Ok(())
        } else {
            Err(Failure::Reported(format!(
                "the daemon exited with {status}"
            )))
        }
    }
}

fn run_daemon(paths: HomePaths, args: DaemonArgs) -> Result<(), Failure> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Logs go to stderr (the service manager's journal) and to the home.
    let log_file = open_log_file(&paths);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter()),
        )
        .with(log_file.map(|file| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .with_filter(filter())
        }))
        .init();
    crate::daemon::run(crate::daemon::Options {
        paths,
        listen: args.listen,
        mdns: !args.no_mdns,
        relay: args.relay,
    })
    .map_err(|e| Failure::Other(format!("{e:#}")))
}

/// `mariesync.log` in the home's data directory, appended to; a log over
/// 10 MiB is moved to `mariesync.log.1` first.
fn open_log_file(paths: &HomePaths) -> Option<std::fs::File> {
    const LOG_BYTES_MAX: u64 = 10 * 1024 * 1024;
    let path = paths.log_file();
    std::fs::create_dir_all(&paths.data_dir).ok()?;
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_BYTES_MAX) {
        let _ = std::fs::rename(&path, path.with_extension("log.1"));
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .ok()
}

/// Drops `null` members so optional params are simply absent.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

fn print_human(name: &str, result: &Value) {
    let mut out = std::io::stdout().lock();
    let str_of = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    let _ = match name {
        method::ID => writeln!(out, "{}", str_of(&result["device_id"])),
        method::JOIN if result["group"] == true => writeln!(
            out,
            "joined the device group of {} ({}); settings now sync with it",
            str_of(&result["name"]),
            str_of(&result["device_id"])
        ),
        method::SETTINGS_GET => {
            if result["key"].is_null() {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&result["value"]).unwrap_or_default()
                )
            } else {
                writeln!(out, "{}", result["value"])
            }
        }
        method::SETTINGS_HISTORY => {
            let mut r = Ok(());
            for v in result["versions"].as_array().into_iter().flatten() {
                r = writeln!(
                    out,
                    "{}  {}  {}  {}",
                    &str_of(&v["version"])[..12.min(str_of(&v["version"]).len())],
                    str_of(&v["time"]),
                    &str_of(&v["device_id"])[..12.min(str_of(&v["device_id"]).len())],
                    str_of(&v["summary"])
                );
            }
            r
        }
        method::SETTINGS_SET => writeln!(
            out,
            "{} = {}{}",
            str_of(&result["key"]),
            result["value"],
            if result["device_only"] == true {
                " (this device only)"
            } else {
                ""
            }
        ),
        method::SETTINGS_UNSET => writeln!(
            out,
            "{} {}",
            str_of(&result["key"]),
            if result["removed"] == true {
                "unset"
            } else {
                "was not set"
            }
        ),
        method::SETTINGS_EXTENSION_INSTALL | method::SETTINGS_EXTENSION_UNINSTALL => writeln!(
            out,
            "{}: {}{}",
            str_of(&result["id"]),
            str_of(&result["state"]),
            if result["changed"] == true {
                " (on every device of the group)"
            } else {
                " already"
            }
        ),
        method::SETTINGS_RESTORE => writeln!(
            out,
            "restored {}; to undo: mariesync settings restore {}",
            str_of(&result["restored"]),
            str_of(&result["undo"])
        ),
        m if m.starts_with("settings.") => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        ),
        method::WORKSPACE_ADD | method::JOIN => writeln!(
            out,
            "added workspace {} at {}",
            str_of(&result["workspace_id"]),
            str_of(&result["path"])
        ),
        method::INVITE => writeln!(
            out,
            "{}\n(single use, good until {}; on the other device: mariesync join TICKET{})",
            str_of(&result["ticket"]),
            str_of(&result["expires"]),
            if result["workspace_id"].is_null() {
                ""
            } else {
                " PATH"
            }
        ),
        method::STATUS | method::WORKSPACE_LIST => {
            if name == method::STATUS {
                let _ = writeln!(out, "device {}", str_of(&result["device_id"]));
                for addr in result["listen_addrs"].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "listening on {}", str_of(addr));
                }
                for p in result["peers"].as_array().into_iter().flatten() {
                    let state = if p["connected"] == true {
                        "connected"
                    } else {
                        "not connected"
                    };
                    let _ = writeln!(
                        out,
                        "peer {} {} ({state})",
                        str_of(&p["device_id"]),
                        str_of(&p["name"])
                    );
                }
            }
            let workspaces = result["workspaces"].as_array().cloned().unwrap_or_default();
            if workspaces.is_empty() {
                writeln!(
                    out,
                    "no workspaces; add one with `mariesync workspace add PATH`"
                )
            } else {
                for w in workspaces {
                    let mut state = str_of(&w["state"]);
                    if let Some(reason) = w["reason"].as_str() {
                        state = format!("{state} ({reason})");
                    }
                    if let Some(p) = w.get("progress") {
                        state = match p.get("changes_total") {
                            Some(total) => format!(
                                "{state} {}/{} changes, {} received",
                                p["changes_done"],
                                total,
                                human_bytes(p["bytes_received"].as_u64().unwrap_or(0))
                            ),
                            None => {
                                format!("{state} {}/{} files", p["files_done"], p["files_total"])
                            }
                        };
                    }
                    let _ = writeln!(
                        out,
                        "{:<20} {:<10} {:>8} files {:>10}  {}  [{}]",
                        str_of(&w["name"]),
                        state,
                        w["files"],
                        human_bytes(w["bytes"].as_u64().unwrap_or(0)),
                        str_of(&w["path"]),
                        str_of(&w["workspace_id"]),
                    );
                    if w["watcher"]["state"] == "degraded" {
                        let _ = writeln!(
                            out,
                            "    watcher degraded: {} (rescanning periodically)",
                            str_of(&w["watcher"]["reason"])
                        );
                    }
                    for clash in w["case_clashes"].as_array().into_iter().flatten() {
                        let _ = writeln!(
                            out,
                            "    names differ only in case: {} / {}",
                            str_of(&clash[0]),
                            str_of(&clash[1])
                        );
                    }
                    for skipped in w["skipped"].as_array().into_iter().flatten() {
                        let _ = writeln!(out, "    not synced: {}", str_of(skipped));
                    }
                }
                Ok(())
            }
        }
        method::PEER_LIST => {
            let peers = result["peers"].as_array().cloned().unwrap_or_default();
            if peers.is_empty() {
                let _ = writeln!(
                    out,
                    "no trusted devices; add one with `mariesync peer add DEVICE_ID`"
                );
            }
            for p in peers {
                let state = if p["connected"] == true {
                    format!("connected via {}", str_of(&p["address"]))
                } else {
                    "not connected".to_string()
                };
                let _ = writeln!(
                    out,
                    "{}  {:<16} {}",
                    str_of(&p["device_id"]),
                    str_of(&p["name"]),
                    state
                );
            }
            Ok(())
        }
        method::WORKSPACE_FILES => {
            for f in result["files"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<8} {:>10}  {}",
                    str_of(&f["kind"]),
                    f["size"],
                    str_of(&f["path"])
                );
            }
            Ok(())
        }
        method::CONFLICTS => {
            for c in result["conflicts"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}  (the other version: {}, by {})",
                    str_of(&c["path"]),
                    str_of(&c["conflict_path"]),
                    str_of(&c["device_id"])
                );
            }
            Ok(())
        }
        method::CHECKPOINT_CREATE => {
            writeln!(out, "checkpoint {}", str_of(&result["checkpoint_id"]))
        }
        method::CHECKPOINT_LIST => {
            for c in result["checkpoints"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:>5}  {}  {:>8} files {:>10}  {}",
                    str_of(&c["checkpoint_id"]),
                    str_of(&c["created"]),
                    c["files"],
                    human_bytes(c["bytes"].as_u64().unwrap_or(0)),
                    str_of(&c["message"])
                );
            }
            Ok(())
        }
        method::CHECKPOINT_DIFF => {
            for (label, key) in [("A", "added"), ("M", "modified"), ("D", "deleted")] {
                for path in result[key].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "{label} {}", str_of(path));
                }
            }
            Ok(())
        }
        method::CHECKPOINT_RESTORE => {
            let _ = writeln!(
                out,
                "restored checkpoint {}: {} written, {} deleted; undo with `mariesync checkpoint restore WS {}`",
                str_of(&result["checkpoint_id"]),
                result["written"],
                result["deleted"],
                str_of(&result["undo_checkpoint_id"])
            );
            for error in result["errors"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "  not restored: {}", str_of(error));
            }
            Ok(())
        }
        method::STORE_STATS => writeln!(
            out,
            "{} chunks, {} of content stored in {} ({} database file)",
            result["chunks"],
            human_bytes(result["raw_bytes"].as_u64().unwrap_or(0)),
            human_bytes(result["stored_bytes"].as_u64().unwrap_or(0)),
            human_bytes(result["database_bytes"].as_u64().unwrap_or(0))
        ),
        method::STORE_VERIFY => {
            let _ = writeln!(out, "{} chunks checked", result["chunks_checked"]);
            for c in result["corrupt"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "corrupt: {} ({})",
                    str_of(&c["chunk"]),
                    str_of(&c["reason"])
                );
            }
            for c in result["missing"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "missing: {} ({})",
                    str_of(&c["chunk"]),
                    str_of(&c["owner"])
                );
            }
            Ok(())
        }
        method::STORE_GC => writeln!(
            out,
            "removed {} chunks, freed {}",
            result["chunks_removed"],
            human_bytes(result["bytes_freed"].as_u64().unwrap_or(0))
        ),
        _ => Ok(()),
    };
}

/// Shows the initial scan of a new workspace as a progress bar (a TTY
/// only), then the sync from its peers if one follows at once (an offer
/// accepted).
fn show_scan_progress(client: &mut Client, workspace_id: &str) {
    let style = |template: &str| {
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ")
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(style(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ));
    bar.set_message("scanning");
    let mut syncing = false;
    while let Ok(status) = client.call(method::STATUS, json!({})) {
        let Some(w) = status["workspaces"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["workspace_id"] == workspace_id))
            .cloned()
        else {
            break;
        };
        match w["state"].as_str() {
            Some("scanning") => {
                if let Some(p) = w.get("progress") {
                    bar.set_length(p["bytes_total"].as_u64().unwrap_or(0));
                    bar.set_position(p["bytes_done"].as_u64().unwrap_or(0));
                }
            }
            Some("syncing") => {
                if !syncing {
                    syncing = true;
                    bar.set_style(style("{msg} [{bar:24}] {pos}/{len} changes"));
                }
                if let Some(p) = w.get("progress") {
                    bar.set_length(p["changes_total"].as_u64().unwrap_or(0));
                    bar.set_position(p["changes_done"].as_u64().unwrap_or(0));
                    let received = human_bytes(p["bytes_received"].as_u64().unwrap_or(0));
                    bar.set_message(format!("syncing ({received} received)"));
                }
            }
            _ => {
                bar.finish_with_message(format!("{} files", w["files"]));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn follow_events(paths: &HomePaths, since: Option<u64>) -> Result<(), Failure> {
    let mut client = Client::connect(paths)?;
    let params = match since {
        Some(since) => json!({ "since": since }),
        None => json!({}),
    };
    client.call(method::EVENTS_SUBSCRIBE, params)?;
    let stdout = std::io::stdout();
    loop {
        let notification = client.next_notification()?;
        let mut out = stdout.lock();
        if writeln!(out, "{}", notification.params)
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}

/// Copies bytes both ways between stdin/stdout and the daemon's socket.
fn proxy(paths: &HomePaths) -> Result<(), Failure> {
    use std::io::Read;
    let stream = Client::connect(paths)?.into_stream();
    let (mut from_daemon, mut to_daemon) = {
        use interprocess::local_socket::traits::Stream as _;
        #[allow(deprecated)]
        stream.split()
    };
    let upstream = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                // The IDE closed our stdin: it is gone, and so are we.
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(n) => {
                    if to_daemon.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = std::io::stdout().lock();
    // On the heap: on the stack, inlined into `run`, it made every command
    // touch 16 pages of stack for a buffer only this one uses.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from_daemon.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(upstream);
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> (Option<String>, Result<String, clap::error::ErrorKind>) {
        parse_args(&line.split_whitespace().collect::<Vec<_>>())
    }

    fn parse_args(args: &[&str]) -> (Option<String>, Result<String, clap::error::ErrorKind>) {
        let hint = HintCli::try_parse_from(args)
            .ok()
            .map(|hint| format!("{:?}", Cli::from(hint)));
        let full = Cli::try_parse_from(args)
            .map(|cli| format!("{cli:?}"))
            .map_err(|e| e.kind());
        (hint, full)
    }

    /// Whatever the hint's own parser accepts, the whole command line parses
    /// the same way; the rest it leaves to the whole command line.
    #[test]
    fn the_hint_parser_agrees_with_the_whole_command_line() {
        let accepted = [
            "mariesync touched ws a.rs",
            "mariesync touched ws a.rs b/c.rs --wait",
            "mariesync --home /h --json touched ws a.rs",
            "mariesync touched --home /h ws --json a.rs",
            "mariesync --home touched touched ws touched",
            "mariesync touched ws -- --wait",
        ];
        for line in accepted {
            let (hint, full) = parse(line);
            let full = full.unwrap_or_else(|e| panic!("{line}: {e:?}"));
            assert_eq!(hint.as_ref(), Some(&full), "{line}");
        }
        let left_to_the_whole_line = [
            "mariesync touched",
            "mariesync touched ws",
            "mariesync touched --help",
            "mariesync --version touched ws a",
            "mariesync ipc touched",
            "mariesync workspace add touched",
            "mariesync --home touched status",
            "mariesync touched ws a --wat",
        ];
        for line in left_to_the_whole_line {
            let (hint, _) = parse(line);
            assert_eq!(hint, None, "{line}");
        }
    }

    proptest::proptest! {
        /// The same, for any short line of the words these parsers know.
        #[test]
        fn the_hint_parser_never_disagrees(
            words in proptest::collection::vec(
                proptest::sample::select(vec![
                    "touched", "ws", "a.rs", "--wait", "--wait=true", "--json", "--home",
                    "/h", "--", "-V", "-h", "--help", "help", "status", "ipc", "-x",
                ]),
                0..7,
            )
        ) {
            let mut args = vec!["mariesync"];
            args.extend(words);
            let (hint, full) = parse_args(&args);
            if let Some(hint) = hint {
                proptest::prop_assert_eq!(Ok(hint), full, "{:?}", args);
            }
        }
    }
}
