//! A loopback TCP proxy that injects faults in front of a service (object store, registry):
//! HTTP 500 and 503 answers, connection resets (before or in the middle of an exchange, so responses
//! can be lost after the server acted), slow connections, and windows of total outage.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    /// Faulty connections per thousand.
    rate: AtomicU32,
    outage_until: Mutex<Option<Instant>>,
    rng: Mutex<StdRng>,
    pub injected: AtomicU64,
}

enum Fault {
    Unavailable,
    Reset,
    Slow,
    /// Pass through, but cut the connection after a while (possibly mid-exchange).
    Cut(Duration),
    None,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr, rate_per_mille: u32, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream,
            rate: AtomicU32::new(rate_per_mille),
            outage_until: Mutex::new(None),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            injected: AtomicU64::new(0),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move { s.handle(conn).await });
            }
        });
        FaultProxy { addr, state }
    }

    /// Refuses every connection for `d`.
    pub fn outage(&self, d: Duration) {
        *self.state.outage_until.lock().unwrap() = Some(Instant::now() + d);
    }

    pub fn set_rate(&self, per_mille: u32) {
        self.state.rate.store(per_mille, Ordering::Relaxed);
    }

    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::Relaxed)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl State {
    fn pick(&self) -> Fault {
        if self
            .outage_until
            .lock()
            .unwrap()
            .is_some_and(|u| Instant::now() < u)
        {
            return Fault::Reset;
        }
        let rate = self.rate.load(Ordering::Relaxed);
        let mut rng = self.rng.lock().unwrap();
        let r = rng.random_range(0..1000u32);
        if r >= rate {
            // Even healthy connections are cut now and then, so pooled connections see faults.
            return if rng.random_range(0..4) == 0 && rate > 0 {
                Fault::Cut(Duration::from_millis(rng.random_range(200..3000)))
            } else {
                Fault::None
            };
        }
        match r % 3 {
            0 => Fault::Unavailable,
            1 => Fault::Reset,
            _ => Fault::Slow,
        }
    }

    async fn handle(&self, mut conn: TcpStream) {
        let fault = self.pick();
        if !matches!(fault, Fault::None) {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        match fault {
            Fault::Reset => drop(conn),
            Fault::Unavailable => {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
                let status: &[u8] = if self.rng.lock().unwrap().random_range(0..2) == 0 {
                    b"503 Service Unavailable"
                } else {
                    b"500 Internal Server Error"
                };
                let answer = [
                    b"HTTP/1.1 ".as_slice(),
                    status,
                    b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                ]
                .concat();
                let _ = conn.write_all(&answer).await;
            }
            Fault::Slow => {
                tokio::time::sleep(Duration::from_millis(400)).await;
                self.pipe(conn, None).await;
            }
            Fault::Cut(after) => self.pipe(conn, Some(after)).await,
            Fault::None => self.pipe(conn, None).await,
        }
    }

    async fn pipe(&self, mut conn: TcpStream, limit: Option<Duration>) {
        let Ok(mut up) = TcpStream::connect(self.upstream).await else {
            return;
        };
        let copy = tokio::io::copy_bidirectional(&mut conn, &mut up);
        match limit {
            Some(d) => {
                let _ = tokio::time::timeout(d, copy).await;
            }
            None => {
                let _ = copy.await;
            }
        }
    }
}
