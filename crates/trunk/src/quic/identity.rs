//! Who may join the cluster: mutual TLS chained to one cluster CA.
//!
//! With a shared cluster secret every node derives the *same* CA key
//! (HKDF-SHA256 over the secret → an Ed25519 seed), issues itself a fresh
//! node certificate signed by it at start, and trusts only that CA, both as
//! server (client certificates required) and as client. Nothing else is
//! shared or stored; a node with another secret has another CA and its
//! handshakes fail. The derivation is written here because no crate does
//! "CA key from a passphrase"; HKDF, Ed25519 and X.509 come from aws-lc-rs
//! and rcgen.
//!
//! The other way in (DESIGN): explicit PEM files from the operator's own CA
//! ([`Identity::from_pem_files`]); node certificates must then carry the DNS
//! name [`SERVER_NAME`] and be valid for both server and client auth.

use std::sync::Arc;

use aws_lc_rs::hkdf;
use aws_lc_rs::signature::Ed25519KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ED25519,
};
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

/// ALPN of the trunk protocol.
pub const ALPN: &[u8] = b"switchboard-trunk/1";
/// The name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "switchboard-trunk";

/// Shortest cluster secret accepted: the CA key is only as strong as it.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the cluster secret must be at least {MIN_SECRET_LEN} bytes")]
    WeakSecret,
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("key derivation failed")]
    Derive,
    #[error("{what} {path}: {error}")]
    Pem {
        what: &'static str,
        path: String,
        error: String,
    },
}

/// This node's certificate and the cluster CA it trusts.
pub struct Identity {
    /// Trusted roots: the cluster CA.
    ca: Vec<CertificateDer<'static>>,
    /// This node's certificate chain, leaf first.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

impl Identity {
    /// Derive the cluster CA from `secret` and issue a node certificate.
    pub fn from_secret(secret: &str) -> Result<Identity, IdentityError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(IdentityError::WeakSecret);
        }
        let ca_key = derive_ca_key(secret)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchboard cluster CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let node_key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "switchboard node");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&node_key, &issuer)?;
        Ok(Identity {
            ca: vec![ca.der().clone()],
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node_key.serialize_der())),
        })
    }

    /// Use the operator's PEM files: the CA certificate(s) every node
    /// chains to, this node's certificate chain (leaf first) and its
    /// private key.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, IdentityError> {
        let pem = |what: &'static str, path: &Path, error: String| IdentityError::Pem {
            what,
            path: path.display().to_string(),
            error,
        };
        let certs = |what: &'static str,
                     path: &Path|
         -> Result<Vec<CertificateDer<'static>>, IdentityError> {
            let list = CertificateDer::pem_file_iter(path)
                .map_err(|e| pem(what, path, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem(what, path, e.to_string()))?;
            if list.is_empty() {
                return Err(pem(what, path, "no certificate in the file".into()));
            }
            Ok(list)
        };
        let identity = Identity {
            ca: certs("CA file", ca)?,
            chain: certs("certificate file", cert)?,
            key: PrivateKeyDer::from_pem_file(key)
                .map_err(|e| pem("key file", key, e.to_string()))?,
        };
        // Fail at start, not at the first handshake.
        identity.server_config()?;
        identity.client_config()?;
        Ok(identity)
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, IdentityError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone())?;
        }
        Ok(Arc::new(roots))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// Server side: TLS 1.3, client certificate required and chained to the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .build()
            .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side: the server must chain to the CA; we present our cert.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// HKDF-SHA256(secret) → 32-byte Ed25519 seed → the cluster CA key.
fn derive_ca_key(secret: &str) -> Result<KeyPair, IdentityError> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"switchboard cluster CA v1");
    let prk = salt.extract(secret.as_bytes());
    let info: [&[u8]; 1] = [b"ed25519 seed"];
    let okm = prk
        .expand(&info, Len32)
        .map_err(|_| IdentityError::Derive)?;
    let mut seed = [0u8; 32];
    okm.fill(&mut seed).map_err(|_| IdentityError::Derive)?;
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| IdentityError::Derive)?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| IdentityError::Derive)?;
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec()),
        &PKCS_ED25519,
    )
    .map_err(IdentityError::Cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_secret_same_ca_key_different_node_keys() {
        let key = |s: &str| derive_ca_key(s).unwrap().public_key_pem();
        assert_eq!(
            key("correct horse battery staple"),
            key("correct horse battery staple")
        );
        assert_ne!(
            key("correct horse battery staple"),
            key("another cluster entirely!!")
        );
        let a = Identity::from_secret("correct horse battery staple").unwrap();
        let b = Identity::from_secret("correct horse battery staple").unwrap();
        assert_ne!(a.chain, b.chain, "each node issues its own certificate");
        assert!(a.server_config().is_ok() && a.client_config().is_ok());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            Identity::from_secret("short"),
            Err(IdentityError::WeakSecret)
        ));
    }
}
