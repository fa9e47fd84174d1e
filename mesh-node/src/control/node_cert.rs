//! The node certificate: obtained with the node's credential over server-authenticated TLS
//! (`CreateNodeCertificate`), renewed at half-life, with backoff while the controller refuses or
//! cannot be reached. Renewal uses the credential again, not the current certificate, so a
//! revoked credential (deleted token file, deleted pod) locks the node out within one lifetime.
//! Every renewal publishes a fresh mutual-TLS channel; the old one stays usable until its
//! certificate expires, so nothing in flight breaks.

use std::time::{Duration, SystemTime};

use mesh_proto::ca::v1::{CreateNodeCertificateRequest, certificates_client::CertificatesClient};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{Config, Error, Metrics, within};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct Renewer {
    config: Config,
    channel: watch::Sender<Option<Channel>>,
    metrics: Metrics,
}

/// A node certificate as issued.
struct Issued {
    channel: Channel,
    not_after: SystemTime,
}

impl Renewer {
    pub(super) fn new(config: Config, channel: watch::Sender<Option<Channel>>, metrics: Metrics) -> Self {
        Self { config, channel, metrics }
    }

    /// Runs forever: obtain, publish, sleep until half-life, again.
    pub async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let issued_at = SystemTime::now();
            match self.obtain().await {
                Ok(issued) => {
                    self.channel.send_replace(Some(issued.channel));
                    let expiry = issued.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    self.metrics.node_cert_expiry.set(i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX));
                    backoff = BACKOFF_MIN;
                    let lifetime = issued.not_after.duration_since(issued_at).unwrap_or_default();
                    tracing::info!(node = self.config.node_name, valid_for_s = lifetime.as_secs(), "node certificate issued; renewing at half-life");
                    tokio::time::sleep(lifetime / 2).await;
                }
                Err(e) => {
                    self.metrics.node_cert_errors.inc();
                    tracing::warn!(node = self.config.node_name, error = %e, retry_in_ms = backoff.as_millis(), "node certificate not issued");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn obtain(&self) -> Result<Issued, Error> {
        let token = Config::read(&self.config.token_file)?;
        let key = rcgen::KeyPair::generate()?;
        let csr_pem = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
        let ttl_seconds = i64::try_from(self.config.node_cert_ttl.as_secs()).unwrap_or(0);
        let mut request = tonic::Request::new(CreateNodeCertificateRequest { csr_pem, ttl_seconds });
        mesh_proto::authenticate_node(&mut request, &self.config.node_name, &token).map_err(|_| Error::Credential)?;
        // A fresh server-TLS channel each time: it also picks up a changed root file.
        let mut client = CertificatesClient::new(self.config.endpoint(None)?);
        let response = within(self.config.deadlines.call, &self.metrics.call_timeouts, client.create_node_certificate(request)).await?.into_inner();
        let leaf = response.cert_chain_pem.first().ok_or_else(|| Error::Invalid("empty node certificate chain".into()))?;
        let identity = tonic::transport::Identity::from_pem(leaf, key.serialize_pem());
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(response.not_after_unix).unwrap_or(0));
        Ok(Issued { channel: self.config.endpoint(Some(identity))?, not_after })
    }
}
