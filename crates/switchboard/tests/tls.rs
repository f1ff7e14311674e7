//! HTTPS and WSS on the node's one HTTP port, with a certificate from a
//! test CA, and the certificate replaced without a restart: new connections
//! get the new one while a call's WebSocket opened before stays up.

mod wsclient;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use switchboard::{Config, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// A CA and leaf certificates for `localhost` it signs.
struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A fresh leaf (new key, new serial): (DER, cert PEM, key PEM).
    fn leaf(&self) -> (CertificateDer<'static>, String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().clone(), cert.pem(), key.serialize_pem())
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// A scratch directory with `cert.pem` and `key.pem`.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("sb-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// Replace both files the way a renewal tool does: write aside, rename.
    fn install(&self, cert_pem: &str, key_pem: &str) {
        for (path, pem) in [(self.key(), key_pem), (self.cert(), cert_pem)] {
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_node(files: &Files, poll_secs: u64) -> Node {
    Node::start(Config {
        http_port: 0,
        media_port: 0,
        tls_cert: Some(files.cert()),
        tls_key: Some(files.key()),
        tls_poll_secs: poll_secs,
        ..Default::default()
    })
    .await
    .expect("TLS node starts")
}

async fn tls_connect(connector: &TlsConnector, addr: SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("the handshake succeeds with the test CA trusted")
}

/// The leaf certificate a new connection is served.
async fn served_cert(connector: &TlsConnector, addr: SocketAddr) -> CertificateDer<'static> {
    let s = tls_connect(connector, addr).await;
    s.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

/// Status and body of `GET path` over HTTPS.
async fn https_get(connector: &TlsConnector, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tls_connect(connector, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // The server may close without close_notify: keep what arrived.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    wsclient::parse_response(&buf)
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

async fn wss_join(connector: &TlsConnector, addr: SocketAddr, room: &str, name: &str) -> Wss {
    let tls = tls_connect(connector, addr).await;
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WSS upgrade");
    let join = json!({"type":"join","room":room,"name":name});
    ws.send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    let joined = recv_type(&mut ws, "joined").await;
    assert_eq!(joined["name"], name);
    ws
}

async fn recv_type(ws: &mut Wss, ty: &str) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} within {WAIT:?}"));
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == ty {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended while waiting for {ty}: {other:?}"),
        }
    }
}

/// The session still answers: ping → pong over the old connection.
async fn still_open(ws: &mut Wss) {
    ws.send(Message::Text(json!({"type":"ping"}).to_string().into()))
        .await
        .expect("the old WSS connection still takes frames");
    recv_type(ws, "pong").await;
}

fn roster_names(roster: &Value) -> Vec<String> {
    let mut names: Vec<String> = roster["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn https_and_wss_serve_and_reload_keeps_open_sessions() {
    let ca = Ca::new();
    let connector = ca.connector();
    let files = Files::new("reload");
    let (first, c1, k1) = ca.leaf();
    files.install(&c1, &k1);
    // No polling: only the explicit reload (what SIGHUP calls) changes it.
    let node = tls_node(&files, 0).await;
    assert_eq!(node.scheme(), "https");
    let addr = node.http_addr();

    let (status, body) = https_get(&connector, addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, page) = https_get(&connector, addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.to_ascii_lowercase().contains("<html"), "{page}");
    // Plain HTTP on the TLS port is not served.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("ok\n"));

    let mut ada = wss_join(&connector, addr, "tls-room", "Ada").await;
    assert_eq!(served_cert(&connector, addr).await, first);

    // Renewal: new key, new certificate, same CA.
    let (second, c2, k2) = ca.leaf();
    assert_ne!(first, second);
    files.install(&c2, &k2);
    assert_eq!(
        served_cert(&connector, addr).await,
        first,
        "nothing reloads by itself with polling off"
    );
    assert!(node.reload_tls().await.expect("the new pair loads"));
    assert_eq!(served_cert(&connector, addr).await, second);
    assert!(!node.reload_tls().await.unwrap(), "unchanged: no reload");

    // The session opened before the reload goes on, and a participant
    // who joins over the new certificate shares its room.
    still_open(&mut ada).await;
    let mut bob = wss_join(&connector, addr, "tls-room", "Bob").await;
    loop {
        let roster = recv_type(&mut ada, "roster").await;
        if roster_names(&roster) == ["Ada", "Bob"] {
            break;
        }
    }
    still_open(&mut bob).await;

    // A broken pair is refused and the current one keeps serving.
    files.install("not a certificate", &k2);
    assert!(node.reload_tls().await.is_err());
    assert_eq!(served_cert(&connector, addr).await, second);
    let (status, _) = https_get(&connector, addr, "/readyz").await;
    assert_eq!(status, 200);
    still_open(&mut ada).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_changed_certificate_file_is_picked_up_without_a_signal() {
    let ca = Ca::new();
    let connector = ca.connector();
    let files = Files::new("poll");
    let (first, c1, k1) = ca.leaf();
    files.install(&c1, &k1);
    let node = tls_node(&files, 1).await;
    let addr = node.http_addr();
    let mut ada = wss_join(&connector, addr, "poll-room", "Ada").await;
    assert_eq!(served_cert(&connector, addr).await, first);
    let (second, c2, k2) = ca.leaf();
    files.install(&c2, &k2);
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_cert(&connector, addr).await != second {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not picked up within {WAIT:?}"
        );
        // Polling interval of a condition wait: the node polls every second.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_open(&mut ada).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_node_with_an_unloadable_certificate_does_not_start() {
    let files = Files::new("bad");
    let ca = Ca::new();
    let (_, c1, _) = ca.leaf();
    let (_, _, other_key) = ca.leaf();
    files.install(&c1, &other_key);
    let err = Node::start(Config {
        http_port: 0,
        media_port: 0,
        tls_cert: Some(files.cert()),
        tls_key: Some(files.key()),
        ..Default::default()
    })
    .await
    .err()
    .expect("a key that does not match the certificate is an error");
    assert!(format!("{err:#}").contains("tls"), "{err:#}");
    let missing = Path::new("/nonexistent/cert.pem");
    assert!(
        Node::start(Config {
            http_port: 0,
            media_port: 0,
            tls_cert: Some(missing.into()),
            tls_key: Some(missing.into()),
            ..Default::default()
        })
        .await
        .is_err()
    );
}

/// The real binary: `https://` in its start line, and SIGHUP reloads the
/// certificate (polling is off, so nothing else could have).
#[tokio::test]
async fn the_binary_serves_https_and_reloads_on_sighup() {
    use std::io::BufRead;
    let ca = Ca::new();
    let connector = ca.connector();
    let files = Files::new("bin");
    let (first, c1, k1) = ca.leaf();
    files.install(&c1, &k1);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    let cert = files.cert();
    let key = files.key();
    cmd.args([
        "--http-port",
        "0",
        "--media-port",
        "0",
        "--tls-poll-secs",
        "0",
    ])
    .arg("--tls-cert")
    .arg(&cert)
    .arg("--tls-key")
    .arg(&key)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped());
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(cmd.spawn().expect("the binary starts"));
    let stdout = child.0.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut wait_line = async |want: &str| -> String {
        loop {
            let line = tokio::time::timeout(WAIT, lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no line with {want:?}"))
                .expect("the binary is running");
            if line.contains(want) {
                return line;
            }
        }
    };
    let started = wait_line("Switchboard is running").await;
    let addr: SocketAddr = started
        .split("https://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("an https URL: {started}"))
        .parse()
        .unwrap();
    let mut ada = wss_join(&connector, addr, "bin-room", "Ada").await;
    assert_eq!(served_cert(&connector, addr).await, first);
    let (second, c2, k2) = ca.leaf();
    files.install(&c2, &k2);
    let pid = child.0.id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_line("SIGHUP: TLS certificate reloaded").await;
    assert_eq!(served_cert(&connector, addr).await, second);
    still_open(&mut ada).await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap();
    assert_eq!(status.unwrap().code(), Some(0));
}
