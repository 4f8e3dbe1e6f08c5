//! TLS to the server: with `sslmode=require` in the URL, rustls (on ring),
//! the server's certificate checked against the web's roots, or against
//! the certificates of `sslrootcert=PATH` (a PEM file) when given. Without
//! it, plain TCP: `prefer`, the default, does not turn TLS on, so a server
//! with a certificate nobody can check still accepts a plain connection.

use rustls::pki_types::pem::PemObject as _;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How connections are made: plain, or with rustls.
#[derive(Clone)]
pub(crate) enum Tls {
    Plain,
    Rustls(MakeRustlsConnect),
}

/// The URL's settings and how to connect. `sslrootcert`, which
/// tokio-postgres does not know, is taken out of the URL first.
pub(crate) fn config(url: &str, location: &str) -> Result<(Config, Tls), StoreError> {
    let cannot = |why: String| StoreError::CannotOpen { location: location.to_string(), why };
    let mut parsed = url::Url::parse(url).map_err(|e| cannot(format!("not a PostgreSQL URL: {e}")))?;
    let root_cert = parsed.query_pairs().find(|(k, _)| k == "sslrootcert").map(|(_, v)| v.into_owned());
    if root_cert.is_some() {
        let rest: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(k, _)| k != "sslrootcert")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    let config: Config =
        parsed.as_str().trim_end_matches('?').parse().map_err(|e| cannot(format!("not a PostgreSQL URL: {e}")))?;
    if config.get_ssl_mode() != SslMode::Require {
        if root_cert.is_some() {
            return Err(cannot("sslrootcert is for sslmode=require".into()));
        }
        return Ok((config, Tls::Plain));
    }
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| cannot(format!("sslrootcert {path}: {e}")))?;
            let mut found = 0;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| cannot(format!("sslrootcert {path}: {e}")))?;
                roots.add(cert).map_err(|e| cannot(format!("sslrootcert {path}: {e}")))?;
                found += 1;
            }
            if found == 0 {
                return Err(cannot(format!("sslrootcert {path}: no certificate in it")));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cannot(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((config, Tls::Rustls(MakeRustlsConnect::new(tls))))
}

impl Tls {
    /// A pool manager connecting this way.
    pub(crate) fn manager(
        &self,
        config: Config,
        manager: deadpool_postgres::ManagerConfig,
    ) -> deadpool_postgres::Manager {
        match self {
            Tls::Plain => deadpool_postgres::Manager::from_config(config, tokio_postgres::NoTls, manager),
            Tls::Rustls(tls) => deadpool_postgres::Manager::from_config(config, tls.clone(), manager),
        }
    }

    /// One connection; `drive` gets its connection half to poll (spawned).
    pub(crate) async fn connect<D>(&self, config: &Config, drive: D) -> Result<Client, tokio_postgres::Error>
    where
        D: Driver,
    {
        match self {
            Tls::Plain => connect_with(config, tokio_postgres::NoTls, drive).await,
            Tls::Rustls(tls) => connect_with(config, tls.clone(), drive).await,
        }
    }
}

/// What polls a connection: it may take its notifications.
pub(crate) trait Driver {
    fn drive<S, T>(self, connection: tokio_postgres::Connection<S, T>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
}

async fn connect_with<M, D>(config: &Config, tls: M, drive: D) -> Result<Client, tokio_postgres::Error>
where
    M: MakeTlsConnect<Socket>,
    M::Stream: Send + 'static,
    D: Driver,
{
    let (client, connection) = config.connect(tls).await?;
    drive.drive(connection);
    Ok(client)
}
