//! The network side of the daemon: accepting QUIC connections, the hello and login
//! exchanges, and one task per request stream once logged in. Requests run on tokio's
//! blocking pool (the repository does synchronous disk I/O), under a global memory budget.

use crate::service::{LoginAttempt, Refusal, Service, Session};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tardis_net::proto::{self, ErrorCode, Request, Response, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use tardis_net::transport;
use tokio::sync::{watch, Notify, Semaphore};

/// Time a client gets to complete the QUIC handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a client gets between hello and a successful login (Argon2id runs in between).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Exchanges allowed before login (key header, a few password tries).
const MAX_LOGIN_EXCHANGES: usize = 8;
/// Pause before answering a failed login, to slow down password guessing.
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(500);
/// Bytes of requests and responses being handled at once, across all connections (in KiB,
/// the semaphore's unit). This, not the number of clients, bounds the daemon's buffers.
const BUDGET_KIB: u32 = 48 * 1024;
/// What a response may need beyond its request: a chunk or a listing page.
const RESPONSE_KIB: u32 = 5 * 1024;
/// The part of that budget one host's requests may hold at once: a client that stalls its
/// request bodies, or floods large ones from many connections, never starves the other hosts.
const HOST_BUDGET_KIB: u32 = 32 * 1024;
/// How long a request's body may take to arrive once its header has (generous for slow links;
/// a body that stalls longer gives its share of the budget back).
const BODY_TIMEOUT: Duration = Duration::from_secs(300);

/// Counts requests in progress, so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// Waits until no request is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything the connection tasks share.
#[derive(Debug)]
pub struct Shared {
    pub service: Arc<Service>,
    pub in_flight: Arc<InFlight>,
    budget: Semaphore,
    host_budgets: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
    connections: Arc<Semaphore>,
    software: String,
}

impl Shared {
    pub fn new(service: Arc<Service>, max_connections: u32) -> Arc<Shared> {
        Arc::new(Shared {
            service,
            in_flight: Arc::new(InFlight::default()),
            budget: Semaphore::new(BUDGET_KIB as usize),
            host_budgets: Default::default(),
            connections: Arc::new(Semaphore::new(max_connections as usize)),
            software: format!("tardisd {}", env!("CARGO_PKG_VERSION")),
        })
    }
}

impl Shared {
    /// The budget of one host's requests (made on first use; one per host).
    fn host_budget(&self, host: &str) -> Arc<Semaphore> {
        let mut all = self.host_budgets.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(host.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(HOST_BUDGET_KIB as usize))).clone()
    }
}

/// Accepts connections until `stop` turns true.
pub async fn serve(endpoint: quinn::Endpoint, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.changed() => break,
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(peer = %incoming.remote_address(), "refusing a connection: MaxConnections reached");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            if let Err(e) = connection(incoming, &shared).await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn connection(incoming: quinn::Incoming, shared: &Arc<Shared>) -> Result<(), String> {
    let peer = incoming.remote_address();
    let conn = tokio::time::timeout(HELLO_TIMEOUT, incoming)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    logged_in(&conn, peer, shared).await
}

/// Hello and login, then requests until the connection closes.
async fn logged_in(conn: &quinn::Connection, peer: SocketAddr, shared: &Arc<Shared>) -> Result<(), String> {
    tokio::time::timeout(HELLO_TIMEOUT, hello(conn, shared)).await.map_err(|_| "no hello".to_owned())??;
    let session =
        tokio::time::timeout(LOGIN_TIMEOUT, login(conn, peer, shared)).await.map_err(|_| "no login".to_owned())??;
    transport::open_up(conn);
    let result = requests(conn, &session, shared).await;
    shared.service.detach(&session);
    result
}

/// Reads the one request of a new stream (pre-login limits).
async fn next_request(conn: &quinn::Connection) -> Result<(quinn::SendStream, Request), String> {
    let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    match transport::read_frame::<Request>(&mut recv, MAX_HANDSHAKE_FRAME).await {
        Ok(Some(req)) => Ok((send, req)),
        Ok(None) => Err("empty stream".into()),
        Err(e) => {
            let mut send = send;
            let _ = reply(&mut send, Refusal::new(ErrorCode::Protocol, e.to_string()).response()).await;
            // Let the refusal arrive before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(transport::CLOSE_PROTOCOL.into(), b"protocol error");
            Err(e.to_string())
        }
    }
}

async fn reply(send: &mut quinn::SendStream, r: Response) -> Result<(), String> {
    transport::write_frame(send, &r).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(())
}

async fn hello(conn: &quinn::Connection, shared: &Arc<Shared>) -> Result<(), String> {
    let (mut send, req) = next_request(conn).await?;
    let Request::Hello { min, max, software } = req else {
        let _ = reply(&mut send, Refusal::new(ErrorCode::Protocol, "the first request must be hello").response()).await;
        return Err("no hello".into());
    };
    let version = max.min(proto::PROTOCOL_MAX);
    if version < min.max(proto::PROTOCOL_MIN) {
        let msg = format!(
            "{software} speaks protocol versions {min}-{max}, this server ({}) speaks {}-{}; upgrade the older side",
            shared.software,
            proto::PROTOCOL_MIN,
            proto::PROTOCOL_MAX
        );
        reply(&mut send, Refusal::new(ErrorCode::Version, msg.clone()).response()).await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        return Err(msg);
    }
    let welcome = Response::Welcome {
        version,
        software: shared.software.clone(),
        allow_new_hosts: shared.service.allow_new_hosts(),
    };
    reply(&mut send, welcome).await
}

async fn login(conn: &quinn::Connection, peer: SocketAddr, shared: &Arc<Shared>) -> Result<Session, String> {
    let binding = transport::binding(conn).map_err(|e| e.to_string())?;
    for _ in 0..MAX_LOGIN_EXCHANGES {
        let (mut send, req) = next_request(conn).await?;
        let service = shared.service.clone();
        let name = req.name();
        // Repository access is blocking I/O: off the async threads.
        let outcome = tokio::task::spawn_blocking(move || match req {
            Request::KeyHeader { host } => {
                service.key_header(&host).map(|header| (None, Response::KeyHeader { header: header.map(Into::into) }))
            }
            Request::Login { host, client, session, proof } => {
                let attempt = LoginAttempt { binding, proof: proof.into_vec(), token: session, client, peer };
                service.login(&host, attempt).map(|(s, info)| (Some(s), Response::LoggedIn { info }))
            }
            Request::CreateHost { host, host_id, key, client, session, proof } => {
                let attempt = LoginAttempt { binding, proof: proof.into_vec(), token: session, client, peer };
                service
                    .create_host(&host, host_id, key, attempt)
                    .map(|(s, info)| (Some(s), Response::LoggedIn { info }))
            }
            other => Err(Refusal::new(ErrorCode::Protocol, format!("log in before {}", other.name()))),
        })
        .await
        .map_err(|e| format!("{name}: {e}"))?;
        match outcome {
            Ok((session, response)) => {
                reply(&mut send, response).await?;
                if let Some(s) = session {
                    return Ok(s);
                }
            }
            Err(refusal) => {
                if refusal.code == ErrorCode::Auth {
                    tokio::time::sleep(FAILED_LOGIN_DELAY).await;
                }
                reply(&mut send, refusal.response()).await?;
            }
        }
    }
    conn.close(transport::CLOSE_PROTOCOL.into(), b"too many login attempts");
    Err("too many login attempts".into())
}

async fn requests(conn: &quinn::Connection, session: &Session, shared: &Arc<Shared>) -> Result<(), String> {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return Err(e.to_string()),
        };
        let shared = shared.clone();
        let session = session.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = request(send, recv, &session, &shared).await {
                tracing::debug!(peer = %session.peer, "request failed: {e}");
                if e.starts_with("protocol") {
                    conn.close(transport::CLOSE_PROTOCOL.into(), b"protocol error");
                }
            }
        });
    }
}

async fn request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    session: &Session,
    shared: &Arc<Shared>,
) -> Result<(), String> {
    let Some(len) = transport::read_header(&mut recv, MAX_FRAME).await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let kib = (len as u32).div_ceil(1024) + RESPONSE_KIB;
    // The host's share first, so that its waiting requests queue there, not in front of
    // other hosts' requests in the global budget.
    let host_budget = shared.host_budget(session.host.name());
    let _host_budget = host_budget.acquire_many(kib).await.map_err(|e| e.to_string())?;
    let _budget = shared.budget.acquire_many(kib).await.map_err(|e| e.to_string())?;
    let _busy = shared.in_flight.enter();
    let body = match tokio::time::timeout(BODY_TIMEOUT, transport::read_body(&mut recv, len)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())),
    };
    let req: Request = match body {
        Ok(r) => r,
        Err(e) => {
            let _ = reply(&mut send, Refusal::new(ErrorCode::Protocol, e.clone()).response()).await;
            return Err(format!("protocol: {e}"));
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Response>(2);
    let service = shared.service.clone();
    let session = session.clone();
    let work = tokio::task::spawn_blocking(move || {
        let mut page = |r: Response| tx.blocking_send(r).is_ok();
        let last = service.handle(&session, req, &mut page);
        let _ = tx.blocking_send(last);
    });
    while let Some(r) = rx.recv().await {
        transport::write_frame(&mut send, &r).await.map_err(|e| e.to_string())?;
    }
    work.await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(())
}
