//! tollgate's gateway: the tenant-facing OpenAI-compatible API, tenant authentication,
//! routing to GPU workers (simulated, OpenAI-compatible upstreams, and the in-process
//! engine), metering and operations.
//!
//! A request's way: `api` (parse, validate) → `pipeline` (admit against the tenant's
//! contract in `limits`, route, stream, reconcile, meter into `meter`) →
//! `route` (pick a worker) → `worker` (generate) → back through `api::render` as JSON or
//! SSE frames.

pub mod api;
pub mod batch;
pub mod config;
pub mod engine;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod model_fetch;
pub mod pipeline;
pub mod reload;
pub mod response_store;
pub mod route;
pub mod server;
pub mod state;
pub mod tenants;
pub mod truncate;
pub mod worker;
