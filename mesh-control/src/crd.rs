//! The CRDs users apply. Here: the policy CRDs, `security.mesh.dev/v1alpha1`
//! `AuthorizationPolicy` and `PeerAuthentication`, with Istio's field names so Istio YAML ports
//! by changing `apiVersion`. The routing kinds are in [`networking`] (Istio-shaped, our group)
//! and [`gateway`] (Gateway API's own group); [`read`] turns their JSON into typed objects and
//! names every field the types do not know, so nothing a user writes vanishes unnoticed.
//!
//! The schema only checks types; meaning (principal format, port range, action and mode names,
//! conflicts) is checked by [`crate::validate`], which reports through `status.conditions`. Enum
//! like fields are therefore plain strings here: an unknown action must reach validation and get
//! `Accepted=False` instead of being rejected by a schema the file mode does not have.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub mod gateway;
pub mod networking;
pub mod telemetry;

/// API group of every mesh CRD.
pub const GROUP: &str = "security.mesh.dev";
/// API version of every mesh CRD.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every mesh CRD.
pub const API_VERSION: &str = "security.mesh.dev/v1alpha1";
/// Annotation that turns an `AuthorizationPolicy` into dry-run (Istio's name, kept for porting).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// Namespace and pod label that opts workloads into the mesh (value `ambient`); the pod value
/// `none` opts a pod out of a meshed namespace.
pub const DATAPLANE_MODE_LABEL: &str = "mesh.dev/dataplane-mode";

/// `spec.selector`: the workloads a policy applies to (absent: every workload of the namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Access control for workloads, Istio's `AuthorizationPolicy` at L4 plus the L7 fields.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.mesh.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ap",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW (default), DENY or AUDIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition_>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Istio's JWT principals (`iss/sub`) of a request's token
    /// (`*`: any valid token), verified by a `RequestAuthentication`; HTTP requests only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct To {
    pub operation: Operation,
}

/// Ports are strings, as in Istio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

/// Istio's `when` condition. (Named with a trailing underscore: `Condition` is the status type.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition_ {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// Which mTLS mode a workload's inbound traffic requires, Istio's `PeerAuthentication`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.mesh.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "pa",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Port on the workload (as a string key, as JSON objects have) → mode for that port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Mtls {
    /// UNSET, STRICT, PERMISSIVE or DISABLE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// Which end-user JWTs the selected workloads accept, Istio's `RequestAuthentication`. A request
/// with a token must carry a valid one (else 401); one without passes with no request principal,
/// unless an AuthorizationPolicy requires one.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.mesh.dev",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "ra",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// Istio's `JWTRule`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWK set inline, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// Status of the policy kinds: an `Accepted` condition written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, thiserror::Error)]
#[error("serializing the CRDs: {0}")]
pub struct Error(String);

/// Our CRDs (security and networking) as one multi-document YAML stream: what `crdgen` prints,
/// committed as `deploy/10-crds.yaml`.
pub fn yaml() -> Result<String, Error> {
    use kube::CustomResourceExt as _;
    let crds = [
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        preserving_unknown_fields(&RequestAuthentication::crd())?,
        preserving_unknown_fields(&networking::VirtualService::crd())?,
        preserving_unknown_fields(&networking::DestinationRule::crd())?,
        preserving_unknown_fields(&networking::LocalRateLimit::crd())?,
        preserving_unknown_fields(&telemetry::Telemetry::crd())?,
    ];
    to_yaml("cargo run -p mesh-control --bin crdgen", &crds)
}

/// The Gateway API CRDs we read (`HTTPRoute`, `GRPCRoute`, `ReferenceGrant`), generated from our
/// types: `crdgen --gateway-api`, committed as `deploy/11-gateway-api-crds.yaml`, for clusters
/// that do not have Gateway API yet. Clusters that do keep theirs (upstream's are a superset).
pub fn gateway_api_yaml() -> Result<String, Error> {
    use kube::CustomResourceExt as _;
    let crds = [
        preserving_unknown_fields(&gateway::HttpRoute::crd())?,
        preserving_unknown_fields(&gateway::GrpcRoute::crd())?,
        preserving_unknown_fields(&gateway::ReferenceGrant::crd())?,
    ];
    to_yaml("cargo run -p mesh-control --bin crdgen -- --gateway-api", &crds)
}

type Crd = k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn to_yaml(command: &str, crds: &[Crd]) -> Result<String, Error> {
    let mut out = format!("# Generated by `{command}`; do not edit.\n");
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(crd).map_err(|e| Error(e.to_string()))?);
    }
    Ok(out)
}

/// Marks every object of the `spec` schema `x-kubernetes-preserve-unknown-fields`: the API server
/// then keeps fields our types do not have (Istio's `tcp`, an experimental Gateway API field, a
/// typo), so [`read`] can name them in a condition instead of the server pruning them silently.
fn preserving_unknown_fields(crd: &Crd) -> Result<Crd, Error> {
    fn mark(schema: &mut serde_json::Value) {
        let Some(obj) = schema.as_object_mut() else { return };
        if let Some(props) = obj.get_mut("properties").and_then(serde_json::Value::as_object_mut) {
            props.values_mut().for_each(mark);
            obj.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
        }
        for key in ["items", "additionalProperties"] {
            if let Some(inner) = obj.get_mut(key) {
                mark(inner);
            }
        }
    }
    let mut v = serde_json::to_value(crd).map_err(|e| Error(e.to_string()))?;
    for version in v["spec"]["versions"].as_array_mut().into_iter().flatten() {
        if let Some(spec) = version.pointer_mut("/schema/openAPIV3Schema/properties/spec") {
            mark(spec);
        }
    }
    serde_json::from_value(v).map_err(|e| Error(e.to_string()))
}

/// Schema of a field carried as free-form JSON (Istio's `trafficPolicy`, `corsPolicy`).
pub(crate) fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// An object as read, with the fields of its `spec` its type does not have.
#[derive(Clone, Debug, PartialEq)]
pub struct Read<K> {
    pub object: K,
    /// Paths like `spec.http[0].tcp`; validation refuses the object naming them.
    pub unknown_fields: Vec<String>,
}

impl<K> Read<K> {
    /// An object built in code (tests): nothing unknown.
    pub fn known(object: K) -> Self {
        Self { object, unknown_fields: Vec::new() }
    }
}

/// A typed object from its JSON, plus the paths of every field in `spec` the type does not have:
/// the caller reports them (a condition) instead of losing them.
pub fn read<K: DeserializeOwned + Serialize>(value: &serde_json::Value) -> Result<Read<K>, serde_json::Error> {
    let object: K = serde_json::from_value(value.clone())?;
    let back = serde_json::to_value(&object)?;
    let mut unknown_fields = Vec::new();
    if let Some(spec) = value.get("spec") {
        unknown(spec, back.get("spec").unwrap_or(&serde_json::Value::Null), "spec", &mut unknown_fields);
    }
    Ok(Read { object, unknown_fields })
}

fn unknown(raw: &serde_json::Value, typed: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (k, v) in r {
                match t.get(k) {
                    Some(tv) => unknown(v, tv, &format!("{path}.{k}"), out),
                    None if !empty(v) => out.push(format!("{path}.{k}")),
                    None => {}
                }
            }
        }
        (Value::Array(r), Value::Array(t)) => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                unknown(rv, tv, &format!("{path}[{i}]"), out);
            }
        }
        // A typed free-form field (`trafficPolicy`) or a scalar: nothing below it is unknown.
        _ => {}
    }
}
