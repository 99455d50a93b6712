//! Invitation tickets: one line a user can paste in a chat.
//!
//! A ticket names the inviting device and where to dial it, and carries a
//! random secret. Only the inviter knows whether the secret is still good
//! (unused and unexpired): the joiner dials the inviter and presents it.
//! Text form: `mariesync1-` then lowercase base32 of the postcard-encoded
//! ticket followed by the first four bytes of its blake3 hash, so a mangled
//! paste is reported as damaged rather than as an unknown ticket.

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

use crate::WorkspaceId;
use crate::membership::Role;

const PREFIX: &str = "mariesync1-";
const CHECK_BYTES: usize = 4;
/// A ticket's text is at most this long (a pasted novel is not a ticket).
pub const TICKET_TEXT_MAX: usize = 4096;
/// Addresses a ticket carries at most.
pub const TICKET_ADDRS_MAX: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The inviting device.
    pub device_id: String,
    pub device_name: String,
    /// Where to dial it (multiaddrs, as text).
    pub addrs: Vec<String>,
    pub secret: [u8; 16],
    /// Milliseconds since the Unix epoch; the inviter enforces it.
    pub expires_ms: u64,
    pub kind: TicketKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketKind {
    /// Join a workspace with a role.
    Workspace {
        workspace: WorkspaceId,
        name: String,
        role: Role,
    },
    /// Join the inviter's device group (settings sync).
    Device,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("this is not a MarieSync ticket (it should start with '{PREFIX}')")]
    NotATicket,
    #[error("the ticket is damaged (was it cut or changed when pasted?)")]
    Damaged,
    #[error("the ticket is too long")]
    TooLong,
}

impl Ticket {
    pub fn encode(&self) -> String {
        let mut bytes = postcard::to_stdvec(self).expect("tickets always serialize");
        let check = blake3::hash(&bytes);
        bytes.extend_from_slice(&check.as_bytes()[..CHECK_BYTES]);
        format!(
            "{PREFIX}{}",
            BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
        )
    }

    pub fn decode(text: &str) -> Result<Ticket, TicketError> {
        let text = text.trim();
        if text.len() > TICKET_TEXT_MAX {
            return Err(TicketError::TooLong);
        }
        let body = text.strip_prefix(PREFIX).ok_or(TicketError::NotATicket)?;
        let bytes = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TicketError::Damaged)?;
        if bytes.len() < CHECK_BYTES {
            return Err(TicketError::Damaged);
        }
        let (payload, check) = bytes.split_at(bytes.len() - CHECK_BYTES);
        if blake3::hash(payload).as_bytes()[..CHECK_BYTES] != *check {
            return Err(TicketError::Damaged);
        }
        let ticket: Ticket = postcard::from_bytes(payload).map_err(|_| TicketError::Damaged)?;
        if ticket.addrs.len() > TICKET_ADDRS_MAX {
            return Err(TicketError::Damaged);
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ticket {
        Ticket {
            device_id: "12D3KooWExample".into(),
            device_name: "laptop".into(),
            addrs: vec!["/ip4/192.168.1.2/tcp/4001".into()],
            secret: [7; 16],
            expires_ms: 1_700_000_000_000,
            kind: TicketKind::Workspace {
                workspace: WorkspaceId::from_random([1; 16]),
                name: "app".into(),
                role: Role::Editor,
            },
        }
    }

    #[test]
    fn round_trip_one_line() {
        let text = sample().encode();
        assert!(text.starts_with(PREFIX));
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(Ticket::decode(&format!("  {text}\n")), Ok(sample()));
        assert_eq!(
            Ticket::decode(&text.to_ascii_uppercase().replace("MARIESYNC1-", PREFIX)),
            Ok(sample())
        );
    }

    #[test]
    fn damage_is_reported() {
        let text = sample().encode();
        assert_eq!(Ticket::decode("hello"), Err(TicketError::NotATicket));
        assert_eq!(
            Ticket::decode(&text[..text.len() - 3]),
            Err(TicketError::Damaged)
        );
        let mut flipped = text.into_bytes();
        let i = flipped.len() / 2;
        flipped[i] = if flipped[i] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            Ticket::decode(std::str::from_utf8(&flipped).unwrap()),
            Err(TicketError::Damaged)
        );
    }
}
