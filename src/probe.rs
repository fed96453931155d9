//! Asks an app whether it answers HTTP. Any response counts, whatever its status; a bare TCP
//! connect does not, because Docker's port proxy accepts connections before the app listens.

use std::net::SocketAddr;
use std::time::Duration;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Prober {
    client: reqwest::Client,
}

impl Prober {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { client }
    }

    /// True when `http://<upstream><path>` gives any HTTP response.
    pub async fn answers(&self, upstream: SocketAddr, path: &str) -> bool {
        let url = format!("http://{upstream}{path}");
        self.client.get(url).send().await.is_ok()
    }
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_error_status_still_counts_as_an_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            socket.write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        });
        assert!(Prober::new().answers(([127, 0, 0, 1], port).into(), "/").await);
    }

    #[tokio::test]
    async fn a_connection_closed_without_a_response_does_not_count() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            drop(socket);
        });
        assert!(!Prober::new().answers(([127, 0, 0, 1], port).into(), "/").await);
    }
}
