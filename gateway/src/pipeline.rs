//! The one place a validated request goes through: admit → route → stream → meter.
//!
//! Handlers parse and validate, then call [`serve`]. Here the tenant's concurrency slot is
//! taken, a worker is picked (retrying on another worker while nothing has reached the
//! client), and the worker's events become the response: a JSON body, or SSE frames sent
//! as the client reads them. Everything a request holds (tenant slot, worker lease, meter)
//! lives in the response stream, so a client that disconnects releases it all at once and
//! cancels the worker's generation.

use crate::api::error::ApiError;
use crate::api::render::Renderer;
use crate::api::validate::InferenceRequest;
use crate::metrics::Meter;
use crate::route::{Lease, NoWorker, Pool};
use crate::state::AppState;
use crate::tenants::{Tenant, TenantSlot};
use crate::worker::{EventStream, WorkerError, WorkerEvent, WorkerRequest};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;
use tracing::Instrument;

/// Who is asking, and since when.
pub struct RequestCtx {
    pub request_id: Arc<str>,
    pub tenant: Arc<Tenant>,
    /// Set when a trusted gateway names the tenant the request is for.
    pub acting: Option<crate::api::auth::ActingFor>,
    pub started: Instant,
}

impl RequestCtx {
    /// The tenant the request is for: a trusted gateway's tenant, else the caller.
    pub fn tenant_id(&self) -> &Arc<str> {
        self.acting.as_ref().map_or(&self.tenant.id, |a| &a.tenant)
    }
    /// Its scheduling weight: the trusted gateway's word, else the purchased rate.
    pub fn weight(&self) -> Option<f64> {
        match &self.acting {
            Some(a) => a.weight,
            None => self.tenant.cfg.tokens_per_second,
        }
    }
}

/// Serves one validated request end to end.
pub async fn serve(state: &AppState, ctx: RequestCtx, req: InferenceRequest) -> Response {
    let Some(pool) = state
        .router
        .pool_for(&req.model, ctx.tenant.cfg.pool.as_deref())
        .cloned()
    else {
        state.metrics.count(ctx.tenant_id(), "", "404");
        return ApiError::ModelNotFound(req.model).into_response();
    };
    let model: Arc<str> = req.model.as_str().into();
    let mut meter = Meter::start(
        state.metrics.clone(),
        state.metrics.handles(ctx.tenant_id(), &model),
        ctx.started,
    );
    match run(state, &ctx, &pool, req, &mut meter).await {
        Ok(Reply::Whole(resp)) => resp,
        Ok(Reply::Stream(stream)) => stream.into_response(meter),
        Err(e) => {
            meter.failure(e.status().as_str());
            e.into_response()
        }
    }
}

enum Reply {
    Whole(Response),
    Stream(SseStream),
}

async fn run(
    state: &AppState,
    ctx: &RequestCtx,
    pool: &Pool,
    req: InferenceRequest,
    meter: &mut Meter,
) -> Result<Reply, ApiError> {
    let tenant_slot = ctx
        .tenant
        .try_acquire()
        .ok_or_else(|| ApiError::RateLimited {
            message: format!(
                "Tenant `{}` is at its limit of {} concurrent requests.",
                ctx.tenant.id,
                ctx.tenant.cfg.max_concurrency.unwrap_or(0)
            ),
            retry_after_ms: 1000,
        })?;
    let server = &state.config.server;
    let deadline = TokioInstant::from_std(ctx.started)
        + std::time::Duration::from_secs_f64(server.request_timeout_secs);
    let renderer = Renderer::new(req.endpoint, &req.model, req.include_usage);
    let stream = req.stream;
    let wreq = Arc::new(WorkerRequest {
        request_id: ctx.request_id.clone(),
        tenant: ctx.tenant_id().clone(),
        weight: ctx.weight(),
        model: req.model.as_str().into(),
        prompt: req.prompt,
        params: req.params,
        stream,
    });
    let (lease, events, first) = dispatch(pool, &wreq, server.max_retries, deadline).await?;
    tracing::debug!(worker = lease.worker().name(), "routed");
    let sse = SseStream {
        renderer,
        events,
        first: Some(first),
        lease,
        _tenant_slot: tenant_slot,
        deadline,
        text: String::new(),
    };
    if stream {
        Ok(Reply::Stream(sse))
    } else {
        sse.collect(meter).await.map(Reply::Whole)
    }
}

/// Picks a worker and gets its first event, retrying on other workers while nothing has
/// been sent to the client.
async fn dispatch(
    pool: &Pool,
    wreq: &Arc<WorkerRequest>,
    max_retries: u32,
    deadline: TokioInstant,
) -> Result<(Lease, EventStream, WorkerEvent), ApiError> {
    let tokens =
        crate::worker::estimate_prompt_tokens(&wreq.prompt) as u64 + wreq.params.max_tokens as u64;
    let mut tried = Vec::new();
    let mut last: Option<ApiError> = None;
    for attempt in 0..=max_retries {
        let mut lease = match pool.pick(tokens, &tried) {
            Ok(l) => l,
            Err(why) => {
                return Err(last.unwrap_or_else(|| ApiError::Overloaded {
                    message: match why {
                        NoWorker::Saturated => format!(
                            "All workers of pool `{}` are at capacity; retry shortly.",
                            pool.name
                        ),
                        NoWorker::Unhealthy => {
                            format!("No healthy worker in pool `{}`.", pool.name)
                        }
                    },
                    retry_after_ms: 1000,
                }))
            }
        };
        tried.push(lease.index);
        let worker = lease.worker().clone();
        let first = async {
            let mut events = worker.submit(wreq.clone()).await?;
            match events.next().await {
                Some(Ok(ev)) => Ok((events, ev)),
                Some(Err(e)) => Err(e),
                None => Err(WorkerError::Protocol(
                    "answer ended before any event".into(),
                )),
            }
        };
        match tokio::time::timeout_at(deadline, first).await {
            Err(_) => return Err(ApiError::Timeout),
            Ok(Ok((events, ev))) => return Ok((lease, events, ev)),
            Ok(Err(e)) => {
                if e.counts_against_worker() {
                    lease.failure();
                }
                tracing::warn!(worker = worker.name(), attempt, error = %e, "worker attempt failed");
                if !e.retryable() {
                    return Err(worker_error(e));
                }
                last = Some(worker_error(e));
            }
        }
    }
    Err(last.unwrap_or_else(|| ApiError::Internal("no attempt made".into())))
}

fn worker_error(e: WorkerError) -> ApiError {
    match e {
        WorkerError::Rejected {
            status: 400 | 422,
            message,
        } => ApiError::bad(message, None),
        WorkerError::Rejected { status, message } => ApiError::Upstream(format!(
            "The worker rejected the request ({status}): {message}"
        )),
        other => ApiError::Upstream(format!("The worker failed: {other}")),
    }
}

/// A routed request's remaining life: the worker's events, rendered.
struct SseStream {
    renderer: Renderer,
    events: EventStream,
    first: Option<WorkerEvent>,
    lease: Lease,
    _tenant_slot: TenantSlot,
    deadline: TokioInstant,
    text: String,
}

enum Step {
    Event(WorkerEvent),
    Failed(ApiError),
}

impl SseStream {
    async fn next_step(&mut self) -> Step {
        if let Some(ev) = self.first.take() {
            return Step::Event(ev);
        }
        match tokio::time::timeout_at(self.deadline, self.events.next()).await {
            Err(_) => Step::Failed(ApiError::Timeout),
            Ok(Some(Ok(ev))) => Step::Event(ev),
            Ok(Some(Err(e))) => {
                if e.counts_against_worker() {
                    self.lease.failure();
                }
                tracing::warn!(worker = self.lease.worker().name(), error = %e, "worker failed mid-request");
                Step::Failed(worker_error(e))
            }
            Ok(None) => {
                self.lease.failure();
                Step::Failed(ApiError::Upstream(
                    "The worker's answer ended early.".into(),
                ))
            }
        }
    }

    /// Non-streamed: gather the whole answer, then one JSON body.
    async fn collect(mut self, meter: &mut Meter) -> Result<Response, ApiError> {
        loop {
            match self.next_step().await {
                Step::Event(WorkerEvent::Delta { text, .. }) => {
                    meter.first_token();
                    self.text.push_str(&text);
                }
                Step::Event(WorkerEvent::Done {
                    finish_reason,
                    usage,
                }) => {
                    self.lease.success();
                    meter.success(usage.prompt_tokens, usage.completion_tokens);
                    let body = self.renderer.full(&self.text, finish_reason, usage);
                    return Ok(
                        ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
                    );
                }
                Step::Failed(e) => return Err(e),
            }
        }
    }

    /// Streamed: SSE frames produced as the client reads them.
    fn into_response(self, meter: Meter) -> Response {
        let mut head = BytesMut::new();
        self.renderer.role_frame(&mut head);
        let state = (self, meter, Some(head), false);
        // The request's span outlives its handler: keep it on the body's work too.
        let span = tracing::Span::current();
        let body = futures::stream::unfold(state, move |(mut s, mut meter, head, ended)| {
            let span = span.clone();
            async move {
                if ended {
                    return None;
                }
                let mut out = head.unwrap_or_default();
                let ended = match s.next_step().await {
                    Step::Event(WorkerEvent::Delta { text, .. }) => {
                        meter.first_token();
                        s.renderer.delta_frame(&mut out, &text);
                        false
                    }
                    Step::Event(WorkerEvent::Done {
                        finish_reason,
                        usage,
                    }) => {
                        s.lease.success();
                        meter.success(usage.prompt_tokens, usage.completion_tokens);
                        s.renderer.final_frames(&mut out, finish_reason, usage);
                        true
                    }
                    Step::Failed(e) => {
                        meter.failure("stream_error");
                        s.renderer.error_frame(&mut out, &e);
                        true
                    }
                };
                Some((
                    Ok::<_, std::convert::Infallible>(out.freeze()),
                    (s, meter, None, ended),
                ))
            }
            .instrument(span)
        });
        (
            [
                (http::header::CONTENT_TYPE, "text/event-stream"),
                (http::header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(body),
        )
            .into_response()
    }
}
