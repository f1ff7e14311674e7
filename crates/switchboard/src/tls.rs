//! HTTPS/WSS on the HTTP port: the certificate and key from PEM files,
//! reloaded without a restart.
//!
//! The acceptor reads its rustls config through an `ArcSwap`
//! (`axum_server::tls_rustls::RustlsConfig`): a reload swaps it for new
//! handshakes only, so connections already open — a call's WebSocket —
//! keep the session they negotiated. Reloads come from SIGHUP
//! ([`crate::Node::reload_tls`]) and from polling the files' contents
//! every `--tls-poll-secs`: content rather than mtime, so a Kubernetes secret
//! volume (a symlink swapped under the path) or a copy that keeps the old
//! mtime is noticed too. A pair that does not load (half-written, key not
//! matching the certificate yet) leaves the previous one serving and is
//! tried again at the next poll.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Mutex, watch};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: bad PEM: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The files, what was last loaded from them, and the live config.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    config: RustlsConfig,
    /// The PEM bytes behind the config that serves now.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl Tls {
    /// Load the pair once; an error here stops the node from starting.
    pub async fn load(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
        let (cert, key) = read_pair(cert_path, key_path).await?;
        let config = build(cert_path, &cert, key_path, &key)?;
        Ok(Tls {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            config: RustlsConfig::from_config(config),
            loaded: Mutex::new((cert, key)),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// What the acceptor serves from.
    pub fn acceptor_config(&self) -> RustlsConfig {
        self.config.clone()
    }

    /// Read the files and, if they changed, serve the new pair to new
    /// connections. `Ok(true)` when it was swapped, `Ok(false)` when the
    /// files are unchanged; on an error the previous pair keeps serving.
    pub async fn reload(&self) -> Result<bool, TlsError> {
        let mut loaded = self.loaded.lock().await;
        let result = async {
            let (cert, key) = read_pair(&self.cert_path, &self.key_path).await?;
            if (&cert, &key) == (&loaded.0, &loaded.1) {
                return Ok(false);
            }
            let config = build(&self.cert_path, &cert, &self.key_path, &key)?;
            self.config.reload_from_config(config);
            *loaded = (cert, key);
            Ok(true)
        }
        .await;
        match &result {
            Ok(true) => {
                self.reloads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(_) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Poll the files every `every` until `stop` turns true. A failure is
    /// logged once per distinct error, not every poll, while the files
    /// stay broken.
    pub async fn watch(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.reload().await {
                Ok(true) => {
                    last_error = None;
                    tracing::info!(cert = %self.cert_path.display(), "TLS certificate changed on disk; reloaded");
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(&text) {
                        tracing::warn!(error = %text, "TLS certificate files changed but do not load; still serving the previous certificate");
                        last_error = Some(text);
                    }
                }
            }
        }
    }
}

async fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        let path = path.to_owned();
        async move {
            tokio::fs::read(&path)
                .await
                .map_err(|source| TlsError::Read { path, source })
        }
    };
    Ok((read(cert).await?, read(key).await?))
}

/// A rustls server config for the pair, on aws-lc (the workspace's one
/// crypto provider), offering HTTP/1.1 only: WebSocket over HTTP/2 needs
/// extended CONNECT, which the HTTP stack here does not serve, and a page
/// of a few assets gains nothing from HTTP/2.
fn build(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
        path: key_path.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // Checks that the key belongs to the certificate, so a rotation caught
    // half-way (new certificate, old key) is refused rather than served.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[tokio::test]
    async fn reload_swaps_only_a_changed_valid_pair() {
        let dir = std::env::temp_dir().join(format!("sb-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        let (c1, k1) = pair("one.test");
        std::fs::write(&c, &c1).unwrap();
        std::fs::write(&k, &k1).unwrap();
        let tls = Tls::load(&c, &k).await.unwrap();
        assert!(
            !tls.reload().await.unwrap(),
            "unchanged files: nothing to do"
        );
        // Half a rotation: a new certificate with the old key is refused.
        let (c2, k2) = pair("two.test");
        std::fs::write(&c, &c2).unwrap();
        assert!(matches!(tls.reload().await, Err(TlsError::Rustls(_))));
        std::fs::write(&k, &k2).unwrap();
        assert!(tls.reload().await.unwrap());
        assert_eq!(tls.reloads.load(Ordering::Relaxed), 1);
        assert_eq!(tls.reload_failures.load(Ordering::Relaxed), 1);
        std::fs::write(&c, "not pem").unwrap();
        assert!(matches!(
            tls.reload().await,
            Err(TlsError::NoCertificate { .. })
        ));
        std::fs::remove_file(&k).unwrap();
        assert!(matches!(tls.reload().await, Err(TlsError::Read { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
