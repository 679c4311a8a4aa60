//! Glob patterns with `*` (any sequence, `/` included) and `?` (exactly one character).
//!
//! Matching never backtracks: the pattern is split on `*` into segments of fixed length (a `?`
//! is one Unicode scalar), the first segment must match at the start of the text, the last at
//! the end, and the segments in between are found leftmost, one after another. Because every
//! segment has a fixed length, the leftmost occurrence of a segment also ends earliest, so the
//! greedy choice never loses a match. The cost is at most the text length times the pattern
//! length, whatever the pattern; policies hold attacker-chosen resources and operator-chosen
//! patterns, and neither can make a decision slow.

/// A compiled glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    /// The pattern split on `*`. One segment means the pattern has no `*` and must match the
    /// whole text.
    segments: Vec<Segment>,
}

/// A run of the pattern between two `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    text: String,
    /// Length in characters: each `?` matches exactly one.
    chars: usize,
    /// Whether `text` holds a `?`; without one, plain substring search applies.
    any: bool,
}

impl Glob {
    /// Compiles `pattern`. Every string is a valid pattern: there is no escape character.
    pub fn new(pattern: &str) -> Glob {
        Glob {
            segments: pattern
                .split('*')
                .map(|s| Segment {
                    text: s.to_string(),
                    chars: s.chars().count(),
                    any: s.contains('?'),
                })
                .collect(),
        }
    }

    /// True when the pattern matches the whole of `text`.
    pub fn matches(&self, text: &str) -> bool {
        let (first, rest) = match self.segments.split_first() {
            Some(split) => split,
            // `split` always yields at least one segment; an empty list matches nothing.
            None => return false,
        };
        let Some((last, middle)) = rest.split_last() else {
            return first.match_at(text, 0) == Some(text.len());
        };
        let Some(mut pos) = first.match_at(text, 0) else {
            return false;
        };
        let Some(tail) = start_of_last_chars(text, last.chars) else {
            return false;
        };
        // The last segment must not overlap the first: `ab*ba` does not match `aba`.
        if tail < pos || last.match_at(text, tail) != Some(text.len()) {
            return false;
        }
        let inner = &text[..tail];
        for segment in middle {
            match segment.find(inner, pos) {
                Some(end) => pos = end,
                None => return false,
            }
        }
        true
    }
}

/// True when `pattern` (with `*` and `?`) matches the whole of `text`. Compile a [`Glob`] once
/// instead when the same pattern is matched many times.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    Glob::new(pattern).matches(text)
}

impl Segment {
    /// The end of this segment when it matches `text` at byte offset `start`.
    fn match_at(&self, text: &str, start: usize) -> Option<usize> {
        let rest = text.get(start..)?;
        if !self.any {
            return rest
                .starts_with(self.text.as_str())
                .then_some(start + self.text.len());
        }
        let mut end = start;
        let mut chars = rest.chars();
        for want in self.text.chars() {
            let got = chars.next()?;
            if want != '?' && want != got {
                return None;
            }
            end += got.len_utf8();
        }
        Some(end)
    }

    /// The end of the leftmost occurrence of this segment in `text` at or after `from`.
    fn find(&self, text: &str, from: usize) -> Option<usize> {
        let rest = text.get(from..)?;
        if !self.any {
            return rest
                .find(self.text.as_str())
                .map(|at| from + at + self.text.len());
        }
        rest.char_indices()
            .map(|(at, _)| from + at)
            .chain(std::iter::once(text.len()))
            .find_map(|at| self.match_at(text, at))
    }
}

/// The byte offset where the last `n` characters of `text` begin, if it has that many.
fn start_of_last_chars(text: &str, n: usize) -> Option<usize> {
    match n {
        0 => Some(text.len()),
        _ => text.char_indices().rev().nth(n - 1).map(|(at, _)| at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plainly correct dynamic-programming matcher to compare against.
    fn reference(pattern: &str, text: &str) -> bool {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        // row[j]: pattern prefix so far matches text prefix of length j.
        let mut row = vec![false; t.len() + 1];
        row[0] = true;
        for &pc in &p {
            let mut next = vec![false; t.len() + 1];
            if pc == '*' {
                let mut any = false;
                for j in 0..=t.len() {
                    any |= row[j];
                    next[j] = any;
                }
            } else {
                for j in 1..=t.len() {
                    next[j] = row[j - 1] && (pc == '?' || pc == t[j - 1]);
                }
            }
            row = next;
        }
        row[t.len()]
    }

    /// Every string of up to `max` characters over `alphabet`.
    fn strings(alphabet: &[char], max: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| {
                    alphabet.iter().map(move |c| {
                        let mut s = s.clone();
                        s.push(*c);
                        s
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn agrees_with_the_reference_matcher_on_every_small_case() {
        let patterns = strings(&['a', 'é', '*', '?'], 5);
        let texts = strings(&['a', 'é', 'b'], 5);
        let mut matched = 0;
        for p in &patterns {
            let glob = Glob::new(p);
            for t in &texts {
                let want = reference(p, t);
                assert_eq!(glob.matches(t), want, "pattern {p:?} text {t:?}");
                matched += usize::from(want);
            }
        }
        // The comparison is not vacuous: both outcomes occur.
        assert!(matched > 1000 && matched < patterns.len() * texts.len() / 2);
    }

    #[test]
    fn edge_cases() {
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything/at all"));
        assert!(glob_match("**", "x"));
        assert!(glob_match("?", "é"));
        assert!(glob_match("?", "🦀"));
        assert!(!glob_match("?", ""));
        assert!(!glob_match("?", "ab"));
        assert!(glob_match("caf?", "café"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("ab*ba", "abba"));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("route:api/*", "route:api/x/y/z"));
        assert!(!glob_match("route:api/*", "route:apix"));
        assert!(glob_match("*/b/?", "a/b/c"));
        assert!(!glob_match("abc", "abcd"));
        assert!(!glob_match("abc", "ab"));
        assert!(glob_match("a*b?c*d", "aXbYcZd"));
        assert!(!glob_match("a*b?c*d", "aXbcZd"));
    }

    #[test]
    fn adversarial_patterns_finish_with_the_right_answer() {
        // Exponential for a backtracking matcher; linear-ish here.
        let text = "a".repeat(10_000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(12)), &text));
        assert!(glob_match(&format!("{}*", "*a".repeat(12)), &text));
        assert!(!glob_match(&format!("{}*b*", "*a".repeat(12)), &text));
        let question = "a?".repeat(500);
        assert!(!glob_match(&question, &text));
        assert!(glob_match(&format!("{question}*"), &text));
        assert!(glob_match(&format!("*{question}*"), &text));
        assert!(!glob_match(&format!("*{question}b*"), &text));
        let mut long = "a".repeat(9_999);
        long.push('b');
        assert!(glob_match(&format!("{}b", "*a?".repeat(40)), &long));
        assert!(glob_match(&format!("*{}?b", "a?".repeat(4_999)), &long));
        assert!(!glob_match(&format!("*{}b", "a?".repeat(5_000)), &long));
    }
}
