//! Proves that nginx serves a route, from the outside: a request to nginx itself (on
//! `nginx.listen`, with the preview's Host header, TLS with SNI when the vhost listens `ssl`) for
//! the probe location every vhost carries. That location proxies to the preview's upstream and
//! marks its answer with the upstream, so an answer from nginx's default server, from another
//! server block, or from an old route is told apart from the new one. When the probe fails,
//! `nginx -T` tells why (see [`diagnose`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The path of the probe location in every vhost.
pub const PROBE_PATH: &str = "/.well-known/previewd-probe";
/// The header the probe location adds to its answer: the upstream it routes to.
pub const PROBE_HEADER: &str = "x-previewd-upstream";
/// How long one probe may take, connection, TLS and the app's answer included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// A response head larger than this is not nginx's.
const MAX_HEAD: usize = 64 * 1024;

/// The probe location of a vhost routed to `upstream` (`127.0.0.1:<port>`), as the vhost
/// template's `{{ probe }}`.
pub fn probe_location(upstream: &str) -> String {
    format!(
        "# previewd requests this after each route change, to prove nginx serves it.\n    \
         location = {PROBE_PATH} {{\n        \
         add_header X-Previewd-Upstream \"{upstream}\" always;\n        \
         proxy_pass http://{upstream}/;\n        \
         proxy_read_timeout 5s;\n    \
         }}"
    )
}

/// Whether a rendered vhost serves TLS: one of its `listen` directives has the `ssl` parameter.
pub fn listens_tls(vhost: &str) -> bool {
    vhost.lines().map(|line| line.split('#').next().unwrap_or_default()).any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("listen") && words.any(|word| word.trim_end_matches(';') == "ssl")
    })
}

/// Where to connect to reach a listen address: a wildcard listen is reached on loopback.
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// What nginx answered the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing accepted the connection (or TLS failed): the message says what happened.
    Unreachable(String),
    /// An HTTP answer; `upstream` is the probe header, absent when another server block answered.
    Http { status: u16, upstream: Option<String> },
}

impl Answer {
    /// Whether the answer came through the vhost of `upstream` from the app itself: a 502 or
    /// 504 is nginx saying the app did not answer.
    pub fn reached(&self, upstream: &str) -> bool {
        matches!(self, Self::Http { status, upstream: Some(seen) } if seen == upstream && *status != 502 && *status != 504)
    }
}

/// Sends the probe request for `host` to nginx at `addr`, with TLS when `tls` or when nginx
/// answers that the port speaks TLS (a vhost may share a port another server block made `ssl`).
pub async fn probe(addr: SocketAddr, host: &str, tls: bool) -> Answer {
    let answer = probe_once(addr, host, tls).await;
    match answer {
        Answer::Http { status: 400, upstream: None } if !tls => probe_once(addr, host, true).await,
        answer => answer,
    }
}

async fn probe_once(addr: SocketAddr, host: &str, tls: bool) -> Answer {
    match tokio::time::timeout(PROBE_TIMEOUT, exchange(addr, host, tls)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(message)) => Answer::Unreachable(message),
        Err(_) => Answer::Unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

async fn exchange(addr: SocketAddr, host: &str, tls: bool) -> Result<Answer, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|err| format!("cannot connect to {addr}: {err}"))?;
    if !tls {
        return request(tcp, host).await;
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|err| format!("{host}: {err}"))?;
    let stream = tls_connector()?.connect(name, tcp).await.map_err(|err| format!("TLS with {addr} failed: {err}"))?;
    request(stream, host).await
}

async fn request<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, host: &str) -> Result<Answer, String> {
    let head =
        format!("GET {PROBE_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: previewd\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.map_err(|err| format!("cannot send the probe: {err}"))?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(answer) = parse_head(&buffer)? {
            return Ok(answer);
        }
        let read = stream.read(&mut chunk).await.map_err(|err| format!("cannot read the answer: {err}"))?;
        if read == 0 || buffer.len() > MAX_HEAD {
            return Err("the connection closed before a complete HTTP answer".to_owned());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// The answer in a response head, once the head is complete.
fn parse_head(bytes: &[u8]) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(_)) => {
            let upstream = response
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case(PROBE_HEADER))
                .map(|header| String::from_utf8_lossy(header.value).into_owned());
            Ok(Some(Answer::Http { status: response.code.unwrap_or_default(), upstream }))
        }
        Err(err) => Err(format!("the answer is not HTTP: {err}")),
    }
}

/// TLS that accepts any certificate: the probe checks which vhost answers, not who signed the
/// certificate (operators often start with a self-signed one).
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why nginx did not serve `vhost_file` for `host` on `listen`, from `nginx -T`: the sites dir
/// not included, or nothing listening, or another server block answering.
pub fn diagnose(dump: &str, sites_dir: &Path, vhost_file: &Path, listen: SocketAddr, answer: &Answer) -> String {
    let files: Vec<&str> =
        dump.lines().filter_map(|line| line.strip_prefix("# configuration file ")?.strip_suffix(':')).collect();
    let main_conf = files.first().copied().unwrap_or("nginx.conf");
    let vhost = vhost_file.display().to_string();
    if !files.contains(&vhost.as_str()) {
        return format!(
            "nginx does not serve {sites}: add `include {sites}/*.conf;` to the http block of {main_conf}, then reload nginx",
            sites = sites_dir.display()
        );
    }
    match answer {
        Answer::Unreachable(why) => format!(
            "nginx reads {vhost} but does not answer on nginx.listen {listen} ({why}): make nginx.listen the address \
             the vhost template listens on, or fix the template's `listen`"
        ),
        Answer::Http { status, upstream: None } => format!(
            "nginx answered {status} from another server block, not from {vhost}: another server on {listen} claims \
             the same host name, or the template's `listen` is not nginx.listen {listen}"
        ),
        Answer::Http { status, upstream: Some(seen) } => format!(
            "nginx routes the host to {seen} and answered {status}: the preview's app did not answer through nginx"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vhost_listening_ssl_is_probed_with_tls() {
        assert!(listens_tls("server {\n    listen 443 ssl;\n"));
        assert!(listens_tls("  listen [::]:8443 ssl http2;"));
        assert!(!listens_tls("  listen 80;\n  # listen 443 ssl;\n  ssl_certificate x;"));
    }

    #[test]
    fn a_wildcard_listen_is_reached_on_loopback() {
        assert_eq!(connect_addr("0.0.0.0:80".parse().unwrap()).to_string(), "127.0.0.1:80");
        assert_eq!(connect_addr("[::]:80".parse().unwrap()).to_string(), "[::1]:80");
        assert_eq!(connect_addr("10.0.0.5:81".parse().unwrap()).to_string(), "10.0.0.5:81");
    }

    #[test]
    fn only_an_answer_marked_with_the_new_upstream_reaches_the_preview() {
        let marked = |status| Answer::Http { status, upstream: Some("127.0.0.1:2000".to_owned()) };
        assert!(marked(200).reached("127.0.0.1:2000"));
        assert!(marked(404).reached("127.0.0.1:2000"));
        assert!(!marked(502).reached("127.0.0.1:2000"));
        assert!(!marked(200).reached("127.0.0.1:2001"));
        assert!(!Answer::Http { status: 404, upstream: None }.reached("127.0.0.1:2000"));
    }

    #[test]
    fn a_response_head_is_read_with_its_probe_header() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n").unwrap(), None);
        let head = b"HTTP/1.1 204 No Content\r\nX-Previewd-Upstream: 127.0.0.1:9\r\n\r\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Some(Answer::Http { status: 204, upstream: Some("127.0.0.1:9".to_owned()) })
        );
        assert!(parse_head(b"\x16\x03\x01 garbage\r\n\r\n").is_err());
    }

    #[test]
    fn a_dump_without_the_sites_dir_names_the_include_to_add_and_the_main_config() {
        let dump = "nginx: the configuration file /etc/nginx/nginx.conf syntax is ok\n\
                    # configuration file /etc/nginx/nginx.conf:\nhttp {\n}\n\
                    # configuration file /etc/nginx/mime.types:\ntypes {}\n";
        let answer = Answer::Http { status: 404, upstream: None };
        let message = diagnose(
            dump,
            Path::new("/srv/sites"),
            Path::new("/srv/sites/x.conf"),
            "127.0.0.1:80".parse().unwrap(),
            &answer,
        );
        assert_eq!(
            message,
            "nginx does not serve /srv/sites: add `include /srv/sites/*.conf;` to the http block of \
             /etc/nginx/nginx.conf, then reload nginx"
        );
    }

    #[test]
    fn a_dump_with_the_vhost_but_no_listener_names_the_listen_address() {
        let dump = "# configuration file /etc/nginx/nginx.conf:\n# configuration file /srv/sites/x.conf:\n";
        let answer = Answer::Unreachable("connection refused".to_owned());
        let message = diagnose(
            dump,
            Path::new("/srv/sites"),
            Path::new("/srv/sites/x.conf"),
            "127.0.0.1:81".parse().unwrap(),
            &answer,
        );
        assert!(message.contains("does not answer on nginx.listen 127.0.0.1:81"), "{message}");
    }
}
