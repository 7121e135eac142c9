//! Tenants' secrets, sealed at rest.
//!
//! The operator stores each tenant's secrets (`rein secrets set --tenant T NAME`); a spec the
//! tenant registered names them as `${NAME}` and `api_key_env: NAME`, and they are opened only
//! for the call that sends them. The store keeps them sealed with XChaCha20-Poly1305 under a
//! key from the operator's environment ([`SECRETS_KEY_ENV`]), bound to the tenant and the name
//! (as associated data), so a value copied to another tenant's row, or another name's, does
//! not open. Without the key, the database reveals nothing.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rein_core::TenantId;

/// The environment variable holding the key: 64 hex digits (32 random bytes; `rein secrets
/// key` makes one).
pub const SECRETS_KEY_ENV: &str = "REIN_SECRETS_KEY";

/// What a sealed value starts with: the format's version.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;

/// Why a secret could not be sealed or opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The key is not 64 hex digits.
    #[error(
        "{SECRETS_KEY_ENV} must be 64 hex digits (32 random bytes); `rein secrets key` makes one"
    )]
    BadKey,
    /// No key is configured.
    #[error(
        "{SECRETS_KEY_ENV} is not set: tenants' secrets are sealed with it (`rein secrets key` makes one)"
    )]
    NoKey,
    /// The value does not open under this key, tenant and name (another key sealed it, or the
    /// row was altered or moved).
    #[error(
        "the secret `{0}` does not open with this {SECRETS_KEY_ENV} (sealed under another key, or altered)"
    )]
    Unopenable(String),
    /// The operating system gave no randomness for a nonce.
    #[error("no randomness for a nonce: {0}")]
    NoRandomness(String),
}

/// The operator's key for tenants' secrets. `Debug` never shows it.
#[derive(Clone)]
pub struct SecretKey(XChaCha20Poly1305);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// The key written as 64 hex digits.
    pub fn parse(hex_key: &str) -> Result<Self, SecretError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| SecretError::BadKey)?;
        XChaCha20Poly1305::new_from_slice(&bytes)
            .map(SecretKey)
            .map_err(|_| SecretError::BadKey)
    }

    /// The key in [`SECRETS_KEY_ENV`], if it is set.
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        match std::env::var(SECRETS_KEY_ENV) {
            Ok(text) if !text.trim().is_empty() => SecretKey::parse(&text).map(Some),
            _ => Ok(None),
        }
    }

    /// A new random key, as 64 hex digits.
    pub fn generate() -> Result<String, SecretError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| SecretError::NoRandomness(e.to_string()))?;
        Ok(hex::encode(bytes))
    }

    /// `value` sealed for `tenant`'s secret `name`.
    pub fn seal(&self, tenant: &TenantId, name: &str, value: &str) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SecretError::NoRandomness(e.to_string()))?;
        let aad = associated(tenant, name);
        let sealed = self
            .0
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Unopenable(name.to_string()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The value of `tenant`'s secret `name`, sealed as `sealed`.
    pub fn open(
        &self,
        tenant: &TenantId,
        name: &str,
        sealed: &[u8],
    ) -> Result<String, SecretError> {
        let unopenable = || SecretError::Unopenable(name.to_string());
        let (format, rest) = sealed.split_first().ok_or_else(unopenable)?;
        if *format != FORMAT || rest.len() < NONCE_LEN {
            return Err(unopenable());
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| unopenable())?;
        let aad = associated(tenant, name);
        let plain = self
            .0
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .map_err(|_| unopenable())?;
        String::from_utf8(plain).map_err(|_| unopenable())
    }
}

/// What a sealed value is bound to: the format, the tenant and the name.
fn associated(tenant: &TenantId, name: &str) -> Vec<u8> {
    let mut aad = b"rein-secret-v1\0".to_vec();
    aad.extend_from_slice(tenant.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_tenant_name_and_key() {
        let key = SecretKey::parse(&SecretKey::generate().unwrap()).unwrap();
        let acme = TenantId::new("acme");
        let sealed = key.seal(&acme, "CRM_TOKEN", "tok-123").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"tok-123"));
        assert_eq!(key.open(&acme, "CRM_TOKEN", &sealed).unwrap(), "tok-123");
        let other = TenantId::new("globex");
        assert!(key.open(&other, "CRM_TOKEN", &sealed).is_err());
        assert!(key.open(&acme, "OTHER", &sealed).is_err());
        let another = SecretKey::parse(&SecretKey::generate().unwrap()).unwrap();
        assert!(another.open(&acme, "CRM_TOKEN", &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(key.open(&acme, "CRM_TOKEN", &altered).is_err());
        // Two seals of one value differ (a fresh nonce each time).
        assert_ne!(sealed, key.seal(&acme, "CRM_TOKEN", "tok-123").unwrap());
        assert_eq!(format!("{key:?}"), "SecretKey(..)");
    }

    #[test]
    fn a_bad_key_is_refused() {
        assert_eq!(SecretKey::parse("abc").unwrap_err(), SecretError::BadKey);
        assert_eq!(
            SecretKey::parse(&"zz".repeat(32)).unwrap_err(),
            SecretError::BadKey
        );
    }
}
