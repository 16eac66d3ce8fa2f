//! A `redis-server` with a TLS port, and the certificates it and its clients use.
//!
//! The certificates are made per server with rcgen, into the server's own temp
//! dir: a CA, a server certificate for 127.0.0.1 and `localhost` signed by it,
//! a client certificate signed by it, and a second CA that signed nothing (a
//! wrong CA for a client to trust). The server keeps its plain port too, for
//! [`Redis::raw`] and the readiness check; caches reach it on the TLS port.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use cache_runtime::{CacheConfig, CacheConfigBuilder};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{unique_prefix, Redis};

/// PEM files in a temp dir of their own, removed on drop.
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    pub fn generate() -> Certs {
        let dir = std::env::temp_dir().join(unique_prefix("tls-certs"));
        std::fs::create_dir_all(&dir).expect("create a temp dir for certificates");
        let certs = Certs { dir };
        let ca = certs.ca("cache-runtime test CA", "ca");
        let _other = certs.ca("another CA", "other-ca");
        certs.leaf(&ca, "server", &[ExtendedKeyUsagePurpose::ServerAuth]);
        certs.leaf(&ca, "client", &[ExtendedKeyUsagePurpose::ClientAuth]);
        // A cluster node is a server to clients and a client to its peers' bus.
        certs.leaf(&ca, "node", &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]);
        certs
    }

    fn ca(&self, name: &str, file: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        self.write(&format!("{file}.pem"), &ca.pem());
        ca
    }

    fn leaf(&self, ca: &CertifiedIssuer<'static, KeyPair>, file: &str, usages: &[ExtendedKeyUsagePurpose]) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = usages.to_vec();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        self.write(&format!("{file}.pem"), &cert.pem());
        self.write(&format!("{file}.key"), &key.serialize_pem());
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).expect("write a PEM file");
    }

    /// The file `name` in the certificates' dir (which need not exist).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA that signed the server's and the client's certificates.
    pub fn ca_pem(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed neither.
    pub fn other_ca_pem(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// The client certificate and its key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.path("client.pem"), self.path("client.key"))
    }

    /// The `redis-server` arguments of a TLS port presenting the certificate
    /// `cert` (`server`, or `node` for a cluster node) and trusting the CA.
    pub fn server_args(&self, tls_port: u16, cert: &str, auth_clients: &str) -> Vec<String> {
        let path = |name: String| self.path(&name).display().to_string();
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(format!("{cert}.pem")),
            "--tls-key-file".into(),
            path(format!("{cert}.key")),
            "--tls-ca-cert-file".into(),
            path("ca.pem".into()),
            "--tls-auth-clients".into(),
            auth_clients.into(),
        ]
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of our own listening for TLS on `tls_port` (and plain TCP
/// on [`Redis::port`]); `auth_clients` is `--tls-auth-clients` (`yes`,
/// `optional` or `no`). Killed by PID on drop, as [`Redis`] is.
pub struct TlsRedis {
    pub redis: Redis,
    pub tls_port: u16,
    pub certs: Certs,
}

impl TlsRedis {
    pub fn spawn(auth_clients: &str) -> TlsRedis {
        let certs = Certs::generate();
        let tls_port = super::free_port();
        let args = certs.server_args(tls_port, "server", auth_clients);
        let redis = Redis::spawn_with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
        TlsRedis { redis, tls_port, certs }
    }

    /// `rediss://127.0.0.1:{tls_port}/0`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.tls_port)
    }

    /// A builder on the TLS port trusting the test CA, with a prefix of the test's own.
    pub fn config(&self, name: &str) -> CacheConfigBuilder {
        CacheConfig::builder()
            .redis_url(self.url())
            .tls_ca_cert(self.certs.ca_pem())
            .key_prefix(unique_prefix(name))
    }
}
