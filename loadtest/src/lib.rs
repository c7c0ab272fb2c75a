//! tollgate's load tools as a library: the open-loop generator ([`rate`]) and the
//! fixed-answer OpenAI-compatible upstream stub ([`stub`]), also used by the gateway's tests.

pub mod rate;
pub mod stub;
