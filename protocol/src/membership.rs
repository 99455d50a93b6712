//! Who may do what in a workspace: its members and their roles.
//!
//! Each device keeps the membership of every workspace it has. Only owners
//! change it: a change is a new `Membership` with a higher version, written by
//! an owner and pushed by it to the other members. A device accepts an update
//! only from a peer that is an owner in the membership it already has, so an
//! editor or a viewer can neither grant nor take rights.
//!
//! Device ids are kept as text here (this crate knows nothing of libp2p);
//! the daemon checks that they parse.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A workspace has at most this many members.
pub const MEMBERS_MAX: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Receives only: its local changes are never accepted by others.
    Viewer,
    /// Changes files.
    Editor,
    /// Changes files and membership.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }

    /// Whether others accept this member's file changes.
    pub fn can_write(self) -> bool {
        self >= Role::Editor
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "editor" => Ok(Role::Editor),
            "owner" => Ok(Role::Owner),
            other => Err(format!("'{other}' is not a role (owner, editor or viewer)")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Grows with every change; with `author`, orders concurrent changes.
    pub version: u64,
    /// The owner who wrote this version.
    pub author: String,
    pub members: BTreeMap<String, Role>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("{0} is not an owner of this workspace")]
    NotOwner(String),
    #[error("a workspace has at most {MEMBERS_MAX} members")]
    TooMany,
    #[error("a workspace keeps at least one owner")]
    NoOwner,
    #[error("the update was written by {author}, who is not one of its owners")]
    BadAuthor { author: String },
}

impl Membership {
    /// A new workspace: its creator owns it alone.
    pub fn founded_by(device: &str) -> Membership {
        Membership {
            version: 1,
            author: device.to_owned(),
            members: BTreeMap::from([(device.to_owned(), Role::Owner)]),
        }
    }

    pub fn role(&self, device: &str) -> Option<Role> {
        self.members.get(device).copied()
    }

    /// `owner` sets `device`'s role (adding it if new): the next version.
    pub fn with_member(
        &self,
        owner: &str,
        device: &str,
        role: Role,
    ) -> Result<Membership, MembershipError> {
        if self.role(owner) != Some(Role::Owner) {
            return Err(MembershipError::NotOwner(owner.to_owned()));
        }
        let mut next = self.clone();
        next.members.insert(device.to_owned(), role);
        next.version += 1;
        next.author = owner.to_owned();
        next.check()?;
        Ok(next)
    }

    fn check(&self) -> Result<(), MembershipError> {
        if self.members.len() > MEMBERS_MAX {
            return Err(MembershipError::TooMany);
        }
        if !self.members.values().any(|r| *r == Role::Owner) {
            return Err(MembershipError::NoOwner);
        }
        Ok(())
    }

    /// Whether `update`, received from `sender`, replaces `self`: the sender
    /// must be an owner here, the update newer and well formed. `Ok(false)`
    /// for an update that is merely old news.
    pub fn accepts(&self, update: &Membership, sender: &str) -> Result<bool, MembershipError> {
        if self.role(sender) != Some(Role::Owner) {
            return Err(MembershipError::NotOwner(sender.to_owned()));
        }
        update.check()?;
        if update.author != sender && self.role(&update.author) != Some(Role::Owner) {
            return Err(MembershipError::BadAuthor {
                author: update.author.clone(),
            });
        }
        Ok((update.version, &update.author) > (self.version, &self.author))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owners_change_membership() {
        let m = Membership::founded_by("a");
        let m2 = m.with_member("a", "b", Role::Editor).unwrap();
        let m3 = m2.with_member("a", "c", Role::Viewer).unwrap();
        assert_eq!(m3.version, 3);
        assert!(matches!(
            m3.with_member("b", "d", Role::Owner),
            Err(MembershipError::NotOwner(_))
        ));
        // B (editor) and C (viewer) cannot push changes; A can.
        let forged = Membership {
            version: 10,
            author: "b".into(),
            members: BTreeMap::from([("b".into(), Role::Owner)]),
        };
        assert!(m3.accepts(&forged, "b").is_err());
        assert!(m3.accepts(&forged, "c").is_err());
        assert_eq!(m2.accepts(&m3, "a"), Ok(true));
        assert_eq!(m3.accepts(&m2, "a"), Ok(false));
        assert_eq!(m3.accepts(&m3, "a"), Ok(false));
    }

    #[test]
    fn an_update_keeps_an_owner() {
        let m = Membership::founded_by("a");
        let mut orphan = m.clone();
        orphan.version = 2;
        orphan.members.insert("a".into(), Role::Editor);
        assert_eq!(m.accepts(&orphan, "a"), Err(MembershipError::NoOwner));
        assert!(m.with_member("a", "a", Role::Viewer).is_err());
    }

    #[test]
    fn roles_parse_and_order() {
        assert_eq!("viewer".parse::<Role>(), Ok(Role::Viewer));
        assert!("admin".parse::<Role>().is_err());
        assert!(Role::Owner.can_write() && Role::Editor.can_write());
        assert!(!Role::Viewer.can_write());
    }
}
