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

/// Checks `raw`, routed here to `mapping`, against how upstreams may read it. Servers resolve
/// dot-segments (`..`, `%2e%2e`, `..;`), decode escapes (some twice), turn `\` into `/`, drop
/// `;parameters` (Tomcat, Spring), trim trailing dots and spaces (IIS), merge slashes and compare
/// case-insensitively before they route, so a path can reach a resource another mapping covers
/// (one that needs a certificate, or another policy). Refused: dot-segments, backslashes, NUL,
/// overlong UTF-8 and `%u` escapes in any spelling, and any path that such a reading routes to
/// another mapping.
pub(crate) fn check_reading(
    raw: &str,
    mapping: &Mapping,
    mappings: &[Mapping],
) -> Result<(), &'static str> {
    let bytes = raw.as_bytes();
    // The common path (no escape, backslash, parameter, empty or dotted segment, capital) is
    // read the same way by everyone: checked in place, without allocating.
    let plain = !bytes
        .iter()
        .any(|b| matches!(b, b'%' | b'\\' | b';') || b.is_ascii_uppercase())
        && !raw.contains("//")
        && !bytes.split(|b| *b == b'/').any(|seg| seg.ends_with(b"."));
    if plain {
        return Ok(());
    }
    let view = upstream_view(bytes)?;
    if mappings.len() > 1 {
        let view = String::from_utf8_lossy(&view);
        let read = route_ignoring_case(mappings, &view);
        if !read.is_some_and(|m| std::ptr::eq(m, mapping)) {
            return Err("a spelling that upstreams read as another mapping's path");
        }
    }
    Ok(())
}

/// The most lenient reading of a path: percent-decoded twice, each segment without its
/// `;parameters` and trailing dots or spaces, slashes merged.
fn upstream_view(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    const DOTS: &str = "a '.' or '..' segment (encoded or not)";
    if raw
        .windows(2)
        .any(|w| w[0] == b'%' && w[1].eq_ignore_ascii_case(&b'u'))
    {
        return Err("a %u escape");
    }
    let once = percent_decode(raw);
    let twice = percent_decode(&once);
    for decoded in [&once, &twice] {
        if decoded.contains(&b'\\') {
            return Err("a backslash (encoded or not)");
        }
        if decoded.contains(&0) {
            return Err("an encoded NUL");
        }
        // Never in UTF-8: the lead bytes of overlong encodings such as %c0%ae ('.').
        if decoded.iter().any(|b| matches!(b, 0xc0 | 0xc1)) {
            return Err("an overlong UTF-8 sequence");
        }
        if has_dot_segment(decoded) {
            return Err(DOTS);
        }
    }
    let mut view = Vec::with_capacity(twice.len());
    for segment in twice.split(|b| *b == b'/') {
        let name = segment.split(|b| *b == b';').next().unwrap_or_default();
        let end = name
            .iter()
            .rposition(|b| !matches!(b, b'.' | b' '))
            .map_or(0, |i| i + 1);
        if end == 0 && !name.is_empty() {
            // Only dots and spaces: `...` or `.. `, which some servers read as `..`.
            return Err(DOTS);
        }
        if !(name.is_empty() && view.last() == Some(&b'/')) {
            if !view.is_empty() || !name.is_empty() {
                view.push(b'/');
            }
            view.extend_from_slice(&name[..end]);
        }
    }
    while view.len() > 1 && view.last() == Some(&b'/') && !twice.ends_with(b"/") {
        view.pop();
    }
    Ok(view)
}

/// Percent-decodes, leaving malformed escapes as they are.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// [`route`]'s mapping for `path`, comparing base paths without regard to case.
fn route_ignoring_case<'a>(mappings: &'a [Mapping], path: &str) -> Option<&'a Mapping> {
    mappings
        .iter()
        .filter(|m| {
            let base = m.base_path.as_bytes();
            let p = path.as_bytes();
            base.is_empty()
                || (p.len() >= base.len()
                    && p[..base.len()].eq_ignore_ascii_case(base)
                    && (p.len() == base.len() || p[base.len()] == b'/'))
        })
        .max_by_key(|m| m.base_path.len())
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
    fn every_reading_of_a_path_stays_in_its_mapping() {
        let maps = vec![m(""), m("/open"), m("/secure")];
        let check = |p: &str| {
            let (mapping, _) = route(&maps, p).unwrap();
            check_reading(p, mapping, &maps)
        };
        for bad in [
            "/open/../secure/x",
            "/open/%2e%2e/secure/x",
            "/open/%2E%2e/secure/x",
            "/open/..;/secure/x",
            "/open/..\\secure/x",
            "/open/..%5csecure/x",
            "/open/.%2e/secure",
            "/open/..%2fsecure",
            "/open/%252e%252e/secure",
            "/open/%c0%ae%c0%ae/secure",
            "/open/%u002e%u002e/secure",
            "/open/.../secure",
            "/./x",
            "/a%00b",
            "/secure;x/p1",
            "/;x/secure/p2",
            "/SECURE/p3",
            "/secure./p4",
            "/secure%20/p5",
            "/secure%252fp8",
            "//secure/x",
            "/open%2fx",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        for good in [
            "/open/x",
            "/v1.2/file.txt",
            "/a/...b/c",
            "/a%20b",
            "/open/Photos/IMG.JPG",
            "/open/x;jsessionid=1",
            "/secure/a;b=c",
            "/",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        // With one mapping nothing can route elsewhere; dot-segments are still refused.
        let one = vec![m("/app")];
        assert_eq!(check_reading("/app/SECURE", &one[0], &one), Ok(()));
        assert!(check_reading("/app/../x", &one[0], &one).is_err());
    }
}
