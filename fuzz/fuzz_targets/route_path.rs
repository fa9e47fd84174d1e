//! Path matching and prefix rewrites (Gateway API `PathPrefix` + `ReplacePrefixMatch`, Istio
//! `prefix` + `rewrite.uri`) on any path and prefix: no panic (the rewrite slices the path where
//! the match ended), and the Gateway API rules hold: a `PathPrefix` matches whole segments only,
//! and a segment-wise rewrite of an absolute path gives an absolute path. (Regex matches are the
//! regex crate's, which is fuzzed upstream; compiling one per input would slow this 25-fold.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_l7::route::{
    PathModifier,
    filter::rewrite_path,
    matching::{PrefixKind, PrefixMatch, StringMatch},
};

fuzz_target!(|input: (&str, &str, &str)| {
    let (prefix, path, replacement) = input;
    let segments = StringMatch::path_prefix(prefix);
    if let Some(len) = segments.matches(path) {
        let rest = &path[len..];
        assert!(len == 0 || rest.is_empty() || rest.starts_with('/'), "{prefix:?} matched {path:?} inside a segment");
        let out = rewrite_path(path, Some(PrefixMatch { len, kind: PrefixKind::Segments }), &PathModifier::Prefix(replacement.to_owned()));
        if path.starts_with('/') && (replacement.is_empty() || replacement.starts_with('/')) {
            assert!(out.starts_with('/'), "{path:?} under {prefix:?} → {replacement:?} gave {out:?}");
        }
    }
    let plain = StringMatch::Prefix(prefix.to_owned());
    if let Some(len) = plain.matches(path) {
        let _ = rewrite_path(path, Some(PrefixMatch { len, kind: PrefixKind::String }), &PathModifier::Prefix(replacement.to_owned()));
    }
});
