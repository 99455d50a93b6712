//! The integration-test harness: a small vocabulary for tests that start
//! real `mariesync daemon` processes on real files.
//!
//! - [`Device`]: a daemon process with its own home; `cli`, `call`, `kill9`,
//!   `restart`.
//! - [`generate_tree`]: a deterministic workspace of text, binaries, links.
//! - [`tree_state`] / [`digest`]: what is on disk, in the form of
//!   RELIABILITY.md's convergence digest; [`index_state`]: the same from the
//!   daemon's index, so the two can be compared.
//! - [`wait_until`]: poll a condition with a deadline (never a bare sleep).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mariesync_ffi::{Client, ClientError, HomePaths};
use serde_json::{Value, json};

/// The `mariesync` binary: `MARIESYNC_BIN`, else built once per test process
/// with the cargo that runs the tests.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("MARIESYNC_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let output = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "mariesync",
                "--bin",
                "mariesync",
                // What `mariesync daemon` runs.
                "--bin",
                "mariesyncd",
                "--message-format=json",
                "--manifest-path",
            ])
            .arg(&manifest)
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build for the mariesync binary");
        assert!(
            output.status.success(),
            "building the mariesync binary failed"
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|msg| {
                msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "mariesync"
            })
            .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no mariesync executable")
    })
    .clone()
}

/// Polls `condition` until it returns `Some`, or panics after `timeout`
/// saying what was awaited.
pub fn wait_until<T>(timeout: Duration, what: &str, condition: impl FnMut() -> Option<T>) -> T {
    poll(
        timeout,
        what,
        condition,
        Duration::from_millis(2),
        |pause| (pause * 2).min(Duration::from_millis(50)),
    )
}

/// [`wait_until`], checking every `pause`: for benchmarks, where the time
/// it returns at is what is measured (a growing pause rounds it up to its
/// steps).
pub fn wait_until_every<T>(
    pause: Duration,
    timeout: Duration,
    what: &str,
    condition: impl FnMut() -> Option<T>,
) -> T {
    poll(timeout, what, condition, pause, |pause| pause)
}

fn poll<T>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Option<T>,
    first_pause: Duration,
    next_pause: impl Fn(Duration) -> Duration,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = first_pause;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = next_pause(pause);
    }
}

/// Counters of a running process, from `/proc` (Linux): for tests that
/// bound a daemon's memory or page faults, and for benchmarks. `None` when
/// the process or the field is not there.
pub mod proc_stats {
    /// The numbers of `/proc/PID/stat` after the command name, by
    /// position (0 is the state, which is not a number; 7 minor faults; 11
    /// and 12 user and system ticks).
    fn stat_numbers(pid: u32) -> Option<Vec<Option<u64>>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces; it ends at the last ')'.
        let after_name = stat.rsplit(')').next()?;
        Some(
            after_name
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect(),
        )
    }

    /// Minor page faults so far (each a page the kernel had to find and
    /// map: memory given back to the system and touched again, say).
    pub fn minor_faults(pid: u32) -> Option<u64> {
        *stat_numbers(pid)?.get(7)?
    }

    /// User plus system CPU time so far, in clock ticks.
    pub fn cpu_ticks(pid: u32) -> Option<u64> {
        let numbers = stat_numbers(pid)?;
        Some((*numbers.get(11)?)? + (*numbers.get(12)?)?)
    }

    /// A `kB` line of `/proc/PID/status` (`VmRSS`, `VmHWM`...), in KiB.
    pub fn status_kib(pid: u32, name: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.split(':').next() == Some(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

/// A device: one home and, while running, one daemon process.
pub struct Device {
    pub home: PathBuf,
    pub paths: HomePaths,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
    /// Run inside this network namespace (LAN tests), with mDNS on.
    netns: Option<String>,
    /// Listen on this loopback port at every (re)start: see `pin_port`.
    port: Option<u16>,
}

impl Device {
    /// Starts a daemon with a fresh home under `dir`.
    pub fn start(dir: &Path) -> Device {
        Device::start_with_env(dir, &[])
    }

    /// Starts a daemon inside network namespace `netns`, listening on all
    /// of its interfaces with LAN discovery on.
    pub fn start_in_netns(dir: &Path, netns: &str) -> Device {
        let home = dir.join("home");
        let mut device = Device {
            paths: HomePaths::in_dir(&home),
            home,
            child: None,
            extra_env: Vec::new(),
            netns: Some(netns.to_owned()),
            port: None,
        };
        device.launch();
        device
    }

    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Device {
        let home = dir.join("home");
        let mut device = Device {
            paths: HomePaths::in_dir(&home),
            home,
            child: None,
            extra_env: owned_env(env),
            netns: None,
            port: None,
        };
        device.launch();
        device
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(&self.home).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns])
                    .arg(bin())
                    .arg("daemon")
                    .args(["--listen", "/ip4/0.0.0.0/tcp/0"]);
                c
            }
            // Tests talk over loopback only, and never multicast on a real
            // interface; LAN tests make their own network namespaces.
            None => {
                let mut c = Command::new(bin());
                let listen = format!("/ip4/127.0.0.1/tcp/{}", self.port.unwrap_or(0));
                c.arg("daemon").args(["--listen", &listen, "--no-mdns"]);
                c
            }
        };
        command
            .arg("--home")
            .arg(&self.home)
            .env(
                "RUST_LOG",
                std::env::var("MARIESYNC_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.extra_env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("starting mariesync daemon");
        let paths = self.paths.clone();
        wait_until(
            Duration::from_secs(30),
            "the daemon to answer on its socket",
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the daemon exited during startup with {status}; log:\n{}",
                        self.log()
                    );
                }
                Client::connect(&paths)
                    .ok()
                    .and_then(|mut c| c.call("id", json!({})).ok())
            },
        );
        self.child = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.home.with_file_name("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.paths).expect("connecting to the daemon")
    }

    /// One IPC call.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.client().call(method, params)
    }

    /// One IPC call that must succeed.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        match self.call(method, params.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{method} {params} failed: {e}\nlog:\n{}", self.log()),
        }
    }

    /// Runs the CLI against this device's home.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running mariesync")
    }

    /// Runs the CLI with `--json` and parses the one object it prints.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let output = self.cli(&[args, &["--json"]].concat());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "mariesync {args:?} failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout:?}"))
    }

    pub fn device_id(&self) -> String {
        self.ok("id", json!({}))["device_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Where this daemon listens (waits for the first address).
    pub fn listen_addr(&self) -> String {
        wait_until(Duration::from_secs(10), "a listen address", || {
            self.ok("status", json!({}))["listen_addrs"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|a| a.as_str())
                .map(str::to_owned)
        })
    }

    /// This device's view of a trusted peer, from `peer.list`.
    pub fn peer(&self, device_id: &str) -> Option<Value> {
        self.ok("peer.list", json!({}))["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["device_id"] == device_id)
            .cloned()
    }

    pub fn wait_connected(&self, device_id: &str) {
        wait_until(
            Duration::from_secs(30),
            &format!("a connection to {device_id}"),
            || {
                self.peer(device_id)
                    .filter(|p| p["connected"] == true)
                    .map(|_| ())
            },
        );
    }

    /// Keeps this device's current port across restarts, as a device on a
    /// network keeps its address: peers that remember it can dial it
    /// again after a restart.
    pub fn pin_port(&mut self) {
        let addr = self.listen_addr();
        let port = addr
            .rsplit('/')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr}"));
        self.port = Some(port);
    }

    /// Links `other` into this device's group (`invite --device` here,
    /// `join` there); returns once both are connected.
    pub fn link(&self, other: &Device) {
        let ticket = self.cli_json(&["invite", "--device"])["ticket"]
            .as_str()
            .unwrap()
            .to_owned();
        let joined = other.cli_json(&["join", &ticket]);
        assert_eq!(joined["group"], true, "{joined}");
        other.wait_connected(&self.device_id());
        self.wait_connected(&other.device_id());
    }

    /// A setting's value on this device (`null` when unset).
    pub fn setting(&self, key: &str) -> Value {
        self.ok("settings.get", json!({"key": key}))["value"].clone()
    }

    /// Waits until `key` has `value` on this device.
    pub fn wait_setting(&self, key: &str, value: &Value) {
        wait_until(
            Duration::from_secs(30),
            &format!("{key} = {value} on {}", self.home.display()),
            || (self.setting(key) == *value).then_some(()),
        );
    }

    /// A client subscribed to events from now on.
    pub fn subscribe(&self) -> Client {
        let mut client = self.client();
        client.call("events.subscribe", json!({})).unwrap();
        client
    }

    pub fn add_workspace(&self, path: &Path, name: &str) -> String {
        let result = self.ok("workspace.add", json!({"path": path, "name": name}));
        result["workspace_id"].as_str().unwrap().to_owned()
    }

    /// `self` and `other` trust each other (`other` is told where `self`
    /// listens); returns once both are connected.
    pub fn trust_each_other(&self, other: &Device) {
        let (id_self, id_other) = (self.device_id(), other.device_id());
        self.cli_json(&["peer", "add", &id_other]);
        other.cli_json(&["peer", "add", &id_self, "--addr", &self.listen_addr()]);
        self.wait_connected(&id_other);
        other.wait_connected(&id_self);
    }

    /// `self`, an owner of `workspace`, shares it with `other` as `role`
    /// (`share`); `other` accepts the offer into `path` (`workspace add
    /// --id`).
    pub fn share_with(&self, other: &Device, workspace: &str, role: &str, path: &Path) {
        self.cli_json(&["share", workspace, &other.device_id(), "--role", role]);
        other.accept_offer(workspace, path);
    }

    /// A workspace `w` of `files` generated text files (`seed`) at
    /// `dir/ws`, shared with `other` as an editor into `other_dir/ws`; its
    /// ID and the two roots. Waits for the offer, not for the sync.
    pub fn share_generated(
        &self,
        dir: &Path,
        other: &Device,
        other_dir: &Path,
        seed: u64,
        files: usize,
    ) -> (String, PathBuf, PathBuf) {
        let (root, other_root) = (dir.join("ws"), other_dir.join("ws"));
        generate_tree(&root, seed, files, 0, 0);
        std::fs::create_dir_all(&other_root).unwrap();
        let ws = self.add_workspace(&root, "w");
        self.share_with(other, &ws, "editor", &other_root);
        (ws, root, other_root)
    }

    /// Waits for an offer of `workspace` and accepts it into `path`.
    pub fn accept_offer(&self, workspace: &str, path: &Path) {
        wait_until(Duration::from_secs(30), "the offer to arrive", || {
            self.ok("workspace.list", json!({}))["workspaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["workspace_id"] == workspace && w["state"] == "offered")
                .then_some(())
        });
        self.ok("workspace.add", json!({"path": path, "id": workspace}));
    }

    pub fn flush(&self, workspace: &str) {
        self.ok("flush", json!({ "workspace": workspace }));
    }

    /// The IDE's hint that it saved `path` (`workspace.touched`); with
    /// `wait`, answered once connected peers have it.
    pub fn touched(&self, workspace: &str, path: &Path, wait: bool) {
        self.ok(
            "workspace.touched",
            json!({"workspace": workspace, "paths": [path], "wait": wait}),
        );
    }

    /// Stops the daemon with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = wait_until(
                Duration::from_secs(30),
                "the daemon to exit after SIGTERM",
                || child.try_wait().ok().flatten(),
            );
            assert!(
                status.success(),
                "the daemon exited with {status} after SIGTERM; log:\n{}",
                self.log()
            );
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// [`Device::restart`] with `env` instead of the environment it was
    /// started with.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.extra_env = owned_env(env);
        self.launch();
    }

    /// Waits for the daemon to exit by itself (after `mariesync stop`).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the daemon runs");
        wait_until(Duration::from_secs(30), "the daemon to exit", || {
            child.try_wait().ok().flatten()
        })
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }

    /// RELIABILITY.md check 4: every referenced chunk exists and hashes right.
    pub fn assert_store_integrity(&self) {
        let report = self.ok("store.verify", json!({}));
        assert_eq!(report["ok"], true, "store verification failed: {report}");
    }
}

fn owned_env(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Flips one byte of `content` where it is stored in the database of the
/// (stopped) daemon with home `home`: `content` must be incompressible and
/// longer than 5,064 bytes, so its bytes appear verbatim in the file.
pub fn rot_stored_chunk(home: &Path, content: &[u8]) {
    let db_path = home.join("mariesync.redb");
    let mut db = std::fs::read(&db_path).unwrap();
    let needle = &content[5000..5064];
    let at = db
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("chunk bytes in the database file");
    db[at + 10] ^= 0xff;
    std::fs::write(&db_path, &db).unwrap();
}

/// The next event of `client` (subscribed) for which `wanted` holds.
pub fn next_event(client: &mut Client, mut wanted: impl FnMut(&Value) -> bool) -> Value {
    loop {
        let event = client.next_notification().expect("an event").params;
        assert_ne!(event["kind"], "gap", "events were lost");
        if wanted(&event) {
            return event;
        }
    }
}

/// One path's synced state: kind, exec bit and content hash (blake3 hex; of
/// the target for links).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PathState {
    pub kind: &'static str,
    pub executable: bool,
    pub hash: String,
}

pub type TreeState = BTreeMap<String, PathState>;

/// Names the harness never counts: the daemon's own temporary files and
/// what the daemon is told to ignore by default.
fn excluded(name: &str) -> bool {
    name.starts_with(".mariesync-tmp-") || matches!(name, ".git" | ".hg" | ".svn")
}

/// What is on disk under `root` (ignore rules are the caller's business:
/// use trees without ignored files when comparing with the index).
pub fn tree_state(root: &Path) -> TreeState {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Walks `dir` into `out`. Tests poll trees that daemons are still
/// changing: an entry that vanishes between being listed and being read is
/// left out (the next poll sees the tree settled), never a panic.
fn walk(root: &Path, dir: &Path, out: &mut TreeState) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if excluded(&name) {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let state = if meta.file_type().is_symlink() {
            let Ok(target) = std::fs::read_link(&path) else {
                continue;
            };
            PathState {
                kind: "symlink",
                executable: false,
                hash: blake3::hash(target.to_string_lossy().as_bytes())
                    .to_hex()
                    .to_string(),
            }
        } else if meta.is_dir() {
            walk(root, &path, out);
            PathState {
                kind: "dir",
                executable: false,
                hash: blake3::hash(b"").to_hex().to_string(),
            }
        } else {
            use std::os::unix::fs::PermissionsExt;
            let Ok(data) = std::fs::read(&path) else {
                continue;
            };
            PathState {
                kind: "file",
                executable: meta.permissions().mode() & 0o111 != 0,
                hash: blake3::hash(&data).to_hex().to_string(),
            }
        };
        out.insert(rel, state);
    }
}

/// The daemon's index of a workspace, in the same form as [`tree_state`].
pub fn index_state(device: &Device, workspace: &str) -> TreeState {
    let files = device.ok("workspace.files", json!({ "workspace": workspace }));
    files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let kind = match f["kind"].as_str().unwrap() {
                "file" => "file",
                "dir" => "dir",
                _ => "symlink",
            };
            (
                f["path"].as_str().unwrap().to_owned(),
                PathState {
                    kind,
                    executable: f["executable"].as_bool().unwrap(),
                    hash: f["content_hash"].as_str().unwrap().to_owned(),
                },
            )
        })
        .collect()
}

/// RELIABILITY.md's convergence digest over a tree state.
pub fn digest(state: &TreeState) -> String {
    let mut hasher = blake3::Hasher::new();
    for (path, s) in state {
        hasher
            .update(format!("{path}\0{}\0{}\0{}\n", s.kind, s.executable as u8, s.hash).as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// Asserts two states are equal, listing the first differences if not.
pub fn assert_same_state(what: &str, expected: &TreeState, actual: &TreeState) {
    if expected == actual {
        return;
    }
    let mut diffs = Vec::new();
    for (path, state) in expected {
        match actual.get(path) {
            None => diffs.push(format!("missing {path}")),
            Some(other) if other != state => {
                diffs.push(format!("differs {path}: {state:?} vs {other:?}"))
            }
            _ => {}
        }
    }
    for path in actual.keys() {
        if !expected.contains_key(path) {
            diffs.push(format!("unexpected {path}"));
        }
    }
    diffs.truncate(20);
    panic!(
        "{what}: {} vs {} entries; first differences:\n{}",
        expected.len(),
        actual.len(),
        diffs.join("\n")
    );
}

/// RELIABILITY.md check 5: no temporary file of the daemon left behind.
pub fn assert_no_junk(root: &Path) {
    fn visit(dir: &Path, junk: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".mariesync-tmp-")
            {
                junk.push(path.clone());
            }
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                visit(&path, junk);
            }
        }
    }
    let mut junk = Vec::new();
    visit(root, &mut junk);
    assert!(junk.is_empty(), "temporary files left behind: {junk:?}");
}

/// A small deterministic PRNG (xorshift64*), so trees are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

const WORDS: [&str; 16] = [
    "let", "value", "return", "buffer", "index", "config", "handler", "request", "state", "node",
    "tree", "path", "chunk", "digest", "peer", "sync",
];

/// Source-like text of about `len` bytes.
pub fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = String::with_capacity(len + 64);
    while out.len() < len {
        let indent = "    ".repeat(rng.below(4) as usize);
        let a = WORDS[rng.below(16) as usize];
        let b = WORDS[rng.below(16) as usize];
        out.push_str(&format!(
            "{indent}{a}_{b} = {}({b}, {});\n",
            WORDS[rng.below(16) as usize],
            rng.below(100_000)
        ));
    }
    out.into_bytes()
}

/// Writes a deterministic workspace: `files` text files of 1 to 20 KiB in
/// nested directories, plus `binaries` incompressible files of
/// `binary_bytes`, a few executables and in-workspace symlinks.
pub fn generate_tree(root: &Path, seed: u64, files: usize, binaries: usize, binary_bytes: usize) {
    let mut rng = Rng::new(seed);
    for i in 0..files {
        let depth = rng.below(4);
        let mut dir = root.join("src");
        for d in 0..depth {
            dir.push(format!(
                "{}{}",
                WORDS[rng.below(16) as usize],
                (i / 25 + d as usize) % 40
            ));
        }
        std::fs::create_dir_all(&dir).unwrap();
        let len = 1024 + rng.below(19 * 1024) as usize;
        let path = dir.join(format!("file{i}.rs"));
        std::fs::write(&path, text(&mut rng, len)).unwrap();
        if i % 97 == 0 {
            set_executable(&path, true);
        }
    }
    if binaries > 0 {
        std::fs::create_dir_all(root.join("assets")).unwrap();
    }
    for i in 0..binaries {
        std::fs::write(
            root.join(format!("assets/blob{i}.bin")),
            rng.bytes(binary_bytes),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("src", root.join("link-to-src")).unwrap();
}

pub fn set_executable(path: &Path, executable: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(if executable { 0o755 } else { 0o644 });
    std::fs::set_permissions(path, perms).unwrap();
}

/// All regular files under `root`, relative, sorted.
pub fn list_files(root: &Path) -> Vec<String> {
    tree_state(root)
        .into_iter()
        .filter(|(_, s)| s.kind == "file")
        .map(|(p, _)| p)
        .collect()
}

/// Two network namespaces joined by a veth pair (10.231.N.1 and .2/24):
/// two hosts on one LAN. Removed when dropped.
pub struct Lan {
    pub names: [String; 2],
}

impl Lan {
    pub fn new(tag: &str) -> Lan {
        let id = std::process::id() % 100_000;
        let names = [format!("ms-{tag}-a-{id}"), format!("ms-{tag}-b-{id}")];
        let subnet = 1 + id % 250;
        let run = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("running ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        let (veth_a, veth_b) = (format!("v{id}a"), format!("v{id}b"));
        let lan = Lan { names };
        for name in &lan.names {
            run(&["netns", "add", name]);
            run(&["-n", name, "link", "set", "lo", "up"]);
        }
        run(&[
            "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
        ]);
        for (veth, name, host) in [(&veth_a, &lan.names[0], 1), (&veth_b, &lan.names[1], 2)] {
            run(&["link", "set", veth, "netns", name]);
            run(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("10.231.{subnet}.{host}/24"),
                "dev",
                veth,
            ]);
            run(&["-n", name, "link", "set", veth, "up", "multicast", "on"]);
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// A tmpfs of a given size mounted on a directory (root only), for full
/// disks; unmounted when dropped.
pub struct SmallDisk {
    pub path: PathBuf,
}

impl SmallDisk {
    /// None if this machine does not let us mount (a container without
    /// the capability, say): the caller skips, loudly.
    pub fn mount(path: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .ok()?;
        status.success().then(|| SmallDisk {
            path: path.to_path_buf(),
        })
    }

    /// Gives it room again (`mount -o remount,size=...`).
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "resizing the tmpfs on {}",
            self.path.display()
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Root privileges, for tests that need them; prints why a test is skipped.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Two devices in their own temporary folders, trusting each other and
/// connected.
pub fn two_trusting_devices() -> (tempfile::TempDir, tempfile::TempDir, Device, Device) {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    (dir_a, dir_b, a, b)
}

/// Puts the executable `from` at `to` without ever holding it open for
/// writing where it can: a hard link. A copy cannot always run at once
/// ("text file busy"): a process that another test's thread forks while
/// the copy is open inherits the descriptor until it runs its own program;
/// run a copy with [`output_of`].
pub fn place_executable(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// `command.output()`, started again while its program is "text file
/// busy" (see [`place_executable`]); that lasts until another process runs
/// its own program.
pub fn output_of(command: &mut Command) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match command.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::yield_now();
            }
            result => return result.unwrap(),
        }
    }
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("ms-").tempdir().unwrap()
}
