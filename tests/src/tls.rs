//! A certificate authority of the test's own, and TLS for the harness's servers and clients
//! (the HTTPS health-check test, the demo's external Web Services VIP). Keys and
//! certificates are made afresh per authority and never leave the process, except the CA
//! certificate a health check is told to trust.
use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use rustls::{
    crypto::ring::default_provider,
    pki_types::{PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig,
};

use crate::netns::unique_prefix;

pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    pub fn new() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate in a file of its own (removed on drop), for a health check's
    /// `ca_file`.
    pub fn write_pem(&self) -> Result<PemFile> {
        let path = std::env::temp_dir().join(format!("{}-ca.pem", unique_prefix()));
        std::fs::write(&path, self.cert.pem())
            .with_context(|| format!("write {}", path.display()))?;
        Ok(PemFile { path })
    }

    /// A server's TLS: a fresh key and a certificate for `name` signed by this authority.
    pub fn server(&self, name: &str) -> Result<Arc<ServerConfig>> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![name.to_string()])?
            .signed_by(&key, &self.cert, &self.key)?;
        let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .context("server certificate")?;
        Ok(Arc::new(config))
    }

    /// A client's TLS that trusts this authority only.
    pub fn client(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone())?;
        let config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

pub struct PemFile {
    pub path: PathBuf,
}

impl Drop for PemFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `name` as TLS wants it for SNI and verification.
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string()).with_context(|| format!("server name {name:?}"))
}
