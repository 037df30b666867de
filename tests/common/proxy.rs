//! A TCP proxy on loopback for fault tests. It forwards to one of its
//! backends (the first that accepts a connection, so with several CouchDB
//! nodes it is a fail-over load balancer), and it can make connections go
//! silent: the socket stays open and no byte flows either way, as when a
//! network path dies without a reset. New connections keep working.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop and every connection; dropped with the proxy.
    _tasks: JoinSet<()>,
}

#[derive(Default)]
struct Shared {
    backends: Vec<SocketAddr>,
    /// The silence flag of every connection still open.
    open: Mutex<Vec<Weak<AtomicBool>>>,
    /// Silence the next connection whose request contains this.
    trigger: Mutex<Option<Vec<u8>>>,
    silenced: AtomicU64,
    accepted: AtomicU64,
}

impl Proxy {
    /// A proxy in front of `backends` (URLs or `host:port`), on a free port.
    pub async fn start(backends: &[&str]) -> Proxy {
        let backends = backends.iter().map(|b| socket_addr(b)).collect();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            backends,
            ..Default::default()
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(listener, shared.clone()));
        Proxy {
            addr,
            shared,
            _tasks: tasks,
        }
    }

    /// `url` (with its credentials and path) pointed at the proxy.
    pub fn url(&self, url: &str) -> String {
        pointed_at(url, self.addr)
    }

    /// Every connection open now goes silent.
    pub fn silence_open_connections(&self) {
        let open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
        for flag in open.iter().filter_map(Weak::upgrade) {
            if !flag.swap(true, Ordering::SeqCst) {
                self.shared.silenced.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// The next connection that sends a request containing `pattern` (such
    /// as `POST /_replicate`) goes silent once that request is through: the
    /// server gets it, the client never hears back.
    pub fn silence_next_request(&self, pattern: &str) {
        *self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(pattern.as_bytes().to_vec());
    }

    /// Connections silenced so far.
    pub fn silenced(&self) -> u64 {
        self.shared.silenced.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

/// `url` (with its credentials and path) pointed at a proxy on `addr`.
pub fn pointed_at(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).expect("a server URL");
    parsed.set_port(Some(addr.port())).expect("a port");
    parsed.set_host(Some("127.0.0.1")).expect("a host");
    parsed.as_str().trim_end_matches('/').to_string()
}

fn socket_addr(backend: &str) -> SocketAddr {
    let hostport = match url::Url::parse(backend) {
        Ok(u) if u.has_host() => format!(
            "{}:{}",
            u.host_str().unwrap_or("127.0.0.1"),
            u.port_or_known_default().unwrap_or(80)
        ),
        _ => backend.to_string(),
    };
    hostport
        .replace("localhost", "127.0.0.1")
        .parse()
        .unwrap_or_else(|e| panic!("backend {hostport}: {e}"))
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let Some(server) = connect_any(&shared.backends).await else {
            continue; // every backend is down: the client sees a reset
        };
        let silent = Arc::new(AtomicBool::new(false));
        {
            let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|w| w.strong_count() > 0);
            open.push(Arc::downgrade(&silent));
        }
        connections.spawn(forward(client, server, silent, shared.clone()));
    }
}

async fn connect_any(backends: &[SocketAddr]) -> Option<TcpStream> {
    for backend in backends {
        if let Ok(stream) = TcpStream::connect(backend).await {
            return Some(stream);
        }
    }
    None
}

/// Copies both ways until either side closes; once silenced, holds both
/// sockets open and copies nothing more.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    silent: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        if silent.load(Ordering::SeqCst) {
            // Keep the sockets, send nothing, until the proxy is dropped.
            std::future::pending::<()>().await;
        }
        tokio::select! {
            n = client_read.read(&mut up) => {
                let Ok(n @ 1..) = n else { return };
                let triggered = {
                    let mut trigger = shared.trigger.lock().unwrap_or_else(|e| e.into_inner());
                    let hit = trigger
                        .as_ref()
                        .is_some_and(|p| up[..n].windows(p.len()).any(|w| w == p.as_slice()));
                    if hit {
                        *trigger = None;
                    }
                    hit
                };
                if server_write.write_all(&up[..n]).await.is_err() {
                    return;
                }
                if triggered && !silent.swap(true, Ordering::SeqCst) {
                    shared.silenced.fetch_add(1, Ordering::SeqCst);
                }
            }
            n = server_read.read(&mut down) => {
                let Ok(n @ 1..) = n else { return };
                if silent.load(Ordering::SeqCst) {
                    continue;
                }
                if client_write.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
