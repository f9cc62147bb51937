//! Just enough of kustomize to render k8s/ without a cluster or a kustomize
//! binary: `resources` (files and directories), `namespace`,
//! `configMapGenerator` (files; `create` or `replace`), `images` and
//! `patches` with a target (RFC 6902 JSON patches). A kustomization using
//! anything else fails to load, so the model cannot silently diverge from
//! what `kubectl apply -k` does; where kubectl is installed,
//! `kubectl_kustomize_renders_what_the_tests_check` compares the two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

/// One rendered object and the file it came from (for messages).
#[derive(Clone, Debug)]
pub struct Object {
    pub value: Value,
    pub source: String,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// What a kustomization produced: the objects, and for each generated
/// ConfigMap the files it was made from.
#[derive(Debug, Default)]
pub struct Rendered {
    pub objects: Vec<Object>,
    /// ConfigMap name → (data key → the file it came from).
    pub generated: BTreeMap<String, BTreeMap<String, PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    config_map_generator: Vec<Generator>,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    patches: Vec<PatchRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Generator {
    name: String,
    behavior: Option<String>,
    files: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
    target: Target,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    kind: String,
    name: String,
}

/// Parses every YAML document in `text` (empty documents skipped).
pub fn yaml_documents(text: &str, source: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{source}: not valid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn display(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

/// Renders the kustomization in `dir`.
pub fn build(dir: &Path) -> Rendered {
    let file = dir.join("kustomization.yaml");
    let source = display(&file);
    let mut docs = yaml_documents(&read(&file), &source);
    assert_eq!(docs.len(), 1, "{source}: one document expected");
    let k: Kustomization = serde_json::from_value(docs.remove(0))
        .unwrap_or_else(|e| panic!("{source}: a field this test's kustomize model does not know ({e})"));
    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1", "{source}");
    assert_eq!(k.kind, "Kustomization", "{source}");

    let mut out = Rendered::default();
    for resource in &k.resources {
        let path = dir.join(resource);
        if path.is_dir() {
            let inner = build(&path);
            out.objects.extend(inner.objects);
            out.generated.extend(inner.generated);
        } else {
            let source = display(&path);
            for value in yaml_documents(&read(&path), &source) {
                out.objects.push(Object {
                    value,
                    source: source.clone(),
                });
            }
        }
    }

    for generator in &k.config_map_generator {
        let mut data = serde_json::Map::new();
        let mut files = BTreeMap::new();
        for file in &generator.files {
            let (key, path) = match file.split_once('=') {
                Some((key, path)) => (key.to_string(), dir.join(path)),
                None => (
                    Path::new(file).file_name().unwrap().to_string_lossy().into_owned(),
                    dir.join(file),
                ),
            };
            data.insert(key.clone(), Value::String(read(&path)));
            files.insert(key, path);
        }
        let existing = out
            .objects
            .iter()
            .position(|o| o.kind() == "ConfigMap" && o.name() == generator.name);
        let mut metadata = json!({"name": generator.name});
        match generator.behavior.as_deref().unwrap_or("create") {
            "create" => assert!(existing.is_none(), "{source}: ConfigMap {} exists", generator.name),
            "replace" => {
                let i = existing.unwrap_or_else(|| panic!("{source}: no ConfigMap {} to replace", generator.name));
                let replaced = out.objects.remove(i);
                // The replacement keeps the namespace the base gave it.
                if let Some(ns) = replaced.value["metadata"].get("namespace") {
                    metadata["namespace"] = ns.clone();
                }
            }
            other => panic!("{source}: configMapGenerator behavior {other:?} is not modelled"),
        }
        out.objects.push(Object {
            value: json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata,
                "data": data,
            }),
            source: source.clone(),
        });
        out.generated.insert(generator.name.clone(), files);
    }

    for patch in &k.patches {
        let path = dir.join(&patch.path);
        let patch_source = display(&path);
        let mut docs = yaml_documents(&read(&path), &patch_source);
        assert_eq!(docs.len(), 1, "{patch_source}: one document expected");
        let ops = docs.remove(0);
        let ops = ops
            .as_array()
            .unwrap_or_else(|| panic!("{patch_source}: only JSON patches (a list of operations) are modelled"));
        let targets: Vec<&mut Object> = out
            .objects
            .iter_mut()
            .filter(|o| o.kind() == patch.target.kind && o.name() == patch.target.name)
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "{patch_source}: target {} {} must match one object",
            patch.target.kind,
            patch.target.name
        );
        for target in targets {
            for op in ops {
                json_patch(&mut target.value, op).unwrap_or_else(|e| panic!("{patch_source}: {e}"));
            }
        }
    }

    if let Some(namespace) = &k.namespace {
        for object in &mut out.objects {
            object.value["metadata"]["namespace"] = Value::String(namespace.clone());
            // kustomize's default for RoleBinding subjects: a ServiceAccount
            // in "default" (or none) moves with the namespace.
            if let Some(subjects) = object.value.get_mut("subjects").and_then(Value::as_array_mut) {
                for subject in subjects {
                    let ns = subject.get("namespace").and_then(Value::as_str);
                    if subject["kind"] == "ServiceAccount" && matches!(ns, None | Some("default")) {
                        subject["namespace"] = Value::String(namespace.clone());
                    }
                }
            }
        }
    }

    for image in &k.images {
        for object in &mut out.objects {
            set_images(&mut object.value, image);
        }
    }
    out
}

/// kustomize's image transformer: every container, wherever it sits.
fn set_images(value: &mut Value, image: &Image) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "containers" || key == "initContainers" {
                    for container in child.as_array_mut().into_iter().flatten() {
                        let Some(current) = container["image"].as_str() else {
                            continue;
                        };
                        let (name, tag) = match current.rsplit_once(':') {
                            Some((n, t)) if !t.contains('/') => (n, Some(t)),
                            _ => (current, None),
                        };
                        if name != image.name {
                            continue;
                        }
                        let name = image.new_name.as_deref().unwrap_or(name);
                        let tag = image.new_tag.as_deref().or(tag);
                        container["image"] = Value::String(match tag {
                            Some(tag) => format!("{name}:{tag}"),
                            None => name.to_string(),
                        });
                    }
                } else {
                    set_images(child, image);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| set_images(v, image)),
        _ => {}
    }
}

/// One RFC 6902 operation: `add`, `remove`, `replace` or `test`.
pub fn json_patch(doc: &mut Value, op: &Value) -> Result<(), String> {
    let kind = op["op"].as_str().ok_or("an operation without \"op\"")?;
    let path = op["path"].as_str().ok_or("an operation without \"path\"")?;
    let (parent_path, last) = path.rsplit_once('/').ok_or(format!("bad path {path:?}"))?;
    let last = last.replace("~1", "/").replace("~0", "~");
    match kind {
        "test" => {
            let found = doc.pointer(path).ok_or(format!("test: nothing at {path}"))?;
            if found != &op["value"] {
                return Err(format!("test failed at {path}: {found} != {}", op["value"]));
            }
        }
        "add" | "replace" => {
            let parent = doc
                .pointer_mut(parent_path)
                .ok_or(format!("{kind}: no parent for {path}"))?;
            let value = op["value"].clone();
            match parent {
                Value::Object(map) => {
                    if kind == "replace" && !map.contains_key(&last) {
                        return Err(format!("replace: nothing at {path}"));
                    }
                    map.insert(last, value);
                }
                Value::Array(items) if last == "-" && kind == "add" => items.push(value),
                Value::Array(items) => {
                    let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                    if kind == "add" && i <= items.len() {
                        items.insert(i, value);
                    } else if kind == "replace" && i < items.len() {
                        items[i] = value;
                    } else {
                        return Err(format!("{kind}: index out of range in {path}"));
                    }
                }
                _ => return Err(format!("{kind}: parent of {path} is not a container")),
            }
        }
        "remove" => {
            let parent = doc
                .pointer_mut(parent_path)
                .ok_or(format!("remove: no parent for {path}"))?;
            let removed = match parent {
                Value::Object(map) => map.remove(&last).is_some(),
                Value::Array(items) => match last.parse::<usize>() {
                    Ok(i) if i < items.len() => {
                        items.remove(i);
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if !removed {
                return Err(format!("remove: nothing at {path}"));
            }
        }
        other => return Err(format!("operation {other:?} is not modelled")),
    }
    Ok(())
}
