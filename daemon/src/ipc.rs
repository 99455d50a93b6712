//! The local IPC server: JSON-RPC 2.0 with LSP framing over a Unix socket
//! (a named pipe on Windows), mode 0600 in a 0700 directory; connections
//! from other users are refused.
//!
//! **Architecture Invariant:** nothing a client sends can stop the daemon or
//! another client. Malformed JSON, unknown methods and wrong params get an
//! error with a stable code; a frame that breaks the framing gets one error
//! and its connection is closed; every buffer is bounded.

use std::sync::Arc;

use interprocess::local_socket::tokio::{Listener, Stream, prelude::*};
use mariesync_protocol::frame::{FrameDecoder, FrameError, encode_frame};
use mariesync_protocol::ipc::{
    ErrorCode, FRAME_BYTES_MAX, Notification, Request, Response, RpcError, SubscribeParams, method,
    parse_params,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, broadcast, mpsc};

use crate::daemon::Daemon;

/// Connections served at once; more are closed on accept.
const CONNECTIONS_MAX: usize = 256;
/// Requests in flight per connection; the reader waits beyond this.
const REQUESTS_IN_FLIGHT_MAX: usize = 32;
/// A frame not written within this time closes its connection.
const FRAME_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Outgoing frames queued per connection.
const OUTGOING_FRAMES_MAX: usize = 1024;

pub async fn serve(
    listener: Listener,
    daemon: Arc<Daemon>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("IPC accept failed: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("refusing an IPC connection: {CONNECTIONS_MAX} already open");
            continue;
        };
        if !same_user(&stream) {
            tracing::warn!("refusing an IPC connection from another user");
            continue;
        }
        let daemon = daemon.clone();
        tokio::spawn(async move {
            connection(stream, daemon).await;
            drop(permit);
        });
    }
}

#[cfg(unix)]
fn same_user(stream: &Stream) -> bool {
    match stream.peer_creds() {
        // SAFETY: geteuid has no preconditions.
        Ok(creds) => creds
            .euid()
            .is_none_or(|uid| uid == unsafe { libc::geteuid() }),
        Err(_) => false,
    }
}

#[cfg(not(unix))]
fn same_user(_stream: &Stream) -> bool {
    true
}

async fn connection(stream: Stream, daemon: Arc<Daemon>) {
    let stream = Arc::new(stream);
    let (out, mut outgoing) = mpsc::channel::<Outgoing>(OUTGOING_FRAMES_MAX);
    // Dropped when the writer stops, which stops the reader too.
    let (writer_alive, mut writer_stopped) = tokio::sync::oneshot::channel::<()>();
    let writer = {
        let stream = stream.clone();
        tokio::spawn(async move {
            let _alive = writer_alive;
            let mut sink = &*stream;
            while let Some((frame, written)) = outgoing.recv().await {
                // A client that stops reading is disconnected, not waited for.
                match tokio::time::timeout(FRAME_WRITE_TIMEOUT, sink.write_all(&frame)).await {
                    Ok(Ok(())) => {
                        if let Some(written) = written {
                            let _ = written.send(());
                        }
                    }
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::warn!("closing an IPC connection whose client stopped reading");
                        return;
                    }
                }
            }
            let _ = sink.flush().await;
        })
    };
    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let mut subscription: Option<tokio::task::JoinHandle<()>> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut source = &*stream;
    'read: loop {
        let read = tokio::select! {
            read = source.read(&mut buf) => read,
            _ = &mut writer_stopped => break,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::InvalidRequest,
                    };
                    tracing::debug!("closing an IPC connection: {e}");
                    send(
                        &out,
                        &Response::err(
                            Value::Null,
                            RpcError::new(code, format!("{e}; closing the connection")),
                        ),
                    )
                    .await;
                    break 'read;
                }
            };
            let request = match parse_request(&frame) {
                Ok(request) => request,
                Err((id, error)) => {
                    send(&out, &Response::err(id, error)).await;
                    continue;
                }
            };
            if request.method == method::EVENTS_SUBSCRIBE {
                let params: Result<SubscribeParams, _> = parse_params(request.params);
                let reply = match params {
                    Ok(params) => {
                        let sub = daemon.events.subscribe(params.since);
                        let last_seq = sub.last_seq;
                        if let Some(old) = subscription.take() {
                            old.abort();
                        }
                        subscription = Some(tokio::spawn(forward_events(sub, out.clone())));
                        Ok(json!({ "seq": last_seq }))
                    }
                    Err(e) => Err(e),
                };
                if let Some(id) = request.id {
                    send(&out, &respond(id, reply)).await;
                }
                continue;
            }
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break 'read;
            };
            let daemon = daemon.clone();
            let out = out.clone();
            tokio::spawn(async move {
                if request.method == method::SHUTDOWN {
                    // The answer is written before the daemon stops, so the
                    // client hears that it stops, not that it went away.
                    if let Some(id) = request.id {
                        let (done, written) = tokio::sync::oneshot::channel();
                        let frame = response_frame(&Response::ok(id, json!({})));
                        if out.send((frame, Some(done))).await.is_ok() {
                            let _ = tokio::time::timeout(FRAME_WRITE_TIMEOUT, written).await;
                        }
                    }
                    let _ = daemon.handle(&request.method, request.params).await;
                    drop(permit);
                    return;
                }
                let result = daemon.handle(&request.method, request.params).await;
                if let Some(id) = request.id {
                    send(&out, &respond(id, result)).await;
                }
                drop(permit);
            });
        }
    }
    if let Some(task) = subscription {
        task.abort();
    }
    drop(out);
    // The writer ends once in-flight requests have answered (they hold the
    // other senders) or once it cannot write.
    let _ = writer.await;
}

fn respond(id: Value, result: Result<Value, RpcError>) -> Response {
    match result {
        Ok(value) => Response::ok(id, value),
        Err(error) => Response::err(id, error),
    }
}

/// Parses a frame into a request, or the error to answer with (and the id
/// to answer to, when one could be read).
fn parse_request(frame: &[u8]) -> Result<Request, (Value, RpcError)> {
    let value: Value = serde_json::from_slice(frame).map_err(|e| {
        (
            Value::Null,
            RpcError::new(ErrorCode::ParseError, format!("invalid JSON: {e}")),
        )
    })?;
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    if value.is_array() {
        return Err((
            Value::Null,
            RpcError::new(
                ErrorCode::InvalidRequest,
                "batch requests are not supported",
            ),
        ));
    }
    let request: Request = serde_json::from_value(value).map_err(|e| {
        (
            id.clone(),
            RpcError::new(
                ErrorCode::InvalidRequest,
                format!("not a JSON-RPC request: {e}"),
            ),
        )
    })?;
    if request.jsonrpc != "2.0" {
        return Err((
            id,
            RpcError::new(ErrorCode::InvalidRequest, "jsonrpc must be \"2.0\""),
        ));
    }
    if let Some(id) = &request.id
        && !(id.is_string() || id.is_number() || id.is_null())
    {
        return Err((
            Value::Null,
            RpcError::new(ErrorCode::InvalidRequest, "id must be a string or a number"),
        ));
    }
    Ok(request)
}

async fn forward_events(mut sub: crate::events::Subscription, out: mpsc::Sender<Outgoing>) {
    let mut last = 0;
    for event in sub.replay.drain(..) {
        last = event["seq"].as_u64().unwrap_or(last);
        if !send_event(&out, &event).await {
            return;
        }
    }
    loop {
        match sub.live.recv().await {
            Ok(event) => {
                let seq = event["seq"].as_u64().unwrap_or(0);
                if seq <= last && last != 0 {
                    continue;
                }
                last = seq;
                if !send_event(&out, &event).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let gap = json!({
                    "seq": last,
                    "kind": mariesync_protocol::ipc::event_kind::GAP,
                    "from": last + 1,
                    "missed": missed,
                    "message": "this subscriber fell behind and missed events; re-read the state you need",
                });
                if !send_event(&out, &gap).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A frame to write, and who waits until it is written.
type Outgoing = (Vec<u8>, Option<tokio::sync::oneshot::Sender<()>>);

async fn send_event(out: &mpsc::Sender<Outgoing>, event: &Value) -> bool {
    let notification = Notification {
        jsonrpc: "2.0".into(),
        method: method::EVENT.into(),
        params: event.clone(),
    };
    let body = serde_json::to_vec(&notification).expect("JSON values always serialize");
    out.send((encode_frame(&body), None)).await.is_ok()
}

async fn send(out: &mpsc::Sender<Outgoing>, response: &Response) {
    let _ = out.send((response_frame(response), None)).await;
}

fn response_frame(response: &Response) -> Vec<u8> {
    let body = serde_json::to_vec(response).expect("responses always serialize");
    encode_frame(&body)
}
