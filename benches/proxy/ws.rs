//! WebSocket measurements: echo round trips with a real client, and many
//! idle sockets opened with the cheapest possible hand-made handshake.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Conn, Endpoint};

fn broken(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Round-trip times (ns) of `count` binary messages of `size` bytes echoed
/// on one socket, after `warmup` unmeasured ones.
pub async fn echo_rtt(
    endpoint: &Endpoint,
    cookie: &str,
    token: &str,
    size: usize,
    warmup: usize,
    count: usize,
) -> io::Result<Vec<u64>> {
    let mut request = format!("ws://{}/ws", endpoint.addr)
        .into_client_request()
        .map_err(io::Error::other)?;
    let headers = request.headers_mut();
    headers.insert("x-goog-iap-jwt-assertion", token.parse().map_err(io::Error::other)?);
    headers.insert("cookie", cookie.parse().map_err(io::Error::other)?);
    let stream = TcpStream::connect(endpoint.addr).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (mut socket, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(io::Error::other)?;
    let payload = Bytes::from((0..size).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let mut rtts = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let sent = Instant::now();
        socket
            .send(Message::Binary(payload.clone()))
            .await
            .map_err(io::Error::other)?;
        let reply = loop {
            match socket.next().await {
                Some(Ok(Message::Binary(data))) => break data,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return Err(broken(format!("echo broke: {other:?}"))),
            }
        };
        let rtt = sent.elapsed().as_nanos() as u64;
        if reply.len() != size {
            return Err(broken(format!("echoed {} of {size} bytes", reply.len())));
        }
        if i >= warmup {
            rtts.push(rtt);
        }
    }
    let _ = socket.close(None).await;
    Ok(rtts)
}

/// Opens one WebSocket by hand: the upgrade request, the `101` head, and
/// nothing else; the socket is then left idle.
async fn open_idle(endpoint: &Endpoint) -> io::Result<Conn> {
    let mut conn = Conn::connect(endpoint.addr).await?;
    let request = endpoint.request(
        "GET",
        "/ws",
        "Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    conn.stream.write_all(&request).await?;
    let head = conn.read_head().await?;
    if head.status != 101 {
        return Err(broken(format!("upgrade answered {}", head.status)));
    }
    Ok(conn)
}

/// Opens `n` idle WebSockets, at most `parallel` handshakes at a time.
pub async fn open_many(endpoint: &Endpoint, n: usize, parallel: usize) -> io::Result<Vec<Conn>> {
    let opened: Vec<io::Result<Conn>> = futures_util::stream::iter(0..n)
        .map(|_| open_idle(endpoint))
        .buffer_unordered(parallel)
        .collect()
        .await;
    opened.into_iter().collect()
}

/// Proves an idle socket is still relayed end to end: one masked frame out,
/// its echo back.
pub async fn check_echo(conn: &mut Conn) -> io::Result<()> {
    let payload = b"still here";
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x82, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    conn.stream.write_all(&frame).await?;
    let expected_len = 2 + payload.len();
    tokio::time::timeout(Duration::from_secs(5), async {
        while conn.buf.len() < expected_len {
            conn.fill().await?;
        }
        Ok::<_, io::Error>(())
    })
    .await
    .map_err(|_| broken("no echo within 5 s".into()))??;
    if conn.buf[0] != 0x82 || &conn.buf[2..expected_len] != payload {
        return Err(broken("wrong echo frame".into()));
    }
    conn.buf.drain(..expected_len);
    Ok(())
}
