//! tollgate's gateway: the tenant-facing OpenAI-compatible API, tenant authentication,
//! routing to GPU workers (simulated, OpenAI-compatible upstreams, and the in-process
//! engine), metering and operations.
//!
//! A request's way: `api` (parse, validate) → `pipeline` (admit, route, stream, meter) →
//! `route` (pick a worker) → `worker` (generate) → back through `api::render` as JSON or
//! SSE frames.

pub mod api;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod model_fetch;
pub mod pipeline;
pub mod route;
pub mod server;
pub mod state;
pub mod tenants;
pub mod worker;
