//! A GPU box that can die for real: when stopped, its port refuses
//! connections and no kept-alive connection of it survives (a stopped
//! [`DemoPod`](super::DemoPod) keeps serving the connections it has).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A GPU box stand-in that answers every request with its name and closes
/// the connection, so that when it is stopped nothing of it is left: no
/// listener, no kept-alive connection in the router's pool.
pub struct GpuBox {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl GpuBox {
    pub async fn start(name: &'static str) -> GpuBox {
        GpuBox::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr`: a box coming back where it was.
    pub async fn start_on(name: &'static str, addr: SocketAddr) -> GpuBox {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Served one at a time inside this task: aborting it ends all.
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        GpuBox { addr, task }
    }

    pub fn url(&self) -> String {
        format!("\"http://{}\"", self.addr)
    }

    /// The box dies: from now on its port refuses connections.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A port nothing listens on.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}
