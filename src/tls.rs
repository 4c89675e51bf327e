//! TLS for the HTTP API with rustls (ring as its crypto provider): the server's certificate
//! and key come from PEM files and are reloaded when either file changes, with no restart; a
//! bad new pair is logged and the previous one kept. The peer client and the CLI verify
//! servers against a CA file (`shoal.http.tls.ca-file`, `--ca-file`).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// How often the certificate and key files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// ring, not aws-lc-rs: ring is already built for the rest of the node and needs no C
/// toolchain beyond `cc`. rustls 0.23.48 marks it deprecated because it lacks post-quantum key
/// exchange (X25519MLKEM768); classical X25519/P-256 key exchange is what ring offers.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring_provider())
}

/// Makes ring the process's rustls provider, for clients built without one of our configs
/// (reqwest builds its own TLS setup even for plain HTTP).
pub fn install_default_provider() {
    let _ = ring_provider().install_default();
}

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("certificate file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("certificate file {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key file {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate {} and key: {e}", cert.display()))?;
    // The server speaks HTTP/1.1 only (see `server`).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config that trusts the CAs in `ca_file` only.
pub fn client_config(ca_file: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("CA file {}: no usable certificate in it", ca_file.display()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server's TLS config, swapped when its files change.
pub struct Reloading {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl Reloading {
    /// TLS as the node's config asks: `None` when `shoal.http.tls.cert-file` is not set.
    pub fn from_config(cfg: &crate::config::Config) -> std::io::Result<Option<Self>> {
        let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else { return Ok(None) };
        let config = server_config(cert, key).map_err(std::io::Error::other)?;
        let current = Arc::new(RwLock::new(Arc::new(config)));
        tokio::spawn(watch(Arc::downgrade(&current), cert.clone(), key.clone()));
        Ok(Some(Self { current }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().expect("tls lock").clone())
    }
}

/// Reloads the pair when either file's modification time changes, until the server is gone.
async fn watch(current: std::sync::Weak<RwLock<Arc<rustls::ServerConfig>>>, cert: PathBuf, key: PathBuf) {
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::time::sleep(RELOAD_CHECK).await;
        let Some(current) = current.upgrade() else { return };
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        seen = now;
        let (c, k) = (cert.clone(), key.clone());
        match crate::env::spawn_blocking(move || server_config(&c, &k)).await {
            Ok(Ok(config)) => {
                *current.write().expect("tls lock") = Arc::new(config);
                tracing::info!(cert = %cert.display(), "reloaded the TLS certificate");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the changed TLS files do not load; the previous certificate stays")
            }
            Err(e) => tracing::error!(error = %e, "reloading the TLS files failed"),
        }
    }
}
