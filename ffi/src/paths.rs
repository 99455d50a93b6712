//! Where a device keeps its state (SPEC.md section 1).

use std::path::{Path, PathBuf};

/// The environment variable that names the home, like `--home`.
pub const HOME_ENV: &str = "MARIESYNC_HOME";

/// Every path of one device's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomePaths {
    /// What the user named with `--home`, or the platform data directory.
    pub home: PathBuf,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

impl HomePaths {
    /// All state under one directory, as `--home DIR` asks.
    pub fn in_dir(dir: &Path) -> HomePaths {
        let dir = absolute(dir);
        HomePaths {
            home: dir.clone(),
            config_dir: dir.clone(),
            data_dir: dir.clone(),
            runtime_dir: dir,
        }
    }

    /// `--home` if given, else `MARIESYNC_HOME`, else the platform directories
    /// of `ProjectDirs::from("dev", "MarieIDE", "MarieSync")`.
    pub fn resolve(home: Option<&Path>) -> Result<HomePaths, String> {
        if let Some(dir) = home {
            return Ok(HomePaths::in_dir(dir));
        }
        if let Some(dir) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            return Ok(HomePaths::in_dir(Path::new(&dir)));
        }
        let dirs =
            directories::ProjectDirs::from("dev", "MarieIDE", "MarieSync").ok_or_else(|| {
                "cannot find this user's home directory; pass --home DIR or set MARIESYNC_HOME"
                    .to_string()
            })?;
        let data_dir = dirs.data_dir().to_path_buf();
        let runtime_dir = dirs
            .runtime_dir()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data_dir.clone());
        Ok(HomePaths {
            home: data_dir.clone(),
            config_dir: dirs.config_dir().to_path_buf(),
            data_dir,
            runtime_dir,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("mariesync.sock")
    }

    pub fn database(&self) -> PathBuf {
        self.data_dir.join("mariesync.redb")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join("mariesync.lock")
    }

    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join("mariesync.log")
    }

    pub fn device_key(&self) -> PathBuf {
        self.config_dir.join("device.key")
    }

    /// The words a user types to start the daemon for this home.
    pub fn daemon_command(&self) -> String {
        format!("mariesync daemon --home {}", self.home.display())
    }
}

fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}
