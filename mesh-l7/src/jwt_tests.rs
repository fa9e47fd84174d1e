use std::{collections::HashMap, sync::Mutex};

use serde_json::{Value, json};

use super::{testing::*, *};

const ISS: &str = "https://issuer.example";

/// A key source with fixed sets per URI that records the URIs asked to refresh.
#[derive(Default)]
struct Fetched {
    sets: HashMap<String, Arc<KeySet>>,
    refresh: Mutex<Vec<String>>,
}

impl KeySource for Fetched {
    fn keys(&self, uri: &str) -> Option<Arc<KeySet>> {
        self.sets.get(uri).cloned()
    }

    fn unknown_key(&self, uri: &str) {
        self.refresh.lock().expect("lock").push(uri.to_owned());
    }
}

fn provider(keys: &[&SigningKey]) -> Provider {
    Provider {
        audiences: vec!["orders".into()],
        ..Provider::new(
            ISS,
            Jwks::Inline(Arc::new(KeySet::parse(&jwks(keys)).expect("jwks"))),
        )
    }
}

fn claims(extra: &Value) -> Value {
    let mut c = json!({"iss": ISS, "sub": "alice", "aud": "orders", "exp": now() + 600, "groups": ["dev", "ops"], "azp": "web"});
    c.as_object_mut()
        .expect("object")
        .extend(extra.as_object().expect("object").clone());
    c
}

fn bearer(token: &str) -> Request<()> {
    Request::get("/orders")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .expect("request")
}

fn run(providers: &[Provider], req: &mut Request<()>) -> Result<Option<RequestAuth>, Error> {
    authenticate(providers, &Fetched::default(), req)
}

#[test]
fn a_valid_token_gives_istios_principal_claims_and_is_removed_from_the_request() {
    let key = SigningKey::generate("k1");
    let mut req = bearer(&key.sign(&claims(&json!({}))));
    let auth = run(&[provider(&[&key])], &mut req)
        .expect("valid")
        .expect("a token");
    assert_eq!(auth.principal, format!("{ISS}/alice"));
    assert_eq!(auth.audiences, vec!["orders".to_owned()]);
    assert_eq!(auth.presenter.as_deref(), Some("web"));
    assert_eq!(auth.claim(&["groups"]), vec!["dev", "ops"]);
    assert_eq!(auth.claim(&["sub"]), vec!["alice"]);
    assert!(
        auth.claim(&["exp"]).is_empty(),
        "numbers are not string claims"
    );
    assert!(
        req.headers().get("authorization").is_none(),
        "the token is not forwarded by default"
    );
}

#[test]
fn no_token_passes_without_a_principal() {
    let key = SigningKey::generate("k1");
    let mut req = Request::get("/").body(()).expect("request");
    assert_eq!(run(&[provider(&[&key])], &mut req), Ok(None));
    // A header with another scheme is not a token either.
    let mut basic = Request::get("/")
        .header("authorization", "Basic dXNlcjpwdw==")
        .body(())
        .expect("request");
    assert_eq!(run(&[provider(&[&key])], &mut basic), Ok(None));
}

#[test]
fn the_matrix_of_invalid_tokens_each_with_envoys_reason() {
    let key = SigningKey::generate("k1");
    let other = SigningKey::generate("k1");
    let p = [provider(&[&key])];
    let cases = [
        (
            "expired",
            key.sign(&claims(&json!({"exp": now() - 120}))),
            Error::Expired,
        ),
        (
            "not yet valid",
            key.sign(&claims(&json!({"nbf": now() + 600}))),
            Error::NotYetValid,
        ),
        (
            "wrong issuer",
            key.sign(&claims(&json!({"iss": "https://evil.example"}))),
            Error::IssuerNotConfigured,
        ),
        (
            "wrong audience",
            key.sign(&claims(&json!({"aud": ["billing"]}))),
            Error::AudienceNotAllowed,
        ),
        (
            "no audience",
            key.sign(&json!({"iss": ISS, "sub": "alice"})),
            Error::AudienceNotAllowed,
        ),
        (
            "signed by another key with the same kid",
            other.sign(&claims(&json!({}))),
            Error::VerificationFailed,
        ),
        (
            "unknown kid",
            SigningKey::generate("k9").sign(&claims(&json!({}))),
            Error::UnknownKey,
        ),
        ("not a JWT", "abc.def".to_owned(), Error::Malformed),
    ];
    for (what, token, want) in cases {
        assert_eq!(run(&p, &mut bearer(&token)), Err(want), "{what}");
    }
    // Within the clock skew an expired token is still accepted (Envoy's 60 s).
    assert!(
        run(
            &p,
            &mut bearer(&key.sign(&claims(&json!({"exp": now() - 30}))))
        )
        .is_ok()
    );
}

#[test]
fn a_tampered_payload_fails_verification() {
    let key = SigningKey::generate("k1");
    let token = key.sign(&claims(&json!({})));
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(claims(&json!({"sub": "admin"})).to_string());
    parts[1] = &forged;
    assert_eq!(
        run(&[provider(&[&key])], &mut bearer(&parts.join("."))),
        Err(Error::VerificationFailed)
    );
}

#[test]
fn alg_none_and_hmac_with_a_public_key_are_refused() {
    let key = SigningKey::generate("k1");
    let p = [provider(&[&key])];
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": "k1"})),
        b64(claims(&json!({})))
    );
    assert_eq!(run(&p, &mut bearer(&none)), Err(Error::Malformed));
    // HS256 "signed" with the public key's bytes: no key of the set admits HS256.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("k1".into()),
            ..jsonwebtoken::Header::new(Algorithm::HS256)
        },
        &claims(&json!({})),
        &jsonwebtoken::EncodingKey::from_secret(key.jwk()["x"].as_str().expect("x").as_bytes()),
    )
    .expect("sign");
    assert_eq!(run(&p, &mut bearer(&hs)), Err(Error::UnknownKey));
}

#[test]
fn keys_from_a_uri_come_from_the_source_and_an_unknown_kid_asks_it_to_refresh() {
    let old = SigningKey::generate("old");
    let new = SigningKey::generate("new");
    let uri = "http://keys.example/jwks.json";
    let p = [Provider {
        jwks: Jwks::Uri(uri.into()),
        ..provider(&[&old])
    }];
    let mut source = Fetched::default();
    assert_eq!(
        authenticate(&p, &source, &mut bearer(&old.sign(&claims(&json!({}))))),
        Err(Error::KeysUnavailable)
    );
    source.sets.insert(
        uri.into(),
        Arc::new(KeySet::parse(&jwks(&[&old])).expect("jwks")),
    );
    assert!(authenticate(&p, &source, &mut bearer(&old.sign(&claims(&json!({}))))).is_ok());
    assert_eq!(
        authenticate(&p, &source, &mut bearer(&new.sign(&claims(&json!({}))))),
        Err(Error::UnknownKey)
    );
    assert_eq!(*source.refresh.lock().expect("lock"), vec![uri.to_owned()]);
}

#[test]
fn custom_locations_and_outputs() {
    let key = SigningKey::generate("k1");
    let p = Provider {
        from_headers: vec![HeaderLocation {
            name: HeaderName::from_static("x-jwt"),
            prefix: String::new(),
        }],
        from_params: vec!["token".into()],
        from_cookies: vec!["session".into()],
        forward_original_token: true,
        output_payload_to_header: Some(HeaderName::from_static("x-jwt-payload")),
        output_claim_to_headers: vec![ClaimToHeader {
            header: HeaderName::from_static("x-sub"),
            claim: "sub".into(),
        }],
        ..provider(&[&key])
    };
    let token = key.sign(&claims(&json!({})));
    let mut header = Request::get("/")
        .header("x-jwt", &token)
        .body(())
        .expect("request");
    assert!(
        run(std::slice::from_ref(&p), &mut header)
            .expect("valid")
            .is_some()
    );
    assert_eq!(
        header.headers()["x-jwt"],
        token.as_str(),
        "forwardOriginalToken keeps it"
    );
    assert_eq!(header.headers()["x-sub"], "alice");
    assert_eq!(
        header.headers()["x-jwt-payload"],
        token.split('.').nth(1).expect("payload")
    );
    let mut param = Request::get(format!("/?a=1&token={token}"))
        .body(())
        .expect("request");
    assert!(
        run(std::slice::from_ref(&p), &mut param)
            .expect("valid")
            .is_some()
    );
    let mut cookie = Request::get("/")
        .header("cookie", format!("a=b; session={token}"))
        .body(())
        .expect("request");
    assert!(
        run(std::slice::from_ref(&p), &mut cookie)
            .expect("valid")
            .is_some()
    );
    // Custom locations replace the defaults: a bearer header is not read.
    assert_eq!(run(std::slice::from_ref(&p), &mut bearer(&token)), Ok(None));
}

#[test]
fn two_issuers_each_verified_by_its_own_keys() {
    let a = SigningKey::generate("a");
    let b = SigningKey::generate("b");
    let providers = [
        provider(&[&a]),
        Provider {
            issuer: "https://b.example".into(),
            audiences: Vec::new(),
            ..provider(&[&b])
        },
    ];
    let from_b = b.sign(&json!({"iss": "https://b.example", "sub": "bob"}));
    let auth = run(&providers, &mut bearer(&from_b))
        .expect("valid")
        .expect("a token");
    assert_eq!(auth.principal, "https://b.example/bob");
    // b's issuer with a's key: b's provider verifies it, and a's key is not in b's set.
    let forged = a.sign(&json!({"iss": "https://b.example", "sub": "bob"}));
    assert_eq!(
        run(&providers, &mut bearer(&forged)),
        Err(Error::UnknownKey)
    );
}

#[test]
fn key_sets_refuse_what_cannot_verify() {
    assert!(matches!(KeySet::parse("{}"), Err(KeySetError::Parse(_))));
    assert_eq!(
        KeySet::parse(r#"{"keys": []}"#).err(),
        Some(KeySetError::NoUsableKey)
    );
    let mut enc = SigningKey::generate("e").jwk();
    enc["use"] = json!("enc");
    assert_eq!(
        KeySet::parse(&json!({"keys": [enc]}).to_string()).err(),
        Some(KeySetError::NoUsableKey)
    );
}
