//! A deliberately minimal HTTP/1.1 client for load generation: one request
//! written as prepared bytes, the response head parsed by hand, the body
//! skipped. It costs the same for every contender and as little as
//! possible, so the CPU it takes from a 2-core machine is small and equal.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where one contender listens, and the header lines every request to it
/// carries (the IAP assertion and the pinning cookie; the same bytes for
/// every contender, so each parses the same request).
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub headers: String,
}

impl Endpoint {
    /// `extra` is more header lines, each ending in `\r\n`.
    pub fn request(&self, method: &str, path: &str, extra: &str) -> Vec<u8> {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{}{extra}\r\n",
            self.addr, self.headers
        )
        .into_bytes()
    }
}

#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// `Connection: close`: the server ends the connection after this
    /// response (nginx does every `keepalive_requests`, 1000 by default).
    pub close: bool,
    pub set_cookies: Vec<String>,
}

pub struct Conn {
    addr: SocketAddr,
    pub stream: TcpStream,
    /// Bytes read but not yet consumed.
    pub buf: Vec<u8>,
}

fn broken(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            addr,
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Reads more bytes into `buf`; end of stream is an error.
    pub async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(16 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        Ok(())
    }

    pub async fn read_head(&mut self) -> io::Result<Head> {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(broken("response head over 64 KiB"));
            }
            self.fill().await?;
        };
        let text = std::str::from_utf8(&self.buf[..end]).map_err(|_| broken("head not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| broken("bad status line"))?;
        let mut head = Head {
            status,
            content_length: None,
            chunked: false,
            close: false,
            set_cookies: Vec::new(),
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.content_length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                head.close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("set-cookie") {
                head.set_cookies.push(value.to_string());
            }
        }
        self.buf.drain(..end + 4);
        Ok(head)
    }

    /// Reads the body after `head`; kept only if `keep` (small bodies).
    pub async fn read_body(&mut self, head: &Head, keep: bool) -> io::Result<Vec<u8>> {
        let mut kept = Vec::new();
        if head.status == 101 || head.status == 204 || head.status == 304 {
            return Ok(kept);
        }
        if head.chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_text = std::str::from_utf8(&self.buf[..line_end]).map_err(|_| broken("bad chunk size"))?;
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16).map_err(|_| broken("bad chunk size"))?;
                // size line, data, CRLF (for the last chunk: the final CRLF).
                let need = line_end + 2 + size + 2;
                while self.buf.len() < need {
                    self.fill().await?;
                }
                if keep {
                    kept.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                }
                self.buf.drain(..need);
                if size == 0 {
                    return Ok(kept);
                }
            }
        }
        let Some(mut left) = head.content_length else {
            return Err(broken("response without length (connection-delimited)"));
        };
        loop {
            let take = (self.buf.len() as u64).min(left) as usize;
            if keep {
                kept.extend_from_slice(&self.buf[..take]);
            }
            self.buf.drain(..take);
            left -= take as u64;
            if left == 0 {
                return Ok(kept);
            }
            self.fill().await?;
        }
    }

    /// One request and its whole response; returns the status. Reconnects,
    /// as a browser would, when the server closes the connection after it.
    pub async fn roundtrip(&mut self, request: &[u8]) -> io::Result<u16> {
        self.stream.write_all(request).await?;
        let head = self.read_head().await?;
        self.read_body(&head, false).await?;
        if head.close {
            *self = Conn::connect(self.addr).await?;
        }
        Ok(head.status)
    }
}

/// A GET whose status and body are returned (set-up and checks).
pub async fn get(endpoint: &Endpoint, path: &str) -> io::Result<(Head, Vec<u8>)> {
    let mut conn = Conn::connect(endpoint.addr).await?;
    conn.stream.write_all(&endpoint.request("GET", path, "")).await?;
    let head = conn.read_head().await?;
    let body = conn.read_body(&head, true).await?;
    Ok((head, body))
}

/// Latencies in nanoseconds, and how many requests failed.
#[derive(Default)]
pub struct LoadResult {
    pub latencies_ns: Vec<u64>,
    pub errors: u64,
    pub secs: f64,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.latencies_ns.len() as f64 / self.secs
    }
}

/// Percentile `p` (0..=1) of unsorted samples, in the samples' unit.
pub fn percentile(samples: &mut [u64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i] as f64
}

async fn connect_all(addr: SocketAddr, n: usize) -> io::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::connect(addr).await?);
    }
    Ok(conns)
}

/// One connection's latencies (ns) and failed requests.
type ConnTask = tokio::task::JoinHandle<io::Result<(Vec<u64>, u64)>>;

async fn gather(tasks: Vec<ConnTask>, start: Instant) -> io::Result<LoadResult> {
    let mut result = LoadResult::default();
    for task in tasks {
        let (latencies, errors) = task.await.map_err(io::Error::other)??;
        result.latencies_ns.extend(latencies);
        result.errors += errors;
    }
    result.secs = start.elapsed().as_secs_f64();
    Ok(result)
}

/// `conns` keep-alive connections, each sending its next request as soon as
/// the previous response is complete, for `duration`.
pub async fn closed_loop(endpoint: &Endpoint, path: &str, conns: usize, duration: Duration) -> io::Result<LoadResult> {
    let request: Arc<[u8]> = endpoint.request("GET", path, "").into();
    let connections = connect_all(endpoint.addr, conns).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let tasks = connections
        .into_iter()
        .map(|mut conn| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match conn.roundtrip(&request).await? {
                        200 => latencies.push(sent.elapsed().as_nanos() as u64),
                        _ => errors += 1,
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    gather(tasks, start).await
}

/// `rate` requests per second in total, spread evenly over `conns`
/// keep-alive connections on a fixed schedule, for `duration`.
///
/// Free of coordinated omission: when a response comes back after the next
/// request was due, that request's latency counts from when it was due, not
/// from when it could be sent. When the connection was idle at the due time,
/// it counts from the actual send, so the 1 ms granularity of the client's
/// timer is not charged to the server.
pub async fn constant_rate(
    endpoint: &Endpoint,
    path: &str,
    conns: usize,
    rate: f64,
    duration: Duration,
) -> io::Result<LoadResult> {
    let request: Arc<[u8]> = endpoint.request("GET", path, "").into();
    let connections = connect_all(endpoint.addr, conns).await?;
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(5);
    let end = start + duration;
    let tasks = connections
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let request = request.clone();
            let offset = interval.mul_f64(i as f64 / conns as f64);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 14);
                let mut errors = 0;
                let mut previous_done = start;
                for k in 0u32.. {
                    let due = start + offset + interval * k;
                    if due >= end {
                        break;
                    }
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let sent = Instant::now();
                    let status = conn.roundtrip(&request).await?;
                    let done = Instant::now();
                    let from = if previous_done > due { due } else { sent };
                    previous_done = done;
                    match status {
                        200 => latencies.push((done - from).as_nanos() as u64),
                        _ => errors += 1,
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let mut result = gather(tasks, start).await?;
    result.secs = duration.as_secs_f64();
    Ok(result)
}

/// Streams `total` bytes as one request body (with `Content-Length`, as a
/// browser uploads a file) and returns the seconds from the first byte
/// sent to the whole response received. The sink must echo the byte count.
pub async fn upload(endpoint: &Endpoint, path: &str, total: u64) -> io::Result<f64> {
    let mut conn = Conn::connect(endpoint.addr).await?;
    let head = endpoint.request(
        "POST",
        path,
        &format!("Content-Type: application/octet-stream\r\nContent-Length: {total}\r\n"),
    );
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let started = Instant::now();
    conn.stream.write_all(&head).await?;
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        conn.stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    let response = conn.read_head().await?;
    let body = conn.read_body(&response, true).await?;
    let secs = started.elapsed().as_secs_f64();
    let expected = format!("\"bytes\":{total}");
    if response.status != 200 || find(&body, expected.as_bytes()).is_none() {
        return Err(broken(&format!(
            "upload answered {}: {}",
            response.status,
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(secs)
}

/// Time from sending a request for an event stream to holding its first
/// event, `samples` times on one keep-alive connection. The stream has a
/// second event `gap_ms` later, so a proxy that buffers shows the gap.
pub async fn sse_first_event(endpoint: &Endpoint, samples: usize, gap_ms: u64) -> io::Result<Vec<u64>> {
    let mut conn = Conn::connect(endpoint.addr).await?;
    let request = endpoint.request(
        "GET",
        &format!("/events?count=2&interval_ms={gap_ms}"),
        "Accept: text/event-stream\r\n",
    );
    let mut delays = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = Instant::now();
        conn.stream.write_all(&request).await?;
        let head = conn.read_head().await?;
        if head.status != 200 {
            return Err(broken(&format!("event stream answered {}", head.status)));
        }
        while find(&conn.buf, b"data: event 0").is_none() {
            conn.fill().await?;
        }
        delays.push(sent.elapsed().as_nanos() as u64);
        let body = conn.read_body(&head, true).await?;
        if find(&body, b"data: event 1").is_none() {
            return Err(broken("event stream ended without its second event"));
        }
        if head.close {
            conn = Conn::connect(endpoint.addr).await?;
        }
    }
    Ok(delays)
}
