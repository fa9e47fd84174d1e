//! Filters of Gateway API rules and backendRefs, and backendRefs themselves: each filter type
//! at most once (RequestMirror aside), only the types a route kind allows, every value checked.

use crate::{
    crd::gateway as api,
    model::NamespacedName,
    routing::{
        model::{HeaderModifier, PathModifier, Redirect, UrlRewrite},
        validate::{
            BackendRef, Error, header_modifier, hostname, in_range, path_modifier, port,
            redirect_scheme, redirect_status, weight,
        },
    },
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Allowed {
    Http,
    Grpc,
    /// A backendRef's own filters.
    Backend,
}

#[derive(Default)]
pub(super) struct Filters {
    pub(super) request_headers: HeaderModifier,
    pub(super) response_headers: HeaderModifier,
    pub(super) rewrite: Option<UrlRewrite>,
    pub(super) redirect: Option<Redirect>,
    pub(super) mirrors: Vec<(BackendRef, u32)>,
}

pub(super) fn filters(
    list: &[api::RouteFilter],
    parent: &str,
    allowed: Allowed,
    namespace: &str,
) -> Result<Filters, Error> {
    let mut out = Filters::default();
    let mut seen: Vec<&str> = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let field = format!("{parent}.filters[{i}]");
        let t = f.type_.as_str();
        if t != "RequestMirror" && seen.contains(&t) {
            return Err(Error::Duplicate {
                field: format!("{parent}.filters"),
                name: t.into(),
            });
        }
        seen.push(t);
        let set = [
            ("RequestHeaderModifier", f.request_header_modifier.is_some()),
            (
                "ResponseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", f.request_mirror.is_some()),
            ("RequestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", f.url_rewrite.is_some()),
            ("ExtensionRef", f.extension_ref.is_some()),
        ];
        if let Some((other, _)) = set.iter().find(|(name, is_set)| *is_set && *name != t) {
            return Err(Error::Conflict {
                field,
                what: format!("type {t} must not set the field of filter type {other}"),
            });
        }
        let kinds: &[&str] = match allowed {
            Allowed::Http => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "RequestRedirect",
                "URLRewrite",
            ],
            Allowed::Grpc => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
            ],
            Allowed::Backend => &["RequestHeaderModifier", "ResponseHeaderModifier"],
        };
        if t == "ExtensionRef" {
            return Err(Error::Unsupported {
                field: format!("{field}.type"),
                what: "ExtensionRef filters (the mesh has no extensions)".into(),
            });
        }
        if !kinds.contains(&t) {
            return Err(if set.iter().any(|(name, _)| *name == t) {
                Error::Unsupported {
                    field: format!("{field}.type"),
                    what: format!("{t} filters here (allowed: {})", kinds.join(", ")),
                }
            } else {
                Error::UnknownValue {
                    field: format!("{field}.type"),
                    value: t.into(),
                    expected: "a filter type of this route kind",
                }
            });
        }
        apply(f, &field, namespace, &mut out)?;
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(Error::IncompatibleFilters {
            field: format!("{parent}.filters"),
            what: "RequestRedirect and URLRewrite cannot be used together".into(),
        });
    }
    Ok(out)
}

/// Applies one filter (of an allowed type) to `out`.
fn apply(
    f: &api::RouteFilter,
    field: &str,
    namespace: &str,
    out: &mut Filters,
) -> Result<(), Error> {
    let t = f.type_.as_str();
    let missing = || Error::Missing {
        field: field.to_owned(),
        what: "the field named by type",
    };
    match t {
        "RequestHeaderModifier" => {
            out.request_headers = modifier(
                f.request_header_modifier.as_ref().ok_or_else(missing)?,
                &format!("{field}.requestHeaderModifier"),
            )?;
        }
        "ResponseHeaderModifier" => {
            out.response_headers = modifier(
                f.response_header_modifier.as_ref().ok_or_else(missing)?,
                &format!("{field}.responseHeaderModifier"),
            )?;
        }
        "RequestMirror" => out.mirrors.push(mirror(
            f.request_mirror.as_ref().ok_or_else(missing)?,
            &format!("{field}.requestMirror"),
            namespace,
        )?),
        "RequestRedirect" => {
            out.redirect = Some(redirect(
                f.request_redirect.as_ref().ok_or_else(missing)?,
                &format!("{field}.requestRedirect"),
            )?);
        }
        _ => {
            out.rewrite = Some(rewrite(
                f.url_rewrite.as_ref().ok_or_else(missing)?,
                &format!("{field}.urlRewrite"),
            )?);
        }
    }
    Ok(())
}

fn modifier(m: &api::HeaderModifier, field: &str) -> Result<HeaderModifier, Error> {
    let set = m.set.iter().map(|h| (h.name.as_str(), h.value.as_str()));
    header_modifier(
        field,
        set,
        m.add.iter().map(|h| (h.name.as_str(), h.value.as_str())),
        &m.remove,
    )
}

fn path_mod(p: &api::PathModifier, field: &str) -> Result<PathModifier, Error> {
    let (value, prefix) = match p.type_.as_str() {
        "ReplaceFullPath" => (
            p.replace_full_path.as_deref().ok_or(Error::Missing {
                field: field.into(),
                what: "replaceFullPath",
            })?,
            false,
        ),
        "ReplacePrefixMatch" => (
            p.replace_prefix_match.as_deref().ok_or(Error::Missing {
                field: field.into(),
                what: "replacePrefixMatch",
            })?,
            true,
        ),
        other => {
            return Err(Error::UnknownValue {
                field: format!("{field}.type"),
                value: other.into(),
                expected: "ReplaceFullPath or ReplacePrefixMatch",
            });
        }
    };
    path_modifier(
        &format!(
            "{field}.{}",
            if prefix {
                "replacePrefixMatch"
            } else {
                "replaceFullPath"
            }
        ),
        prefix,
        value,
    )
}

/// The hostname and path both redirects and rewrites may replace.
fn host_and_path(
    host: Option<&str>,
    path: Option<&api::PathModifier>,
    field: &str,
) -> Result<(Option<String>, Option<PathModifier>), Error> {
    let host = host
        .map(|h| hostname(&format!("{field}.hostname"), h, false))
        .transpose()?;
    let path = path
        .map(|p| path_mod(p, &format!("{field}.path")))
        .transpose()?;
    Ok((host, path))
}

fn redirect(r: &api::RequestRedirect, field: &str) -> Result<Redirect, Error> {
    let (hostname, path) = host_and_path(r.hostname.as_deref(), r.path.as_ref(), field)?;
    Ok(Redirect {
        scheme: redirect_scheme(&format!("{field}.scheme"), r.scheme.as_deref())?,
        hostname,
        path,
        port: r
            .port
            .map(|p| port(&format!("{field}.port"), p.into()))
            .transpose()?,
        status: redirect_status(
            &format!("{field}.statusCode"),
            r.status_code.map(i64::from),
            302,
        )?,
    })
}

fn rewrite(r: &api::UrlRewrite, field: &str) -> Result<UrlRewrite, Error> {
    let (hostname, path) = host_and_path(r.hostname.as_deref(), r.path.as_ref(), field)?;
    Ok(UrlRewrite { hostname, path })
}

fn mirror(
    m: &api::RequestMirror,
    field: &str,
    namespace: &str,
) -> Result<(BackendRef, u32), Error> {
    let per_million = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(Error::Conflict {
                field: field.into(),
                what: "set percent or fraction, not both".into(),
            });
        }
        (Some(p), None) => {
            u32::try_from(in_range(&format!("{field}.percent"), p.into(), 0, 100)? * 10_000)
                .expect("in range")
        }
        (None, Some(f)) => {
            let denominator = in_range(
                &format!("{field}.fraction.denominator"),
                f.denominator.unwrap_or(100).into(),
                1,
                i64::from(i32::MAX),
            )?;
            let numerator = in_range(
                &format!("{field}.fraction.numerator"),
                f.numerator.into(),
                0,
                denominator,
            )?;
            u32::try_from(numerator * 1_000_000 / denominator).expect("at most a million")
        }
        (None, None) => 1_000_000,
    };
    Ok((
        backend(
            &m.backend_ref,
            1,
            &[],
            &format!("{field}.backendRef"),
            namespace,
        )?,
        per_million,
    ))
}

pub(super) fn backends(
    list: &[api::BackendRef],
    parent: &str,
    namespace: &str,
) -> Result<Vec<BackendRef>, Error> {
    list.iter()
        .enumerate()
        .map(|(i, b)| {
            let field = format!("{parent}.backendRefs[{i}]");
            let w = weight(&format!("{field}.weight"), b.weight.map_or(1, i64::from))?;
            backend(&b.object, w, &b.filters, &field, namespace)
        })
        .collect()
}

fn backend(
    b: &api::BackendObjectReference,
    weight: u32,
    filters_: &[api::RouteFilter],
    field: &str,
    namespace: &str,
) -> Result<BackendRef, Error> {
    let group = b.group.clone().unwrap_or_default();
    let kind = b.kind.clone().unwrap_or_else(|| "Service".into());
    let port = b
        .port
        .map(|p| port(&format!("{field}.port"), p.into()))
        .transpose()?;
    if group.is_empty() && kind == "Service" && port.is_none() {
        return Err(Error::Missing {
            field: format!("{field}.port"),
            what: "a port (for a Service backend)",
        });
    }
    let f = filters(filters_, field, Allowed::Backend, namespace)?;
    Ok(BackendRef {
        field: field.into(),
        group,
        kind,
        target: NamespacedName::new(b.namespace.as_deref().unwrap_or(namespace), &b.name),
        port,
        weight,
        request_headers: f.request_headers,
        response_headers: f.response_headers,
    })
}
