//! The device's libp2p node: QUIC and TCP (noise, yamux), identify, ping,
//! mDNS, and MarieSync's sync protocol.
//!
//! **Architecture Invariant:** an untrusted device never gets a sync message
//! read. The gate comes first in [`Behaviour`] (hooks run in field order)
//! and denies every connection with a device that is not trusted, right
//! after the handshake proves its key, except while an invitation is
//! outstanding: then a few unknown devices may connect, and on their
//! connections only the join protocol (one small, size-limited message: a
//! ticket's secret) is spoken; the sync protocol is not even negotiated
//! ([`crate::gate::TrustedOnly`]). mDNS only ever leads to dialing trusted
//! devices.
//!
//! One task owns the swarm; the rest of the daemon talks to it through
//! [`Network`] (commands in, a shared snapshot of its state out).

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, identify, mdns, noise, ping,
    request_response, tcp, yamux,
};
use mariesync_protocol::wire::{
    self, JOIN_FRAME_BYTES_MAX, JOIN_PROTOCOL, JoinRequest, JoinResponse, PROTOCOL_VERSION,
    Request, Response, SYNC_PROTOCOL, WIRE_FRAME_BYTES_MAX,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::events::EventLog;
use crate::gate::{Gate, TrustedOnly};

/// LAN devices remembered from mDNS at most.
const DISCOVERED_PEERS_MAX: usize = 256;
/// Connections kept to one peer at most (QUIC and TCP may both succeed).
const CONNECTIONS_PER_PEER_MAX: u32 = 2;
const CONNECTIONS_INCOMING_MAX: u32 = 128;
const CONNECTIONS_PENDING_MAX: u32 = 32;
/// Reconnection attempts back off from the first to the last delay.
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
const RECONNECT_LAST: Duration = Duration::from_secs(60);
/// Connections to trusted peers stay open while idle.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A frame being read must keep coming: at least this many bytes (or its
/// length prefix) within this time, i.e. 6.4 KB/s at the slowest.
const STALL_BYTES: usize = 64 * 1024;
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a peer sends are read concurrently (libp2p allows 100 streams
/// per connection), but those above [`BUDGETED_FRAME_BYTES`] only within
/// one budget for all peers, taken for the whole frame before its body is
/// read: a peer opening a hundred streams of 8 MiB each costs this much
/// memory, not 800 MiB. Nearly every request is small (announcements,
/// index and chunk requests) and never waits for it; only pushed changes
/// and large settings messages do.
const REQUEST_BYTES_BUDGET: usize = 64 * 1024 * 1024;
const BUDGETED_FRAME_BYTES: usize = 64 * 1024;
static REQUEST_BUDGET: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(REQUEST_BYTES_BUDGET / 1024);
const _: () = assert!(WIRE_FRAME_BYTES_MAX <= REQUEST_BYTES_BUDGET);
/// Requests in flight to one peer at most. libp2p counts a connection's
/// streams both ways against its limit (100) and fails what goes beyond:
/// two devices sharing dozens of workspaces pulled them all at once and
/// saw their requests fail with "max sub-streams reached". Below half the
/// limit on each side, neither ever reaches it.
const REQUESTS_PER_PEER_MAX: usize = 32;
const _: () = assert!(2 * REQUESTS_PER_PEER_MAX < STREAMS_PER_CONNECTION_MAX);
const STREAMS_PER_CONNECTION_MAX: usize = 100;
/// A connection with an untrusted device (a joiner) is closed after this.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Addresses remembered per peer at most.
const ADDRS_PER_PEER_MAX: usize = 16;

pub const EVENT_PEER_CONNECTED: &str = "peer_connected";
pub const EVENT_PEER_DISCONNECTED: &str = "peer_disconnected";

type SyncCodec = FrameCodec<Request, Response, WIRE_FRAME_BYTES_MAX>;
type JoinCodec = FrameCodec<JoinRequest, JoinResponse, JOIN_FRAME_BYTES_MAX>;

#[derive(NetworkBehaviour)]
struct Behaviour {
    // Gatekeepers first.
    gate: Gate,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    sync: TrustedOnly<request_response::Behaviour<SyncCodec>>,
    join: request_response::Behaviour<JoinCodec>,
}

pub struct Options {
    pub listen: Vec<Multiaddr>,
    pub mdns: bool,
    pub device_name: String,
}

/// The default listen addresses: QUIC and TCP, all interfaces, OS ports.
pub fn default_listen_addrs() -> Vec<Multiaddr> {
    ["/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0"]
        .iter()
        .map(|a| a.parse().expect("valid default multiaddr"))
        .collect()
}

/// What the rest of the daemon can see of the node.
#[derive(Default)]
pub struct State {
    pub listen_addrs: Vec<Multiaddr>,
    /// Connected peers and the address of their first connection.
    pub connected: BTreeMap<PeerId, Multiaddr>,
    /// Names peers gave in their hello.
    pub names: HashMap<PeerId, String>,
}

pub enum Command {
    Trust {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Distrust {
        peer: PeerId,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, String>>,
    },
    Respond {
        channel: request_response::ResponseChannel<Outgoing<Response>>,
        response: Outgoing<Response>,
    },
    /// Whether unknown devices may connect to present a ticket.
    AdmitGuests(bool),
    /// Presents a ticket's secret to `peer` (which must be trusted here).
    Join {
        peer: PeerId,
        request: JoinRequest,
        reply: oneshot::Sender<Result<JoinResponse, String>>,
    },
    JoinRespond {
        channel: request_response::ResponseChannel<Outgoing<JoinResponse>>,
        response: JoinResponse,
    },
    /// Closes the connections with `peer` and dials it again at once (after
    /// a join, so that the other side admits us fully).
    Redial {
        peer: PeerId,
    },
    /// Closes the connections with a peer that broke the protocol.
    Disconnect {
        peer: PeerId,
        reason: String,
    },
}

/// What the node hands to the daemon.
pub enum NetEvent {
    PeerUp(PeerId),
    PeerDown(PeerId),
    /// A request from a trusted peer; answer with [`Command::Respond`].
    Request {
        peer: PeerId,
        request: Request,
        channel: request_response::ResponseChannel<Outgoing<Response>>,
    },
    /// A device presents a ticket; answer with [`Command::JoinRespond`].
    JoinRequest {
        peer: PeerId,
        request: JoinRequest,
        channel: request_response::ResponseChannel<Outgoing<JoinResponse>>,
    },
    /// Where a trusted peer says it listens (to be remembered).
    Addresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
}

#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    pub state: Arc<Mutex<State>>,
    /// Permits for requests in flight, per peer ([`REQUESTS_PER_PEER_MAX`]).
    in_flight: Arc<Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>>,
}

impl Network {
    pub fn send(&self, command: Command) {
        if self.commands.try_send(command).is_err() {
            tracing::warn!("the network task is busy or gone; a peer command was dropped");
        }
    }

    /// Closes the connections with `peer`, which broke the protocol for
    /// `reason`; gives `reason` back, for the caller's error.
    pub fn cut_off(&self, peer: PeerId, reason: String) -> String {
        self.send(Command::Disconnect {
            peer,
            reason: reason.clone(),
        });
        reason
    }

    /// Sends the command `make` builds around a reply channel, and waits
    /// for the reply.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, String> {
        const GONE: &str = "the network task is gone";
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| GONE.to_string())?;
        answer.await.map_err(|_| GONE.to_string())?
    }

    /// Sends `request` to `peer` and waits for its answer; waits first while
    /// [`REQUESTS_PER_PEER_MAX`] requests to it are in flight.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, String> {
        let permits = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(REQUESTS_PER_PEER_MAX)))
            .clone();
        let _permit = permits
            .acquire_owned()
            .await
            .map_err(|_| "the network is shutting down".to_string())?;
        self.ask(|reply| Command::Request {
            peer,
            request,
            reply,
        })
        .await
    }

    /// Presents a ticket to `peer` (trusted here, so it is dialed) and
    /// waits for its answer.
    pub async fn join(&self, peer: PeerId, request: JoinRequest) -> Result<JoinResponse, String> {
        self.ask(|reply| Command::Join {
            peer,
            request,
            reply,
        })
        .await
    }

    pub async fn respond_join(
        &self,
        channel: request_response::ResponseChannel<Outgoing<JoinResponse>>,
        response: JoinResponse,
    ) {
        let _ = self
            .commands
            .send(Command::JoinRespond { channel, response })
            .await;
    }

    pub async fn respond(
        &self,
        channel: request_response::ResponseChannel<Outgoing<Response>>,
        response: Outgoing<Response>,
    ) {
        let _ = self
            .commands
            .send(Command::Respond { channel, response })
            .await;
    }

    pub fn snapshot<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Builds the node, starts listening and spawns its task on the current
/// tokio runtime.
pub fn start(
    keypair: libp2p::identity::Keypair,
    options: Options,
    trusted: Vec<(PeerId, Vec<Multiaddr>)>,
    events: Arc<EventLog>,
    net_events: mpsc::Sender<NetEvent>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Network> {
    let local = keypair.public().to_peer_id();
    let mdns_enabled = options.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_dns()?
        .with_behaviour(|key| {
            let mdns = if mdns_enabled {
                match mdns::tokio::Behaviour::new(mdns::Config::default(), local) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!("LAN discovery (mDNS) is unavailable: {e}");
                        None
                    }
                }
            } else {
                None
            };
            Ok(Behaviour {
                gate: Gate::default(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX))
                        .with_max_established_incoming(Some(CONNECTIONS_INCOMING_MAX))
                        .with_max_pending_incoming(Some(CONNECTIONS_PENDING_MAX))
                        .with_max_pending_outgoing(Some(CONNECTIONS_PENDING_MAX)),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    format!("/mariesync/{PROTOCOL_VERSION}"),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                mdns: Toggle::from(mdns),
                sync: TrustedOnly::new(request_response::Behaviour::with_codec(
                    SyncCodec::default(),
                    [(
                        StreamProtocol::new(SYNC_PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(STREAMS_PER_CONNECTION_MAX),
                )),
                join: request_response::Behaviour::with_codec(
                    JoinCodec::default(),
                    [(
                        StreamProtocol::new(JOIN_PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default().with_request_timeout(GUEST_TIMEOUT),
                ),
            })
        })?
        .with_swarm_config(|c| {
            // Every stream we open proposes one protocol, which a trusted
            // peer speaks: its first message goes out with the proposal
            // instead of a round trip later (multistream-select's lazy
            // mode). A refused proposal fails the request as before, on
            // its first read.
            c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    for addr in &options.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    }
    let (commands, receiver) = mpsc::channel(256);
    let state = Arc::new(Mutex::new(State::default()));
    let mut node = Node {
        swarm,
        state: state.clone(),
        events,
        device_name: options.device_name,
        known: HashMap::new(),
        backoff: HashMap::new(),
        pending: HashMap::new(),
        pending_joins: HashMap::new(),
        waiting_joins: HashMap::new(),
        guests: HashMap::new(),
        discovered: HashMap::new(),
        net_events,
    };
    for (peer, addrs) in trusted {
        node.trust(peer, addrs);
    }
    tokio::spawn(node.run(receiver, shutdown));
    Ok(Network {
        commands,
        state,
        in_flight: Arc::default(),
    })
}

type WaitingJoin = (JoinRequest, oneshot::Sender<Result<JoinResponse, String>>);

struct Node {
    swarm: Swarm<Behaviour>,
    state: Arc<Mutex<State>>,
    events: Arc<EventLog>,
    device_name: String,
    /// Trusted peers and where they were last seen or said to be.
    known: HashMap<PeerId, Vec<Multiaddr>>,
    /// When each disconnected trusted peer is dialed next, and the delay after.
    backoff: HashMap<PeerId, (Instant, Duration)>,
    /// Devices mDNS found on the LAN, trusted or not (never dialed unless
    /// trusted): a device trusted later is then dialed at once.
    discovered: HashMap<PeerId, Vec<Multiaddr>>,
    /// Outbound requests waiting for their answer.
    pending:
        HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Response, String>>>,
    pending_joins:
        HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<JoinResponse, String>>>,
    /// Tickets to present to trusted peers once connected.
    waiting_joins: HashMap<PeerId, Vec<WaitingJoin>>,
    /// Untrusted devices connected to present a ticket, and since when.
    guests: HashMap<PeerId, Instant>,
    net_events: mpsc::Sender<NetEvent>,
}

impl Node {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = commands.recv() => match command {
                    Some(Command::Trust { peer, addrs }) => self.trust(peer, addrs),
                                        Some(Command::Distrust { peer }) => self.distrust(peer),
                    Some(Command::Request { peer, request, reply }) => {
                        let id = self.swarm.behaviour_mut().sync.inner.send_request(&peer, Framed::Message(request));
                        self.pending.insert(id, reply);
                    }
                    Some(Command::Respond { channel, response }) => {
                        let _ = self.swarm.behaviour_mut().sync.inner.send_response(channel, response);
                    }
                    Some(Command::AdmitGuests(admit)) => {
                        self.swarm.behaviour_mut().gate.admit_guests(admit);
                    }
                    Some(Command::Join { peer, request, reply }) => {
                        if self.is_connected(&peer) {
                            self.send_join(peer, request, reply);
                        } else {
                            // Sent once connected: a request to a peer not
                            // connected would dial it without its addresses.
                            self.waiting_joins.entry(peer).or_default().push((request, reply));
                            let addrs = self.known.get(&peer).cloned().unwrap_or_default();
                            self.dial(peer, addrs);
                        }
                    }
                    Some(Command::JoinRespond { channel, response }) => {
                        let _ = self.swarm.behaviour_mut().join.send_response(channel, Outgoing::Message(response));
                    }
                    Some(Command::Disconnect { peer, reason }) => self.drop_offender(peer, &reason),
                    Some(Command::Redial { peer }) => {
                        let _ = self.swarm.disconnect_peer_id(peer);
                        self.backoff.insert(peer, (Instant::now(), RECONNECT_FIRST));
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    self.reconnect();
                    self.close_stale_guests();
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.swarm.is_connected(peer)
    }

    fn send_join(
        &mut self,
        peer: PeerId,
        request: JoinRequest,
        reply: oneshot::Sender<Result<JoinResponse, String>>,
    ) {
        let id = self
            .swarm
            .behaviour_mut()
            .join
            .send_request(&peer, Framed::Message(request));
        self.pending_joins.insert(id, reply);
    }

    fn set_trusted(&mut self, peer: PeerId, trusted: bool) {
        let behaviour = self.swarm.behaviour_mut();
        behaviour.gate.set_trusted(peer, trusted);
        behaviour.sync.set_trusted(peer, trusted);
    }

    fn is_trusted(&self, peer: &PeerId) -> bool {
        self.swarm.behaviour().gate.is_trusted(peer)
    }

    /// A peer sent something malformed or false: its connections close
    /// (it may come back, and is served again, but gets nothing it sends
    /// wrong accepted).
    fn drop_offender(&mut self, peer: PeerId, reason: &str) {
        tracing::warn!(%peer, "closing the connection with a peer that broke the protocol: {reason}");
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn close_stale_guests(&mut self) {
        let now = Instant::now();
        let stale: Vec<PeerId> = self
            .guests
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > GUEST_TIMEOUT)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in stale {
            tracing::debug!(%peer, "closing a guest connection that outstayed its welcome");
            self.guests.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn trust(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        self.set_trusted(peer, true);
        let lan = self.discovered.get(&peer).cloned().unwrap_or_default();
        let known = self.known.entry(peer).or_default();
        for addr in addrs.into_iter().chain(lan) {
            if !known.contains(&addr) {
                known.push(addr);
            }
        }
        self.backoff.insert(peer, (Instant::now(), RECONNECT_FIRST));
        self.reconnect();
    }

    fn distrust(&mut self, peer: PeerId) {
        self.set_trusted(peer, false);
        self.waiting_joins.remove(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.known.remove(&peer);
        self.backoff.remove(&peer);
    }

    /// Dials trusted peers that are not connected and whose backoff expired.
    fn reconnect(&mut self) {
        let now = Instant::now();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .known
            .iter()
            .filter(|(peer, addrs)| {
                !addrs.is_empty()
                    && !self.is_connected(peer)
                    && self.backoff.get(peer).is_none_or(|(next, _)| *next <= now)
            })
            .map(|(peer, addrs)| (*peer, addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            let delay = self
                .backoff
                .get(&peer)
                .map(|(_, d)| *d)
                .unwrap_or(RECONNECT_FIRST);
            self.backoff
                .insert(peer, (now + delay, (delay * 2).min(RECONNECT_LAST)));
            self.dial(peer, addrs);
        }
    }

    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "not dialing: {e}");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                self.update(|s| s.listen_addrs.push(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.update(|s| s.listen_addrs.retain(|a| a != &address));
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } if !self.is_trusted(&peer_id) => {
                tracing::info!(peer = %peer_id, "an untrusted device connected to present a ticket");
                self.guests.entry(peer_id).or_insert_with(Instant::now);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if self.guests.remove(&peer_id).is_some() => {}
            // The first connection of a trusted peer, or the first since it
            // was trusted: a device that just joined redials, and its new
            // connection can be established here before its guest one is
            // seen to close (two established: it was never counted as
            // connected, and stayed so).
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } if self.guests.remove(&peer_id).is_some() || num_established.get() == 1 => {
                let addr = endpoint.get_remote_address().clone();
                tracing::info!(peer = %peer_id, %addr, "peer connected");
                self.update(|s| {
                    s.connected.insert(peer_id, addr.clone());
                });
                self.backoff
                    .insert(peer_id, (Instant::now(), RECONNECT_FIRST));
                self.events.publish(
                    EVENT_PEER_CONNECTED,
                    json!({"device_id": peer_id.to_string(), "addr": addr.to_string()}),
                );
                let hello = Request::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    device_name: self.device_name.clone(),
                };
                self.swarm
                    .behaviour_mut()
                    .sync
                    .inner
                    .send_request(&peer_id, Framed::Message(hello));
                let _ = self.net_events.try_send(NetEvent::PeerUp(peer_id));
                for (request, reply) in self.waiting_joins.remove(&peer_id).unwrap_or_default() {
                    self.send_join(peer_id, request, reply);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer disconnected{}", cause.map(|c| format!(": {c}")).unwrap_or_default());
                self.update(|s| {
                    s.connected.remove(&peer_id);
                });
                self.events.publish(
                    EVENT_PEER_DISCONNECTED,
                    json!({"device_id": peer_id.to_string()}),
                );
                let _ = self.net_events.try_send(NetEvent::PeerDown(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(from = %send_back_addr, "incoming connection refused: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                // mDNS reports every address of a peer: group them, dial once.
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    if self.discovered.len() < DISCOVERED_PEERS_MAX
                        || self.discovered.contains_key(&peer)
                    {
                        let seen = self.discovered.entry(peer).or_default();
                        if !seen.contains(&addr) && seen.len() < 16 {
                            seen.push(addr.clone());
                        }
                    }
                    if self.known.contains_key(&peer) {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    let known = self.known.entry(peer).or_default();
                    for addr in &addrs {
                        if !known.contains(addr) {
                            known.push(addr.clone());
                        }
                    }
                    if !self.is_connected(&peer) {
                        tracing::info!(%peer, "found a trusted device on the LAN");
                        self.dial(peer, addrs);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, addr) in gone {
                    if let Some(seen) = self.discovered.get_mut(&peer) {
                        seen.retain(|a| a != &addr);
                        if seen.is_empty() {
                            self.discovered.remove(&peer);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Remember where a trusted peer listens, to call it back,
                // here and across restarts.
                if let Some(known) = self.known.get_mut(&peer_id) {
                    let mut learned = Vec::new();
                    for addr in info.listen_addrs {
                        if !known.contains(&addr) && known.len() < ADDRS_PER_PEER_MAX {
                            known.push(addr.clone());
                            learned.push(addr);
                        }
                    }
                    if !learned.is_empty() {
                        let _ = self.net_events.try_send(NetEvent::Addresses {
                            peer: peer_id,
                            addrs: learned,
                        });
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Join(event)) => self.on_join_event(event),
            _ => {}
        }
    }

    fn on_sync_event(
        &mut self,
        event: request_response::Event<Framed<Request>, Outgoing<Response>>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Framed::Malformed(reason),
                    ..
                } => self.drop_offender(peer, &reason),
                request_response::Message::Request {
                    request: Framed::Message(request),
                    channel,
                    ..
                } => {
                    let response = match request {
                        Request::Hello {
                            protocol_version,
                            device_name,
                        } => {
                            self.update(|s| {
                                s.names.insert(peer, device_name);
                            });
                            if protocol_version == PROTOCOL_VERSION {
                                Response::Hello {
                                    protocol_version: PROTOCOL_VERSION,
                                    device_name: self.device_name.clone(),
                                }
                            } else {
                                Response::Error {
                                    message: format!(
                                        "protocol version {protocol_version} is not {PROTOCOL_VERSION}"
                                    ),
                                }
                            }
                        }
                        other => {
                            // The daemon answers; a full queue refuses rather
                            // than buffering without bound.
                            if let Err(mpsc::error::TrySendError::Full(NetEvent::Request {
                                channel,
                                ..
                            })) = self.net_events.try_send(NetEvent::Request {
                                peer,
                                request: other,
                                channel,
                            }) {
                                let busy = Response::Error {
                                    message: "busy; try again".into(),
                                };
                                let _ = self
                                    .swarm
                                    .behaviour_mut()
                                    .sync
                                    .inner
                                    .send_response(channel, Outgoing::Message(busy));
                            }
                            return;
                        }
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .inner
                        .send_response(channel, Outgoing::Message(response));
                }
                request_response::Message::Response {
                    request_id,
                    response: Outgoing::Message(response),
                } => match response {
                    _ if self.pending.contains_key(&request_id) => {
                        if let Some(reply) = self.pending.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                    Response::Hello { device_name, .. } => self.update(|s| {
                        s.names.insert(peer, device_name);
                    }),
                    Response::Error { message } => tracing::warn!(%peer, "peer refused: {message}"),
                    _ => {}
                },
                // Only written, never read.
                request_response::Message::Response {
                    response: Outgoing::Encoded(_),
                    ..
                } => {}
            },
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound sync message failed: {error}");
                if let request_response::InboundFailure::Io(e) = &error
                    && e.kind() == std::io::ErrorKind::InvalidData
                {
                    self.drop_offender(peer, &format!("a malformed request: {e}"));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                tracing::debug!(%peer, "outbound sync message failed: {error}");
                if let request_response::OutboundFailure::Io(e) = &error
                    && e.kind() == std::io::ErrorKind::InvalidData
                {
                    self.drop_offender(peer, &format!("a malformed answer: {e}"));
                }
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

impl Node {
    fn on_join_event(
        &mut self,
        event: request_response::Event<Framed<JoinRequest>, Outgoing<JoinResponse>>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Framed::Malformed(reason),
                    ..
                } => self.drop_offender(peer, &format!("join: {reason}")),
                request_response::Message::Request {
                    request: Framed::Message(request),
                    channel,
                    ..
                } => {
                    if let Err(mpsc::error::TrySendError::Full(NetEvent::JoinRequest {
                        channel,
                        ..
                    })) = self.net_events.try_send(NetEvent::JoinRequest {
                        peer,
                        request,
                        channel,
                    }) {
                        let busy = JoinResponse::Refused {
                            message: "the inviting device is busy; try again".into(),
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .join
                            .send_response(channel, Outgoing::Message(busy));
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response: Outgoing::Message(response),
                } => {
                    if let Some(reply) = self.pending_joins.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                request_response::Message::Response {
                    response: Outgoing::Encoded(_),
                    ..
                } => {}
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending_joins.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound join message failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

/// An inbound request: a message, or why it could not be one. (libp2p does
/// not report a request that fails to decode, nor from whom; delivered like
/// this, the node knows which peer to cut off.)
#[derive(Debug)]
pub enum Framed<T> {
    Message(T),
    Malformed(String),
}

/// An answer on its way out: a message, or one framed already (an answer
/// of chunks is read from the store straight into its frame: see
/// [`wire::encode_chunks_with`]). Answers read are always messages.
#[derive(Debug)]
pub enum Outgoing<A> {
    Message(A),
    Encoded(Vec<u8>),
}

/// Length-prefixed postcard frames of requests `Q` and responses `A`, at
/// most `MAX` bytes each, checked before a body is read.
pub struct FrameCodec<Q, A, const MAX: usize>(PhantomData<fn() -> (Q, A)>);

impl<Q, A, const MAX: usize> Default for FrameCodec<Q, A, MAX> {
    fn default() -> Self {
        FrameCodec(PhantomData)
    }
}

impl<Q, A, const MAX: usize> Clone for FrameCodec<Q, A, MAX> {
    fn clone(&self) -> Self {
        FrameCodec(PhantomData)
    }
}

/// Reads one frame of at most `max` bytes. A `request` that stops coming
/// is an error of kind `TimedOut` (see [`STALL_TIMEOUT`]), and a large one
/// is read within [`REQUEST_BUDGET`]. Answers are read without either: a
/// peer may think a while before it answers, the request timeout bounds
/// the wait, and the requests in flight bound how many come at once.
async fn read_frame<T, M>(io: &mut T, max: usize, request: bool) -> std::io::Result<M>
where
    T: futures::AsyncRead + Unpin + Send,
    M: for<'de> serde::Deserialize<'de>,
{
    let mut prefix = [0u8; 4];
    unstalled(request, io.read_exact(&mut prefix)).await?;
    let len = wire::check_length(prefix, max)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    // Taken for the whole frame at once: a reader holding part of the
    // budget never waits for more (two such would wait for each other).
    let _budget = if request && len > BUDGETED_FRAME_BYTES {
        let kib = len.div_ceil(1024) as u32;
        Some(
            REQUEST_BUDGET
                .acquire_many(kib)
                .await
                .map_err(std::io::Error::other)?,
        )
    } else {
        None
    };
    // Reserved at once (address space only, never copied while it grows)
    // but touched a step at a time as bytes arrive: a peer announcing 8 MiB
    // and trickling bytes holds little more memory than it sent. A frame
    // above 64 KiB and up to SPARE_FRAME_BYTES reuses the last such
    // frame's buffer on this thread: its bytes are overwritten, not zeroed
    // first (zeroing fresh buffers was 3% of a receiver's CPU, most of its
    // frames being answers of 2 MiB of chunks).
    const STEP: usize = 1024 * 1024;
    let spare = (BUDGETED_FRAME_BYTES..=SPARE_FRAME_BYTES).contains(&len);
    let mut body = if spare {
        SPARE_FRAME.take()
    } else {
        Vec::new()
    };
    // Its length is how much of it is initialized; the frame is its first
    // `len` bytes.
    body.reserve_exact(len.saturating_sub(body.len()));
    let mut filled = 0;
    while filled < len {
        let end = (filled + STEP).min(len);
        if body.len() < end {
            body.resize(end, 0);
        }
        for piece in body[filled..end].chunks_mut(STALL_BYTES) {
            unstalled(request, io.read_exact(piece)).await?;
        }
        filled = end;
    }
    let message = wire::decode(&body[..len])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    if spare {
        SPARE_FRAME.set(body);
    }
    message
}

/// Frames up to this size (an answer of chunks and its framing) are read
/// into a buffer kept for the next one on the same thread.
const SPARE_FRAME_BYTES: usize = wire::CHUNK_RESPONSE_BYTES_MAX + 64 * 1024;

thread_local! {
    /// The last frame's buffer; its bytes are initialized (stale).
    static SPARE_FRAME: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `read`, unless (with `stall`) it takes longer than [`STALL_TIMEOUT`]:
/// then an error of kind `TimedOut`.
async fn unstalled(
    stall: bool,
    read: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    if !stall {
        return read.await;
    }
    match tokio::time::timeout(STALL_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "less than {} KiB arrived in {} s",
                STALL_BYTES / 1024,
                STALL_TIMEOUT.as_secs()
            ),
        )),
    }
}

async fn write_frame<T, M>(io: &mut T, message: &M) -> std::io::Result<()>
where
    T: futures::AsyncWrite + Unpin + Send,
    M: serde::Serialize,
{
    let frame = wire::encode(message)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    io.write_all(&frame).await?;
    io.flush().await
}

impl<Q, A, const MAX: usize> request_response::Codec for FrameCodec<Q, A, MAX>
where
    Q: serde::Serialize + for<'de> serde::Deserialize<'de> + Send + Sync + 'static,
    A: serde::Serialize + for<'de> serde::Deserialize<'de> + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Framed<Q>;
    type Response = Outgoing<A>;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Framed<Q>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        match read_frame(io, MAX, true).await {
            Ok(message) => Ok(Framed::Message(message)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Ok(Framed::Malformed(format!("a malformed request: {e}")))
            }
            // One byte a second holds a stream, and its memory, for as long
            // as the request timeout: such a peer is cut off instead.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                Ok(Framed::Malformed(format!("a request that stalled: {e}")))
            }
            Err(e) => Err(e),
        }
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Outgoing<A>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX, false).await.map(Outgoing::Message)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Framed<Q>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        match request {
            Framed::Message(request) => write_frame(io, &request).await,
            Framed::Malformed(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a malformed request is never sent",
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Outgoing<A>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        match response {
            Outgoing::Message(response) => write_frame(io, &response).await,
            Outgoing::Encoded(frame) => {
                io.write_all(&frame).await?;
                io.flush().await
            }
        }
    }
}

/// This machine's name, for peers' lists.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "device".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mariesync_protocol::ChunkHash;
    use mariesync_protocol::wire::Response;

    #[test]
    fn a_reused_frame_buffer_never_leaks_into_the_next_frame() {
        let answer = |seed: &[u8], byte: u8, len: usize| Response::Chunks {
            chunks: vec![(ChunkHash::of(seed), vec![byte; len])],
        };
        // Both reuse this thread's buffer: the second frame is shorter than
        // the stale bytes the first left in it.
        let frames = [
            answer(b"a", 7, 300_000),
            answer(b"b", 9, 90_000),
            answer(b"c", 5, 1_000),
        ];
        let mut bytes = Vec::new();
        for frame in &frames {
            bytes.extend(wire::encode(frame).unwrap());
        }
        let mut io = futures::io::Cursor::new(bytes);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for frame in &frames {
                let read: Response = read_frame(&mut io, 8 << 20, false).await.unwrap();
                assert_eq!(&read, frame);
            }
        });
        assert!(SPARE_FRAME.take().len() >= 300_000, "the buffer was kept");
    }
}
