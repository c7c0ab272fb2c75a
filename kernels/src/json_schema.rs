//! Structured output (`response_format: {"type": "json_schema"}`): a JSON Schema compiled
//! into the node graph that the JSON recognizer ([`crate::json_mode`]) walks, so that the
//! engine generates only documents the schema accepts.
//!
//! The subset is that of OpenAI's structured outputs, plus what Pydantic models emit:
//! `type` (one or a list), `properties`, `required`, `additionalProperties`, `items`,
//! `minItems`/`maxItems`, tuples (`prefixItems`; draft 7's `items` array with
//! `additionalItems`), `enum`, `const`, `anyOf`, `oneOf` where no value can match two of
//! its alternatives (as far as kinds, literals and required properties tell: Pydantic's
//! discriminated unions), `allOf` of one schema, `nullable`,
//! `$ref` into the document (`#`, `#/$defs/…`, `#/definitions/…`, recursion included),
//! strings' `pattern`, `format` (`date-time`, `date`, `time`, `uuid`, `email`, `ipv4`)
//! and `minLength`/`maxLength`, numbers' `minimum`, `maximum`, `exclusiveMinimum` and
//! `exclusiveMaximum` (a bounded number is written without exponent, in at most 18
//! digits, and each digit only while some ending stays within the bounds), and
//! annotations (`title`, `description`, `default`, …), which are ignored. A keyword that would constrain the output in a way the recognizer
//! cannot follow (`multipleOf`, `uniqueItems`, an overlapping `oneOf`, another
//! `format`, …) is refused with a
//! [`SchemaError`] that names it, rather than ignored: the engine never returns a
//! document its schema rejects.
//!
//! A `pattern` or `format` becomes a DFA over the string's UTF-8 bytes
//! (`regex-automata`, minimized, size-limited), walked byte by byte as the string is
//! generated; such a string is written without escapes, so that its JSON bytes are its
//! value's.
//!
//! What is generated: an object's properties in the order the schema declares them
//! (a required one always, an optional one or not), and no others when the object
//! declares any (an object with no `properties` takes any keys, with values of its
//! `additionalProperties` schema or any value). That is a subset of the valid documents,
//! and each of them is valid.

mod bounds;
mod dfa;

use bounds::bounds;
pub use bounds::Bounds;
pub(crate) use dfa::whole_match_dfa;
use dfa::{format_regex, pattern_dfa};
pub use dfa::{Dfa, StringRule};
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
    /// An array: its first elements of the `prefix` nodes in turn (a tuple), the rest of
    /// `items`; between `min` and `max` elements.
    Array {
        prefix: Vec<NodeId>,
        items: NodeId,
        min: u32,
        max: u32,
    },
    /// A string: free (`rule` `None`), or held to a pattern and a length.
    String(Option<StringRule>),
    /// A number, within bounds when it has them.
    Number(Option<Bounds>),
    /// An integer, within bounds when it has them.
    Integer(Option<Bounds>),
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
                prefix: Vec::new(),
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
            "pattern",
            "format",
            "minLength",
            "maxLength",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "prefixItems",
            "additionalItems",
            "oneOf",
        ];
        if let Some(k) = obj
            .keys()
            .find(|k| !KNOWN.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
        {
            // `uniqueItems: false` says nothing.
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
        } else if let Some(one) = obj.get("oneOf") {
            // Generated as `anyOf`, which is the same where no document can match two
            // alternatives: that has to be provable (Pydantic's discriminated unions are).
            let alts = one
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| invalid("`oneOf` must be a non-empty array"))?;
            let mut ids: Vec<NodeId> = Vec::with_capacity(alts.len());
            for (i, a) in alts.iter().enumerate() {
                let id = self.node(a, &format!("{at}/oneOf/{i}"))?;
                if let Some(j) = ids.iter().position(|&o| !disjoint(&self.nodes, o, id, 0)) {
                    return Err(SchemaError::Unsupported {
                        keyword: format!(
                            "oneOf` whose alternatives {j} and {i} may both match (a discriminating `const` property, or `anyOf`, is followed"
                        ),
                        at: at.to_string(),
                    });
                }
                ids.push(id);
            }
            self.push(Node::AnyOf(ids))?
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
                } else if obj.contains_key("items") || obj.contains_key("prefixItems") {
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
                        "string" => {
                            let rule = self.string_rule(obj, at)?;
                            self.push(Node::String(rule))?
                        }
                        "number" => {
                            let b = bounds(obj, at, false)?;
                            self.push(Node::Number(b))?
                        }
                        "integer" => {
                            let b = bounds(obj, at, true)?;
                            self.push(Node::Integer(b))?
                        }
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

    /// A string's `pattern`, `format` and lengths; `None` when it has none.
    fn string_rule(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        at: &str,
    ) -> Result<Option<StringRule>, SchemaError> {
        let invalid = |why: String| SchemaError::Invalid {
            at: at.to_string(),
            why,
        };
        let min = count(obj, "minLength", at)?.unwrap_or(0);
        let max = count(obj, "maxLength", at)?.unwrap_or(u32::MAX);
        if min > max {
            return Err(invalid("`minLength` is above `maxLength`".into()));
        }
        let pattern = match obj.get("pattern") {
            None => None,
            Some(Value::String(p)) => Some(p.as_str()),
            Some(_) => return Err(invalid("`pattern` must be a string".into())),
        };
        let format = match obj.get("format") {
            None => None,
            Some(Value::String(f)) => {
                Some(format_regex(f).ok_or_else(|| SchemaError::Unsupported {
                    keyword: format!("format\": \"{f}"),
                    at: at.to_string(),
                })?)
            }
            Some(_) => return Err(invalid("`format` must be a string".into())),
        };
        let dfa = match (pattern, format) {
            (Some(_), Some(_)) => {
                return Err(SchemaError::Unsupported {
                    keyword: "pattern` with `format".into(),
                    at: at.to_string(),
                })
            }
            (Some(p), None) => {
                Some(pattern_dfa(p).map_err(|e| invalid(format!("`pattern` {p:?}: {e}")))?)
            }
            (None, Some(f)) => Some(whole_match_dfa(f, f).map_err(invalid)?),
            (None, None) => None,
        };
        Ok((dfa.is_some() || min > 0 || max < u32::MAX).then(|| StringRule { min, max, dfa }))
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
        let min = count(obj, "minItems", at)?.unwrap_or(0);
        let mut max = count(obj, "maxItems", at)?.unwrap_or(u32::MAX);
        // A tuple: `prefixItems` (2020-12), or `items` as an array (draft 7); then the
        // rest's schema in `items` or `additionalItems`.
        let (tuple, rest, rest_key) = match (obj.get("prefixItems"), obj.get("items")) {
            (Some(p), rest) => (Some((p, "prefixItems")), rest, "items"),
            (None, Some(Value::Array(_))) => (
                Some((&obj["items"], "items")),
                obj.get("additionalItems"),
                "additionalItems",
            ),
            (None, rest) => (None, rest, "items"),
        };
        let mut prefix = Vec::new();
        if let Some((t, key)) = tuple {
            let t = t.as_array().ok_or_else(|| SchemaError::Invalid {
                at: at.to_string(),
                why: format!("`{key}` must be an array"),
            })?;
            for (i, s) in t.iter().enumerate() {
                prefix.push(self.node(s, &format!("{at}/{key}/{i}"))?);
            }
        }
        let items = match rest {
            None | Some(Value::Bool(true)) => ANY,
            // No elements past the tuple.
            Some(Value::Bool(false)) => {
                max = max.min(prefix.len() as u32);
                ANY
            }
            Some(i) => self.node(i, &format!("{at}/{rest_key}"))?,
        };
        if min > max {
            return Err(SchemaError::Invalid {
                at: at.to_string(),
                why: "`minItems` is above `maxItems` (or the tuple's length)".into(),
            });
        }
        self.push(Node::Array {
            prefix,
            items,
            min,
            max,
        })
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

/// The kinds of JSON value a node may be (bits: object, array, string, number, boolean,
/// null); all of them where that is not known (a `$ref` still being compiled).
fn kinds(nodes: &[Node], n: NodeId, depth: u8) -> u8 {
    const ALL: u8 = 0b11_1111;
    match &nodes[n as usize] {
        _ if depth > 16 => ALL,
        Node::Any => ALL,
        Node::Object { .. } => 1,
        Node::Array { .. } => 2,
        Node::String(_) => 4,
        Node::Number(_) | Node::Integer(_) => 8,
        Node::Literal(texts) => texts
            .iter()
            .map(|t| match t.first() {
                Some(b'{') => 1,
                Some(b'[') => 2,
                Some(b'"') => 4,
                Some(b't' | b'f') => 16,
                Some(b'n') => 32,
                _ => 8,
            })
            .fold(0, |a, k| a | k),
        Node::AnyOf(alts) if alts.is_empty() => ALL,
        Node::AnyOf(alts) => alts.iter().fold(0, |a, &x| a | kinds(nodes, x, depth + 1)),
    }
}

/// Whether no value can be of both nodes, as far as can be told: different kinds,
/// literals with no text in common, or objects with a required property of disjoint
/// values in both.
fn disjoint(nodes: &[Node], a: NodeId, b: NodeId, depth: u8) -> bool {
    if depth > 16 {
        return false;
    }
    if kinds(nodes, a, 0) & kinds(nodes, b, 0) == 0 {
        return true;
    }
    // Through the one-alternative wrappers that `$ref`s compile to.
    let unwrap = |mut n: NodeId| {
        for _ in 0..16 {
            match &nodes[n as usize] {
                Node::AnyOf(alts) if alts.len() == 1 => n = alts[0],
                _ => break,
            }
        }
        n
    };
    let (a, b) = (unwrap(a), unwrap(b));
    match (&nodes[a as usize], &nodes[b as usize]) {
        (Node::Literal(x), Node::Literal(y)) => !x.iter().any(|t| y.contains(t)),
        (Node::Object { props: pa, .. }, Node::Object { props: pb, .. }) => pa.iter().any(|p| {
            p.required
                && pb.iter().any(|q| {
                    q.required && q.key == p.key && disjoint(nodes, p.value, q.value, depth + 1)
                })
        }),
        (Node::AnyOf(alts), _) if !alts.is_empty() => {
            alts.iter().all(|&x| disjoint(nodes, x, b, depth + 1))
        }
        (_, Node::AnyOf(alts)) if !alts.is_empty() => {
            alts.iter().all(|&x| disjoint(nodes, a, x, depth + 1))
        }
        _ => false,
    }
}

/// A count keyword (`minItems`, `maxLength`, …) of the schema at `at`, if given.
fn count(
    obj: &serde_json::Map<String, Value>,
    k: &str,
    at: &str,
) -> Result<Option<u32>, SchemaError> {
    obj.get(k)
        .map(|v| {
            v.as_u64()
                .map(|n| n.min(u32::MAX as u64) as u32)
                .ok_or_else(|| SchemaError::Invalid {
                    at: at.to_string(),
                    why: format!("`{k}` must be a non-negative integer"),
                })
        })
        .transpose()
}

/// A value's compact JSON text.
fn text(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn escape_pointer(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
