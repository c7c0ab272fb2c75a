//! The gateway's integration tests, in one binary: each module was its own test crate,
//! and one binary compiles `common` and links the gateway once instead of twenty times.
//! Run one module's tests with `cargo test -p gateway --test suite engine::`.
//!
//! `engine_fault` and `engine_stall` stay their own binaries: they set the CUDA
//! emulator's process-wide faults, which would reach every test running beside them.
//!
//! The engine tests' GPU path runs on the emulator, and on a real GPU too where the driver
//! sees one (`common::gpu_paths`): `kernels/gpu-check.sh` carries this binary to the GPU
//! machine and runs the engine modules there with the emulator off.

mod common;

mod api;
mod batches;
mod choices;
mod contracts;
mod embeddings_engine;
mod engine;
mod guided;
mod json_mode;
mod lifecycle;
mod limiter_props;
mod loadtest_scenario;
mod logprobs;
mod metering;
mod penalties;
mod real_model;
mod redis_fleet;
mod responses_engine;
mod sdk;
mod tools;
mod validate_props;
mod vocabs;
mod workers;
