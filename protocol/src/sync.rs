//! The sans-IO core of replication: given what this device has for a path
//! and what a peer announces, what to do. No IO, no clock: the same inputs
//! give the same decision on every device, which is what makes every
//! device pick the same conflict winner and the same conflict name.

use crate::{FileEntry, RelPath, VersionOrder};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We already have this version or a newer one.
    Ignore,
    /// The remote version replaces ours.
    Apply,
    /// Concurrent changes: the winner takes the path on every device; the
    /// loser's content is kept as `conflict_path` (absent when the loser is
    /// a deletion: an edit beats a delete and nothing is lost).
    Conflict {
        remote_wins: bool,
        conflict_path: Option<RelPath>,
    },
}

pub fn decide(local: Option<&FileEntry>, remote: &FileEntry) -> Decision {
    let Some(local) = local else {
        return Decision::Apply;
    };
    match remote.version.compare(&local.version) {
        VersionOrder::Equal | VersionOrder::Older => Decision::Ignore,
        VersionOrder::Newer => Decision::Apply,
        VersionOrder::Concurrent => {
            if local.same_content(remote) {
                // Both made the same change: take the merged version, no copy.
                return Decision::Apply;
            }
            let remote_wins = wins(remote, local);
            let loser = if remote_wins { local } else { remote };
            let conflict_path = if loser.deleted {
                None
            } else {
                Some(conflict_path(loser))
            };
            Decision::Conflict {
                remote_wins,
                conflict_path,
            }
        }
    }
}

/// Does `a` beat `b` for the path? An edit beats a deletion; then the later
/// modification time; then the larger device id, so ties break the same
/// way everywhere.
pub fn wins(a: &FileEntry, b: &FileEntry) -> bool {
    if a.deleted != b.deleted {
        return !a.deleted;
    }
    (a.mtime_ns, &a.modified_by) > (b.mtime_ns, &b.modified_by)
}

/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.EXT`: the loser's own
/// modification time (UTC) and a short prefix of the device that made it.
pub fn conflict_path(loser: &FileEntry) -> RelPath {
    let name = loser.path.file_name();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let device = device_prefix(&loser.modified_by);
    let stamp = utc_stamp(loser.mtime_ns);
    // Shorten the stem so the name stays within one component's limit.
    let fixed = ".sync-conflict-".len() + stamp.len() + 1 + device.len() + ext.len();
    let mut stem = stem;
    while !stem.is_empty() && stem.len() + fixed > crate::path::COMPONENT_BYTES_MAX {
        let mut cut = stem.len() - 1;
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        stem = &stem[..cut];
    }
    let file = format!("{stem}.sync-conflict-{stamp}-{device}{ext}");
    let joined = match loser.path.parent() {
        Some(parent) => format!("{parent}/{file}"),
        None => file,
    };
    // Only components that were valid already, plus ASCII: still valid;
    // fall back to the bare name if the result is too long.
    RelPath::new(joined).unwrap_or_else(|_| loser.path.clone())
}

/// For a conflict copy's path: the path it is a copy of, and the short
/// device prefix in its name.
pub fn parse_conflict_path(path: &RelPath) -> Option<(RelPath, String)> {
    let name = path.file_name();
    let at = name.find(".sync-conflict-")?;
    let stem = &name[..at];
    let rest = &name[at + ".sync-conflict-".len()..];
    // YYYYMMDD-HHMMSS-DEVICE then the extension, if any.
    let (stamp_and_device, ext) = match rest.find('.') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let mut parts = stamp_and_device.splitn(3, '-');
    let (date, time, device) = (parts.next()?, parts.next()?, parts.next()?);
    if date.len() != 8
        || time.len() != 6
        || !date.bytes().chain(time.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let original = format!("{stem}{ext}");
    let original = match path.parent() {
        Some(parent) => format!("{parent}/{original}"),
        None => original,
    };
    Some((RelPath::new(original).ok()?, device.to_owned()))
}

/// The short prefix of a device ID used in conflict names.
pub fn device_prefix(device_id: &str) -> String {
    device_id.chars().skip(8).take(7).collect()
}

/// YYYYMMDD-HHMMSS of a Unix time in nanoseconds, UTC (civil-from-days).
fn utc_stamp(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}{mo:02}{d:02}-{h:02}{m:02}{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkHash, DeviceKey, FileKind, VersionVector};

    const A: &str = "12D3KooWAAAAAAAAAAAAAAAA";
    const B: &str = "12D3KooWBBBBBBBBBBBBBBBB";

    fn entry(
        path: &str,
        content: &str,
        by: &str,
        mtime_s: i64,
        version: &[(u64, u64)],
    ) -> FileEntry {
        let mut v = VersionVector::new();
        for &(device, counter) in version {
            for _ in 0..counter {
                v.bump(DeviceKey(device));
            }
        }
        FileEntry {
            path: RelPath::new(path).unwrap(),
            kind: FileKind::File,
            size: content.len() as u64,
            mtime_ns: mtime_s * 1_000_000_000,
            executable: false,
            content_hash: ChunkHash::of(content.as_bytes()),
            chunks: vec![],
            symlink_target: None,
            deleted: content.is_empty(),
            version: v,
            sequence: 0,
            modified_by: by.into(),
        }
    }

    #[test]
    fn newer_applies_older_is_ignored() {
        let base = entry("a.txt", "1", A, 100, &[(1, 1)]);
        let newer = entry("a.txt", "2", A, 200, &[(1, 2)]);
        assert_eq!(decide(None, &base), Decision::Apply);
        assert_eq!(decide(Some(&base), &newer), Decision::Apply);
        assert_eq!(decide(Some(&newer), &base), Decision::Ignore);
        assert_eq!(decide(Some(&newer), &newer), Decision::Ignore);
    }

    #[test]
    fn concurrent_edits_pick_the_same_winner_and_name_on_both_sides() {
        // 2026-11-25 10:00:00 UTC and 10:00:05 UTC.
        let on_a = entry("src/main.rs", "from a", A, 1_795_600_800, &[(1, 1), (2, 0)]);
        let mut on_b = entry("src/main.rs", "from b", B, 1_795_600_805, &[]);
        on_b.version = VersionVector::new();
        on_b.version.bump(DeviceKey(2));
        let at_a = decide(Some(&on_a), &on_b);
        let at_b = decide(Some(&on_b), &on_a);
        expect_test::expect![[r#"
            (
                Conflict {
                    remote_wins: true,
                    conflict_path: Some(
                        "src/main.sync-conflict-20261125-100000-AAAAAAA.rs",
                    ),
                },
                Conflict {
                    remote_wins: false,
                    conflict_path: Some(
                        "src/main.sync-conflict-20261125-100000-AAAAAAA.rs",
                    ),
                },
            )
        "#]]
        .assert_debug_eq(&(at_a, at_b));
    }

    #[test]
    fn an_edit_beats_a_concurrent_delete() {
        let edited = entry("notes", "kept", A, 100, &[(1, 2)]);
        let mut deleted = entry("notes", "", B, 500, &[(1, 1)]);
        deleted.version.bump(DeviceKey(2));
        assert_eq!(
            decide(Some(&edited), &deleted),
            Decision::Conflict {
                remote_wins: false,
                conflict_path: None
            }
        );
        assert_eq!(
            decide(Some(&deleted), &edited),
            Decision::Conflict {
                remote_wins: true,
                conflict_path: None
            }
        );
    }

    #[test]
    fn long_names_still_get_a_valid_conflict_name() {
        let long = format!("{}.txt", "é".repeat(120));
        let loser = entry(&long, "x", A, 0, &[(1, 1)]);
        let copy = conflict_path(&loser);
        assert_ne!(copy, loser.path);
        assert!(copy.as_str().len() <= crate::path::COMPONENT_BYTES_MAX);
        assert!(copy.as_str().ends_with(".txt"));
    }

    #[test]
    fn conflict_names_parse_back() {
        let loser = entry("src/main.rs", "x", A, 1_795_600_800, &[(1, 1)]);
        let copy = conflict_path(&loser);
        assert_eq!(
            parse_conflict_path(&copy),
            Some((loser.path.clone(), "AAAAAAA".into()))
        );
        let bare = entry("Makefile", "x", A, 0, &[(1, 1)]);
        assert_eq!(
            parse_conflict_path(&conflict_path(&bare))
                .unwrap()
                .0
                .as_str(),
            "Makefile"
        );
        assert_eq!(
            parse_conflict_path(&RelPath::new("a.sync-conflict-x.rs").unwrap()),
            None
        );
    }

    #[test]
    fn stamps_are_utc_civil_time() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400 * 1_000_000_000), "20000229-000000");
        assert_eq!(utc_stamp(-1_000_000_000), "19691231-235959");
    }
}
