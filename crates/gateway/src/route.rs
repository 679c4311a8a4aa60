//! Base path routing: the longest matching prefix wins, on path-segment boundaries.

use crate::config::Mapping;

/// The mapping for `path` and the path the upstream sees (prefix stripped, never empty).
pub(crate) fn route<'a>(mappings: &'a [Mapping], path: &str) -> Option<(&'a Mapping, String)> {
    mappings
        .iter()
        .filter(|m| {
            m.base_path.is_empty()
                || path == m.base_path
                || path
                    .strip_prefix(m.base_path.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|m| m.base_path.len())
        .map(|m| {
            let rest = &path[m.base_path.len()..];
            let rest = if rest.is_empty() { "/" } else { rest };
            (m, rest.to_string())
        })
}

/// Checks a path on a domain without policy-authorized mappings. Upstreams resolve dot-segments
/// (`..`, `%2e%2e`, `..;`), decode escapes, turn `\` into `/` and merge slashes before they route,
/// so such a path can reach a resource its mapping here does not cover: dot-segments in any
/// spelling, backslashes and NUL are refused. Returns the path as an upstream would route it
/// (decoded, slashes merged) when that differs from `raw`, for the caller to check that it
/// routes to the same mapping.
pub(crate) fn plain_path(raw: &str) -> Result<Option<String>, &'static str> {
    const DOTS: &str = "a '.' or '..' segment (encoded or not)";
    let bytes = raw.as_bytes();
    // The common path, without escapes or backslashes, is checked in place.
    if !bytes.iter().any(|b| matches!(b, b'%' | b'\\')) {
        if has_dot_segment(bytes) {
            return Err(DOTS);
        }
        if !raw.contains("//") {
            return Ok(None);
        }
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                decoded.push(b);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    if decoded.contains(&b'\\') {
        return Err("a backslash (encoded or not)");
    }
    if decoded.contains(&0) {
        return Err("an encoded NUL");
    }
    if has_dot_segment(&decoded) {
        return Err(DOTS);
    }
    let mut merged = Vec::with_capacity(decoded.len());
    for &b in &decoded {
        if !(b == b'/' && merged.last() == Some(&b'/')) {
            merged.push(b);
        }
    }
    if merged == bytes {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&merged).into_owned()))
}

/// Whether a path has a `.` or `..` segment; `..;x` counts, since servers that drop path
/// parameters (Tomcat, Spring) read it as `..`.
fn has_dot_segment(path: &[u8]) -> bool {
    path.split(|b| *b == b'/').any(|segment| {
        let name = segment.split(|b| *b == b';').next().unwrap_or_default();
        name == b"." || name == b".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(base: &str) -> Mapping {
        Mapping::new(base, "http://127.0.0.1:1", true).unwrap()
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let maps = vec![m(""), m("/api"), m("/api/v2")];
        let pick = |p: &str| route(&maps, p).map(|(m, rest)| (m.base_path.clone(), rest));
        assert_eq!(
            pick("/api/v2/users"),
            Some(("/api/v2".into(), "/users".into()))
        );
        assert_eq!(pick("/api/v1"), Some(("/api".into(), "/v1".into())));
        assert_eq!(pick("/api"), Some(("/api".into(), "/".into())));
        assert_eq!(pick("/apix"), Some(("".into(), "/apix".into())));
        let no_catch_all = vec![m("/api")];
        assert!(route(&no_catch_all, "/other").is_none());
    }

    #[test]
    fn plain_paths_refuse_dot_segments_in_every_spelling() {
        for bad in [
            "/open/../secure/x",
            "/open/%2e%2e/secure/x",
            "/open/%2E%2e/secure/x",
            "/open/..;/secure/x",
            "/open/..\\secure/x",
            "/open/..%5csecure/x",
            "/open/.%2e/secure",
            "/open/..%2fsecure",
            "/./x",
            "/a%00b",
        ] {
            assert!(plain_path(bad).is_err(), "{bad}");
        }
        assert_eq!(plain_path("/open/x"), Ok(None));
        assert_eq!(plain_path("/v1.2/file.txt"), Ok(None));
        assert_eq!(plain_path("/a/...b/c"), Ok(None));
        assert_eq!(plain_path("/a%20b"), Ok(Some("/a b".into())));
        assert_eq!(plain_path("//secure/x"), Ok(Some("/secure/x".into())));
        assert_eq!(plain_path("/open%2fx"), Ok(Some("/open/x".into())));
    }
}
