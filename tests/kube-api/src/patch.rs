//! The PATCH bodies: JSON merge patch (RFC 7386, also standing in for strategic merge patch),
//! JSON patch (RFC 6902) and the simple server-side-apply rule of the double.

use serde_json::{Map, Value};

/// The patch types a PATCH's `Content-Type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// RFC 6902 on a copy of `target`; the error says which operation failed.
pub fn json_patch(target: &Value, operations: &Value) -> Result<Value, String> {
    let operations = operations
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let mut doc = target.clone();
    for operation in operations {
        let op = operation["op"].as_str().unwrap_or_default();
        let path = operation["path"].as_str().ok_or("operation without a path")?;
        match op {
            "add" => add(&mut doc, path, operation["value"].clone())?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, operation["value"].clone())?;
            }
            "move" | "copy" => {
                let from = operation["from"].as_str().ok_or("move/copy without from")?;
                let value = if op == "move" {
                    remove(&mut doc, from)?
                } else {
                    doc.pointer(from).cloned().ok_or(format!("no value at {from}"))?
                };
                add(&mut doc, path, value)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&operation["value"]) {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(doc)
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// The parent of `path` and the last reference token.
fn parent<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let (parent, last) = path.rsplit_once('/').ok_or(format!("invalid path {path:?}"))?;
    let parent = doc.pointer_mut(parent).ok_or(format!("no parent for {path}"))?;
    Ok((parent, unescape(last)))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    match parent(doc, path)? {
        (Value::Object(map), key) => {
            map.insert(key, value);
        }
        (Value::Array(items), index) if index == "-" => items.push(value),
        (Value::Array(items), index) => {
            let index: usize = index.parse().map_err(|_| format!("bad index in {path}"))?;
            if index > items.len() {
                return Err(format!("index out of range in {path}"));
            }
            items.insert(index, value);
        }
        _ => return Err(format!("cannot add at {path}")),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let missing = || format!("no value at {path}");
    match parent(doc, path)? {
        (Value::Object(map), key) => map.remove(&key).ok_or_else(missing),
        (Value::Array(items), index) => {
            let index: usize = index.parse().map_err(|_| missing())?;
            (index < items.len()).then(|| items.remove(index)).ok_or_else(missing)
        }
        _ => Err(missing()),
    }
}

/// Server-side apply, simplified: each top-level field the applied object sets replaces the stored
/// one (`status` only when applying to the status subresource, where nothing else changes);
/// in `metadata`, the labels, annotations, owner references and finalizers it sets replace
/// the stored ones and the server's fields (uid, creationTimestamp, ...) stay.
pub fn apply(existing: &Value, applied: &Value, to_status: bool) -> Value {
    let mut result = existing.clone();
    if to_status {
        if let Some(status) = applied.get("status") {
            result["status"] = status.clone();
        }
        return result;
    }
    let Some(fields) = applied.as_object() else {
        return result;
    };
    for (key, value) in fields {
        match key.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for field in ["labels", "annotations", "ownerReferences", "finalizers"] {
                    if let Some(value) = value.get(field) {
                        result["metadata"][field] = value.clone();
                    }
                }
            }
            _ => result[key] = value.clone(),
        }
    }
    result
}

/// Records `manager` in `metadata.managedFields` for `operation` (`Apply` or `Update`); an entry
/// already there stays as it is, so repeating a write changes nothing.
pub fn managed(object: &mut Value, manager: &str, operation: &str, subresource: Option<&str>) {
    let api_version = object["apiVersion"].clone();
    let entries = &mut object["metadata"]["managedFields"];
    if !entries.is_array() {
        *entries = Value::Array(Vec::new());
    }
    let entries = entries.as_array_mut().expect("made an array above");
    let same =
        |e: &Value| e["manager"] == manager && e["operation"] == operation && e["subresource"].as_str() == subresource;
    if entries.iter().any(same) {
        return;
    }
    let mut entry = serde_json::json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": crate::meta::timestamp(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    });
    if let Some(subresource) = subresource {
        entry["subresource"] = serde_json::json!(subresource);
    }
    entries.push(entry);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn managers_are_recorded_once() {
        let mut object = json!({"apiVersion": "v1", "metadata": {"name": "a"}});
        managed(&mut object, "mgr", "Apply", None);
        managed(&mut object, "mgr", "Apply", None);
        managed(&mut object, "mgr", "Apply", Some("status"));
        let entries = object["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["manager"], "mgr");
        assert_eq!(entries[0]["operation"], "Apply");
        assert_eq!(entries[1]["subresource"], "status");
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_operations() {
        let doc = json!({"metadata": {"labels": {"a": "1"}}, "items": [1, 3]});
        let ops = json!([
            {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
            {"op": "replace", "path": "/metadata/labels/a", "value": "9"},
            {"op": "add", "path": "/items/1", "value": 2},
            {"op": "remove", "path": "/items/2"},
            {"op": "test", "path": "/items/0", "value": 1},
        ]);
        let patched = json_patch(&doc, &ops).unwrap();
        assert_eq!(
            patched,
            json!({"metadata": {"labels": {"a": "9", "b/c": "2"}}, "items": [1, 2]})
        );
        let failing = json!([{"op": "test", "path": "/items/0", "value": 7}]);
        assert_eq!(
            json_patch(&doc, &failing).unwrap_err(),
            "test operation failed at /items/0"
        );
    }

    #[test]
    fn apply_replaces_top_level_fields_and_keeps_server_fields() {
        let existing = json!({"metadata": {"name": "g", "uid": "u", "labels": {"old": "x"}},
                              "spec": {"a": 1, "b": 2}, "status": {"ready": true}});
        let applied = json!({"metadata": {"name": "g", "labels": {"new": "y"}}, "spec": {"a": 3},
                             "status": {"ready": false}});
        let result = apply(&existing, &applied, false);
        assert_eq!(
            result["metadata"],
            json!({"name": "g", "uid": "u", "labels": {"new": "y"}})
        );
        assert_eq!(result["spec"], json!({"a": 3}));
        assert_eq!(result["status"], json!({"ready": true}));
        assert_eq!(apply(&existing, &applied, true)["status"], json!({"ready": false}));
    }
}
