//! Who shares which workspace, offers from peers, and invitation tickets.
//!
//! Memberships live in the store's metadata (`members/WS`), with a copy in
//! memory because every request a peer makes is checked against them.
//! Offers (`offer/WS`) are workspaces a peer shared with this device that it
//! has not accepted yet. Tickets (`ticket/HASH`) are keyed by the blake3 of
//! their secret, so the store never holds a usable secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mariesync_protocol::WorkspaceId;
use mariesync_protocol::membership::{Membership, Role};
use mariesync_protocol::ticket::TicketKind;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::events::EventLog;
use crate::store::{Store, StoreError};
use mariesync_protocol::ipc::event_kind;

/// Offers kept at most; the oldest go first.
const OFFERS_MAX: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Offer {
    /// The owner who offered it.
    pub from: String,
    pub name: String,
    pub membership: Membership,
    pub received_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TicketRecord {
    kind: TicketKind,
    expires_ms: u64,
    used_by: Option<String>,
}

/// What became of a membership a peer sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Updated,
    Offered,
    Unchanged,
}

pub struct Sharing {
    store: Arc<Store>,
    device_id: String,
    events: Arc<EventLog>,
    memberships: Mutex<HashMap<WorkspaceId, Membership>>,
    /// Held from reading a ticket to marking it used: two joiners
    /// presenting one secret at once cannot both get in.
    redeeming: Mutex<()>,
}

fn members_key(workspace: WorkspaceId) -> String {
    format!("members/{workspace}")
}

fn offer_key(workspace: WorkspaceId) -> String {
    format!("offer/{workspace}")
}

fn ticket_key(secret: &[u8; 16]) -> String {
    format!("ticket/{}", blake3::hash(secret).to_hex())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("in-memory records always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Record(e.to_string()))
}

impl Sharing {
    /// Loads the memberships of `workspaces`; one without a record (made
    /// before memberships existed) is owned by this device alone.
    pub fn load(
        store: Arc<Store>,
        device_id: String,
        events: Arc<EventLog>,
        workspaces: &[WorkspaceId],
    ) -> Result<Sharing, StoreError> {
        let mut memberships = HashMap::new();
        for &workspace in workspaces {
            let membership = match store.meta_get(&members_key(workspace))? {
                Some(bytes) => decode(&bytes)?,
                None => {
                    let founded = Membership::founded_by(&device_id);
                    store.meta_put(&members_key(workspace), Some(&encode(&founded)))?;
                    founded
                }
            };
            memberships.insert(workspace, membership);
        }
        Ok(Sharing {
            store,
            device_id,
            events,
            memberships: Mutex::new(memberships),
            redeeming: Mutex::new(()),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<WorkspaceId, Membership>> {
        self.memberships.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn membership(&self, workspace: WorkspaceId) -> Option<Membership> {
        self.cache().get(&workspace).cloned()
    }

    pub fn role(&self, workspace: WorkspaceId, device: &str) -> Option<Role> {
        self.cache().get(&workspace)?.role(device)
    }

    pub fn my_role(&self, workspace: WorkspaceId) -> Option<Role> {
        self.role(workspace, &self.device_id)
    }

    /// Workspaces `device` is a member of, with its role there.
    pub fn shared_with(&self, device: &str) -> Vec<(WorkspaceId, Role)> {
        self.cache()
            .iter()
            .filter_map(|(ws, m)| Some((*ws, m.role(device)?)))
            .collect()
    }

    /// Makes `membership` the one of `workspace`, durably, and tells IPC
    /// subscribers.
    pub fn set(&self, workspace: WorkspaceId, membership: Membership) -> Result<(), StoreError> {
        self.store
            .meta_put(&members_key(workspace), Some(&encode(&membership)))?;
        self.publish(workspace, &membership);
        self.cache().insert(workspace, membership);
        Ok(())
    }

    /// The membership of a workspace being added here (its
    /// `workspace_added` event tells subscribers).
    pub fn set_new(
        &self,
        workspace: WorkspaceId,
        membership: Membership,
    ) -> Result<(), StoreError> {
        self.store
            .meta_put(&members_key(workspace), Some(&encode(&membership)))?;
        self.cache().insert(workspace, membership);
        Ok(())
    }

    fn publish(&self, workspace: WorkspaceId, membership: &Membership) {
        let members: Vec<_> = membership
            .members
            .iter()
            .map(|(device, role)| json!({"device_id": device, "role": role.as_str()}))
            .collect();
        self.events.publish(
            event_kind::MEMBERSHIP_CHANGED,
            json!({
                "workspace_id": workspace.to_string(),
                "version": membership.version,
                "members": members,
            }),
        );
    }

    /// A workspace was removed here: its membership and replication
    /// progress go (a later re-add starts from scratch, not from where the
    /// old index was).
    pub fn forget(&self, workspace: WorkspaceId) -> Result<(), StoreError> {
        let mut keys = vec![members_key(workspace)];
        for (key, _) in self.store.meta_scan(&format!("progress/{workspace}/"))? {
            keys.push(key);
        }
        let removals: Vec<(&str, Option<&[u8]>)> =
            keys.iter().map(|k| (k.as_str(), None)).collect();
        self.store.meta_put_all(&removals)?;
        self.cache().remove(&workspace);
        Ok(())
    }

    pub fn offers(&self) -> Result<Vec<(WorkspaceId, Offer)>, StoreError> {
        let mut out = Vec::new();
        for (key, value) in self.store.meta_scan("offer/")? {
            let Some(id) = key
                .strip_prefix("offer/")
                .and_then(|id| id.parse::<WorkspaceId>().ok())
            else {
                continue;
            };
            out.push((id, decode(&value)?));
        }
        Ok(out)
    }

    pub fn offer(&self, workspace: WorkspaceId) -> Result<Option<Offer>, StoreError> {
        self.store
            .meta_get(&offer_key(workspace))?
            .map(|b| decode(&b))
            .transpose()
    }

    /// An offer was accepted (or made moot).
    pub fn drop_offer(&self, workspace: WorkspaceId) -> Result<(), StoreError> {
        self.store.meta_put(&offer_key(workspace), None)
    }

    /// A membership `sender` (a trusted peer) sent for `workspace`: an update
    /// if the workspace is here and the sender owns it, else an offer if it
    /// names this device and the sender as an owner.
    pub fn receive(
        &self,
        sender: &str,
        workspace: WorkspaceId,
        name: &str,
        membership: Membership,
        now_ms: u64,
    ) -> Result<Received, String> {
        for device in membership.members.keys() {
            if device.parse::<libp2p::PeerId>().is_err() {
                return Err(format!("'{device}' in the membership is not a device ID"));
            }
        }
        if let Some(current) = self.membership(workspace) {
            return match current.accepts(&membership, sender) {
                Ok(true) => {
                    self.set(workspace, membership).map_err(|e| e.to_string())?;
                    Ok(Received::Updated)
                }
                Ok(false) => Ok(Received::Unchanged),
                Err(e) => Err(e.to_string()),
            };
        }
        let Some(role) = membership.role(&self.device_id) else {
            return Ok(Received::Unchanged);
        };
        if membership.role(sender) != Some(Role::Owner) {
            return Err(format!("{sender} offered a workspace it does not own"));
        }
        if name.trim().is_empty() || name.len() > 255 {
            return Err("an offered workspace needs a name of 1 to 255 bytes".into());
        }
        if let Some(old) = self.offer(workspace).map_err(|e| e.to_string())?
            && (old.membership.version, &old.membership.author)
                >= (membership.version, &membership.author)
        {
            return Ok(Received::Unchanged);
        }
        let mut offers = self.offers().map_err(|e| e.to_string())?;
        if offers.len() >= OFFERS_MAX {
            offers.sort_by_key(|(_, o)| o.received_ms);
            let (oldest, _) = offers[0];
            self.store
                .meta_put(&offer_key(oldest), None)
                .map_err(|e| e.to_string())?;
        }
        let offer = Offer {
            from: sender.to_owned(),
            name: name.to_owned(),
            membership,
            received_ms: now_ms,
        };
        self.store
            .meta_put(&offer_key(workspace), Some(&encode(&offer)))
            .map_err(|e| e.to_string())?;
        self.events.publish(
            event_kind::WORKSPACE_OFFERED,
            json!({
                "workspace_id": workspace.to_string(),
                "name": name,
                "role": role.as_str(),
                "device_id": sender,
            }),
        );
        Ok(Received::Offered)
    }

    /// Records a new ticket and returns its secret.
    pub fn issue_ticket(&self, kind: TicketKind, expires_ms: u64) -> Result<[u8; 16], StoreError> {
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).expect("the OS provides random bytes");
        let record = TicketRecord {
            kind,
            expires_ms,
            used_by: None,
        };
        self.store
            .meta_put(&ticket_key(&secret), Some(&encode(&record)))?;
        Ok(secret)
    }

    /// Uses up a ticket for `joiner`; the reason it is refused otherwise.
    pub fn redeem_ticket(
        &self,
        secret: &[u8; 16],
        joiner: &str,
        now_ms: u64,
    ) -> Result<TicketKind, String> {
        let key = ticket_key(secret);
        let _redeeming = self.redeeming.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bytes) = self.store.meta_get(&key).map_err(|e| e.to_string())? else {
            return Err(
                "the inviting device does not know this ticket (was it made on another device?)"
                    .into(),
            );
        };
        let mut record: TicketRecord = decode(&bytes).map_err(|e| e.to_string())?;
        if let Some(user) = &record.used_by {
            return Err(format!(
                "this ticket was already used (by {}); ask for a new one",
                mariesync_protocol::sync::device_prefix(user)
            ));
        }
        if now_ms >= record.expires_ms {
            return Err(format!(
                "this ticket expired at {}; ask for a new one",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(record.expires_ms)
                )
            ));
        }
        record.used_by = Some(joiner.to_owned());
        self.store
            .meta_put(&key, Some(&encode(&record)))
            .map_err(|e| e.to_string())?;
        Ok(record.kind)
    }

    /// Whether any ticket is known: one still good, or one used or expired
    /// less than a day ago. Meanwhile unknown devices may connect (to the
    /// join protocol only), so that a late joiner is told why its ticket is
    /// refused instead of finding a closed door.
    pub fn tickets_known(&self) -> bool {
        self.store
            .meta_scan("ticket/")
            .is_ok_and(|tickets| !tickets.is_empty())
    }

    /// Drops tickets that expired or were used more than a day ago.
    pub fn prune_tickets(&self, now_ms: u64) -> Result<(), StoreError> {
        const KEEP_MS: u64 = 24 * 60 * 60 * 1000;
        let stale: Vec<String> = self
            .store
            .meta_scan("ticket/")?
            .into_iter()
            .filter(|(_, bytes)| {
                decode::<TicketRecord>(bytes)
                    .map_or(true, |t| t.expires_ms.saturating_add(KEEP_MS) < now_ms)
            })
            .map(|(key, _)| key)
            .collect();
        if !stale.is_empty() {
            let removals: Vec<(&str, Option<&[u8]>)> =
                stale.iter().map(|k| (k.as_str(), None)).collect();
            self.store.meta_put_all(&removals)?;
        }
        Ok(())
    }
}
