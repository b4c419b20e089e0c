//! `labelSelector` and `fieldSelector` of list and watch requests.
//!
//! Labels take the whole set-based grammar (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
//! `k notin (a,b)`); fields take `=`, `==` and `!=` on any dotted path of the object
//! (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`, ...).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn matches(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::Equals(want), Some(have)) => want == have,
            (Op::NotEquals(want), have) => have != Some(want.as_str()),
            (Op::In(set), Some(have)) => set.iter().any(|v| v == have),
            (Op::NotIn(set), have) => have.is_none_or(|have| set.iter().all(|v| v != have)),
            (Op::Exists, have) => have.is_some(),
            (Op::NotExists, have) => have.is_none(),
            (Op::Equals(_) | Op::In(_), None) => false,
        }
    }
}

/// What a request selects; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selector {
    /// Parses both query parameters; the error is the message of a 400.
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selector, String> {
        Ok(Selector {
            labels: split(labels.unwrap_or_default()).map(label).collect::<Result<_, _>>()?,
            fields: split(fields.unwrap_or_default()).map(field).collect::<Result<_, _>>()?,
        })
    }

    /// Selects only the object called `name` (a watch on `.../{plural}/{name}`).
    pub fn named(mut self, name: &str) -> Selector {
        self.fields.push(Requirement {
            key: "metadata.name".to_owned(),
            op: Op::Equals(name.to_owned()),
        });
        self
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.labels.iter().all(|r| r.matches(labels[&r.key].as_str()))
            && self
                .fields
                .iter()
                .all(|r| r.matches(Some(&field_value(object, &r.key))))
    }
}

/// Splits on commas outside parentheses, dropping empty parts.
fn split(selector: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

fn label(part: &str) -> Result<Requirement, String> {
    let requirement = |key: &str, op| Requirement {
        key: key.trim().to_owned(),
        op,
    };
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(requirement(key, Op::NotEquals(value.trim().to_owned())));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(requirement(key, Op::Equals(value.trim().to_owned())));
    }
    for (word, set_op) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = part.split_once(word) {
            let set = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("unable to parse requirement: {part}: expected a (set)"))?;
            let values = set.split(',').map(|v| v.trim().to_owned()).collect();
            return Ok(requirement(
                key,
                if set_op { Op::NotIn(values) } else { Op::In(values) },
            ));
        }
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(requirement(key, Op::NotExists));
    }
    if part.contains(char::is_whitespace) {
        return Err(format!("unable to parse requirement: {part}"));
    }
    Ok(requirement(part, Op::Exists))
}

fn field(part: &str) -> Result<Requirement, String> {
    let requirement = |key: &str, op| Requirement {
        key: key.trim().to_owned(),
        op,
    };
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(requirement(key, Op::NotEquals(value.trim().to_owned())));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(requirement(key, Op::Equals(value.trim().to_owned())));
    }
    Err(format!("invalid selector: '{part}'; can't understand '{part}'"))
}

/// A field as a selector compares it: strings as they are, other scalars printed, missing empty.
fn field_value(object: &Value, path: &str) -> String {
    match path.split('.').fold(object, |v, key| &v[key]) {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web", "tier": "front"}},
               "spec": {"nodeName": "node-1"}})
    }

    fn selects(labels: &str, fields: &str) -> bool {
        Selector::parse(Some(labels), Some(fields)).unwrap().matches(&pod())
    }

    #[test]
    fn label_requirements() {
        assert!(selects("app=web", ""));
        assert!(selects("app==web,tier", ""));
        assert!(!selects("app!=web", ""));
        assert!(selects("app!=db", ""));
        assert!(selects("version!=v1", ""));
        assert!(!selects("version", ""));
        assert!(selects("!version", ""));
        assert!(selects("app in (db, web),tier notin (back)", ""));
        assert!(!selects("app notin (web)", ""));
        assert!(Selector::parse(Some("app in web"), None).is_err());
    }

    #[test]
    fn field_requirements() {
        assert!(selects("", "metadata.name=p,metadata.namespace=ns"));
        assert!(!selects("", "metadata.name=q"));
        assert!(selects("", "spec.nodeName!=node-2"));
        assert!(!selects("", "status.phase=Running"));
        assert!(Selector::parse(None, Some("metadata.name")).is_err());
    }
}
