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
//! name [`SERVER_NAME`], the URI [`node_uri`] `switchboard-node:<id>` naming
//! the node, and be valid for both server and client auth.
//!
//! **Who can be whom.** With operator files the CA issues one certificate
//! per node id, so a node's id is bound to its key: the driver reads the
//! peer's id from its certificate ([`cert_node_id`]) and the core refuses a
//! Hello naming another. With a shared secret every holder can issue any
//! certificate (self-issued ones name the node's id too, for consistency,
//! but prove nothing): all holders are equally trusted.
//!
//! **The secret's strength** ([`check_secret`]): it must be able to carry
//! 128 bits — at least 128 counted as length × log2(the alphabet of the
//! character classes it uses), only base64/base64url/hex characters, not
//! periodic, not mostly runs — because the CA key is derived from it by a
//! fast KDF and a node's certificate (which any client can fetch) lets an
//! attacker test guesses offline. No check tells a random string from a
//! chosen one: [`generate_secret`] (`switchboard secret`) draws 256 bits.

use std::sync::Arc;

use aws_lc_rs::hkdf;
use aws_lc_rs::signature::Ed25519KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ED25519,
};
use std::path::Path;

use crate::proto::NodeId;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

/// ALPN of the trunk protocol.
pub const ALPN: &[u8] = b"switchboard-trunk/1";
/// The name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "switchboard-trunk";

/// How a node certificate names its node: a URI SAN with this prefix and
/// the id in decimal (`switchboard-node:7`).
pub const NODE_URI_PREFIX: &str = "switchboard-node:";

/// Bits a cluster secret must be able to carry (see [`check_secret`]).
pub const MIN_SECRET_BITS: u32 = 128;

/// The URI SAN naming `node` in its certificate.
pub fn node_uri(node: NodeId) -> String {
    format!("{NODE_URI_PREFIX}{}", node.0)
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the cluster secret is too weak: {0}. It must carry at least {MIN_SECRET_BITS} random bits; \
         `switchboard secret` prints a fresh one (256 bits)"
    )]
    WeakSecret(String),
    #[error(
        "certificate file {path}: {error}; with --trunk-ca/--trunk-cert/--trunk-key each node's \
         certificate must name its node id as the URI SAN `switchboard-node:<id>`"
    )]
    CertNodeId { path: String, error: String },
    #[error(
        "certificate file {path} names node {certified}, but this node's id is {configured}: \
         use the certificate issued for node {configured} (or --node-id {certified})"
    )]
    NodeIdMismatch {
        path: String,
        certified: u64,
        configured: u64,
    },
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
    /// The node id this node's certificate names.
    node: Option<NodeId>,
    /// Where the certificate came from (operator files), for messages.
    cert_path: Option<String>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            node: self.node,
            cert_path: self.cert_path.clone(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

impl Identity {
    /// Derive the cluster CA from `secret` (refused if weak: see
    /// [`check_secret`]) and issue a certificate naming `node`.
    pub fn from_secret(secret: &str, node: NodeId) -> Result<Identity, IdentityError> {
        check_secret(secret)?;
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
            .subject_alt_names
            .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
                node_uri(node),
            )?));
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
            node: Some(node),
            cert_path: None,
        })
    }

    /// The node id this node's certificate names.
    pub fn node_id(&self) -> Option<NodeId> {
        self.node
    }

    /// Whether certificates bind node ids (operator files): the driver
    /// then checks every peer's Hello against its certificate, and this
    /// node's own id against [`Self::node_id`]. With a shared secret any
    /// holder can issue any certificate, so nothing is bound.
    pub fn binds_node_id(&self) -> bool {
        self.cert_path.is_some()
    }

    /// Check that this identity may serve as node `node` (operator files:
    /// the certificate names it). Always fine with a shared secret.
    pub fn check_node_id(&self, node: NodeId) -> Result<(), IdentityError> {
        let Some(path) = &self.cert_path else {
            return Ok(());
        };
        match self.node {
            Some(certified) if certified == node => Ok(()),
            Some(certified) => Err(IdentityError::NodeIdMismatch {
                path: path.clone(),
                certified: certified.0,
                configured: node.0,
            }),
            None => Err(IdentityError::CertNodeId {
                path: path.clone(),
                error: "it names no node id".into(),
            }),
        }
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
        let chain = certs("certificate file", cert)?;
        let cert_path = cert.display().to_string();
        let node = cert_node_id(&chain[0])
            .map_err(|error| IdentityError::CertNodeId {
                path: cert_path.clone(),
                error,
            })?
            .ok_or_else(|| IdentityError::CertNodeId {
                path: cert_path.clone(),
                error: "it names no node id".into(),
            })?;
        let identity = Identity {
            ca: certs("CA file", ca)?,
            chain,
            key: PrivateKeyDer::from_pem_file(key)
                .map_err(|e| pem("key file", key, e.to_string()))?,
            node: Some(node),
            cert_path: Some(cert_path),
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

/// The node id a certificate (DER) names: its URI SANs
/// `switchboard-node:<id>`. `Ok(None)`: none; an error if it cannot be
/// parsed, an id is not a number, or it names several ids.
pub fn cert_node_id(der: &[u8]) -> Result<Option<NodeId>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    let mut found: Option<NodeId> = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) else {
            continue;
        };
        let id = id
            .parse::<u64>()
            .map_err(|_| format!("`{uri}` does not name a node id (a number)"))?;
        match found {
            Some(NodeId(other)) if other != id => {
                return Err(format!("it names two node ids, {other} and {id}"));
            }
            _ => found = Some(NodeId(id)),
        }
    }
    Ok(found)
}

/// A fresh cluster secret: 256 bits from the system's CSPRNG (aws-lc),
/// base64url without padding (43 characters, also long enough for
/// `--auth-secret`).
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator works");
    base64url(&bytes)
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Refuse a cluster secret that cannot carry [`MIN_SECRET_BITS`] bits.
///
/// The rule, checkable and stated in the error: only base64, base64url or
/// hex characters (a generated secret, not a passphrase; `=` padding is
/// not counted); length × log2(size of the character classes it uses —
/// 16 if all hex digits, else the sum of digits 10, lowercase 26,
/// uppercase 26, `-_+/` 4) ≥ 128, so 32 hex or 22–24 base64 characters;
/// not periodic (`abcabc…`) and not mostly runs (`aaaa…`, `1234…`). A
/// string that passes can hold 128 bits; whether it does depends on how
/// it was drawn, which no check can see.
pub fn check_secret(secret: &str) -> Result<(), IdentityError> {
    let weak = |why: String| Err(IdentityError::WeakSecret(why));
    let body = secret.trim_end_matches('=');
    if let Some(c) = body
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '/')))
    {
        return weak(format!(
            "it contains {c:?}; only base64, base64url or hex characters are accepted \
             (a generated secret, not a passphrase)"
        ));
    }
    let b = body.as_bytes();
    let n = b.len();
    let hex = !b.iter().all(u8::is_ascii_digit)
        && (b
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            || b.iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)));
    let alphabet: u32 = if hex {
        16
    } else {
        let has = |f: fn(&u8) -> bool| b.iter().any(f);
        10 * u32::from(has(u8::is_ascii_digit))
            + 26 * u32::from(has(u8::is_ascii_lowercase))
            + 26 * u32::from(has(u8::is_ascii_uppercase))
            + 4 * u32::from(has(|c| matches!(c, b'-' | b'_' | b'+' | b'/')))
    };
    let bits = n as f64 * f64::from(alphabet.max(1)).log2();
    if bits < f64::from(MIN_SECRET_BITS) {
        return weak(format!(
            "{n} characters from an alphabet of {alphabet} carry at most {} bits",
            bits.floor()
        ));
    }
    if let Some(p) = (1..=n / 2).find(|&p| (p..n).all(|i| b[i] == b[i - p])) {
        return weak(format!("it repeats a block of {p} characters"));
    }
    let runs = b.windows(2).filter(|w| w[0].abs_diff(w[1]) <= 1).count();
    if runs * 4 > (n - 1) * 3 {
        return weak("it is mostly runs of equal or consecutive characters".into());
    }
    Ok(())
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

    const SECRET: &str = "q3Vn8xYt-2LpZr7_KcW0aJfB5mHsUe9D";

    #[test]
    fn same_secret_same_ca_key_different_node_keys() {
        let key = |s: &str| derive_ca_key(s).unwrap().public_key_pem();
        assert_eq!(key(SECRET), key(SECRET));
        assert_ne!(key(SECRET), key(&generate_secret()));
        let a = Identity::from_secret(SECRET, NodeId(1)).unwrap();
        let b = Identity::from_secret(SECRET, NodeId(2)).unwrap();
        assert_ne!(a.chain, b.chain, "each node issues its own certificate");
        assert!(a.server_config().is_ok() && a.client_config().is_ok());
        // Self-issued certificates name the node too (binding nothing).
        assert_eq!(cert_node_id(&a.chain[0]), Ok(Some(NodeId(1))));
        assert_eq!(cert_node_id(&b.chain[0]), Ok(Some(NodeId(2))));
        assert!(!a.binds_node_id());
        assert!(a.check_node_id(NodeId(9)).is_ok());
    }

    #[test]
    fn weak_secrets_are_refused_with_the_reason() {
        let why = |s: &str| match check_secret(s) {
            Err(IdentityError::WeakSecret(why)) => why,
            other => panic!("{s:?} not refused: {other:?}"),
        };
        assert!(why("short").contains("carry at most"));
        assert!(why("correct horse battery staple").contains("' '"));
        assert!(why("0123456789012345678901234567890123456789").contains("block of 10"));
        assert!(why(&"a".repeat(40)).contains("repeats"));
        assert!(why(&"Ab1-".repeat(10)).contains("repeats a block of 4"));
        assert!(why("0123456789abcdef0123456789abcdeg").contains("runs"));
        assert!(why("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL").contains("runs"));
        // 31 hex digits: 124 bits; 32: 128.
        assert!(why(&"3f9a1c7e5b2d8046".repeat(2)[..31]).contains("at most 124 bits"));
        let msg = Identity::from_secret("short", NodeId(1))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("too weak") && msg.contains("switchboard secret"),
            "{msg}"
        );
    }

    #[test]
    fn generated_and_common_random_secrets_pass() {
        for _ in 0..1000 {
            let s = generate_secret();
            assert_eq!(s.len(), 43);
            check_secret(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        // `openssl rand -hex 16`, `openssl rand -base64 32`.
        check_secret("3f9a1c7e5b2d80469e1f7a3c5b0d2e84").unwrap();
        check_secret("k2VYp0m4s5X1QfJrW9bZ+eL3u7N/8tHcA6dGqSoR0iE=").unwrap();
        check_secret(SECRET).unwrap();
    }

    #[test]
    fn base64url_matches_the_standard() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
