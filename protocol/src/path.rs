//! Workspace-relative paths: the only form in which a path crosses the IPC or
//! wire boundary or enters the index.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated path relative to a workspace root: UTF-8, `/`-separated, no
/// empty, `.` or `..` component, not absolute, no NUL or backslash, no
/// control characters. A `RelPath` can never name something outside the root
/// by itself (symlinks on the way are checked where files are written).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

pub const PATH_BYTES_MAX: usize = 4096;
pub const COMPONENT_BYTES_MAX: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is longer than {PATH_BYTES_MAX} bytes")]
    TooLong,
    #[error("path is absolute")]
    Absolute,
    #[error("path has an empty, '.' or '..' component")]
    BadComponent,
    #[error("path component is longer than {COMPONENT_BYTES_MAX} bytes")]
    ComponentTooLong,
    #[error("path contains NUL, a backslash or a control character")]
    BadCharacter,
}

impl RelPath {
    pub fn new(path: impl Into<String>) -> Result<RelPath, PathError> {
        let path = path.into();
        validate(&path)?;
        Ok(RelPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].to_string()))
    }

    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{}", self.0, name))
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(&other.0)
                && self.0.as_bytes()[other.0.len()] == b'/')
    }

    /// The key under which names that differ only in case collide on a
    /// case-insensitive file system.
    pub fn case_fold_key(&self) -> String {
        self.0.to_lowercase()
    }
}

fn validate(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path
        .chars()
        .any(|c| c == '\0' || c == '\\' || c.is_control())
    {
        return Err(PathError::BadCharacter);
    }
    for component in path.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(PathError::BadComponent);
        }
        if component.len() > COMPONENT_BYTES_MAX {
            return Err(PathError::ComponentTooLong);
        }
    }
    // A Windows drive prefix is absolute there, whatever it means here.
    let bytes = path.as_bytes();
    if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
        return Err(PathError::Absolute);
    }
    Ok(())
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(value: String) -> Result<RelPath, PathError> {
        RelPath::new(value)
    }
}

impl From<RelPath> for String {
    fn from(value: RelPath) -> String {
        value.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_paths_that_could_escape() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
            "a\\b",
            "C:x",
            "a\nb",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "a",
            "a/b.txt",
            ".gitignore",
            "dir/..hidden",
            "ünïcode/ファイル",
        ] {
            assert!(RelPath::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn prefix_respects_component_boundaries() {
        let dir = RelPath::new("src").unwrap();
        assert!(RelPath::new("src/main.rs").unwrap().starts_with(&dir));
        assert!(RelPath::new("src").unwrap().starts_with(&dir));
        assert!(!RelPath::new("srcx/main.rs").unwrap().starts_with(&dir));
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<RelPath>("\"../x\"").is_err());
        assert_eq!(
            serde_json::from_str::<RelPath>("\"a/b\"").unwrap().as_str(),
            "a/b"
        );
    }
}
