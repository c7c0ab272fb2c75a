//! Structured output (`response_format: {"type": "json_schema"}`): a JSON Schema compiled
//! into the node graph that the JSON recognizer ([`crate::json_mode`]) walks, so that the
//! engine generates only documents the schema accepts.
//!
//! The subset is that of OpenAI's structured outputs, plus what Pydantic models emit:
//! `type` (one or a list), `properties`, `required`, `additionalProperties`, `items`,
//! `minItems`/`maxItems`, `enum`, `const`, `anyOf`, `allOf` of one schema, `nullable`,
//! `$ref` into the document (`#`, `#/$defs/…`, `#/definitions/…`, recursion included),
//! and annotations (`title`, `description`, `default`, …), which are ignored. A keyword
//! that would constrain the output in a way the recognizer cannot follow (`pattern`,
//! `format`, `minimum`, `oneOf`, …) is refused with a [`SchemaError`] that names it,
//! rather than ignored: the engine never returns a document its schema rejects.
//!
//! What is generated: an object's properties in the order the schema declares them
//! (a required one always, an optional one or not), and no others when the object
//! declares any (an object with no `properties` takes any keys, with values of its
//! `additionalProperties` schema or any value). That is a subset of the valid documents,
//! and each of them is valid.

use serde_json::Value;
use std::collections::HashMap;

/// A node of a compiled schema.
pub type NodeId = u32;

/// Any JSON value.
pub const ANY: NodeId = 0;
/// Any JSON object (JSON mode's root).
pub const ANY_OBJECT: NodeId = 1;
/// Any JSON array.
pub const ANY_ARRAY: NodeId = 2;
/// `true`, `false` or `null`.
pub const WORDS: NodeId = 3;

/// The most nodes a schema may compile to, and the most `enum` values in one node.
const MAX_NODES: usize = 10_000;
const MAX_ENUM: usize = 1_000;

/// A property of an object node: its key as JSON text (with its quotes), its value's node,
/// whether it is required.
#[derive(Debug, Clone, PartialEq)]
pub struct Prop {
    pub key: Vec<u8>,
    pub value: NodeId,
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Any JSON value.
    Any,
    /// An object: its declared properties in order; with none declared, any keys whose
    /// values are of `values` (no keys at all when `None`).
    Object {
        props: Vec<Prop>,
        values: Option<NodeId>,
    },
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    String,
    Number,
    Integer,
    /// One of these JSON texts (from `enum`, `const`, `boolean`, `null`), sorted.
    Literal(Vec<Vec<u8>>),
    /// A value of any of these nodes.
    AnyOf(Vec<NodeId>),
}

/// A compiled schema: its nodes and its root.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    nodes: Vec<Node>,
    root: NodeId,
}

/// Why a schema cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("the keyword `{keyword}` (at `{at}`) is not supported in structured output")]
    Unsupported { keyword: String, at: String },
    #[error("`{at}` is not a valid schema: {why}")]
    Invalid { at: String, why: String },
    #[error("the schema is too large (more than {MAX_NODES} nodes)")]
    TooLarge,
}

/// Keywords that describe a schema without constraining its values.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "strict",
    "discriminator",
];

impl Schema {
    /// JSON mode: any object.
    pub fn any_object() -> Self {
        Self {
            nodes: Self::base(),
            root: ANY_OBJECT,
        }
    }

    fn base() -> Vec<Node> {
        vec![
            Node::Any,
            Node::Object {
                props: Vec::new(),
                values: Some(ANY),
            },
            Node::Array {
                items: ANY,
                min: 0,
                max: u32::MAX,
            },
            literal(
                ["true", "false", "null"]
                    .map(|w| w.as_bytes().to_vec())
                    .to_vec(),
            ),
        ]
    }

    /// Compiles a JSON Schema document.
    pub fn compile(doc: &Value) -> Result<Self, SchemaError> {
        let mut c = Compiler {
            doc,
            nodes: Self::base(),
            refs: HashMap::new(),
        };
        let root = c.node(doc, "#")?;
        let s = Self {
            nodes: c.nodes,
            root,
        };
        s.check_alternatives()?;
        Ok(s)
    }

    /// Refuses a schema whose alternatives lead back to themselves with no value in
    /// between (`{"$ref": "#"}`, or an `anyOf` that lists itself): no document has it.
    fn check_alternatives(&self) -> Result<(), SchemaError> {
        // 0: not seen, 1: on the path, 2: done.
        let mut mark = vec![0u8; self.nodes.len()];
        fn visit(s: &Schema, n: NodeId, mark: &mut [u8]) -> bool {
            match mark[n as usize] {
                1 => return false,
                2 => return true,
                _ => {}
            }
            mark[n as usize] = 1;
            if let Node::AnyOf(alts) = s.node(n) {
                if !alts.iter().all(|&a| visit(s, a, mark)) {
                    return false;
                }
            }
            mark[n as usize] = 2;
            true
        }
        for n in 0..self.nodes.len() as NodeId {
            if !visit(self, n, &mut mark) {
                return Err(SchemaError::Invalid {
                    at: "#".into(),
                    why: "its alternatives refer to themselves with no value in between".into(),
                });
            }
        }
        Ok(())
    }

    pub fn root(&self) -> NodeId {
        self.root
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }
}

fn literal(mut texts: Vec<Vec<u8>>) -> Node {
    texts.sort();
    texts.dedup();
    Node::Literal(texts)
}

struct Compiler<'a> {
    doc: &'a Value,
    nodes: Vec<Node>,
    /// `$ref` targets already compiled (or being compiled), by pointer.
    refs: HashMap<String, NodeId>,
}

impl<'a> Compiler<'a> {
    fn push(&mut self, n: Node) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(SchemaError::TooLarge);
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn node(&mut self, s: &'a Value, at: &str) -> Result<NodeId, SchemaError> {
        let invalid = |why: &str| SchemaError::Invalid {
            at: at.to_string(),
            why: why.to_string(),
        };
        let obj = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return Err(invalid("`false` accepts no value")),
            Value::Object(o) => o,
            _ => return Err(invalid("a schema is an object or a boolean")),
        };
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| invalid("`$ref` must be a string"))?;
            if let Some(k) = obj
                .keys()
                .find(|k| *k != "$ref" && !ANNOTATIONS.contains(&k.as_str()))
            {
                return Err(SchemaError::Unsupported {
                    keyword: format!("{k}` beside `$ref"),
                    at: at.to_string(),
                });
            }
            return self.reference(r, at);
        }
        const KNOWN: &[&str] = &[
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "minItems",
            "maxItems",
            "enum",
            "const",
            "anyOf",
            "allOf",
            "nullable",
        ];
        if let Some(k) = obj
            .keys()
            .find(|k| !KNOWN.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
        {
            // `uniqueItems: false` and `additionalItems` without `prefixItems` say nothing.
            if !(k == "uniqueItems" && obj[k] == Value::Bool(false)) {
                return Err(SchemaError::Unsupported {
                    keyword: k.clone(),
                    at: at.to_string(),
                });
            }
        }
        let node = if let Some(c) = obj.get("const") {
            self.push(literal(vec![text(c)]))?
        } else if let Some(e) = obj.get("enum") {
            let vals = e
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| invalid("`enum` must be a non-empty array"))?;
            if vals.len() > MAX_ENUM {
                return Err(invalid("`enum` has more than 1000 values"));
            }
            self.push(literal(vals.iter().map(text).collect()))?
        } else if let Some(all) = obj.get("allOf") {
            match all.as_array().map(|a| a.as_slice()) {
                Some([one]) => self.node(one, &format!("{at}/allOf/0"))?,
                _ => {
                    return Err(SchemaError::Unsupported {
                        keyword: "allOf` of several schemas".into(),
                        at: at.to_string(),
                    })
                }
            }
        } else if let Some(any) = obj.get("anyOf") {
            let alts = any
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| invalid("`anyOf` must be a non-empty array"))?;
            let mut ids = Vec::with_capacity(alts.len());
            for (i, a) in alts.iter().enumerate() {
                ids.push(self.node(a, &format!("{at}/anyOf/{i}"))?);
            }
            self.push(Node::AnyOf(ids))?
        } else {
            let types: Vec<&str> = match obj.get("type") {
                None => Vec::new(),
                Some(Value::String(t)) => vec![t.as_str()],
                Some(Value::Array(ts)) if !ts.is_empty() => ts
                    .iter()
                    .map(|t| t.as_str().ok_or_else(|| invalid("`type` lists strings")))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(invalid("`type` must be a string or a list of them")),
            };
            if types.is_empty() {
                if obj.contains_key("properties") || obj.contains_key("additionalProperties") {
                    self.object(obj, at)?
                } else if obj.contains_key("items") {
                    self.array(obj, at)?
                } else {
                    ANY
                }
            } else {
                let mut ids = Vec::with_capacity(types.len());
                for t in types {
                    ids.push(match t {
                        "object" => self.object(obj, at)?,
                        "array" => self.array(obj, at)?,
                        "string" => self.push(Node::String)?,
                        "number" => self.push(Node::Number)?,
                        "integer" => self.push(Node::Integer)?,
                        "boolean" => {
                            self.push(literal(vec![b"true".to_vec(), b"false".to_vec()]))?
                        }
                        "null" => self.push(literal(vec![b"null".to_vec()]))?,
                        other => return Err(invalid(&format!("unknown type {other:?}"))),
                    });
                }
                if ids.len() == 1 {
                    ids[0]
                } else {
                    self.push(Node::AnyOf(ids))?
                }
            }
        };
        if obj.get("nullable") == Some(&Value::Bool(true)) {
            let null = self.push(literal(vec![b"null".to_vec()]))?;
            return self.push(Node::AnyOf(vec![node, null]));
        }
        Ok(node)
    }

    fn object(
        &mut self,
        obj: &'a serde_json::Map<String, Value>,
        at: &str,
    ) -> Result<NodeId, SchemaError> {
        let invalid = |why: &str| SchemaError::Invalid {
            at: at.to_string(),
            why: why.to_string(),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|k| {
                    k.as_str()
                        .ok_or_else(|| invalid("`required` lists strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("`required` must be an array")),
        };
        let mut props = Vec::new();
        if let Some(p) = obj.get("properties") {
            let p = p
                .as_object()
                .ok_or_else(|| invalid("`properties` must be an object"))?;
            for (k, v) in p {
                let value = self.node(v, &format!("{at}/properties/{}", escape_pointer(k)))?;
                props.push(Prop {
                    key: text(&Value::String(k.clone())),
                    value,
                    required: required.contains(&k.as_str()),
                });
            }
        }
        if let Some(missing) = required.iter().find(|r| {
            !props
                .iter()
                .any(|p| p.key == text(&Value::String(r.to_string())))
        }) {
            if !props.is_empty() || obj.get("additionalProperties") == Some(&Value::Bool(false)) {
                return Err(invalid(&format!(
                    "required property {missing:?} is not among `properties`"
                )));
            }
            return Err(SchemaError::Unsupported {
                keyword: "required` without `properties".into(),
                at: at.to_string(),
            });
        }
        let values = if props.is_empty() {
            match obj.get("additionalProperties") {
                None | Some(Value::Bool(true)) => Some(ANY),
                Some(Value::Bool(false)) => None,
                Some(s) => Some(self.node(s, &format!("{at}/additionalProperties"))?),
            }
        } else {
            None
        };
        self.push(Node::Object { props, values })
    }

    fn array(
        &mut self,
        obj: &'a serde_json::Map<String, Value>,
        at: &str,
    ) -> Result<NodeId, SchemaError> {
        let count = |k: &str| -> Result<Option<u32>, SchemaError> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n.min(u32::MAX as u64) as u32))
                    .ok_or_else(|| SchemaError::Invalid {
                        at: at.to_string(),
                        why: format!("`{k}` must be a non-negative integer"),
                    }),
            }
        };
        let min = count("minItems")?.unwrap_or(0);
        let max = count("maxItems")?.unwrap_or(u32::MAX);
        if min > max {
            return Err(SchemaError::Invalid {
                at: at.to_string(),
                why: "`minItems` is above `maxItems`".into(),
            });
        }
        let items = match obj.get("items") {
            None => ANY,
            Some(i) => self.node(i, &format!("{at}/items"))?,
        };
        self.push(Node::Array { items, min, max })
    }

    /// A `$ref` into this document: compiled once, so that recursion closes on itself.
    fn reference(&mut self, r: &str, at: &str) -> Result<NodeId, SchemaError> {
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = r
            .strip_prefix('#')
            .and_then(|p| {
                if p.is_empty() {
                    Some(self.doc)
                } else {
                    self.doc.pointer(p)
                }
            })
            .ok_or_else(|| SchemaError::Invalid {
                at: at.to_string(),
                why: format!("`$ref` {r:?} does not point into this schema"),
            })?;
        // A placeholder that the target's node replaces: references inside the target
        // (recursion) point to it.
        let id = self.push(Node::AnyOf(Vec::new()))?;
        self.refs.insert(r.to_string(), id);
        let inner = self.node(target, r)?;
        self.nodes[id as usize] = Node::AnyOf(vec![inner]);
        Ok(id)
    }
}

/// A value's compact JSON text.
fn text(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn escape_pointer(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pydantic_shapes_compile() {
        let s = Schema::compile(&json!({
            "$defs": {"Pet": {"properties": {"kind": {"enum": ["cat", "dog"], "title": "Kind"}},
                              "required": ["kind"], "title": "Pet", "type": "object"}},
            "properties": {
                "name": {"title": "Name", "type": "string"},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null},
                "pets": {"items": {"$ref": "#/$defs/Pet"}, "type": "array", "maxItems": 3},
                "tags": {"type": "object", "additionalProperties": {"type": "number"}}
            },
            "required": ["name", "pets"],
            "title": "Person", "type": "object", "additionalProperties": false
        }))
        .unwrap();
        let Node::Object { props, .. } = s.node(s.root()) else {
            panic!("{s:?}")
        };
        let keys: Vec<&[u8]> = props.iter().map(|p| p.key.as_slice()).collect();
        assert_eq!(
            keys,
            [&b"\"name\""[..], b"\"age\"", b"\"pets\"", b"\"tags\""]
        );
        let req: Vec<bool> = props.iter().map(|p| p.required).collect();
        assert_eq!(req, [true, false, true, false]);
    }

    #[test]
    fn recursion_closes_on_itself() {
        let s = Schema::compile(&json!({
            "type": "object",
            "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}
        }))
        .unwrap();
        assert!(s.nodes.len() < 10, "{s:?}");
    }

    #[test]
    fn what_cannot_be_followed_is_refused_by_name() {
        for (schema, word) in [
            (json!({"type": "string", "pattern": "^a+$"}), "pattern"),
            (json!({"type": "string", "format": "email"}), "format"),
            (json!({"type": "integer", "minimum": 3}), "minimum"),
            (json!({"oneOf": [{"type": "string"}]}), "oneOf"),
            (
                json!({"$ref": "#/$defs/X", "minItems": 2, "$defs": {"X": {}}}),
                "minItems",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "array", "prefixItems": []}}}),
                "prefixItems",
            ),
        ] {
            let e = Schema::compile(&schema).unwrap_err();
            assert!(e.to_string().contains(word), "{schema}: {e}");
        }
        for (schema, why) in [
            (json!({"$ref": "#/$defs/Missing"}), "does not point"),
            (json!({"type": "strin"}), "unknown type"),
            (json!({"enum": []}), "non-empty"),
            (
                json!({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": false}),
                "not among",
            ),
            (
                json!({"type": "array", "minItems": 3, "maxItems": 2}),
                "above",
            ),
            (json!(false), "accepts no value"),
            (json!({"$ref": "#"}), "refer to themselves"),
            (
                json!({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "string"}]}}, "$ref": "#/$defs/A"}),
                "refer to themselves",
            ),
        ] {
            let e = Schema::compile(&schema).unwrap_err();
            assert!(e.to_string().contains(why), "{schema}: {e}");
        }
    }
}
