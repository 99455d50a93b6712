//! Who gets in, and to what: the first two pieces of the node's behaviour.
//!
//! [`Gate`] admits a connection after the handshake proved the remote key:
//! always for a trusted device, and for an unknown one only while this
//! device knows of an invitation (good, or used or expired less than a day
//! ago; a few such devices at a time), so a joiner can present its ticket
//! and hear why it is refused. [`TrustedOnly`] wraps the sync protocol: on a
//! connection with a device that is not trusted it installs a handler that
//! speaks no protocol at all, so such a device's sync streams are refused by
//! protocol negotiation and not one of its sync messages is ever read.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{PeerId, swarm::handler::ConnectionHandler};

/// Connections with untrusted devices (joiners) open at once at most.
pub const GUESTS_MAX: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("{0} is not a trusted device")]
struct NotTrusted(PeerId);

#[derive(Default)]
pub struct Gate {
    trusted: HashSet<PeerId>,
    admit_guests: bool,
    guests: HashMap<ConnectionId, PeerId>,
}

impl Gate {
    pub fn set_trusted(&mut self, peer: PeerId, trusted: bool) {
        if trusted {
            self.trusted.insert(peer);
        } else {
            self.trusted.remove(&peer);
        }
    }

    /// Whether unknown devices may connect (to present a ticket).
    pub fn admit_guests(&mut self, admit: bool) {
        self.admit_guests = admit;
    }

    pub fn is_trusted(&self, peer: &PeerId) -> bool {
        self.trusted.contains(peer)
    }

    fn admit(&mut self, connection: ConnectionId, peer: PeerId) -> Result<(), ConnectionDenied> {
        if self.trusted.contains(&peer) {
            return Ok(());
        }
        if self.admit_guests && self.guests.len() < GUESTS_MAX {
            self.guests.insert(connection, peer);
            return Ok(());
        }
        Err(ConnectionDenied::new(NotTrusted(peer)))
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit(connection, peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit(connection, peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = event {
            self.guests.remove(&closed.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// `B` on connections with trusted devices, nothing on the others.
pub struct TrustedOnly<B> {
    pub inner: B,
    trusted: HashSet<PeerId>,
    /// Connections given the empty handler; `B` never hears of them.
    shut: HashSet<ConnectionId>,
}

impl<B> TrustedOnly<B> {
    pub fn new(inner: B) -> Self {
        TrustedOnly {
            inner,
            trusted: HashSet::new(),
            shut: HashSet::new(),
        }
    }

    pub fn set_trusted(&mut self, peer: PeerId, trusted: bool) {
        if trusted {
            self.trusted.insert(peer);
        } else {
            self.trusted.remove(&peer);
        }
    }
}

use either::Either;

impl<B: NetworkBehaviour> NetworkBehaviour for TrustedOnly<B>
where
    THandler<B>: ConnectionHandler,
{
    type ConnectionHandler = Either<THandler<B>, dummy::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !self.trusted.contains(&peer) {
            self.shut.insert(connection);
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        self.inner
            .handle_established_inbound_connection(connection, peer, local, remote)
            .map(Either::Left)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: Option<PeerId>,
        addrs: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(connection, peer, addrs, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !self.trusted.contains(&peer) {
            self.shut.insert(connection);
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        self.inner
            .handle_established_outbound_connection(connection, peer, addr, role, port_use)
            .map(Either::Left)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let shut = match &event {
            FromSwarm::ConnectionEstablished(e) => self.shut.contains(&e.connection_id),
            FromSwarm::AddressChange(e) => self.shut.contains(&e.connection_id),
            FromSwarm::ConnectionClosed(e) => self.shut.remove(&e.connection_id),
            _ => false,
        };
        if !shut {
            self.inner.on_swarm_event(event);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(event) => self
                .inner
                .on_connection_handler_event(peer, connection, event),
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx).map(|e| e.map_in(Either::Left))
    }
}
