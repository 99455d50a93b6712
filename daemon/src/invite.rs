//! `share`, `invite` and `join`: how a workspace reaches another device.
//!
//! `share` is for a device already trusted: the owner adds it to the
//! membership and sends it an offer, which it accepts with `workspace add
//! --id`. A ticket does trust and membership in one step: `join` trusts the
//! inviter, dials it, presents the ticket's secret over the join protocol
//! (the only one an untrusted device may speak), and on success adds the
//! workspace with the membership the inviter sent back, then reconnects as
//! a trusted device.

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use mariesync_protocol::ipc::{ErrorCode, InviteParams, JoinParams, RpcError, ShareParams};
use mariesync_protocol::membership::Role;
use mariesync_protocol::ticket::{TICKET_ADDRS_MAX, Ticket, TicketKind};
use mariesync_protocol::wire::{JoinRequest, JoinResponse};
use serde_json::{Value, json};

use crate::daemon::Daemon;
use crate::network::Command;
use crate::store::PeerRecord;
use crate::workspace::{now_ms, store_rpc_error};

const TICKET_LIFETIME_MIN: Duration = Duration::from_secs(1);
const TICKET_LIFETIME_MAX: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How long `join` waits to reach the inviter.
const JOIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

fn forbidden(message: String) -> RpcError {
    RpcError::new(ErrorCode::Forbidden, message)
}

fn ticket_refused(message: String) -> RpcError {
    RpcError::new(ErrorCode::TicketRefused, message)
}

fn invalid(message: String) -> RpcError {
    RpcError::new(ErrorCode::InvalidParams, message)
}

impl Daemon {
    /// The workspace `text` names, checked to be owned by this device.
    fn owned_workspace(
        &self,
        text: &str,
        what: &str,
    ) -> Result<(u32, mariesync_protocol::WorkspaceId), RpcError> {
        let shared = self.resolve_workspace(text)?;
        let this_device = match self.sharing.my_role(shared.1) {
            Some(Role::Owner) => return Ok(shared),
            Some(Role::Editor) => "an editor",
            Some(Role::Viewer) => "a viewer",
            None => "not a member",
        };
        Err(forbidden(format!(
            "only an owner can {what} workspace '{text}'; this device is {this_device}"
        )))
    }

    pub(crate) fn share(self: &Arc<Self>, p: ShareParams) -> Result<Value, RpcError> {
        let role: Role = p.role.parse().map_err(invalid)?;
        let (_, workspace) = self.owned_workspace(&p.workspace, "share")?;
        let peer: PeerId = p
            .device_id
            .parse()
            .map_err(|_| invalid(format!("'{}' is not a device ID", p.device_id)))?;
        if p.device_id == self.device_id {
            return Err(invalid("that is this device's own ID".into()));
        }
        let trusted = self
            .store
            .peer(&p.device_id)
            .map_err(|e| store_rpc_error(&e))?;
        if trusted.is_none() {
            return Err(invalid(format!(
                "{} is not a trusted device; run `mariesync peer add {}` first (or use `mariesync invite`)",
                p.device_id, p.device_id
            )));
        }
        let current = self
            .sharing
            .membership(workspace)
            .ok_or_else(|| forbidden(format!("workspace '{}' has no membership", p.workspace)))?;
        let next = current
            .with_member(&self.device_id, &p.device_id, role)
            .map_err(|e| forbidden(e.to_string()))?;
        self.sharing
            .set(workspace, next)
            .map_err(|e| store_rpc_error(&e))?;
        if let Some(replicator) = self.replicator.get() {
            replicator.push_membership(self, workspace);
            // A new writer may already have something for us.
            if role.can_write() {
                replicator.clone().pull(workspace, peer);
            }
        }
        Ok(json!({
            "workspace_id": workspace.to_string(),
            "device_id": p.device_id,
            "role": role.as_str(),
        }))
    }

    pub(crate) fn invite(self: &Arc<Self>, p: InviteParams) -> Result<Value, RpcError> {
        let lifetime = match p.expires.as_deref() {
            None => Duration::from_secs(24 * 60 * 60),
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| invalid(format!("--expires '{text}': {e}")))?,
        };
        if !(TICKET_LIFETIME_MIN..=TICKET_LIFETIME_MAX).contains(&lifetime) {
            return Err(invalid(
                "a ticket lasts between 1 second and 30 days".into(),
            ));
        }
        if p.device {
            if p.workspace.is_some() || p.role.is_some() {
                return Err(invalid(
                    "a device ticket names no workspace nor role: the device gets the settings of this user".into(),
                ));
            }
            let ticket = self.issue(TicketKind::Device, lifetime)?;
            return Ok(json!({
                "ticket": ticket.encode(),
                "expires": crate::daemon::format_time(ticket.expires_ms),
            }));
        }
        let text = p
            .workspace
            .ok_or_else(|| invalid("name the workspace to invite into".into()))?;
        let role: Role = p
            .role
            .as_deref()
            .unwrap_or("editor")
            .parse()
            .map_err(invalid)?;
        if role == Role::Owner {
            return Err(invalid(
                "a ticket grants editor or viewer; make an owner with `mariesync share --role owner`"
                    .into(),
            ));
        }
        let (_, workspace) = self.owned_workspace(&text, "invite into")?;
        let name = self.workspace_name(workspace).unwrap_or_default();
        let kind = TicketKind::Workspace {
            workspace,
            name,
            role,
        };
        let ticket = self.issue(kind, lifetime)?;
        Ok(json!({
            "ticket": ticket.encode(),
            "workspace_id": workspace.to_string(),
            "role": role.as_str(),
            "expires": crate::daemon::format_time(ticket.expires_ms),
        }))
    }

    /// Records a new ticket and opens the gate for its holder.
    fn issue(&self, kind: TicketKind, lifetime: Duration) -> Result<Ticket, RpcError> {
        let network = self
            .network
            .get()
            .ok_or_else(|| RpcError::new(ErrorCode::ShuttingDown, "the network is not running"))?;
        let addrs: Vec<String> = network.snapshot(|s| {
            s.listen_addrs
                .iter()
                .take(TICKET_ADDRS_MAX)
                .map(|a| a.to_string())
                .collect()
        });
        if addrs.is_empty() {
            return Err(RpcError::new(
                ErrorCode::PeerUnreachable,
                "this device listens on no address yet; a ticket would lead nowhere",
            ));
        }
        let expires_ms = now_ms() + lifetime.as_millis() as u64;
        let secret = self
            .sharing
            .issue_ticket(kind.clone(), expires_ms)
            .map_err(|e| store_rpc_error(&e))?;
        network.send(Command::AdmitGuests(true));
        Ok(Ticket {
            device_id: self.device_id.clone(),
            device_name: crate::network::host_name(),
            addrs,
            secret,
            expires_ms,
            kind,
        })
    }

    /// Opens the gate to unknown devices while tickets are known.
    pub(crate) fn update_gate(&self) {
        let open = self.sharing.tickets_known();
        if let Some(network) = self.network.get() {
            network.send(Command::AdmitGuests(open));
        }
    }

    /// The inviter's side of a join: checks and uses up the ticket, trusts
    /// the joiner and makes it a member.
    pub(crate) fn admit_joiner(
        self: &Arc<Self>,
        peer: PeerId,
        secret: &[u8; 16],
        name: &str,
    ) -> Result<JoinResponse, String> {
        let joiner = peer.to_string();
        let kind = self.sharing.redeem_ticket(secret, &joiner, now_ms())?;
        self.update_gate();
        let (workspace, role) = match kind {
            TicketKind::Workspace {
                workspace, role, ..
            } => (workspace, role),
            TicketKind::Device => {
                self.trust_joiner(peer, name)?;
                self.settings
                    .add_device(&joiner, name)
                    .map_err(|e| e.message)?;
                tracing::info!(%peer, "a device joined this device's group");
                self.events.publish(
                    mariesync_protocol::ipc::event_kind::DEVICE_JOINED,
                    json!({"device_id": joiner, "name": name}),
                );
                return Ok(JoinResponse::Joined { workspace: None });
            }
        };
        let current = self
            .sharing
            .membership(workspace)
            .ok_or("the invited workspace is no longer shared by this device")?;
        let next = current
            .with_member(&self.device_id, &joiner, role)
            .map_err(|e| e.to_string())?;
        // Trust first: a crash after it leaves a trusted device that is not
        // a member, which can read nothing.
        self.trust_joiner(peer, name)?;
        self.sharing
            .set(workspace, next.clone())
            .map_err(|e| e.to_string())?;
        if let Some(replicator) = self.replicator.get() {
            replicator.push_membership(self, workspace);
        }
        tracing::info!(%peer, %workspace, %role, "a device joined with a ticket");
        let name = self.workspace_name(workspace).unwrap_or_default();
        Ok(JoinResponse::Joined {
            workspace: Some((workspace, name, next)),
        })
    }

    fn trust_joiner(&self, peer: PeerId, name: &str) -> Result<(), String> {
        let joiner = peer.to_string();
        let mut record = self
            .store
            .peer(&joiner)
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| PeerRecord::new(String::new(), now_ms()));
        if record.name.is_empty() {
            record.name = name.to_owned();
        }
        self.store
            .put_peer(&joiner, &record)
            .map_err(|e| e.to_string())?;
        if let Some(network) = self.network.get() {
            network.send(Command::Trust {
                peer,
                addrs: Vec::new(),
            });
        }
        Ok(())
    }

    pub(crate) async fn join(self: &Arc<Self>, p: JoinParams) -> Result<Value, RpcError> {
        let ticket = Ticket::decode(&p.ticket).map_err(|e| ticket_refused(e.to_string()))?;
        if ticket.device_id == self.device_id {
            return Err(ticket_refused(
                "this ticket was made by this very device".into(),
            ));
        }
        let target = match ticket.kind.clone() {
            TicketKind::Workspace {
                workspace,
                name,
                role,
            } => {
                let path = p.path.clone().ok_or_else(|| {
                    invalid("a workspace ticket needs the PATH to sync into".into())
                })?;
                if self.workspace_number(workspace).is_some() {
                    return Err(RpcError::new(
                        ErrorCode::WorkspaceExists,
                        format!("workspace {workspace} is already added here"),
                    ));
                }
                Some((workspace, name, role, path))
            }
            TicketKind::Device => {
                if p.path.is_some() {
                    return Err(invalid(
                        "a device ticket joins a device group and takes no PATH".into(),
                    ));
                }
                None
            }
        };
        let inviter: PeerId = ticket
            .device_id
            .parse()
            .map_err(|_| ticket_refused("the ticket names no valid device".into()))?;
        let network = self
            .network
            .get()
            .ok_or_else(|| RpcError::new(ErrorCode::ShuttingDown, "the network is not running"))?
            .clone();
        // Like `git clone`: the folder may not exist yet. Checked fully
        // (overlaps, home) when the workspace is created.
        let mut created_dir = None;
        if let Some((_, _, _, path)) = &target {
            if !std::path::Path::new(path).exists() {
                created_dir = Some(path.clone());
            }
            std::fs::create_dir_all(path).map_err(|e| {
                RpcError::new(ErrorCode::InvalidPath, format!("cannot create {path}: {e}"))
            })?;
        }

        // Trust the inviter, remembering whether it already was.
        let addrs: Vec<Multiaddr> = ticket.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let this = self.clone();
        let (inviter_id, inviter_name) = (ticket.device_id.clone(), ticket.device_name.clone());
        let addr_texts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let was_trusted = tokio::task::spawn_blocking(move || -> Result<bool, RpcError> {
            let existing = this
                .store
                .peer(&inviter_id)
                .map_err(|e| store_rpc_error(&e))?;
            let was_trusted = existing.is_some();
            let mut record = existing.unwrap_or_else(|| PeerRecord::new(inviter_name, now_ms()));
            for addr in addr_texts {
                record.add_addr(addr);
            }
            this.store
                .put_peer(&inviter_id, &record)
                .map_err(|e| store_rpc_error(&e))?;
            Ok(was_trusted)
        })
        .await
        .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??;
        network.send(Command::Trust {
            peer: inviter,
            addrs,
        });

        let joined = match target {
            Some((workspace, name, role, path)) => {
                self.join_inviter(&network, inviter, &ticket, workspace, name, role, path)
                    .await
            }
            None => self.join_group(&network, inviter, &ticket).await,
        };
        match &joined {
            // Reconnect, so that the inviter, which trusts us now, admits us
            // with the sync protocol.
            Ok(_) => network.send(Command::Redial { peer: inviter }),
            // Nothing changed here: no trust, no folder.
            Err(_) => {
                if !was_trusted {
                    let _ = self.store.remove_peer(&inviter.to_string());
                    network.send(Command::Distrust { peer: inviter });
                }
                if let Some(path) = created_dir {
                    let _ = std::fs::remove_dir(&path);
                }
            }
        }
        joined
    }

    /// Presents the ticket's secret to the (now trusted) inviter.
    async fn present(
        &self,
        network: &crate::network::Network,
        inviter: PeerId,
        ticket: &Ticket,
    ) -> Result<JoinResponse, RpcError> {
        let request = JoinRequest {
            secret: ticket.secret,
            device_name: crate::network::host_name(),
        };
        let unreachable = |why: String| {
            RpcError::new(
                ErrorCode::PeerUnreachable,
                format!("the inviting device {why} at {}", ticket.addrs.join(", ")),
            )
        };
        match tokio::time::timeout(JOIN_CONNECT_TIMEOUT, network.join(inviter, request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(unreachable(format!("cannot be reached ({e})"))),
            Err(_) => Err(unreachable(format!(
                "did not answer within {}s",
                JOIN_CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Joins the inviter's device group: the settings documents merge at
    /// the first sync, this device's own settings kept as a version.
    async fn join_group(
        self: &Arc<Self>,
        network: &crate::network::Network,
        inviter: PeerId,
        ticket: &Ticket,
    ) -> Result<Value, RpcError> {
        match self.present(network, inviter, ticket).await? {
            JoinResponse::Joined { workspace: None } => {}
            JoinResponse::Joined { workspace: Some(_) } => {
                return Err(ticket_refused(
                    "the inviter's answer does not match its ticket".into(),
                ));
            }
            JoinResponse::Refused { message } => return Err(ticket_refused(message)),
        }
        let this = self.clone();
        let (id, name) = (ticket.device_id.clone(), ticket.device_name.clone());
        tokio::task::spawn_blocking(move || {
            this.settings.mark_premerge()?;
            this.settings.add_device(&id, &name)
        })
        .await
        .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??;
        Ok(json!({
            "device_id": ticket.device_id,
            "name": ticket.device_name,
            "group": true,
        }))
    }

    /// Presents the ticket to the (now trusted) inviter and, welcomed, adds
    /// the workspace at `path`.
    #[allow(clippy::too_many_arguments)]
    async fn join_inviter(
        self: &Arc<Self>,
        network: &crate::network::Network,
        inviter: PeerId,
        ticket: &Ticket,
        workspace: mariesync_protocol::WorkspaceId,
        name: String,
        role: Role,
        path: String,
    ) -> Result<Value, RpcError> {
        let answer = self.present(network, inviter, ticket).await?;
        let (joined, joined_name, membership) = match answer {
            JoinResponse::Joined {
                workspace: Some(joined),
            } => joined,
            JoinResponse::Joined { workspace: None } => {
                return Err(ticket_refused("the inviter sent no workspace".into()));
            }
            JoinResponse::Refused { message } => return Err(ticket_refused(message)),
        };
        if joined != workspace
            || membership.role(&self.device_id) != Some(role)
            || membership.role(&ticket.device_id) != Some(Role::Owner)
        {
            return Err(ticket_refused(
                "the inviter's answer does not match its ticket".into(),
            ));
        }
        let name = if joined_name.trim().is_empty() {
            name
        } else {
            joined_name
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // A name taken here falls back to the folder's name.
            let taken = this
                .store
                .workspaces()
                .map(|all| all.iter().any(|(_, r)| r.name == name))
                .unwrap_or(false);
            let name = if taken { None } else { Some(name) };
            this.create_workspace(&path, name, workspace, membership)
        })
        .await
        .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?
    }

    /// Remembers addresses a trusted peer announced, for the next start.
    pub(crate) fn remember_addrs(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let id = peer.to_string();
        let Ok(Some(mut record)) = self.store.peer(&id) else {
            return;
        };
        let mut changed = false;
        for addr in addrs {
            if record.addrs.len() < TICKET_ADDRS_MAX {
                changed |= record.add_addr(addr.to_string());
            }
        }
        if changed && let Err(e) = self.store.put_peer(&id, &record) {
            tracing::warn!(%peer, "cannot remember the peer's addresses: {e}");
        }
    }
}
