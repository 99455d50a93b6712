//! A hostile peer for the tests: a device whose key the victim trusts,
//! which breaks the sync protocol in one way per connection.
//!
//! Usage: `hostile_peer VICTIM_ADDR WORKSPACE_ID` (or `hostile_peer settings
//! TICKET`, see `settings_attacks`). Prints its device ID,
//! waits for a line on stdin (the victim now trusts it and shares the
//! workspace with it), then for each attack connects, attacks, prints
//! `ATTACK closed` once the victim has closed the connection, and finally
//! `done`.
//!
//! The attacks: a frame announcing 4 GiB; a message of a type that does
//! not exist; an index entry whose path is `../escape.txt`, and one whose
//! path is absolute ([`ABSOLUTE_PATH`]); an index page of 20,000 entries,
//! and one that announces ten million; a chunk that decompresses to 512
//! MiB when 1,000 bytes were announced; a chunk whose bytes do not match
//! its hash; the same, pushed with the announcement of a change; ninety
//! requests of 8 MiB at once (`Flood`, 720 MiB were they all read at the
//! same time); a request sent one byte a second (the peer prints `SlowLoris started` when it
//! begins).
//!
//! Then one honest change, pushed with its announcement (`pushed.txt`,
//! [`PUSHED_CONTENT`]): the victim should apply it without asking for its
//! chunk. Once the victim acknowledges it, the peer prints `Pushed applied,
//! chunks asked N` and hangs up (`Pushed closed`).

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, request_response, tcp, yamux};
use mariesync_protocol::index::ChunkRef;
use mariesync_protocol::version::VersionVector;
use mariesync_protocol::wire::{self, Request, Response, SYNC_PROTOCOL};
use mariesync_protocol::{ChunkHash, FileEntry, FileKind, RelPath, WorkspaceId};

/// Bytes as they go on the wire (the length prefix included when written).
#[derive(Debug, Clone)]
struct Raw(Vec<u8>);

#[derive(Clone, Default)]
struct RawCodec;

async fn read_raw<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Raw> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > 16 << 20 {
        return Err(std::io::Error::other("too large"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(Raw(body))
}

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Raw;
    type Response = Raw;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Raw>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_raw(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Raw>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_raw(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        Raw(bytes): Raw,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        if SLOW.load(Ordering::Relaxed) {
            println!("SlowLoris started");
            for byte in bytes {
                io.write_all(&[byte]).await?;
                io.flush().await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        } else {
            io.write_all(&bytes).await?;
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        Raw(bytes): Raw,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&bytes).await?;
        io.close().await
    }
}

/// The flood: this many requests at once, each a frame this large (just
/// under the 8 MiB a frame may have) of bytes that decode to nothing.
const FLOOD_STREAMS: usize = 90;
const FLOOD_FRAME_BYTES: usize = 8 * 1024 * 1024 - 64;

/// Requests are written one byte a second while set.
static SLOW: AtomicBool = AtomicBool::new(false);

/// Where the absolute-path attack tries to write (13 bytes, as the path it
/// replaces in the frame).
pub const ABSOLUTE_PATH: &str = "/escape-abs.t";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Attack {
    HugeLength,
    UnknownMessage,
    EscapingPath,
    AbsolutePath,
    ManyEntries,
    HugeCount,
    SlowLoris,
    DecompressionBomb,
    WrongHash,
    PushedWrongHash,
    Flood,
    /// Not an attack: a change pushed as an honest peer pushes one.
    Pushed,
}

const PUSHED_CONTENT: &[u8] = b"pushed with its announcement\n";

/// The announcement the peer opens with: a change pushed along for the
/// pushing cases.
fn announcement(attack: Attack, workspace: WorkspaceId, me: &str) -> Request {
    let pushed = |name: &str, content: &[u8], stored: Vec<u8>| {
        let hash = ChunkHash::of(content);
        Some(Box::new(wire::Pushed {
            after: 0,
            entries: vec![entry(name, content.len() as u32, hash, me)],
            last_sequence: 1,
            head: 1,
            chunks: vec![(hash, stored)],
        }))
    };
    let raw = |bytes: &[u8]| [&[0u8][..], bytes].concat();
    let pushed = match attack {
        Attack::PushedWrongHash => pushed("pushed-wrong.bin", &[7u8; 100], raw(&[8u8; 100])),
        Attack::Pushed => pushed("pushed.txt", PUSHED_CONTENT, raw(PUSHED_CONTENT)),
        _ => None,
    };
    Request::Changed {
        workspace,
        sequence: 1,
        pushed,
    }
}

fn frame(message: &impl serde::Serialize) -> Raw {
    Raw(wire::encode(message).expect("encodable"))
}

/// `body` behind its length prefix, whatever it holds.
fn raw_frame(body: &[u8]) -> Raw {
    let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(body);
    Raw(bytes)
}

fn entry(path: &str, size: u32, hash: ChunkHash, by: &str) -> FileEntry {
    let mut version = VersionVector::default();
    version.bump(mariesync_protocol::DeviceKey::of_device_id(by));
    FileEntry {
        path: RelPath::new(path).expect("valid path"),
        kind: FileKind::File,
        size: u64::from(size),
        mtime_ns: 1_700_000_000_000_000_000,
        executable: false,
        content_hash: hash,
        chunks: vec![ChunkRef { hash, len: size }],
        symlink_target: None,
        deleted: false,
        version,
        sequence: 1,
        modified_by: by.to_owned(),
    }
}

/// What the hostile peer answers the victim's requests with.
fn answer(attack: Attack, request: &Request, me: &str) -> Raw {
    let bomb_hash = ChunkHash::of(&[0u8; 1000]);
    let honest_hash = ChunkHash::of(&[7u8; 100]);
    match (attack, request) {
        (Attack::EscapingPath | Attack::AbsolutePath, Request::IndexAfter { .. }) => {
            // A valid entry, then its path bytes rewritten: the same length,
            // so the encoding stays well formed but for the path.
            let index = Response::Index {
                entries: vec![entry("aa/escape.txt", 100, honest_hash, me)],
                last_sequence: 1,
                more: false,
                head: 1,
            };
            let mut bytes = wire::encode(&index).expect("encodable");
            let at = bytes
                .windows(13)
                .position(|w| w == b"aa/escape.txt")
                .expect("the path is in the frame");
            let path = match attack {
                Attack::EscapingPath => b"../escape.txt",
                _ => ABSOLUTE_PATH.as_bytes(),
            };
            bytes[at..at + 13].copy_from_slice(path);
            Raw(bytes)
        }
        (Attack::ManyEntries, Request::IndexAfter { .. }) => {
            // Each entry valid, far more than a page holds: a few MB.
            let entries: Vec<FileEntry> = (0..20_000)
                .map(|i| entry(&format!("many/{i}.txt"), 100, honest_hash, me))
                .collect();
            frame(&Response::Index {
                entries,
                last_sequence: 20_000,
                more: false,
                head: 20_000,
            })
        }
        (Attack::HugeCount, Request::IndexAfter { .. }) => {
            // One entry, its count rewritten to ten million: a receiver
            // that sized a vector by it would ask for gigabytes.
            let index = Response::Index {
                entries: vec![entry("count.txt", 100, honest_hash, me)],
                last_sequence: 1,
                more: false,
                head: 1,
            };
            let bytes = wire::encode(&index).expect("encodable");
            // Length prefix, variant (one byte), count (one byte: 1).
            assert_eq!(bytes[5], 1, "the count follows the variant");
            // A count is a varint, as postcard writes a u32.
            let count = postcard::to_stdvec(&10_000_000u32).expect("encodable");
            raw_frame(&[&bytes[4..5], &count[..], &bytes[6..]].concat())
        }
        (Attack::DecompressionBomb, Request::IndexAfter { .. }) => frame(&Response::Index {
            entries: vec![entry("bomb.bin", 1000, bomb_hash, me)],
            last_sequence: 1,
            more: false,
            head: 1,
        }),
        (Attack::DecompressionBomb, Request::Chunks { .. }) => {
            let mut stored = vec![1u8]; // zstd
            stored.extend(zstd::bulk::compress(&vec![0u8; 512 << 20], 3).expect("compress"));
            frame(&Response::Chunks {
                chunks: vec![(bomb_hash, stored)],
            })
        }
        (Attack::WrongHash, Request::IndexAfter { .. }) => frame(&Response::Index {
            entries: vec![entry("wrong.bin", 100, honest_hash, me)],
            last_sequence: 1,
            more: false,
            head: 1,
        }),
        (Attack::WrongHash, Request::Chunks { .. }) => {
            let mut stored = vec![0u8]; // raw
            stored.extend([8u8; 100]);
            frame(&Response::Chunks {
                chunks: vec![(honest_hash, stored)],
            })
        }
        (_, Request::IndexAfter { after, .. }) => frame(&Response::Index {
            entries: Vec::new(),
            last_sequence: *after,
            more: false,
            head: *after,
        }),
        _ => frame(&Response::Ack),
    }
}

type RawSwarm = libp2p::Swarm<request_response::Behaviour<RawCodec>>;

/// A swarm with `keypair` that speaks only `protocol`, in raw frames.
fn raw_swarm(keypair: libp2p::identity::Keypair, protocol: &'static str) -> RawSwarm {
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new(protocol),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build()
}

/// Sends `request` to `peer` (dialing `addr`) and returns the answer,
/// answering the victim's own requests meanwhile as a quiet peer would.
async fn ask(swarm: &mut RawSwarm, addr: &Multiaddr, request: Raw) -> Raw {
    let mut request = Some(request);
    let mut pending = None;
    if !swarm.connected_peers().any(|_| true) {
        swarm.dial(addr.clone()).expect("dial");
    } else {
        let peer = *swarm.connected_peers().next().expect("a peer");
        pending = Some(
            swarm
                .behaviour_mut()
                .send_request(&peer, request.take().unwrap()),
        );
    }
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if let Some(request) = request.take() {
                    pending = Some(swarm.behaviour_mut().send_request(&peer_id, request));
                }
            }
            SwarmEvent::Behaviour(request_response::Event::Message { message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let reply = match wire::decode::<Request>(&request.0) {
                            Ok(Request::Settings { .. }) => {
                                frame(&Response::Settings { message: None })
                            }
                            _ => frame(&Response::Ack),
                        };
                        let _ = swarm.behaviour_mut().send_response(channel, reply);
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } if Some(request_id) == pending => return response,
                    _ => {}
                }
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                panic!("cannot reach the victim: {error}");
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                panic!("the request failed: {error}");
            }
            _ => {}
        }
    }
}

/// `hostile_peer settings TICKET`: joins the victim's device group with a
/// device ticket, then sends settings sync messages that must not harm
/// the victim's documents: garbage, a document of its own whose maps
/// would replace the victim's, a corrupted message, an unknown document.
/// Prints `NAME refused` for each refusal, then `done`.
async fn settings_attacks(ticket: &str) {
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    let ticket = mariesync_protocol::ticket::Ticket::decode(ticket).expect("a ticket");
    let victim: Multiaddr = ticket.addrs[0].parse().expect("an address");
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    println!("{}", keypair.public().to_peer_id());

    let mut join = raw_swarm(keypair.clone(), wire::JOIN_PROTOCOL);
    let answer = ask(
        &mut join,
        &victim,
        frame(&wire::JoinRequest {
            secret: ticket.secret,
            device_name: "hostile".into(),
        }),
    )
    .await;
    match wire::decode::<wire::JoinResponse>(&answer.0) {
        Ok(wire::JoinResponse::Joined { workspace: None }) => println!("joined"),
        other => panic!("not admitted: {other:?}"),
    }
    drop(join);

    let mut sync = raw_swarm(keypair, SYNC_PROTOCOL);
    let settings = |doc: &str, message: Vec<u8>| {
        frame(&Request::Settings {
            doc: doc.into(),
            new_session: false,
            message,
        })
    };
    let refused = |name: &str, answer: Raw| match wire::decode::<Response>(&answer.0) {
        Ok(Response::Error { message }) => println!("{name} refused: {message}"),
        other => panic!("{name} was not refused: {other:?}"),
    };
    let answer = ask(
        &mut sync,
        &victim,
        settings("settings", b"\x42 not automerge at all".to_vec()),
    )
    .await;
    refused("garbage", answer);

    // A well-formed document of its own, with a "settings" map that would
    // win over the victim's (a higher actor).
    let mut rival = automerge::AutoCommit::new().with_actor(automerge::ActorId::from([0xff; 16]));
    let map = rival
        .put_object(automerge::ROOT, "settings", automerge::ObjType::Map)
        .unwrap();
    rival.put(&map, "default:editor.fontSize", "99").unwrap();
    rival.commit();
    let mut state = automerge::sync::State::new();
    let mut corrupted = None;
    for round in 0.. {
        assert!(round < 10, "the victim never asked for the rival's changes");
        let message = rival
            .sync()
            .generate_sync_message(&mut state)
            .expect("a message");
        let bytes = message.encode();
        let answer = ask(&mut sync, &victim, settings("settings", bytes.clone())).await;
        match wire::decode::<Response>(&answer.0) {
            Ok(Response::Settings {
                message: Some(reply),
            }) => {
                let reply = automerge::sync::Message::decode(&reply).unwrap();
                rival
                    .sync()
                    .receive_sync_message(&mut state, reply)
                    .unwrap();
            }
            Ok(Response::Error { message }) => {
                println!("rival refused: {message}");
                corrupted = Some(bytes);
                break;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // The same changes with bytes flipped in the middle.
    let mut bytes = corrupted.unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 8] {
        *b ^= 0x5a;
    }
    let answer = ask(&mut sync, &victim, settings("settings", bytes)).await;
    refused("corrupt", answer);
    let answer = ask(&mut sync, &victim, settings("../secrets", vec![0x42])).await;
    refused("unknown", answer);
    println!("done");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next().expect("VICTIM_ADDR or `settings`");
    if first == "settings" {
        settings_attacks(&args.next().expect("TICKET")).await;
        return;
    }
    let victim: Multiaddr = first.parse().expect("multiaddr");
    let workspace: WorkspaceId = args.next().expect("WORKSPACE_ID").parse().expect("id");
    let mut swarm = raw_swarm(libp2p::identity::Keypair::generate_ed25519(), SYNC_PROTOCOL);
    let me = swarm.local_peer_id().to_string();
    println!("{me}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");

    for attack in [
        Attack::HugeLength,
        Attack::UnknownMessage,
        Attack::EscapingPath,
        Attack::AbsolutePath,
        Attack::ManyEntries,
        Attack::HugeCount,
        Attack::DecompressionBomb,
        Attack::WrongHash,
        Attack::PushedWrongHash,
        Attack::Flood,
        Attack::SlowLoris,
        Attack::Pushed,
    ] {
        swarm.dial(victim.clone()).expect("dial");
        let mut chunks_asked = 0;
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    if attack == Attack::HugeLength {
                        let mut bytes = u32::MAX.to_le_bytes().to_vec();
                        bytes.extend([0u8; 64]);
                        swarm.behaviour_mut().send_request(&peer_id, Raw(bytes));
                    } else if attack == Attack::Flood {
                        // Written at once, each on its own stream.
                        let junk = raw_frame(&vec![0xff; FLOOD_FRAME_BYTES]);
                        for _ in 0..FLOOD_STREAMS {
                            swarm.behaviour_mut().send_request(&peer_id, junk.clone());
                        }
                    } else if attack == Attack::UnknownMessage {
                        // A variant no version of the protocol has.
                        let unknown = raw_frame(&[0x7f, 1, 2, 3]);
                        swarm.behaviour_mut().send_request(&peer_id, unknown);
                    } else {
                        SLOW.store(attack == Attack::SlowLoris, Ordering::Relaxed);
                        let changed = announcement(attack, workspace, &me);
                        swarm
                            .behaviour_mut()
                            .send_request(&peer_id, frame(&changed));
                    }
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    peer,
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                }) => {
                    let request = wire::decode::<Request>(&request.0);
                    let reply = match &request {
                        Ok(request @ Request::Chunks { .. }) if attack == Attack::Pushed => {
                            chunks_asked += 1;
                            answer(attack, request, &me)
                        }
                        Ok(request) => answer(attack, request, &me),
                        Err(_) => frame(&Response::Ack),
                    };
                    let _ = swarm.behaviour_mut().send_response(channel, reply);
                    if attack == Attack::Pushed
                        && let Ok(Request::IndexAfter { applied: 1.., .. }) = request
                    {
                        println!("Pushed applied, chunks asked {chunks_asked}");
                        let _ = swarm.disconnect_peer_id(peer);
                    }
                }
                SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } => {
                    println!("{attack:?} closed");
                    break;
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("cannot reach the victim: {error}");
                }
                _ => {}
            }
        }
    }
    println!("done");
}
