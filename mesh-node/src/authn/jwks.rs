//! The node's cache of JWK sets fetched from `jwksUri`s (Envoy's remote JWKS, as Istio can
//! configure it): each URI the current policies name is fetched once, then refreshed every
//! `MESH_JWKS_REFRESH_SECS` (20 minutes by default, Istio's interval). A token naming a key the
//! set lacks asks for an early refetch (keys were rotated), at most every few seconds. A failed
//! fetch keeps the last good set and retries with backoff; with no set yet, tokens of that issuer
//! get 401 ("Jwks remote fetch is failed"), and requests without a token are unaffected.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use mesh_l7::jwt::{KeySet, KeySource};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{net::TcpStream, sync::Notify};

use crate::state::StateRx;

/// An unknown `kid` refetches no more often than this.
const MIN_REFETCH: Duration = Duration::from_secs(5);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWK set is a few KiB; anything near this is not one.
const MAX_BODY: usize = 1 << 20;
const MAX_BACKOFF: Duration = Duration::from_mins(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Uri(String),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    KeySet(#[from] mesh_l7::jwt::KeySetError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Default)]
struct Entry {
    keys: Option<Arc<KeySet>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    failures: u32,
    refetch: bool,
}

impl Entry {
    /// When this URI should be fetched next (`now` if it never was).
    fn due(&self, refresh: Duration, now: Instant) -> Instant {
        let Some(attempted) = self.attempted else { return now };
        let backoff = Duration::from_secs(1 << self.failures.min(6)).min(MAX_BACKOFF);
        match (self.fetched, self.failures) {
            (_, f) if f > 0 => attempted + backoff,
            (Some(fetched), _) if self.refetch => (attempted + MIN_REFETCH).min(fetched + refresh),
            (Some(fetched), _) => fetched + refresh,
            (None, _) => attempted + backoff,
        }
    }
}

pub struct JwksCache {
    entries: RwLock<HashMap<String, Entry>>,
    wake: Notify,
    refresh: Duration,
    fetches: Family<ResultLabel, Counter>,
}

impl KeySource for JwksCache {
    fn keys(&self, uri: &str) -> Option<Arc<KeySet>> {
        self.entries.read().ok()?.get(uri).and_then(|e| e.keys.clone())
    }

    fn unknown_key(&self, uri: &str) {
        let Ok(mut entries) = self.entries.write() else { return };
        if let Some(e) = entries.get_mut(uri).filter(|e| !e.refetch) {
            e.refetch = true;
            self.wake.notify_one();
        }
    }
}

impl JwksCache {
    pub fn new(refresh: Duration, registry: &mut Registry) -> Arc<Self> {
        let cache = Self { entries: RwLock::default(), wake: Notify::new(), refresh, fetches: Family::default() };
        registry.register("mesh_jwks_fetches", "JWK set fetches from RequestAuthentication jwksUris, by result", cache.fetches.clone());
        Arc::new(cache)
    }

    /// Fetches what the state's policies name, when due, until `stop`.
    pub async fn run(self: Arc<Self>, mut state: StateRx, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let wanted = super::jwks_uris(&state.borrow_and_update().request_authn);
            let due: Vec<String> = {
                let Ok(mut entries) = self.entries.write() else { return };
                entries.retain(|uri, _| wanted.contains(uri));
                for uri in &wanted {
                    entries.entry(uri.clone()).or_default();
                }
                let now = Instant::now();
                entries.iter().filter(|(_, e)| e.due(self.refresh, now) <= now).map(|(u, _)| u.clone()).collect()
            };
            for uri in due {
                let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&uri)).await.unwrap_or(Err(Error::Timeout(FETCH_TIMEOUT)));
                self.record(&uri, result);
            }
            let now = Instant::now();
            let next = self.entries.read().ok().and_then(|e| e.values().map(|e| e.due(self.refresh, now)).min());
            // Never spin: a fetch just made is never due again within this floor.
            let sleep = next.map_or(Duration::from_hours(1), |t| t.saturating_duration_since(now)).max(Duration::from_millis(50));
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = &mut stop => return,
            }
        }
    }

    fn record(&self, uri: &str, result: Result<KeySet, Error>) {
        let Ok(mut entries) = self.entries.write() else { return };
        let Some(e) = entries.get_mut(uri) else { return };
        let now = Instant::now();
        e.attempted = Some(now);
        e.refetch = false;
        match result {
            Ok(keys) => {
                tracing::info!(uri, keys = keys.len(), "JWK set fetched");
                e.keys = Some(Arc::new(keys));
                e.fetched = Some(now);
                e.failures = 0;
                self.fetches.get_or_create(&ResultLabel { result: "ok" }).inc();
            }
            Err(err) => {
                e.failures = e.failures.saturating_add(1);
                let keeping = if e.keys.is_some() { "keeping the last good set" } else { "tokens of its issuer get 401 until it succeeds" };
                tracing::warn!(uri, failures = e.failures, "fetching the JWK set failed ({keeping}): {err}");
                self.fetches.get_or_create(&ResultLabel { result: "error" }).inc();
            }
        }
    }
}

/// GET `uri` (http or https, the system's CA roots or `SSL_CERT_FILE`), a JWK set in the body.
async fn fetch(uri: &str) -> Result<KeySet, Error> {
    let parsed: http::Uri = uri.parse().map_err(|e| Error::Uri(format!("{uri:?}: {e}")))?;
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(Error::Uri(format!("{uri:?} is not http:// or https://"))),
    };
    let host = parsed.host().ok_or_else(|| Error::Uri(format!("{uri:?} has no host")))?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(Error::Connect)?;
    let authority = parsed.authority().map_or(host.clone(), ToString::to_string);
    let path = parsed.path_and_query().map_or("/", http::uri::PathAndQuery::as_str).to_owned();
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| Error::Http(e.to_string()))?;
    let body = if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| Error::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(client_config()?).connect(name, tcp).await.map_err(|e| Error::Tls(e.to_string()))?;
        get(tls, req).await?
    } else {
        get(tcp, req).await?
    };
    let text = std::str::from_utf8(&body).map_err(|e| Error::Http(format!("body is not UTF-8: {e}")))?;
    Ok(KeySet::parse(text)?)
}

async fn get<I>(io: I, req: http::Request<Empty<Bytes>>) -> Result<Bytes, Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| Error::Http(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| Error::Http(e.to_string()))?;
    if resp.status() != http::StatusCode::OK {
        return Err(Error::Status(resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_BODY).collect().await.map_err(|e| Error::Http(e.to_string()))?;
    Ok(body.to_bytes())
}

/// TLS for https JWKS URIs: the system's roots, loaded once.
fn client_config() -> Result<Arc<rustls::ClientConfig>, Error> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no CA certificates found (system store or SSL_CERT_FILE)".to_owned());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(cfg))
        })
        .clone()
        .map_err(Error::Tls)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use mesh_l7::jwt::{Jwks, Provider, testing};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        authn::RequestAuthentication,
        state::{Snapshot, State},
    };

    /// A key server on loopback answering every request with the current `body`.
    async fn key_server(body: Arc<Mutex<String>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = body.lock().expect("lock").clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/jwks.json")
    }

    #[tokio::test]
    async fn fetches_what_the_policies_name_and_refetches_on_an_unknown_key() {
        let (a, b) = (testing::SigningKey::generate("a"), testing::SigningKey::generate("b"));
        let body = Arc::new(Mutex::new(testing::jwks(&[&a])));
        let uri = key_server(body.clone()).await;
        let provider = Provider::new("iss", Jwks::Uri(uri.clone()));
        let ra = RequestAuthentication { name: "r".into(), namespace: "demo".into(), selector: None, providers: vec![provider].into() };
        let snap = Snapshot { request_authentications: vec![ra], ..Snapshot::default() };
        let state = State::build("cluster.local", "mesh-system", snap).expect("state");
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(state));
        let cache = JwksCache::new(Duration::from_mins(20), &mut Registry::default());
        tokio::spawn(cache.clone().run(rx, std::future::pending()));
        let kids = |cache: &JwksCache| cache.keys(&uri).map(|k| format!("{k:?}"));
        for _ in 0..100 {
            if kids(&cache).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(kids(&cache).as_deref(), Some("KeySet { kids: [\"a\"] }"), "fetched at once");
        *body.lock().expect("lock") = testing::jwks(&[&b]);
        cache.unknown_key(&uri);
        tokio::time::sleep(MIN_REFETCH + Duration::from_millis(500)).await;
        assert_eq!(kids(&cache).as_deref(), Some("KeySet { kids: [\"b\"] }"), "refetched within {MIN_REFETCH:?} of an unknown key");
    }

    #[test]
    fn schedule_fetches_refreshes_backs_off_and_refetches_early_on_an_unknown_key() {
        let refresh = Duration::from_mins(20);
        let mut e = Entry::default();
        let t = Instant::now();
        assert_eq!(e.due(refresh, t), t, "a new URI is fetched at once");
        e.attempted = Some(t);
        e.failures = 3;
        assert_eq!(e.due(refresh, t), t + Duration::from_secs(8), "failures back off");
        e.failures = 30;
        assert_eq!(e.due(refresh, t), t + MAX_BACKOFF);
        e.failures = 0;
        e.fetched = Some(t);
        assert_eq!(e.due(refresh, t), t + refresh);
        e.refetch = true;
        assert_eq!(e.due(refresh, t), t + MIN_REFETCH, "a rotated key is looked for soon, not at once");
    }
}
