//! The per-user agent (`corral user-agent`, run by a user unit as the user):
//! carries out the root agent's systemd calls on this user's manager, so the
//! user's processes stay in the user's manager with XDG names.
//!
//! It connects to the root agent's control socket, says
//! `{"cmd":"user_agent"}`, then answers each [`Envelope`] line with a
//! [`Reply`] line carrying the same id. Requests run concurrently (a slow
//! D-Bus call does not hold up the others), so replies may come out of
//! order. The manager itself checks who may move which process; its
//! refusals are passed back as they are. When the socket is missing or
//! closes, the agent tries again after 250 ms, doubling up to 5 s, forever,
//! and logs only when that state changes.

use std::{io, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixStream, unix::OwnedWriteHalf},
    sync::mpsc,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::actuate::{
    manager_ops::{Envelope, Reply, ReplyBody},
    systemd_bus::ManagerClient,
};

/// The first line the agent writes on each connection.
pub const HELLO: &str = "{\"cmd\":\"user_agent\"}\n";
/// First wait before connecting again.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between tries.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// Serve the root agent at `socket` with the calling user's manager.
pub async fn run(socket: &Path) -> anyhow::Result<()> {
    let client = ManagerClient::user_session()
        .await
        .context("connecting to your systemd user manager")?;
    run_with(socket, client).await
}

/// [`run`] with a given manager connection; returns only on a bug.
pub async fn run_with(socket: &Path, client: ManagerClient) -> anyhow::Result<()> {
    let client = Arc::new(client);
    let mut state = State::Starting;
    let mut wait = RETRY_FIRST;
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => {
                state.enter(State::Connected, socket);
                wait = RETRY_FIRST;
                let next = match serve(stream, &client).await {
                    Ok(()) => State::Closed,
                    Err(e) => State::Broken(e.kind(), e.to_string()),
                };
                state.enter(next, socket);
            }
            Err(e) => state.enter(State::Unreachable(e.kind(), e.to_string()), socket),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Where the connection to the root agent stands; logged when it changes.
#[derive(Debug, PartialEq)]
enum State {
    Starting,
    Connected,
    /// The root agent closed the connection.
    Closed,
    /// Reading or writing failed.
    Broken(io::ErrorKind, String),
    /// Connecting failed.
    Unreachable(io::ErrorKind, String),
}

impl State {
    fn enter(&mut self, next: State, socket: &Path) {
        let same = match (&*self, &next) {
            (State::Broken(a, _), State::Broken(b, _))
            | (State::Unreachable(a, _), State::Unreachable(b, _)) => a == b,
            (a, b) => a == b,
        };
        if !same {
            let socket = socket.display();
            match &next {
                State::Starting => {}
                State::Connected => info!("serving the root agent at {socket}"),
                State::Closed => {
                    info!("the root agent at {socket} closed the connection; reconnecting")
                }
                State::Broken(_, e) => warn!("lost the root agent at {socket}: {e}; reconnecting"),
                State::Unreachable(_, e) => warn!(
                    "cannot reach the root agent at {socket}: {e}; trying again every {} ms up to {} s \
                     (is corral.service running?)",
                    RETRY_FIRST.as_millis(),
                    RETRY_MAX.as_secs()
                ),
            }
        }
        *self = next;
    }
}

/// One connection: hello, then requests in, replies out, until it closes.
async fn serve(stream: UnixStream, client: &Arc<ManagerClient>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    write.write_all(HELLO.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    let (done, mut replies) = mpsc::channel::<Reply>(64);
    // Dropped with the connection: answers nobody can read are not waited for.
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { return Ok(()) };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Envelope>(&line) {
                    Ok(Envelope { id, op }) => {
                        debug!(id, ?op, "request");
                        let client = Arc::clone(client);
                        let done = done.clone();
                        running.spawn(async move {
                            let body = client.execute(op).await;
                            let _ = done.send(Reply { id, body }).await;
                        });
                    }
                    Err(e) => refuse(&mut write, &line, e).await?,
                }
            }
            Some(reply) = replies.recv() => send(&mut write, &reply).await?,
            Some(joined) = running.join_next(), if !running.is_empty() => {
                if let Err(e) = joined {
                    warn!("a request's task failed: {e}");
                }
            }
        }
    }
}

async fn send(write: &mut OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

/// Answer a line that is not an [`Envelope`], if it has an id to answer to.
async fn refuse(write: &mut OwnedWriteHalf, line: &str, e: serde_json::Error) -> io::Result<()> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    match serde_json::from_str::<IdOnly>(line) {
        Ok(IdOnly { id }) => {
            let body = ReplyBody::refused(format!("the user agent cannot read this request: {e}"));
            send(write, &Reply { id, body }).await
        }
        Err(_) => {
            warn!("ignoring a line without an id from the root agent: {e}");
            Ok(())
        }
    }
}
