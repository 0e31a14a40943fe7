//! Certificate authorities made up for one test (rcgen), shared by the facade's TLS tests and
//! mesh-reapi's security tests.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

use mesh::tls::{CaBundle, TlsIdentity};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority made up for one test.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    pub fn ca(&self) -> CaBundle {
        CaBundle::from_pem(&self.ca_pem).unwrap()
    }

    /// A certificate for 127.0.0.1 and localhost, usable by a server and by a client.
    pub fn identity(&self, name: &str) -> TlsIdentity {
        self.identity_for(name, &["127.0.0.1", "localhost"])
    }

    /// A certificate for `names` only, usable by a server and by a client.
    pub fn identity_for(&self, name: &str, names: &[&str]) -> TlsIdentity {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TlsIdentity::from_pem(cert.pem(), key.serialize_pem()).unwrap()
    }

    /// The CA certificate in PEM (for a client such as Bazel's `--tls_certificate`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A certificate for 127.0.0.1 and localhost that expired in 2021.
    pub fn expired_identity(&self, name: &str) -> TlsIdentity {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TlsIdentity::from_pem(cert.pem(), key.serialize_pem()).unwrap()
    }
}
