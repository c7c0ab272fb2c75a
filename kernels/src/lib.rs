//! tollgate's compute: GGUF loading, quantized CPU kernels, the tokenizer and chat
//! template, sampling, and the Llama forward step over a packed batch of sequences.
//!
//! This crate knows nothing of tenants or HTTP: it computes one batched model step.

// Numeric kernels index several arrays by the same position; iterator chains would hide it.
#![allow(clippy::needless_range_loop)]

pub mod adjust;
pub mod attention;
pub mod backend;
pub mod chat;
pub mod cuda;
pub mod ebnf;
pub mod forward;
pub mod gguf;
pub mod grammar;
pub mod json_mode;
pub mod json_schema;
pub mod kquant;
pub mod kv;
pub mod load;
pub mod logprobs;
pub mod mask_cache;
pub mod matmul;
pub mod model;
pub mod moe;
pub mod ops;
pub mod packed;
pub mod quant;
pub mod regex_mode;
pub mod sampler;
pub mod synth;
pub mod tokenizer;
pub(crate) mod trie_walk;

#[cfg(test)]
mod testutil;
