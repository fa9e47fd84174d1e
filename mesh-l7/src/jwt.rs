//! End-user authentication with JWTs, Istio's `RequestAuthentication` (Envoy's `jwt_authn`
//! filter as Istio configures it), at the destination node.
//!
//! A request carrying a token at one of a provider's locations must present a valid one: signed
//! by a key of the issuer's key set, not expired, not before its `nbf` (60 s of clock skew, as
//! Envoy allows), with an allowed audience. Otherwise it is refused with 401. A request with no
//! token passes without a principal; an AuthorizationPolicy with `requestPrincipals` or
//! `request.auth.claims[...]` is what makes a token required (Istio's semantics).
//!
//! The first token found decides (providers in order, each provider's locations in order): a
//! token whose issuer no provider reading that location has is refused ("issuer is not
//! configured"), as Envoy does.

use std::{borrow::Borrow, collections::HashSet, fmt, sync::Arc};

use base64::Engine as _;
use http::{HeaderName, HeaderValue, Request};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse},
};
use serde_json::{Map, Value};

/// Envoy's allowed clock skew, seconds.
const CLOCK_SKEW_SECS: u64 = 60;

/// One `jwtRules` entry: which issuer, where its tokens are, which keys sign them.
#[derive(Clone, Debug)]
pub struct Provider {
    pub issuer: String,
    /// Empty: any audience (or none) is accepted.
    pub audiences: Vec<String>,
    /// Where tokens are looked for; all three empty means Istio's defaults, the
    /// `Authorization: Bearer` header and the `access_token` query parameter.
    pub from_headers: Vec<HeaderLocation>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    /// Keep the token in the request sent to the workload (Istio's default is to remove it).
    pub forward_original_token: bool,
    /// A header that carries the verified payload (base64url JSON) to the workload.
    pub output_payload_to_header: Option<HeaderName>,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    pub jwks: Jwks,
}

impl Provider {
    /// A provider of `issuer` with `jwks` and Istio's defaults: any audience, the default token
    /// locations, the token removed, no outputs.
    pub fn new(issuer: impl Into<String>, jwks: Jwks) -> Self {
        Self {
            issuer: issuer.into(),
            audiences: Vec::new(),
            from_headers: Vec::new(),
            from_params: Vec::new(),
            from_cookies: Vec::new(),
            forward_original_token: false,
            output_payload_to_header: None,
            output_claim_to_headers: Vec::new(),
            jwks,
        }
    }

    /// No location configured: Istio's defaults (`Authorization: Bearer`, `access_token`).
    fn default_locations(&self) -> bool {
        self.from_headers.is_empty() && self.from_params.is_empty() && self.from_cookies.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderLocation {
    pub name: HeaderName,
    /// Stripped from the value before the token (`"Bearer "`); empty: the whole value.
    pub prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimToHeader {
    pub header: HeaderName,
    /// A top-level claim, or a nested one as `a.b`.
    pub claim: String,
}

/// Where the issuer's keys come from.
#[derive(Clone, Debug)]
pub enum Jwks {
    /// `jwks`: the key set inline in the resource.
    Inline(Arc<KeySet>),
    /// `jwksUri`: fetched (and refreshed) by the node; see [`KeySource`].
    Uri(String),
}

/// The key sets fetched from `jwksUri`s (the node's cache).
pub trait KeySource: Send + Sync {
    /// The latest key set fetched from `uri`; `None` if none could be fetched yet.
    fn keys(&self, uri: &str) -> Option<Arc<KeySet>>;
    /// A token named a key the set does not have: the keys may have been rotated, so the source
    /// may fetch again sooner than its refresh interval.
    fn unknown_key(&self, uri: &str) {
        let _ = uri;
    }
}

/// A JWK set, with each usable key and the algorithms it may verify.
#[derive(Clone)]
pub struct KeySet {
    entries: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    algorithms: &'static [Algorithm],
    decoding: DecodingKey,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self
            .entries
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

/// Why a key set could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    #[error("not a JWK set: {0}")]
    Parse(String),
    #[error(
        "the JWK set has no key this mesh can verify with (RSA, EC P-256/P-384, Ed25519 or oct)"
    )]
    NoUsableKey,
}

impl KeySet {
    /// Parses a JWK set (`{"keys": [...]}`). Keys of unknown types are skipped, as Envoy does;
    /// a set with none left is an error.
    pub fn parse(json: &str) -> Result<Self, KeySetError> {
        let set: JwkSet =
            serde_json::from_str(json).map_err(|e| KeySetError::Parse(e.to_string()))?;
        let keys: Vec<Key> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                // Encryption keys (`use: enc`, `RSA-OAEP`) never verify a signature.
                if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                    return None;
                }
                let family = algorithms_for(&jwk.algorithm)?;
                // A key that names its algorithm verifies only that one.
                let algorithms = match jwk.common.key_algorithm {
                    Some(named) => {
                        let alg = named.to_string().parse::<Algorithm>().ok()?;
                        single(alg).filter(|_| family.contains(&alg))?
                    }
                    None => family,
                };
                let decoding = DecodingKey::from_jwk(jwk).ok()?;
                Some(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithms,
                    decoding,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err(KeySetError::NoUsableKey);
        }
        Ok(Self { entries: keys })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.entries.iter().filter(move |k| {
            k.algorithms.contains(&alg) && (kid.is_none() || k.kid.as_deref() == kid)
        })
    }
}

fn algorithms_for(params: &AlgorithmParameters) -> Option<&'static [Algorithm]> {
    use Algorithm::{
        ES256, ES384, EdDSA, HS256, HS384, HS512, PS256, PS384, PS512, RS256, RS384, RS512,
    };
    Some(match params {
        AlgorithmParameters::RSA(_) => &[RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[ES256],
            EllipticCurve::P384 => &[ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => &[EdDSA],
        AlgorithmParameters::OctetKey(_) => &[HS256, HS384, HS512],
    })
}

fn single(alg: Algorithm) -> Option<&'static [Algorithm]> {
    use Algorithm::{
        ES256, ES384, EdDSA, HS256, HS384, HS512, PS256, PS384, PS512, RS256, RS384, RS512,
    };
    const ALL: [Algorithm; 12] = [
        HS256, HS384, HS512, ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA,
    ];
    ALL.iter().position(|a| *a == alg).map(|i| &ALL[i..=i])
}

/// A verified token: what authorization (`requestPrincipals`, `request.auth.*`) sees.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestAuth {
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: Map<String, Value>,
}

impl RequestAuth {
    /// The string values of a claim at `path` (`["groups"]`, or nested `["a", "b"]`): a string
    /// claim gives itself, a list gives its strings, anything else nothing (Istio's rule).
    pub fn claim(&self, path: &[&str]) -> Vec<&str> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut value = self.claims.get(*first);
        for key in rest {
            value = value.and_then(|v| v.get(*key));
        }
        match value {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// Why a token was refused; each answers 401 with Envoy's body text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    Malformed,
    #[error("Jwt issuer is not configured")]
    IssuerNotConfigured,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    UnknownKey,
    #[error("Jwt verification fails")]
    VerificationFailed,
    #[error("Jwks remote fetch is failed")]
    KeysUnavailable,
}

impl Error {
    /// Stable metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::IssuerNotConfigured => "issuer_not_configured",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::AudienceNotAllowed => "audience_not_allowed",
            Self::UnknownKey => "unknown_key",
            Self::VerificationFailed => "verification_failed",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }
}

/// Where a token was found, to remove it after verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found<'a> {
    Header(&'a HeaderName),
    Param,
    Cookie,
}

const DEFAULT_PARAM: &str = "access_token";

/// Authenticates `req` against `providers`: `Ok(None)` when it carries no token, `Ok(Some)` with
/// the verified token (the request is also rewritten as the provider says: token removed unless
/// `forward_original_token`, payload and claims copied to headers), `Err` when a token is there
/// and is not valid.
pub fn authenticate<B, P: Borrow<Provider>>(
    providers: &[P],
    keys: &dyn KeySource,
    req: &mut Request<B>,
) -> Result<Option<RequestAuth>, Error> {
    let Some((token, found, index)) = find_token(providers, req) else {
        return Ok(None);
    };
    let payload_b64 = token.split('.').nth(1).ok_or(Error::Malformed)?.to_owned();
    let issuer = peek_issuer(&payload_b64)?;
    // The provider for this issuer that reads the location the token was found at.
    let provider = providers[index..]
        .iter()
        .map(Borrow::borrow)
        .find(|p| p.issuer == issuer && reads(p, found))
        .ok_or(Error::IssuerNotConfigured)?;
    let claims = verify(provider, keys, &token)?;
    let auth = request_auth(&issuer, claims);
    apply(provider, found, &payload_b64, &auth, req);
    Ok(Some(auth))
}

/// The first token in the request, where it was, and the index of the first provider reading
/// that place.
fn find_token<'a, B, P: Borrow<Provider>>(
    providers: &'a [P],
    req: &Request<B>,
) -> Option<(String, Found<'a>, usize)> {
    static AUTHORIZATION: HeaderName = http::header::AUTHORIZATION;
    for (i, p) in providers.iter().map(Borrow::borrow).enumerate() {
        if p.default_locations() {
            if let Some(t) = header_token(req, &AUTHORIZATION, "Bearer ") {
                return Some((t, Found::Header(&AUTHORIZATION), i));
            }
            if let Some(t) = query_param(req, DEFAULT_PARAM) {
                return Some((t, Found::Param, i));
            }
            continue;
        }
        for h in &p.from_headers {
            if let Some(t) = header_token(req, &h.name, &h.prefix) {
                return Some((t, Found::Header(&h.name), i));
            }
        }
        for name in &p.from_params {
            if let Some(t) = query_param(req, name) {
                return Some((t, Found::Param, i));
            }
        }
        for name in &p.from_cookies {
            if let Some(t) = cookie(req, name) {
                return Some((t, Found::Cookie, i));
            }
        }
    }
    None
}

/// Whether `p` looks for tokens where one was found.
fn reads(p: &Provider, found: Found<'_>) -> bool {
    let defaults = p.default_locations();
    match found {
        Found::Header(name) => {
            if defaults {
                name == http::header::AUTHORIZATION
            } else {
                p.from_headers.iter().any(|h| h.name == *name)
            }
        }
        Found::Param => defaults || !p.from_params.is_empty(),
        Found::Cookie => !p.from_cookies.is_empty(),
    }
}

fn header_token<B>(req: &Request<B>, name: &HeaderName, prefix: &str) -> Option<String> {
    req.headers().get_all(name).iter().find_map(|v| {
        let v = v.to_str().ok()?.trim();
        // The scheme of `Authorization: Bearer` is case-insensitive (RFC 7235).
        let rest = if prefix.is_empty() {
            v
        } else if v.len() >= prefix.len()
            && v.is_char_boundary(prefix.len())
            && v[..prefix.len()].eq_ignore_ascii_case(prefix)
        {
            &v[prefix.len()..]
        } else {
            return None;
        };
        let t = rest.trim();
        (!t.is_empty()).then(|| t.to_owned())
    })
}

fn query_param<B>(req: &Request<B>, name: &str) -> Option<String> {
    let query = req.uri().query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn cookie<B>(req: &Request<B>, name: &str) -> Option<String> {
    req.headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|line| {
            line.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_owned())
            })
        })
}

/// The `iss` of an unverified payload, to choose the provider (and its keys).
fn peek_issuer(payload_b64: &str) -> Result<String, Error> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload_b64.trim_end_matches('='))
        .map_err(|_| Error::Malformed)?;
    let payload: Map<String, Value> = serde_json::from_slice(&raw).map_err(|_| Error::Malformed)?;
    match payload.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        _ => Err(Error::IssuerNotConfigured),
    }
}

fn verify(
    provider: &Provider,
    keys: &dyn KeySource,
    token: &str,
) -> Result<Map<String, Value>, Error> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| Error::Malformed)?;
    let set = match &provider.jwks {
        Jwks::Inline(set) => set.clone(),
        Jwks::Uri(uri) => keys.keys(uri).ok_or(Error::KeysUnavailable)?,
    };
    let mut validation = Validation::new(header.alg);
    validation.leeway = CLOCK_SKEW_SECS;
    validation.required_spec_claims = HashSet::new();
    validation.validate_nbf = true;
    // Audiences are checked below with Istio's rule (any configured one, or any at all).
    validation.validate_aud = false;
    let mut tried = false;
    for key in set.candidates(header.kid.as_deref(), header.alg) {
        tried = true;
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
            Ok(data) => {
                check_audience(&provider.audiences, &data.claims)?;
                return Ok(data.claims);
            }
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => return Err(Error::Expired),
                ErrorKind::ImmatureSignature => return Err(Error::NotYetValid),
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::Crypto(_) => {}
                _ => return Err(Error::Malformed),
            },
        }
    }
    if tried {
        Err(Error::VerificationFailed)
    } else {
        if let Jwks::Uri(uri) = &provider.jwks {
            keys.unknown_key(uri);
        }
        Err(Error::UnknownKey)
    }
}

fn audiences(claims: &Map<String, Value>) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn check_audience(allowed: &[String], claims: &Map<String, Value>) -> Result<(), Error> {
    if allowed.is_empty() || audiences(claims).iter().any(|a| allowed.contains(a)) {
        Ok(())
    } else {
        Err(Error::AudienceNotAllowed)
    }
}

fn request_auth(issuer: &str, claims: Map<String, Value>) -> RequestAuth {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    RequestAuth {
        principal: format!("{issuer}/{subject}"),
        audiences: audiences(&claims),
        presenter: claims.get("azp").and_then(Value::as_str).map(str::to_owned),
        claims,
    }
}

/// What a verified token does to the request on its way to the workload.
fn apply<B>(
    provider: &Provider,
    found: Found<'_>,
    payload_b64: &str,
    auth: &RequestAuth,
    req: &mut Request<B>,
) {
    let headers = req.headers_mut();
    if let (false, Found::Header(name)) = (provider.forward_original_token, found) {
        headers.remove(name);
    }
    if let Some((h, Ok(v))) = provider
        .output_payload_to_header
        .as_ref()
        .map(|h| (h, HeaderValue::from_str(payload_b64)))
    {
        headers.insert(h.clone(), v);
    }
    for c in &provider.output_claim_to_headers {
        let path: Vec<&str> = c.claim.split('.').collect();
        let value = path.split_first().and_then(|(first, rest)| {
            rest.iter()
                .try_fold(auth.claims.get(*first)?, |v, k| v.get(*k))
        });
        let text = match value {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => continue,
        };
        if let Ok(v) = HeaderValue::from_str(&text) {
            headers.insert(c.header.clone(), v);
        }
    }
}

/// Signing keys for tests (this crate's, the node's, the lab's): generated ES256 keys, their JWK
/// sets, and tokens signed with them.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    #![expect(
        clippy::missing_panics_doc,
        reason = "test keys: a failure is the test's failure"
    )]
    use base64::Engine as _;
    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
    };
    use serde_json::{Value, json};

    pub struct SigningKey {
        pub kid: String,
        pkcs8: Vec<u8>,
        public: Vec<u8>,
    }

    impl SigningKey {
        pub fn generate(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .expect("generate a P-256 key");
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .expect("read it back");
            Self {
                kid: kid.to_owned(),
                pkcs8: pkcs8.as_ref().to_vec(),
                public: pair.public_key().as_ref().to_vec(),
            }
        }

        /// The public key as a JWK (uncompressed point `04 || x || y`).
        pub fn jwk(&self) -> Value {
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
                   "x": b64(&self.public[1..33]), "y": b64(&self.public[33..65])})
        }

        /// `claims` signed with ES256, with this key's `kid`.
        pub fn sign(&self, claims: &Value) -> String {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(
                &header,
                claims,
                &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
            )
            .expect("sign")
        }
    }

    /// A JWK set of these keys, as a `jwks` field or a `jwksUri` document holds it.
    pub fn jwks(keys: &[&SigningKey]) -> String {
        json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
    }

    /// Seconds since the epoch, for `exp`/`nbf`/`iat`.
    pub fn now() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs(),
        )
        .expect("fits")
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
