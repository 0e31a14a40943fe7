//! The secrets a configuration names: the gossip keyring (from a file or a variable) and
//! the TLS material (certificate, key, CA), read and checked, each error under the key that
//! names the file at fault and never showing a key.

use mesh_core::{Keyring, MAX_CLUSTER_LABEL_LEN};

use super::{ConfigError, MeshConfig, ResolvedTls, invalid};
#[cfg(feature = "tls")]
use crate::tls::{CaBundle, PeerTls, ServerTls, TlsError, TlsIdentity, TlsMaterial};

impl MeshConfig {
    /// The gossip keyring from `gossip_keys_file` or `gossip_keys_env`, and the label check.
    /// Errors name the key and the file or variable, never a key.
    pub(super) fn keyring(&self) -> Result<Option<Keyring>, ConfigError> {
        let keyring = match (
            self.gossip_keys_file.is_empty(),
            self.gossip_keys_env.is_empty(),
        ) {
            (true, true) => None,
            (false, false) => {
                return Err(invalid(
                    "gossip_keys_env",
                    self.gossip_keys_env.clone(),
                    "cannot be set together with gossip_keys_file; keep one",
                ));
            }
            (false, true) => Some(Keyring::from_file(&self.gossip_keys_file).map_err(|e| {
                invalid(
                    "gossip_keys_file",
                    self.gossip_keys_file.clone(),
                    e.to_string(),
                )
            })?),
            (true, false) => Some(Keyring::from_env(&self.gossip_keys_env).map_err(|e| {
                invalid(
                    "gossip_keys_env",
                    self.gossip_keys_env.clone(),
                    e.to_string(),
                )
            })?),
        };
        if !self.cluster_label.is_empty() {
            if keyring.is_none() {
                return Err(invalid(
                    "cluster_label",
                    self.cluster_label.clone(),
                    "needs gossip keys (gossip_keys_file or gossip_keys_env): the label is authenticated by them",
                ));
            }
            if self.cluster_label.len() > MAX_CLUSTER_LABEL_LEN {
                return Err(invalid(
                    "cluster_label",
                    self.cluster_label.clone(),
                    format!("is longer than {MAX_CLUSTER_LABEL_LEN} bytes"),
                ));
            }
        }
        Ok(keyring)
    }

    /// Refuses the `tls_*` keys in a build without TLS.
    #[cfg(not(feature = "tls"))]
    pub(super) fn tls(&self) -> Result<Option<ResolvedTls>, ConfigError> {
        let rule = "needs TLS, which this build of mesh leaves out (its `tls` feature)";
        for (key, value) in [
            ("tls_cert_file", self.tls_cert_file.trim()),
            ("tls_key_file", self.tls_key_file.trim()),
            ("tls_ca_file", self.tls_ca_file.trim()),
            ("tls_domain", self.tls_domain.trim()),
            (
                "tls_client_auth",
                if self.tls_client_auth { "true" } else { "" },
            ),
        ] {
            if !value.is_empty() {
                return Err(invalid(key, value, rule));
            }
        }
        Ok(None)
    }

    /// Reads and checks the TLS material named by the `tls_*` keys.
    #[cfg(feature = "tls")]
    pub(super) fn tls(&self) -> Result<Option<ResolvedTls>, ConfigError> {
        let files = [
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
            ("tls_ca_file", &self.tls_ca_file),
        ];
        let domain = self.tls_domain.trim();
        if files.iter().all(|(_, path)| path.trim().is_empty()) {
            let needs_files = "needs tls_cert_file, tls_key_file and tls_ca_file";
            if self.tls_client_auth {
                return Err(invalid("tls_client_auth", "true", needs_files));
            }
            if !domain.is_empty() {
                return Err(invalid("tls_domain", domain, needs_files));
            }
            return Ok(None);
        }
        for (key, path) in files {
            if path.trim().is_empty() {
                return Err(invalid(
                    key,
                    "",
                    "is required when any of tls_cert_file, tls_key_file and tls_ca_file is set",
                ));
            }
        }
        let ca = CaBundle::from_file(self.tls_ca_file.trim()).map_err(|e| self.tls_error(e))?;
        let identity = TlsIdentity::from_files(self.tls_cert_file.trim(), self.tls_key_file.trim())
            .map_err(|e| self.tls_error(e))?;
        let mut server = ServerTls::new(identity.clone());
        let mut peers = PeerTls::new(ca.clone());
        if self.tls_client_auth {
            server = server.require_client_certificates(ca);
            peers = peers.identity(identity);
        }
        if !domain.is_empty() {
            peers = peers.domain(domain).map_err(|_| {
                invalid("tls_domain", domain, "must be a DNS name or an IP address")
            })?;
        }
        Ok(Some(ResolvedTls { server, peers }))
    }

    /// A TLS error under the key that names the file at fault.
    #[cfg(feature = "tls")]
    fn tls_error(&self, error: TlsError) -> ConfigError {
        let (what, rule) = match &error {
            TlsError::Read { what, source, .. } => {
                (Some(*what), format!("cannot be read: {source}"))
            }
            TlsError::Invalid { what, reason, .. } => (Some(*what), reason.clone()),
            other => (None, other.to_string()),
        };
        let (key, path) = match what {
            Some(TlsMaterial::CaCertificate) => ("tls_ca_file", &self.tls_ca_file),
            Some(TlsMaterial::PrivateKey) => ("tls_key_file", &self.tls_key_file),
            Some(TlsMaterial::Certificate) | None => ("tls_cert_file", &self.tls_cert_file),
        };
        invalid(key, path.trim(), rule)
    }
}
