//! `RequestAuthentication` → [`model::RequestAuthentication`]: every rule's issuer, key source,
//! token locations and outputs checked, naming the field; an inline JWK set is parsed by the
//! nodes' own parser, so what is accepted here is what they can verify with.

use std::collections::BTreeSet;

use super::{Error, key_of, scope};
use crate::{crd, model};

/// What a rejected RequestAuthentication enforces instead (the status message says it).
pub(super) const NOT_APPLIED: &str =
    "nothing: tokens are not verified, so its workloads' requests carry no request principal and policies requiring one deny them";

pub(super) fn request_authentication(
    r: &crd::Read<crd::RequestAuthentication>,
    root_namespace: &str,
) -> Result<model::RequestAuthentication, Error> {
    if let Some(field) = r.unknown_fields.first() {
        return Err(Error::UnknownField { field: field.clone() });
    }
    let p = &r.object;
    let key = key_of(p);
    let (scope, selector) = scope(p.spec.selector.as_ref(), &key.namespace, root_namespace)?;
    let mut issuers = BTreeSet::new();
    let mut rules = Vec::new();
    for (i, rule) in p.spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{i}]");
        let rule = jwt_rule(rule, &field)?;
        if !issuers.insert(rule.issuer.clone()) {
            return Err(invalid(format!("{field}.issuer"), format!("issuer {:?} appears in two rules", rule.issuer)));
        }
        rules.push(rule);
    }
    Ok(model::RequestAuthentication { name: key.name, namespace: key.namespace, scope, selector, rules })
}

fn invalid(field: String, problem: impl Into<String>) -> Error {
    Error::InvalidJwtRule { field, problem: problem.into() }
}

fn jwt_rule(r: &crd::JwtRule, field: &str) -> Result<model::JwtRule, Error> {
    let Some(issuer) = r.issuer.as_deref().filter(|i| !i.trim().is_empty()) else {
        return Err(invalid(format!("{field}.issuer"), "an issuer is required"));
    };
    let jwks = match (&r.jwks_uri, &r.jwks) {
        (Some(_), Some(_)) => return Err(invalid(format!("{field}.jwks"), "set one of jwks and jwksUri, not both")),
        (None, None) => {
            return Err(Error::Unsupported {
                field: format!("{field}.jwksUri"),
                what: "OpenID discovery of the keys from the issuer; set jwksUri or jwks",
            });
        }
        (Some(uri), None) => model::Jwks::Uri(jwks_uri(uri, &format!("{field}.jwksUri"))?),
        (None, Some(set)) => {
            mesh_l7::jwt::KeySet::parse(set).map_err(|e| invalid(format!("{field}.jwks"), e.to_string()))?;
            model::Jwks::Inline(set.clone())
        }
    };
    let header = |name: &str, f: String| -> Result<String, Error> {
        http::HeaderName::from_bytes(name.as_bytes())
            .map(|h| h.as_str().to_owned())
            .map_err(|_| invalid(f, format!("{name:?} is not a header name")))
    };
    let mut from_headers = Vec::new();
    for (i, h) in r.from_headers.iter().enumerate() {
        from_headers.push((header(&h.name, format!("{field}.fromHeaders[{i}].name"))?, h.prefix.clone().unwrap_or_default()));
    }
    for (list, name) in [(&r.from_params, "fromParams"), (&r.from_cookies, "fromCookies")] {
        if let Some(i) = list.iter().position(|v| v.is_empty() || v.contains(|c: char| c.is_whitespace() || matches!(c, '=' | '&' | ';'))) {
            return Err(invalid(format!("{field}.{name}[{i}]"), format!("{:?} is not a parameter or cookie name", list[i])));
        }
    }
    let output_payload_to_header = r.output_payload_to_header.as_deref().map(|h| header(h, format!("{field}.outputPayloadToHeader"))).transpose()?;
    let mut output_claim_to_headers = Vec::new();
    for (i, c) in r.output_claim_to_headers.iter().enumerate() {
        let name = header(&c.header, format!("{field}.outputClaimToHeaders[{i}].header"))?;
        if c.claim.is_empty() {
            return Err(invalid(format!("{field}.outputClaimToHeaders[{i}].claim"), "a claim name is required"));
        }
        output_claim_to_headers.push((name, c.claim.clone()));
    }
    Ok(model::JwtRule {
        issuer: issuer.to_owned(),
        audiences: r.audiences.clone(),
        jwks,
        from_headers,
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        forward_original_token: r.forward_original_token.unwrap_or(false),
        output_payload_to_header,
        output_claim_to_headers,
    })
}

/// An `http://` or `https://` URI with a host.
fn jwks_uri(uri: &str, field: &str) -> Result<String, Error> {
    let parsed: http::Uri = uri.parse().map_err(|_| invalid(field.to_owned(), format!("{uri:?} is not a URI")))?;
    match (parsed.scheme_str(), parsed.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri.to_owned()),
        _ => Err(invalid(field.to_owned(), format!("{uri:?} must be an http:// or https:// URI with a host"))),
    }
}
