//! Command-line flags of the benchmark programs (`--name VALUE` pairs),
//! and the daemon they drive.

use std::path::PathBuf;

pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Args {
        Args(std::env::args().skip(1).collect())
    }

    /// The first argument, when it is not a flag.
    pub fn first(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }

    /// The value after `--name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    /// The number after `--name`, or `default` when absent or not a number.
    pub fn number(&self, name: &str, default: usize) -> usize {
        self.value(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Whether the switch `--name` is given.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
}

/// `mariesync` at `bin` and the `mariesyncd` its `daemon` runs, beside it.
pub fn ensure_built(bin: &std::path::Path) -> anyhow::Result<()> {
    for needed in [bin, &bin.with_file_name(mariesync::cli::DAEMON_BINARY)] {
        anyhow::ensure!(
            needed.exists(),
            "{} not found: build it with `cargo build --release -p mariesync`",
            needed.display()
        );
    }
    Ok(())
}

/// The `mariesync` beside this program (the same build), made the one the
/// integration harness starts (its `daemon` runs the `mariesyncd` beside
/// it). Call before any thread starts.
pub fn use_sibling_daemon() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("mariesync");
    ensure_built(&bin)?;
    // SAFETY: the caller runs this before any thread reads the environment.
    unsafe { std::env::set_var("MARIESYNC_BIN", &bin) };
    Ok(bin)
}
