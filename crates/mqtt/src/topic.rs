//! Topic names and filters (MQTT 3.1.1 §4.7, MQTT 5 §4.7): validation and matching.
//!
//! A topic name is what a PUBLISH carries: non-empty, no `+` or `#`, no NUL. A filter is what a
//! SUBSCRIBE carries: levels separated by `/`, where `+` matches exactly one level and `#`
//! (only as the last level) matches the parent level and any number of levels below it.
//! Topics starting with `$` are not matched by a filter starting with a wildcard, so
//! `#` never delivers `$portcullis/events/…` (MQTT §4.7.2).

use std::fmt;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicError(pub String);

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TopicError {}

/// The longest topic name or filter accepted (the MQTT string limit).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// The most levels a filter may have: matching cost stays bounded.
pub const MAX_LEVELS: usize = 128;

/// Checks a topic name for PUBLISH.
pub fn check_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError("a topic name cannot be empty".into()));
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError(format!(
            "a topic name is at most {MAX_TOPIC_BYTES} bytes"
        )));
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError(format!(
            "topic name '{topic}' holds a wildcard ('+' or '#'); wildcards belong in subscriptions"
        )));
    }
    if topic.contains('\0') {
        return Err(TopicError("a topic name cannot hold NUL".into()));
    }
    if topic.split('/').count() > MAX_LEVELS {
        return Err(TopicError(format!(
            "a topic name has at most {MAX_LEVELS} levels"
        )));
    }
    Ok(())
}

/// Checks a topic filter for SUBSCRIBE.
pub fn check_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError("a topic filter cannot be empty".into()));
    }
    if filter.len() > MAX_TOPIC_BYTES {
        return Err(TopicError(format!(
            "a topic filter is at most {MAX_TOPIC_BYTES} bytes"
        )));
    }
    if filter.contains('\0') {
        return Err(TopicError("a topic filter cannot hold NUL".into()));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    if levels.len() > MAX_LEVELS {
        return Err(TopicError(format!(
            "a topic filter has at most {MAX_LEVELS} levels"
        )));
    }
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 != levels.len() => {
                return Err(TopicError(format!(
                    "in filter '{filter}', '#' must be the last level"
                )));
            }
            "#" | "+" => {}
            l if l.contains(['+', '#']) => {
                return Err(TopicError(format!(
                    "in filter '{filter}', a wildcard must fill a whole level"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A shared subscription's group and filter (`$share/GROUP/FILTER`, MQTT 5 §4.8.2); `None`
/// for an ordinary filter; an error for a malformed `$share/` one.
pub fn shared(filter: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Err(TopicError(format!(
            "'{filter}': a shared subscription is $share/GROUP/FILTER"
        )));
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(TopicError(format!(
            "'{filter}': a share name is not empty and holds no '+' or '#'"
        )));
    }
    check_filter(inner)?;
    Ok(Some((group, inner)))
}

/// Whether `filter` (already checked) matches the topic name `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    // Wildcards at the first level do not match `$` topics.
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a filter holds a wildcard level (`+` or `#`).
pub fn is_wildcard(filter: &str) -> bool {
    filter.split('/').any(|l| l == "+" || l == "#")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_wildcards_nul_and_empty() {
        assert!(check_name("devices/d1/telemetry").is_ok());
        assert!(check_name("/leading/slash").is_ok());
        assert!(check_name("$portcullis/events/x").is_ok());
        for bad in ["", "a/+/b", "a/#", "a\0b", "#"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a/".repeat(MAX_LEVELS)).is_err());
    }

    #[test]
    fn filters_put_wildcards_on_whole_levels() {
        for good in ["#", "+", "a/+/c", "a/#", "+/+/#", "/", "a//b", "$SYS/#"] {
            assert!(check_filter(good).is_ok(), "{good}");
        }
        for bad in ["", "a/#/b", "a/b#", "a+/b", "a/+b", "a\0"] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_follows_the_specification() {
        // MQTT 3.1.1 §4.7.1.2: "sport/tennis/player1/#" matches these.
        for topic in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(matches("sport/tennis/player1/#", topic), "{topic}");
        }
        assert!(matches("sport/#", "sport"), "'#' matches the parent level");
        assert!(matches("#", "anything/at/all"));
        // §4.7.1.3: '+' matches exactly one level, empty ones included.
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        // §4.7.2: '$' topics are not matched by leading wildcards.
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(is_wildcard("a/+") && is_wildcard("#") && !is_wildcard("a/b"));
    }
}
