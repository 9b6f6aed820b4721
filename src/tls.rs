//! One TLS crypto provider for the whole process.
//!
//! kube (rustls + ring) and the AWS SDK would otherwise leave rustls with two providers, and
//! `kube::Client::try_from` panics at start-up when it cannot pick one. Every client
//! constructor in this crate calls [`install_crypto_provider`] first, so neither `main` nor a
//! test can forget it.

/// Installs ring as the process-wide rustls provider; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
