//! HTTPS/WSS for bench runs: a throwaway CA and a `localhost` leaf written
//! to a temporary directory for the node, and WSS joins that trust only
//! that CA.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;
use testkit::{Client, Transport};
use tokio_rustls::TlsConnector;

pub struct BenchTls {
    dir: PathBuf,
    pub cert_path: String,
    pub key_path: String,
    connector: TlsConnector,
}

impl BenchTls {
    pub fn new() -> anyhow::Result<BenchTls> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
        let dir =
            std::env::temp_dir().join(format!("switchboard-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, leaf.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone())?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(BenchTls {
            dir,
            cert_path: cert_path.to_string_lossy().into_owned(),
            key_path: key_path.to_string_lossy().into_owned(),
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Join `room` over `wss://<addr>/ws` (addr = the node's `host:port`).
    pub async fn join(&self, addr: &str, room: &str, name: &str) -> anyhow::Result<Client> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = self
            .connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake")?;
        let port = addr.rsplit(':').next().unwrap_or_default();
        let (ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}/ws"), tls)
            .await
            .context("WebSocket upgrade")?;
        Ok(Client::join(Transport::from_websocket(ws), room, name).await?)
    }
}

impl Drop for BenchTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
