//! The API gateway binary run as a child process, and stand-in HTTP backends for it to route to.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_toolkit::testing::{eventually, free_port};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{bin_dir, WAIT};

/// `GATEWAY_JWT_SECRET` of every test gateway.
pub const JWT_SECRET: &str = "test-gateway-secret-0123456789abcdef";

/// A running `api-gateway`.
pub struct Gateway {
    child: Option<Child>,
    port: u16,
    log: tempfile::NamedTempFile,
    /// A client without credentials (tests add the token they mean to send).
    pub http: reqwest::Client,
}

impl Gateway {
    /// Start the gateway with `env` on top of test defaults (the services' upstreams point at a
    /// closed port and are not polled, unless `env` says otherwise) and wait for `/healthz`.
    pub async fn start(env: &[(&str, String)]) -> Self {
        let binary = bin_dir().join("api-gateway");
        assert!(
            binary.exists(),
            "{} not found: build it first (cargo build --bins) or set SAGA_BIN_DIR",
            binary.display()
        );
        let port = free_port();
        let nowhere = format!("http://127.0.0.1:{}", free_port());
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = Command::new(binary);
        cmd.env("GATEWAY_ADDR", format!("127.0.0.1:{port}"))
            .env("GATEWAY_JWT_SECRET", JWT_SECRET)
            .env("ORDER_UPSTREAMS", &nowhere)
            .env("INVENTORY_UPSTREAMS", &nowhere)
            .env("PAYMENT_UPSTREAMS", &nowhere)
            .env("GATEWAY_PROBE_INTERVAL_MS", "0")
            .env("RUST_LOG", "info,api_gateway=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("spawn api-gateway");
        let gw = Self {
            child: Some(child),
            port,
            log,
            http: reqwest::Client::builder()
                // The services close a connection idle past their header timeout (5 s by default):
                // never reuse one that old, or a request can meet the close.
                .pool_idle_timeout(std::time::Duration::from_secs(2))
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
        };
        let url = gw.url("/healthz");
        let http = gw.http.clone();
        eventually(WAIT, "api-gateway to answer /healthz", || {
            let (url, http) = (url.clone(), http.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        gw
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `api-gateway token <customer> --ttl <ttl>` signed with `secret`.
    pub fn token_with(secret: &str, customer: &str, ttl: &str) -> String {
        let out = Command::new(bin_dir().join("api-gateway"))
            .args(["token", customer, &format!("--ttl={ttl}")])
            .env("GATEWAY_JWT_SECRET", secret)
            .output()
            .expect("run api-gateway token");
        assert!(
            out.status.success(),
            "api-gateway token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// A token for `customer`, valid for an hour.
    pub fn token(customer: &str) -> String {
        Self::token_with(JWT_SECRET, customer, "1h")
    }

    /// `GET /readyz` body (whatever its status).
    pub async fn readyz(&self) -> Value {
        let r = self
            .http
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        r.json().await.expect("readyz json")
    }

    /// The circuit of an upstream, as `/readyz` reports it.
    pub async fn circuit(&self, upstream: &str) -> String {
        self.readyz().await["upstreams"][upstream]["circuit"]
            .as_str()
            .unwrap_or("missing")
            .to_owned()
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "---- last lines of api-gateway ----");
            for l in tail.into_iter().rev() {
                let _ = writeln!(err, "{l}");
            }
        }
    }
}

/// One request a stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query as sent to the backend.
    pub target: String,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 backend on 127.0.0.1: answers every request with a fixed status and a JSON
/// body naming itself (`{"backend": name, "method", "target", "items": [], "next": null}`, so it
/// can also stand in for a list), one request per connection; it records what it received.
pub struct StandIn {
    /// Its name, in every answer and in the `x-stand-in` header.
    pub name: String,
    /// Its port (kept across [`StandIn::stop`] and [`StandIn::restart`]).
    pub port: u16,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    received: Arc<Mutex<Vec<Received>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    /// Start on a free port, answering 200.
    pub async fn start(name: &str) -> Self {
        let mut s = Self {
            name: name.to_owned(),
            port: free_port(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Default::default(),
            received: Default::default(),
            task: None,
        };
        s.restart().await;
        s
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answer every request with `status` from now on.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Wait this long before answering, from now on.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// How many requests it received.
    pub fn calls(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// Stop listening: connections to its port are refused.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listen again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = {
            let addr = format!("127.0.0.1:{}", self.port);
            // The aborted task's listener may take a moment to be dropped.
            eventually(WAIT, "the stand-in's port to be free", || {
                let addr = addr.clone();
                async move { tokio::net::TcpListener::bind(&addr).await.ok() }
            })
            .await
        };
        let (name, status, delay, received) = (
            self.name.clone(),
            self.status.clone(),
            self.delay_ms.clone(),
            self.received.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (name, status, delay, received) = (
                    name.clone(),
                    status.clone(),
                    delay.clone(),
                    received.clone(),
                );
                tokio::spawn(async move {
                    let _ = serve_one(stream, &name, &status, &delay, &received).await;
                });
            }
        }));
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_one(
    mut stream: tokio::net::TcpStream,
    name: &str,
    status: &AtomicU16,
    delay_ms: &AtomicU64,
    received: &Mutex<Vec<Received>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body =
        json!({"backend": name, "method": method, "target": target, "items": [], "next": null})
            .to_string();
    received.lock().expect("lock").push(Received {
        method,
        target,
        headers,
    });
    tokio::time::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst))).await;
    let status = status.load(Ordering::SeqCst);
    let answer = format!(
        "HTTP/1.1 {status} Stand-in\r\ncontent-type: application/json\r\nx-stand-in: {name}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}
