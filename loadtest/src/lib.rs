//! tollgate's load tools as a library: the multi-tenant scenario runner ([`run`], with
//! [`scenario`], [`exchange`], [`batch`] and [`report`]), the single-URL open-loop generator
//! ([`rate`]) and the fixed-answer OpenAI-compatible upstream stub ([`stub`]), also used
//! by the gateway's tests.

pub mod batch;
pub mod exchange;
pub mod rate;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stub;
