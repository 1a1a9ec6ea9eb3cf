//! The https check's certificate verification with `--health-cacert`.
//!
//! The certificates in the file are the trust anchors (the system's roots are not used),
//! checked by webpki as usual: a private CA and the leaf it signed pass. One case more is
//! accepted, the one the most common recipe makes: `openssl req -x509 -newkey … -nodes`
//! writes a self-signed certificate marked `CA:TRUE`, and a server presenting it as its
//! own is refused by webpki (`CaUsedAsEndEntity`) while curl, OpenSSL and Go accept it
//! when it is in their CA file. Here it is accepted when the server presents **exactly**
//! a certificate of the file (the bytes compared: pinning), still only for the names and
//! addresses it holds and only while it is in date — webpki checks the dates before
//! CA-ness, and a unit test holds it to that.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// webpki, plus the certificates of the file accepted when presented as they are.
#[derive(Debug)]
pub struct CaFileVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    given: Vec<CertificateDer<'static>>,
}

/// The client configuration an https check uses with `certs` (DER) as its only trust.
pub fn client_config(certs: Vec<CertificateDer<'static>>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = CaFileVerifier::new(certs, provider.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(config)
}

impl CaFileVerifier {
    fn new(
        certs: Vec<CertificateDer<'static>>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<CaFileVerifier, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &certs {
            roots.add(cert.clone()).map_err(|e| e.to_string())?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(CaFileVerifier {
            webpki,
            given: certs,
        })
    }
}

/// webpki's objection to a CA certificate presented as the server's own.
fn is_ca_used_as_end_entity(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<webpki::Error>() == Some(&webpki::Error::CaUsedAsEndEntity)
    )
}

impl ServerCertVerifier for CaFileVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e)
                if is_ca_used_as_end_entity(&e)
                    && self.given.iter().any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::time::Duration;

    /// A certificate made by `openssl req -x509` (the self-signed recipe: CA:TRUE) for
    /// `name`, valid for 30 days from now.
    fn self_signed(dir: &std::path::Path, name: &str) -> CertificateDer<'static> {
        let crt = dir.join(format!("{name}.crt"));
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            ])
            .args(["-subj", &format!("/CN={name}")])
            .args([
                "-addext",
                &format!("subjectAltName=DNS:{name},IP:127.0.0.1"),
            ])
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        CertificateDer::from_pem_file(&crt).unwrap()
    }

    fn verify(
        given: &[CertificateDer<'static>],
        presented: &CertificateDer<'static>,
        name: &str,
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = CaFileVerifier::new(given.to_vec(), provider).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier.verify_server_cert(presented, &[], &name, &[], now)
    }

    #[test]
    fn a_self_signed_certificate_given_in_the_file_is_accepted_as_presented_only() {
        let dir = tempdir();
        let cert = self_signed(&dir, "app.test");
        let other = self_signed(&dir, "other.test");
        let now = UnixTime::now();
        // webpki alone refuses what curl, OpenSSL and Go accept.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let plain = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = ServerName::try_from("app.test").unwrap();
        let refused = plain.verify_server_cert(&cert, &[], &name, &[], now);
        assert!(is_ca_used_as_end_entity(&refused.unwrap_err()));

        let given = std::slice::from_ref(&cert);
        assert!(verify(given, &cert, "app.test", now).is_ok());
        assert!(verify(std::slice::from_ref(&cert), &cert, "127.0.0.1", now).is_ok());
        assert!(
            verify(&[other.clone(), cert.clone()], &cert, "app.test", now).is_ok(),
            "any certificate of the file"
        );
        // Not for another name, not out of date, not a certificate the file does not hold.
        let wrong_name = verify(std::slice::from_ref(&cert), &cert, "evil.test", now).unwrap_err();
        assert!(
            matches!(
                wrong_name,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{wrong_name:?}"
        );
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 31 * 86_400));
        let expired = verify(std::slice::from_ref(&cert), &cert, "app.test", later).unwrap_err();
        assert!(
            matches!(
                expired,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{expired:?}"
        );
        assert!(verify(&[other], &cert, "app.test", now).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("registrar-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
