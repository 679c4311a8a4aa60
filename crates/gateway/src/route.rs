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
}
