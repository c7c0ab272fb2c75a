//! A number schema's bounds (`minimum`, `maximum` and their exclusive forms, the older
//! boolean ones too): read from the schema, checked for an empty range, and asked whether a
//! value or a range of values can still meet them.

use super::SchemaError;
use serde_json::Value;

/// A number's bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`),
/// infinite where it has none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub lo_excl: bool,
    pub hi: f64,
    pub hi_excl: bool,
}

impl Bounds {
    /// Whether `x` is within them.
    pub fn holds(&self, x: f64) -> bool {
        (if self.lo_excl {
            x > self.lo
        } else {
            x >= self.lo
        }) && (if self.hi_excl {
            x < self.hi
        } else {
            x <= self.hi
        })
    }

    /// Whether some number in `[x, y]` is within them (`int`: some integer). For numbers
    /// the ends count as reachable: what is reachable is decimals as close to them as
    /// the digits allow.
    pub fn meets(&self, x: f64, y: f64, int: bool) -> bool {
        if int {
            let lo = if self.lo_excl {
                self.lo.floor() + 1.0
            } else {
                self.lo.ceil()
            };
            let hi = if self.hi_excl {
                self.hi.ceil() - 1.0
            } else {
                self.hi.floor()
            };
            return x.ceil().max(lo) <= y.floor().min(hi);
        }
        x <= y
            && (if self.lo_excl {
                y > self.lo
            } else {
                y >= self.lo
            })
            && (if self.hi_excl {
                x < self.hi
            } else {
                x <= self.hi
            })
    }
}

/// A number schema's bounds, `None` when it has none. The older boolean
/// `exclusiveMinimum`/`exclusiveMaximum` (beside `minimum`/`maximum`) are taken too.
pub(super) fn bounds(
    obj: &serde_json::Map<String, Value>,
    at: &str,
    int: bool,
) -> Result<Option<Bounds>, SchemaError> {
    let num = |k: &str| -> Result<Option<f64>, SchemaError> {
        match obj.get(k) {
            None | Some(Value::Bool(_)) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| SchemaError::Invalid {
                at: at.to_string(),
                why: format!("`{k}` must be a number"),
            }),
        }
    };
    let flag = |k: &str| obj.get(k) == Some(&Value::Bool(true));
    let mut b = Bounds {
        lo: f64::NEG_INFINITY,
        lo_excl: false,
        hi: f64::INFINITY,
        hi_excl: false,
    };
    if let Some(x) = num("minimum")? {
        b.lo = x;
        b.lo_excl = flag("exclusiveMinimum");
    }
    if let Some(x) = num("exclusiveMinimum")? {
        if x >= b.lo {
            (b.lo, b.lo_excl) = (x, true);
        }
    }
    if let Some(x) = num("maximum")? {
        b.hi = x;
        b.hi_excl = flag("exclusiveMaximum");
    }
    if let Some(x) = num("exclusiveMaximum")? {
        if x <= b.hi {
            (b.hi, b.hi_excl) = (x, true);
        }
    }
    if b.lo.is_infinite() && b.hi.is_infinite() {
        return Ok(None);
    }
    let empty = b.lo > b.hi
        || (b.lo == b.hi && (b.lo_excl || b.hi_excl))
        || (int && !b.meets(b.lo, b.hi, true));
    if empty {
        return Err(SchemaError::Invalid {
            at: at.to_string(),
            why: "its bounds leave no value".into(),
        });
    }
    // Bounded numbers are written with at most 18 digits.
    if b.lo >= MAX_BOUNDED || b.hi <= -MAX_BOUNDED {
        return Err(SchemaError::Unsupported {
            keyword: "minimum` or `maximum` beyond 10^17".into(),
            at: at.to_string(),
        });
    }
    Ok(Some(b))
}

/// The largest magnitude of a bound a bounded number can be generated against.
const MAX_BOUNDED: f64 = 1e17;
