//! The subscription tree: topic filters indexed by level, so a PUBLISH finds its subscribers
//! by walking its topic's levels instead of testing every filter of every session.

use std::collections::HashMap;

/// Filters by level; `V` is what a subscription carries (its session and options).
#[derive(Debug)]
pub struct SubscriptionTree<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    children: HashMap<String, Node<V>>,
    /// Subscriptions whose filter ends at this node, by session id.
    here: HashMap<String, V>,
    /// Subscriptions whose filter ends with `#` below this node.
    hash: HashMap<String, V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            here: HashMap::new(),
            hash: HashMap::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.hash.is_empty()
    }
}

impl<V> Default for SubscriptionTree<V> {
    fn default() -> Self {
        SubscriptionTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: Clone> SubscriptionTree<V> {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many (filter, session) subscriptions it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `session`'s subscription to `filter` (checked by the caller).
    pub fn insert(&mut self, filter: &str, session: &str, value: V) {
        let mut node = &mut self.root;
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if *level == "#" && i + 1 == levels.len() {
                if node.hash.insert(session.to_string(), value).is_none() {
                    self.len += 1;
                }
                return;
            }
            node = node.children.entry((*level).to_string()).or_default();
        }
        if node.here.insert(session.to_string(), value).is_none() {
            self.len += 1;
        }
    }

    /// Removes `session`'s subscription to `filter`; whether there was one.
    pub fn remove(&mut self, filter: &str, session: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, session);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Every subscription whose filter matches the topic name `topic`, as (session, value);
    /// a session with several matching filters appears once per filter.
    pub fn matching(&self, topic: &str) -> Vec<(&str, &V)> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, 0, dollar, &mut out);
        out
    }
}

fn remove_at<V>(node: &mut Node<V>, levels: &[&str], session: &str) -> bool {
    match levels {
        [] => node.here.remove(session).is_some(),
        ["#"] => node.hash.remove(session).is_some(),
        [first, rest @ ..] => {
            let Some(child) = node.children.get_mut(*first) else {
                return false;
            };
            let removed = remove_at(child, rest, session);
            if child.is_empty() {
                node.children.remove(*first);
            }
            removed
        }
    }
}

fn collect<'a, V>(
    node: &'a Node<V>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    out: &mut Vec<(&'a str, &'a V)>,
) {
    // Leading wildcards do not match `$` topics (MQTT §4.7.2).
    let wildcards_ok = !(dollar && depth == 0);
    if wildcards_ok {
        // `#` matches this level and everything below, the parent level included.
        out.extend(node.hash.iter().map(|(s, v)| (s.as_str(), v)));
    }
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.here.iter().map(|(s, v)| (s.as_str(), v)));
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(child, rest, depth + 1, dollar, out);
    }
    if wildcards_ok
        && *level != "+"
        && let Some(child) = node.children.get("+")
    {
        collect(child, rest, depth + 1, dollar, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;

    fn sessions(tree: &SubscriptionTree<u8>, topic: &str) -> Vec<String> {
        let mut s: Vec<String> = tree
            .matching(topic)
            .into_iter()
            .map(|(s, v)| format!("{s}:{v}"))
            .collect();
        s.sort();
        s
    }

    #[test]
    fn the_tree_agrees_with_the_matcher() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/b", "a/+/c", "+/b/#", "/+", "$SYS/#", "a//b", "+/+",
        ];
        let topics = [
            "a",
            "a/b",
            "a/b/c",
            "a/x/c",
            "b",
            "/x",
            "$SYS/load",
            "a//b",
            "x/b",
            "x/b/y",
            "",
        ];
        let mut tree = SubscriptionTree::new();
        for (i, f) in filters.iter().enumerate() {
            tree.insert(f, &format!("s{i}"), 1u8);
        }
        assert_eq!(tree.len(), filters.len());
        for t in topics {
            let mut want: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| topic::matches(f, t))
                .map(|(i, _)| format!("s{i}:1"))
                .collect();
            want.sort();
            assert_eq!(sessions(&tree, t), want, "topic {t:?}");
        }
    }

    #[test]
    fn removal_prunes_and_replacement_keeps_one_entry() {
        let mut tree = SubscriptionTree::new();
        tree.insert("a/b/c", "s", 1u8);
        tree.insert("a/b/c", "s", 2u8);
        assert_eq!(tree.len(), 1);
        assert_eq!(sessions(&tree, "a/b/c"), ["s:2"]);
        tree.insert("a/#", "t", 1u8);
        assert!(tree.remove("a/b/c", "s"));
        assert!(!tree.remove("a/b/c", "s"));
        assert!(!tree.remove("x/y", "s"));
        assert_eq!(sessions(&tree, "a/b/c"), ["t:1"]);
        assert!(tree.remove("a/#", "t"));
        assert!(tree.is_empty());
        assert!(tree.root.is_empty(), "empty branches are pruned");
    }
}
