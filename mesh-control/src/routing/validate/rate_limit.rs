//! `LocalRateLimit` → [`LocalRateLimit`]: the target Service, the token bucket (Envoy's names and
//! defaults) and the key, each refused by name when invalid.

use super::{Error, Identity, header_name, identity, in_range, istio_duration, no_unknown_fields};
use crate::{
    crd::{Read, networking as api},
    model::NamespacedName,
    routing::model::{RateLimit, RateLimitKey},
};

/// Keyed buckets kept per pod when `maxKeys` is not given.
pub const DEFAULT_MAX_KEYS: u32 = 10_000;

/// A valid `LocalRateLimit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRateLimit {
    pub id: Identity,
    pub service: NamespacedName,
    pub limit: RateLimit,
}

pub fn local_rate_limit(r: &Read<api::LocalRateLimit>) -> Result<LocalRateLimit, Error> {
    no_unknown_fields(&r.unknown_fields, |_| "a field the mesh does not implement")?;
    let o = &r.object;
    let id = identity(&o.metadata);
    let service = match o.spec.target_refs.as_slice() {
        [t] if t.group.as_deref().unwrap_or_default().is_empty() && t.kind == "Service" => {
            NamespacedName::new(id.key.namespace.clone(), t.name.clone())
        }
        [t] => {
            return Err(Error::Unsupported {
                field: "spec.targetRefs[0]".into(),
                what: format!(
                    "{}/{}: only a Service (group \"\", kind Service) can be limited",
                    t.group.as_deref().unwrap_or_default(),
                    t.kind
                ),
            });
        }
        [] => {
            return Err(Error::Missing {
                field: "spec.targetRefs".into(),
                what: "one Service",
            });
        }
        _ => {
            return Err(Error::Unsupported {
                field: "spec.targetRefs[1]".into(),
                what: "more than one target (one LocalRateLimit per Service)".into(),
            });
        }
    };
    let bucket = o.spec.token_bucket.as_ref().ok_or(Error::Missing {
        field: "spec.tokenBucket".into(),
        what: "maxTokens and fillInterval",
    })?;
    let max_tokens = u32::try_from(in_range(
        "spec.tokenBucket.maxTokens",
        bucket.max_tokens,
        1,
        1_000_000_000,
    )?)
    .expect("in range");
    let tokens_per_fill = match bucket.tokens_per_fill {
        None => max_tokens,
        Some(n) => u32::try_from(in_range(
            "spec.tokenBucket.tokensPerFill",
            n,
            1,
            1_000_000_000,
        )?)
        .expect("in range"),
    };
    let fill_interval = istio_duration("spec.tokenBucket.fillInterval", &bucket.fill_interval)?
        .filter(|d| d.as_millis() >= 50)
        .ok_or_else(|| Error::Duration {
            field: "spec.tokenBucket.fillInterval".into(),
            value: bucket.fill_interval.clone(),
            expected: "at least 50ms (Envoy's minimum)",
        })?;
    let key = match &o.spec.per_key {
        None => RateLimitKey::None,
        Some(k) => match (k.source_principal.unwrap_or(false), &k.request_header) {
            (true, None) => RateLimitKey::SourcePrincipal,
            (false, Some(h)) => {
                RateLimitKey::RequestHeader(header_name("spec.perKey.requestHeader", h)?)
            }
            (false, None) => RateLimitKey::None,
            (true, Some(_)) => {
                return Err(Error::Conflict {
                    field: "spec.perKey".into(),
                    what: "set sourcePrincipal or requestHeader, not both".into(),
                });
            }
        },
    };
    let max_keys = match o.spec.max_keys {
        None => DEFAULT_MAX_KEYS,
        Some(n) => u32::try_from(in_range("spec.maxKeys", n, 1, 1_000_000)?).expect("in range"),
    };
    Ok(LocalRateLimit {
        id,
        service,
        limit: RateLimit {
            max_tokens,
            tokens_per_fill,
            fill_interval,
            key,
            max_keys,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(spec: &str) -> Result<LocalRateLimit, Error> {
        let yaml = format!(
            "apiVersion: networking.mesh.dev/v1alpha1\nkind: LocalRateLimit\nmetadata: {{name: l, namespace: demo}}\nspec: {spec}\n"
        );
        let value: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
        local_rate_limit(&crate::crd::read(&value).expect("readable"))
    }

    #[test]
    fn envoys_token_bucket_with_defaults() {
        let l = parse("{targetRefs: [{kind: Service, name: whoami}], tokenBucket: {maxTokens: 100, fillInterval: 1s}}").expect("valid");
        assert_eq!(l.service, NamespacedName::new("demo", "whoami"));
        assert_eq!(
            l.limit,
            RateLimit {
                max_tokens: 100,
                tokens_per_fill: 100,
                fill_interval: Duration::from_secs(1),
                key: RateLimitKey::None,
                max_keys: DEFAULT_MAX_KEYS
            }
        );
        let keyed = parse("{targetRefs: [{kind: Service, name: whoami}], tokenBucket: {maxTokens: 5, tokensPerFill: 1, fillInterval: 200ms}, perKey: {requestHeader: X-User}, maxKeys: 50}").expect("valid");
        assert_eq!(
            (keyed.limit.key, keyed.limit.max_keys),
            (RateLimitKey::RequestHeader("x-user".into()), 50)
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let e = |spec: &str| parse(spec).expect_err("invalid").to_string();
        assert!(
            e("{tokenBucket: {maxTokens: 1, fillInterval: 1s}}").starts_with("spec.targetRefs")
        );
        assert!(e("{targetRefs: [{kind: Deployment, name: x}], tokenBucket: {maxTokens: 1, fillInterval: 1s}}").starts_with("spec.targetRefs[0]"));
        assert!(e("{targetRefs: [{kind: Service, name: x}]}").starts_with("spec.tokenBucket"));
        assert!(e("{targetRefs: [{kind: Service, name: x}], tokenBucket: {maxTokens: 0, fillInterval: 1s}}").starts_with("spec.tokenBucket.maxTokens"));
        assert!(e("{targetRefs: [{kind: Service, name: x}], tokenBucket: {maxTokens: 1, fillInterval: 10ms}}").starts_with("spec.tokenBucket.fillInterval"));
        assert!(e("{targetRefs: [{kind: Service, name: x}], tokenBucket: {maxTokens: 1, fillInterval: 1s}, perKey: {sourcePrincipal: true, requestHeader: x}}").starts_with("spec.perKey"));
        assert!(e("{targetRefs: [{kind: Service, name: x}], tokenBucket: {maxTokens: 1, fillInterval: 1s}, descriptors: [{key: a}]}").starts_with("spec.descriptors"));
    }
}
