//! TLS for the client and peer listeners, with rustls (tonic's `tls-ring` feature).
//!
//! As with etcd, the URL scheme picks the transport: an `https://` client URL is served with
//! `--cert-file`/`--key-file`, and with `--client-cert-auth` only clients presenting a
//! certificate signed by `--trusted-ca-file` are accepted (mutual TLS); an `https://` peer URL
//! likewise with the `--peer-*` files and `--peer-client-cert-auth`. A member connects to
//! `https://` peer URLs verifying them against `--peer-trusted-ca-file` and presenting its peer
//! certificate. With auth enabled and `--client-cert-auth`, a request without a token acts as
//! the user named by its client certificate's common name (etcd's `AuthInfoFromTLS`).
//!
//! Plain-text (`http://`) client listeners keep the [`crate::authority_fix`] repair; TLS ones
//! do not need it for the clients Keel supports (their `:authority` is only broken in plain
//! text).

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::Config;

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    client_auth: bool,
    flags: &str,
) -> anyhow::Result<ServerTlsConfig> {
    let (Some(cert), Some(key)) = (cert, key) else {
        // "https:// URLs need ..." for client and metrics URLs, "https:// peer URLs need ...".
        let kind = flags.replace('-', " ");
        anyhow::bail!(
            "https:// {kind}URLs need a certificate and a key (--{flags}cert-file, --{flags}key-file)"
        );
    };
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(
        read(cert, "certificate")?,
        read(key, "private key")?,
    ));
    if client_auth {
        let Some(ca) = ca else {
            anyhow::bail!("--{flags}client-cert-auth needs --{flags}trusted-ca-file");
        };
        cfg = cfg
            .client_ca_root(Certificate::from_pem(read(ca, "CA bundle")?))
            .client_auth_optional(false);
    }
    Ok(cfg)
}

/// The TLS configuration of `https://` client listeners.
pub fn client_listener_config(c: &Config) -> anyhow::Result<ServerTlsConfig> {
    server_config(
        c.cert_file.as_deref(),
        c.key_file.as_deref(),
        c.trusted_ca_file.as_deref(),
        c.client_cert_auth,
        "",
    )
}

/// The TLS configuration of `https://` peer listeners.
pub fn peer_listener_config(c: &Config) -> anyhow::Result<ServerTlsConfig> {
    server_config(
        c.peer_cert_file.as_deref(),
        c.peer_key_file.as_deref(),
        c.peer_trusted_ca_file.as_deref(),
        c.peer_client_cert_auth,
        "peer-",
    )
}

/// How this member connects to `https://` peer URLs (`None` without peer TLS files).
pub fn peer_client_config(c: &Config) -> anyhow::Result<Option<ClientTlsConfig>> {
    if c.peer_trusted_ca_file.is_none() && c.peer_cert_file.is_none() {
        return Ok(None);
    }
    let mut cfg = ClientTlsConfig::new();
    if let Some(ca) = &c.peer_trusted_ca_file {
        cfg = cfg.ca_certificate(Certificate::from_pem(read(ca, "peer CA bundle")?));
    }
    if let (Some(cert), Some(key)) = (&c.peer_cert_file, &c.peer_key_file) {
        cfg = cfg.identity(Identity::from_pem(
            read(cert, "peer certificate")?,
            read(key, "peer private key")?,
        ));
    }
    Ok(Some(cfg))
}

/// The common name of the verified client certificate a request came with, if any.
pub fn peer_common_name<T>(req: &tonic::Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    common_name(certs.first()?.as_ref())
}

/// [`peer_common_name`] for a raw HTTP request.
pub fn common_name_http(ext: &tonic::codegen::http::Extensions) -> Option<String> {
    let certs = ext
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())?;
    common_name(certs.first()?.as_ref())
}

/// The subject common name of a DER X.509 certificate (its first CN attribute).
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::common_name;

    #[test]
    fn common_name_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "keel");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
        assert_eq!(common_name(b"not a certificate"), None);
    }
}
