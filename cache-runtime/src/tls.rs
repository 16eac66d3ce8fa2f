//! TLS to Redis over rustls, with the ring provider.
//!
//! The standalone connections are opened by hand (see `conn.rs`), so they take
//! a [`Connector`] built here; a client redis-rs builds itself (a cluster
//! client) takes the same files through [`redis_certificates`] and
//! [`skip_verify`]. Both read the PEM files once, at `Cache::new`, and refuse
//! one that can't be read or parsed with an error naming its setting and its
//! path, never its contents: a key file's lines are secret.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::CacheConfig;
use crate::CacheError;

/// The PEM files of the TLS settings, read and parsed.
struct Pems {
    /// `tls_ca_cert`'s text and its certificates; `None` trusts the platform's roots.
    ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    /// `tls_client_cert` and `tls_client_key`, for mutual TLS.
    client: Option<ClientPems>,
}

struct ClientPems {
    cert_text: Vec<u8>,
    key_text: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Pems {
    fn read(config: &CacheConfig) -> Result<Pems, CacheError> {
        let ca = match config.tls_ca_cert() {
            Some(path) => {
                let text = read("tls_ca_cert", path)?;
                let certs = certificates("tls_ca_cert", path, &text)?;
                Some((text, certs))
            }
            None => None,
        };
        let client = match (config.tls_client_cert(), config.tls_client_key()) {
            (Some(cert), Some(key)) => {
                let cert_text = read("tls_client_cert", cert)?;
                let chain = certificates("tls_client_cert", cert, &cert_text)?;
                let key_text = read("tls_client_key", key)?;
                // Its error would quote the line it choked on: a line of the key.
                let parsed = PrivateKeyDer::from_pem_slice(&key_text).map_err(|_| {
                    CacheError::config(
                        "tls_client_key",
                        key.display(),
                        "no PEM private key could be read from it (PKCS#8, PKCS#1 or SEC1 expected)",
                    )
                })?;
                Some(ClientPems { cert_text, key_text, chain, key: parsed })
            }
            (Some(cert), None) => {
                return Err(CacheError::config(
                    "tls_client_cert",
                    cert.display(),
                    "a client certificate needs its key: set `tls_client_key` (REDIS_CLIENT_KEY) too",
                ))
            }
            (None, Some(key)) => {
                return Err(CacheError::config(
                    "tls_client_key",
                    key.display(),
                    "a client key needs its certificate: set `tls_client_cert` (REDIS_CLIENT_CERT) too",
                ))
            }
            (None, None) => None,
        };
        Ok(Pems { ca, client })
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, CacheError> {
    std::fs::read(path)
        .map_err(|e| CacheError::config(key, path.display(), format!("could not read it: {e}")))
}

fn certificates(key: &str, path: &Path, text: &[u8]) -> Result<Vec<CertificateDer<'static>>, CacheError> {
    let certs = CertificateDer::pem_slice_iter(text).collect::<Result<Vec<_>, _>>();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(CacheError::config(key, path.display(), "no PEM certificate in it")),
        Err(_) => Err(CacheError::config(key, path.display(), "its PEM certificates could not be parsed")),
    }
}

/// Opens TLS sessions over the standalone connections' TCP streams.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: tokio_rustls::TlsConnector,
}

impl Connector {
    /// Reads the TLS settings of `config`. `skip_verify` also holds for a URL
    /// ending in `#insecure`, which redis-rs reads the same way.
    pub(crate) fn new(config: &CacheConfig, insecure_url: bool) -> Result<Connector, CacheError> {
        let pems = Pems::read(config)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CacheError::config("url", "rediss://…", format!("no TLS version to offer: {e}")))?;
        let builder = if config.tls_insecure_skip_verify() || insecure_url {
            warn_skip_verify();
            builder.dangerous().with_custom_certificate_verifier(Arc::new(SkipVerify(provider)))
        } else {
            builder.with_root_certificates(roots(config, &pems)?)
        };
        let tls = match pems.client {
            Some(client) => builder.with_client_auth_cert(client.chain, client.key).map_err(|e| {
                let path = config.tls_client_key().map(Path::display);
                let path = path.map(|p| p.to_string()).unwrap_or_default();
                CacheError::config("tls_client_key", path, format!("does not go with `tls_client_cert`: {e}"))
            })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Connector { inner: tokio_rustls::TlsConnector::from(Arc::new(tls)) })
    }

    /// The TLS session over `stream`, verified against `host` (a name, or an
    /// IP address that the certificate must list as an IP SAN). A session
    /// refused by either side is [`CacheError::Tls`]: trying again won't help.
    pub(crate) async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, CacheError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            CacheError::Tls(format!("`{host}` is not a host name a certificate can be checked for"))
        })?;
        self.inner.connect(name, stream).await.map_err(|e| {
            match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(refused) => CacheError::Tls(format!("with {host}: {refused}")),
                // The connection broke (a restart, a reset): an outage, not a refusal.
                None => CacheError::from(redis::RedisError::from(e)),
            }
        })
    }
}

/// The error of a handshake (AUTH, SELECT) over a TLS session the client took
/// as established. In TLS 1.3 a server that refuses the client's certificate,
/// or the lack of one, says so only then, with an alert the first read meets;
/// redis-rs passes it on as text, so it is recognized by rustls's wording.
pub(crate) fn refused_late(e: redis::RedisError) -> CacheError {
    let text = e.to_string();
    match text.find("received fatal alert") {
        Some(at) if e.kind() == redis::ErrorKind::Io => CacheError::Tls(format!(
            "Redis ended the session: {} (it may require a client certificate: set `tls_client_cert` and `tls_client_key`)",
            &text[at..]
        )),
        _ => CacheError::from(e),
    }
}

/// `tls_ca_cert`'s certificates, or else the platform's trust store.
fn roots(config: &CacheConfig, pems: &Pems) -> Result<RootCertStore, CacheError> {
    let mut roots = RootCertStore::empty();
    match &pems.ca {
        Some((_, certs)) => {
            let (_, refused) = roots.add_parsable_certificates(certs.iter().cloned());
            if refused > 0 || roots.is_empty() {
                let path = config.tls_ca_cert().map(|p| p.display().to_string()).unwrap_or_default();
                return Err(CacheError::config(
                    "tls_ca_cert",
                    path,
                    "holds a certificate that can't be a trust anchor",
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "a platform root certificate could not be loaded");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(CacheError::config(
                    "tls_ca_cert",
                    "",
                    "not set, and no root certificates were found on this machine: set it (REDIS_CA_CERT) to the CA that signed Redis's certificate",
                ));
            }
        }
    }
    Ok(roots)
}

/// The certificates a client redis-rs builds itself (a cluster client's
/// `ClusterClientBuilder::certs`) needs, from the same settings the standalone
/// connections use: `None` when there is nothing beyond the platform's roots.
/// With [`skip_verify`] it is `.tls(TlsMode::Insecure)`, else `TlsMode::Secure`.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))] // The cluster client's; the standalone connections use `Connector`.
pub(crate) fn redis_certificates(config: &CacheConfig) -> Result<Option<redis::TlsCertificates>, CacheError> {
    let pems = Pems::read(config)?;
    if pems.ca.is_none() && pems.client.is_none() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates {
        client_tls: pems
            .client
            .map(|c| redis::ClientTlsConfig { client_cert: c.cert_text, client_key: c.key_text }),
        root_cert: pems.ca.map(|(text, _)| text),
    }))
}

/// Whether certificate verification is off (`tls_insecure_skip_verify`),
/// warned about once per call.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))] // The cluster client's, beside `redis_certificates`.
pub(crate) fn skip_verify(config: &CacheConfig) -> bool {
    let skip = config.tls_insecure_skip_verify();
    if skip {
        warn_skip_verify();
    }
    skip
}

fn warn_skip_verify() {
    tracing::warn!(
        "TLS certificate verification is OFF (`tls_insecure_skip_verify`): any server, or anyone in between, \
         can pose as Redis; for development only"
    );
}

/// Accepts any certificate for any name, for development against a server
/// whose certificate can't be verified. Handshake signatures are still
/// checked: they prove the server holds the key of the certificate it sent.
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
