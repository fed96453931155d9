//! Traffic: when each preview last served a request, as nginx itself reports it. Every vhost
//! logs its requests to previewd over syslog on a loopback UDP port (the `{{ traffic }}`
//! directive of the vhost template); previewd's side of a request is one map update, off the
//! request's path. The lifecycle's sweep saves the map now and then (see `lifecycle::sweep`)
//! and gives it back at start.
//!
//! A preview is named in the log by a syslog tag derived from its name (tags allow only
//! `[a-zA-Z0-9_]`, 32 characters); the tags of the vhosts previewd rendered are known here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::preview::Slug;

/// The largest datagram read: a `combined` log line with long URLs and user agents.
const MAX_DATAGRAM: usize = 8192;

/// The record of requests; cheap to clone.
#[derive(Clone)]
pub struct Traffic {
    inner: Arc<Inner>,
}

struct Inner {
    address: SocketAddr,
    last: Mutex<HashMap<Slug, SystemTime>>,
    tags: Mutex<HashMap<String, Slug>>,
    /// Stops the receiving task when the last `Traffic` goes.
    _stop: DropGuard,
}

impl Traffic {
    /// Listens on a free loopback UDP port. The port changes at each start; vhosts are
    /// rendered again by the start-up reconcile.
    pub async fn start() -> std::io::Result<Self> {
        let socket = UdpSocket::bind(("127.0.0.1", 0)).await?;
        let address = socket.local_addr()?;
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            address,
            last: Mutex::default(),
            tags: Mutex::default(),
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(receive(socket, Arc::downgrade(&inner), stop));
        Ok(Self { inner })
    }

    /// The access log directive for a preview's vhost: one syslog line per request, to previewd.
    pub fn directive(&self, slug: &Slug) -> String {
        let tag = tag_for(slug);
        self.tags().insert(tag.clone(), slug.clone());
        format!("access_log syslog:server={},nohostname,tag={tag},severity=info combined;", self.inner.address)
    }

    /// Counts as a request now: a launch or a wake is use too.
    pub fn touch(&self, slug: &Slug) {
        self.record(slug, SystemTime::now());
    }

    fn record(&self, slug: &Slug, at: SystemTime) {
        let mut last = self.inner.last.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = last.entry(slug.clone()).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// When the preview last served a request (or was launched or woken), since previewd started.
    pub fn last_request(&self, slug: &Slug) -> Option<SystemTime> {
        self.inner.last.lock().unwrap_or_else(PoisonError::into_inner).get(slug).copied()
    }

    /// Every preview's last request.
    pub fn snapshot(&self) -> Vec<(Slug, SystemTime)> {
        let last = self.inner.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.iter().map(|(slug, at)| (slug.clone(), *at)).collect()
    }

    /// Takes back last requests saved before a restart (a newer one known stays).
    pub fn restore(&self, saved: impl IntoIterator<Item = (Slug, SystemTime)>) {
        for (slug, at) in saved {
            self.record(&slug, at);
        }
    }

    /// The preview is gone.
    pub fn forget(&self, slug: &Slug) {
        self.inner.last.lock().unwrap_or_else(PoisonError::into_inner).remove(slug);
        self.tags().retain(|_, known| known != slug);
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slug>> {
        self.inner.tags.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn receive(socket: UdpSocket, inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let length = tokio::select! {
            () = stop.cancelled() => return,
            received = socket.recv(&mut buffer) => match received {
                Ok(length) => length,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read nginx's request log");
                    continue;
                }
            },
        };
        let Some(inner) = inner.upgrade() else { return };
        let traffic = Traffic { inner };
        let Some(tag) = tag_of(&buffer[..length]) else { continue };
        let slug = traffic.tags().get(tag).cloned();
        if let Some(slug) = slug {
            traffic.touch(&slug);
        }
    }
}

/// `p` and 24 hex digits of the name's digest: a valid syslog tag for any preview name.
pub fn tag_for(slug: &Slug) -> String {
    let digest = Sha256::digest(slug.as_ref().as_bytes());
    format!("p{}", &hex::encode(digest)[..24])
}

/// The tag of one of nginx's syslog lines: `<190>Dec  6 08:00:00 TAG: message` (RFC 3164,
/// without a host name).
fn tag_of(datagram: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(datagram.get(..datagram.len().min(128))?).ok()?;
    let rest = text.strip_prefix('<')?;
    let (priority, rest) = rest.split_once('>')?;
    priority.parse::<u8>().ok()?;
    // The timestamp is always 15 characters (`Mmm dd hh:mm:ss`), then a space.
    let rest = rest.get(16..)?;
    let (tag, _) = rest.split_once(':')?;
    tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_').then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_read_from_nginxs_syslog_line() {
        assert_eq!(
            tag_of(b"<190>Dec  6 08:00:00 p0123abc: 127.0.0.1 - - [06/Dec/2026:08:00:00 +0000] \"GET / HTTP/1.1\" 200"),
            Some("p0123abc")
        );
        assert_eq!(tag_of(b"<190>Dec 16 08:00:00 p1: x"), Some("p1"));
        assert_eq!(tag_of(b"garbage"), None);
        assert_eq!(tag_of(b"<190>Dec  6 08:00:00 bad tag: x"), None);
        assert_eq!(tag_of(&[0xff, 0xfe]), None);
    }

    #[test]
    fn tags_are_valid_syslog_tags_and_differ_between_previews() {
        let a = tag_for(&Slug::parse("feature-x").unwrap());
        let b = tag_for(&Slug::parse("feature-y").unwrap());
        assert_ne!(a, b);
        assert!(a.len() <= 32 && a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'), "{a}");
    }

    #[tokio::test]
    async fn a_logged_request_of_a_rendered_vhost_is_recorded() {
        let traffic = Traffic::start().await.unwrap();
        let slug = Slug::parse("feature-x").unwrap();
        let directive = traffic.directive(&slug);
        assert!(directive.starts_with("access_log syslog:server=127.0.0.1:"), "{directive}");
        let sender = UdpSocket::bind(("127.0.0.1", 0)).await.unwrap();
        let line = format!("<190>Dec  6 08:00:00 {}: GET /", tag_for(&slug));
        sender.send_to(line.as_bytes(), traffic.inner.address).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while traffic.last_request(&slug).is_none() {
            assert!(std::time::Instant::now() < deadline, "the request was never recorded");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
