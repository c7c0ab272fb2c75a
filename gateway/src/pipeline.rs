//! The one place a validated request goes through: admit → queue → route → stream →
//! reconcile and meter.
//!
//! Handlers parse and validate, then call [`serve`]. Here the request is held to its
//! tenant's contract (tier, concurrency cap, token and request buckets: a reservation of
//! `input + output_weight × max_tokens`), a worker is picked (waiting in the pool's
//! bounded queue when all are busy, retrying on another worker while nothing has reached
//! the client), and the worker's events become the response: a JSON body, or SSE frames
//! sent as the client reads them. Everything a request holds (concurrency slot, worker
//! lease, reservation, meter) lives in the response stream, so a client that disconnects
//! releases it all at once and cancels the worker's generation; the reservation is then
//! settled with what was really generated.

use crate::api::error::ApiError;
use crate::api::render::{ChoiceOut, Renderer};
use crate::api::validate::{InferenceRequest, MAX_CHOICES};
use crate::config::{Overflow, Tier};
use crate::limits::{headers, AdmitError, Buckets, ConcurrencySlot, Contract, Limiter};
use crate::metrics::{Meter, MeterCtx};
use crate::route::{Lease, NoWorker, Pool};
use crate::state::AppState;
use crate::tenants::Tenant;
use crate::worker::{EventStream, WorkerError, WorkerEvent, WorkerRequest};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::{StreamExt, TryStreamExt};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;
use tracing::Instrument;

/// Prompts of at least this many tokens route a request's other choices after its first
/// has started (see `run`).
const STAGGER_PROMPT_TOKENS: usize = 256;

/// Marks a response admitted past contract under `overflow = "best_effort"`.
pub const OVERFLOW_HEADER: &str = "x-tollgate-overflow";

/// Who is asking, and since when.
pub struct RequestCtx {
    pub request_id: Arc<str>,
    pub tenant: Arc<Tenant>,
    /// Set when a trusted gateway names the tenant the request is for.
    pub acting: Option<crate::api::auth::ActingFor>,
    pub started: Instant,
    /// A request of a batch (`/v1/batches`): scheduled at the lowest weight, after the
    /// tenant's own interactive requests.
    pub batch: bool,
}

impl RequestCtx {
    /// The tenant the request is for: a trusted gateway's tenant, else the caller.
    pub fn tenant_id(&self) -> &Arc<str> {
        self.acting.as_ref().map_or(&self.tenant.id, |a| &a.tenant)
    }
    /// Its scheduling weight: the trusted gateway's word, else the purchased rate.
    pub fn weight(&self) -> Option<f64> {
        if self.batch {
            return Some(crate::worker::LOWEST_WEIGHT);
        }
        match &self.acting {
            Some(a) => a.weight,
            None => self.tenant.cfg.tokens_per_second,
        }
    }
}

/// The input tokens `req` would take on the pool that would serve it for `tenant`: exact
/// where the pool holds the model's tokenizer (engines), else the estimate admission
/// charges; after truncation where the request asks for it. Nothing is admitted or run.
pub async fn input_tokens(
    state: &AppState,
    tenant: &Tenant,
    mut req: InferenceRequest,
) -> Result<u32, ApiError> {
    let pool = state
        .router
        .pool_for(&req.model, tenant.cfg.pool.as_deref())
        .ok_or_else(|| ApiError::ModelNotFound(req.model.clone()))?;
    Ok(prompt_parts(pool, &mut req)
        .await?
        .iter()
        .map(|p| p.tokens)
        .sum())
}

/// Prompts of at least this many tokens (as [`crate::worker::estimate_prompt_tokens`]
/// guesses from their bytes, in all) are tokenized on the runtime's blocking threads: a
/// megabyte of text takes the model's tokenizer about a third of a second, which on a
/// runtime thread would hold up every other request's I/O on it.
const TOKENIZE_APART_TOKENS: u64 = 2048;

/// `req`'s prompts (taken from it) as `pool` runs them: each tokenized once, here, where
/// the pool has the model's tokenizer (the count is exact, and the engine takes the ids as
/// they are), a conversation truncated to fit where the request says so. Long prompts
/// are tokenized off the runtime's threads ([`TOKENIZE_APART_TOKENS`]).
async fn prompt_parts(
    pool: &Arc<Pool>,
    req: &mut InferenceRequest,
) -> Result<Vec<PromptPart>, ApiError> {
    let how = PromptsHow {
        truncate: req.responses.as_ref().is_some_and(|r| r.truncate),
        max_tokens: req.params.max_tokens as usize,
        echo: req.echo,
        scored: req.params.prompt_logprobs,
    };
    let prompts = std::mem::take(&mut req.prompts);
    let guess: u64 = prompts
        .iter()
        .map(|p| crate::worker::estimate_prompt_tokens(p) as u64)
        .sum();
    let pool = pool.clone();
    apart_if(
        guess >= TOKENIZE_APART_TOKENS,
        "tokenizing the prompt",
        move || parts_of(&pool, prompts, how),
    )
    .await?
}

/// `f`, on the runtime's blocking threads if `apart` (CPU work long enough to hold up a
/// serving thread's other connections), else here; `what` names it if that thread fails.
pub(crate) async fn apart_if<T, F>(apart: bool, what: &str, f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if !apart {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("{what} failed: {e}")))
}

/// How a request's prompts are made into [`PromptPart`]s: a conversation truncated to
/// fit its answer of `max_tokens` (`truncate`), echoed (`echo`), scored (`scored`).
#[derive(Clone, Copy)]
struct PromptsHow {
    truncate: bool,
    max_tokens: usize,
    echo: bool,
    scored: bool,
}

/// [`prompt_parts`]'s work, where it runs.
fn parts_of(
    pool: &Pool,
    prompts: Vec<crate::worker::Prompt>,
    how: PromptsHow,
) -> Result<Vec<PromptPart>, ApiError> {
    prompts
        .into_iter()
        .map(|prompt| {
            let (prompt, ids) = match prompt {
                crate::worker::Prompt::Chat(ms) if how.truncate => {
                    truncated(pool, ms, how.max_tokens)
                }
                p => {
                    let ids = pool.tokenize_prompt(&p);
                    (p, ids)
                }
            };
            PromptPart::new(prompt, ids, pool, how.echo, how.scored)
        })
        .collect()
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
    let live = state.live();
    let output_weight = live.output_weight(&req.model);
    let cached_input_weight = live.cached_input_weight(&req.model);
    drop(live);
    let mut meter = Meter::start(
        state.metrics.clone(),
        state.metrics.handles(ctx.tenant_id(), &model),
        ctx.started,
        MeterCtx {
            ledger: state.ledger.clone(),
            durable: state.metering_wait,
            request_id: ctx.request_id.clone(),
            output_weight,
            cached_input_weight,
        },
    );
    let (contract, scope) = ctx.tenant.limits.for_model(&req.model);
    let terms = Terms {
        contract,
        scope,
        output_weight,
    };
    let mut buckets = None;
    let result = run(state, &ctx, &pool, req, &mut meter, terms, &mut buckets).await;
    let best_effort = meter.best_effort;
    let mut resp = match result {
        Ok(Reply::Whole(resp)) => resp,
        Ok(Reply::Stream(stream)) => stream.into_response(meter),
        Err(e) => {
            meter.failure(e.status().as_str());
            if state.limiter.redis().is_none() && !matches!(e, ApiError::RateLimited { .. }) {
                // Failed after admission: its reservation is back; report the bucket now.
                buckets = None;
            }
            e.into_response()
        }
    };
    if best_effort && resp.status().is_success() {
        resp.headers_mut().insert(
            OVERFLOW_HEADER,
            http::HeaderValue::from_static("best_effort"),
        );
    }
    let buckets = buckets.unwrap_or_else(|| scope.snapshot(contract));
    headers::apply(resp.headers_mut(), contract, &buckets);
    resp
}

/// The contract a request is held to, and how its output tokens weigh.
#[derive(Clone, Copy)]
struct Terms<'a> {
    contract: &'a Contract,
    scope: &'a Arc<crate::limits::Scope>,
    output_weight: f64,
}

enum Reply {
    Whole(Response),
    Stream(SseStream),
}

fn ms(ns: u64) -> u64 {
    ns.div_ceil(1_000_000).max(1)
}

/// What a request asks of its contract.
struct Ask<'a> {
    contract: &'a Contract,
    scope: &'a Arc<crate::limits::Scope>,
    /// Weighted tokens to reserve.
    cost: f64,
    input_tokens: u32,
    /// An embeddings request (its cost is its inputs alone).
    embed: bool,
}

/// Holds the request to its contract: tier, concurrency, buckets. On success the
/// reservation is in `meter`; `buckets` gets the state to report in headers.
async fn admit(
    state: &AppState,
    ctx: &RequestCtx,
    pool: &Pool,
    ask: Ask<'_>,
    meter: &mut Meter,
    buckets: &mut Option<Buckets>,
) -> Result<ConcurrencySlot, ApiError> {
    let Ask {
        contract,
        scope,
        cost,
        input_tokens,
        embed,
    } = ask;
    let tenant = ctx.tenant_id();
    if let Some(rate) = contract.token_rate() {
        if cost > rate.burst {
            let (what, advice, param) = if embed {
                (
                    "its inputs' tokens",
                    "Send fewer or shorter inputs a request.",
                    "input",
                )
            } else {
                (
                    "prompt + output_weight × max_tokens",
                    "Lower `max_tokens` or shorten the prompt.",
                    "max_tokens",
                )
            };
            return Err(ApiError::BadRequest {
                message: format!(
                    "This request needs {cost:.0} weighted tokens ({what}), more than tenant `{tenant}`'s whole burst of {:.0} ({} tokens/s × {} s): it could never be admitted. {advice}",
                    rate.burst, rate.per_sec, contract.burst_seconds
                ),
                param: Some(param.into()),
                code: Some("request_exceeds_contract"),
            });
        }
    }
    let idle_below = state.server.idle_below;
    if contract.tier == Tier::Spot && !pool.idle(idle_below) {
        return Err(ApiError::Overloaded {
            message: format!(
                "Tenant `{tenant}` is on the spot tier, which runs only on idle capacity, and pool `{}` has none now.",
                pool.name
            ),
            retry_after_ms: 1000,
        });
    }
    let slot =
        scope
            .try_acquire(contract.max_concurrency)
            .ok_or_else(|| ApiError::RateLimited {
                message: format!(
                    "Tenant `{tenant}` is at its limit of {} concurrent requests.",
                    contract.max_concurrency.unwrap_or(0)
                ),
                // Not a rate: nothing says when a slot frees up. A short, bounded wait.
                retry_after_ms: 1000,
            })?;
    match state.limiter.admit(scope, contract, cost).await {
        Ok(r) => {
            *buckets = Some(r.buckets);
            meter.admitted(r, input_tokens);
        }
        Err(AdmitError::Refused(refused)) => {
            *buckets = Some(refused.buckets);
            if contract.overflow == Overflow::BestEffort && pool.idle(idle_below) {
                meter.best_effort = true;
                meter.admitted(Limiter::free(scope, contract), input_tokens);
            } else {
                return Err(ApiError::RateLimited {
                    message: format!(
                        "Tenant `{tenant}` is past its contract ({} bucket); this request ({cost:.0} weighted tokens) fits in {} ms.",
                        refused.bucket,
                        ms(refused.retry_after_ns)
                    ),
                    retry_after_ms: ms(refused.retry_after_ns),
                });
            }
        }
        Err(AdmitError::Unavailable) => {
            return Err(ApiError::Overloaded {
                message: "The global rate limiter is unreachable; retry shortly.".into(),
                retry_after_ms: 1000,
            })
        }
    }
    Ok(slot)
}

async fn run(
    state: &AppState,
    ctx: &RequestCtx,
    pool: &Arc<Pool>,
    mut req: InferenceRequest,
    meter: &mut Meter,
    terms: Terms<'_>,
    buckets: &mut Option<Buckets>,
) -> Result<Reply, ApiError> {
    let parts = prompt_parts(pool, &mut req).await?;
    let input_tokens: u32 = parts.iter().map(|p| p.tokens).sum();
    // `best_of` (at least `n`) choices per prompt: each its own sequence, so its own prompt
    // and output. Past `n`, the best `n` of each prompt's are kept (see `best`), which
    // needs each token's log-probability.
    let n = req.best_of.max(req.n).max(1) as usize;
    let keep = req.n.max(1) as usize;
    let choices = n * parts.len();
    let shown_logprobs = req.params.logprobs.is_some();
    let mut params = req.params;
    if n > keep {
        params.logprobs.get_or_insert(0);
    }
    let cost = parts
        .iter()
        .map(|p| n as f64 * (p.tokens as f64 + terms.output_weight * params.max_tokens as f64))
        .sum::<f64>();
    let (embed, dimensions) = match req.endpoint {
        crate::api::validate::Endpoint::Embeddings { dimensions, .. } => (true, dimensions),
        _ => (false, None),
    };
    if dimensions.is_some() && !pool.sets_dimensions() {
        return Err(ApiError::unsupported(
            "dimensions",
            &format!(
                "asking vectors of another size on pool `{}` (its embeddings are the model's own; a pool of upstreams passes `dimensions` on)",
                pool.name
            ),
        ));
    }
    let ask = Ask {
        contract: terms.contract,
        scope: terms.scope,
        cost,
        input_tokens,
        embed,
    };
    let spot = ask.contract.tier == Tier::Spot;
    let concurrency_slot = admit(state, ctx, pool, ask, meter, buckets).await?;
    let server = &state.server;
    let deadline = TokioInstant::from_std(ctx.started)
        + std::time::Duration::from_secs_f64(server.request_timeout_secs);
    let renderer = Renderer::new(
        req.endpoint,
        &req.model,
        req.include_usage,
        shown_logprobs,
        keep * parts.len(),
        req.tool_calls,
        req.responses.clone().map(|info| {
            let saver = state
                .responses
                .as_ref()
                .filter(|_| info.store || info.conversation_id.is_some())
                .map(|store| crate::response_store::Saver {
                    store: store.clone(),
                    tenant: ctx.tenant_id().to_string(),
                });
            (info, saver)
        }),
    );
    let stream = req.stream;
    let prompt_logprobs = params.prompt_logprobs;
    let weight = if meter.best_effort || spot {
        Some(crate::worker::LOWEST_WEIGHT)
    } else {
        ctx.weight()
    };
    let queue = Queue {
        depth: server.queue_depth,
        until: TokioInstant::now() + std::time::Duration::from_secs_f64(server.queue_timeout_secs),
        // In the pool's wait room: the tenant, its weight and the request's weighted tokens.
        who: crate::route::room::Who {
            tenant: crate::engine::fair::account(ctx.tenant_id(), weight.unwrap_or(1.0)),
            weight: weight.unwrap_or(1.0),
            cost: cost / choices as f64,
        },
    };
    // `inputs`: how many of the request's choices (embeddings inputs) it carries.
    let route = |r: Arc<WorkerRequest>, tokens: u32, inputs: usize| {
        let mut queue = queue.clone();
        queue.who.cost *= inputs as f64;
        async move { dispatch(pool, &r, tokens, server.max_retries, deadline, queue).await }
    };
    let worker_request = |part: &PromptPart, more_inputs: Vec<crate::worker::Prompt>| {
        Arc::new(WorkerRequest {
            request_id: ctx.request_id.clone(),
            tenant: ctx.tenant_id().clone(),
            weight,
            output_weight: terms.output_weight,
            model: req.model.as_str().into(),
            prompt: part.prompt.clone(),
            prompt_ids: part.ids.clone(),
            params: params.clone(),
            stream,
            embed,
            more_inputs,
            dimensions,
        })
    };
    if embed {
        let _concurrency_slot = concurrency_slot;
        let embedded = Embedded::gather(
            pool,
            &parts,
            |group| {
                let more = group[1..].iter().map(|p| p.prompt.clone()).collect();
                let tokens = group.iter().map(|p| p.tokens).fold(0, u32::saturating_add);
                route(worker_request(&group[0], more), tokens, group.len())
            },
            deadline,
        )
        .await?;
        return embedded.answer(renderer, meter).await.map(Reply::Whole);
    }
    // Each choice is routed on its own, all at once. Choice j of a prompt draws with the
    // seed, when given, moved on by j: the choices differ and are reproducible, and a
    // prompt's answers do not depend on the other prompts of the request.
    let groups = parts.iter().map(|part| {
        let wreq = worker_request(part, Vec::new());
        let wreqs: Vec<Arc<WorkerRequest>> = (0..n)
            .map(|j| {
                if j == 0 {
                    return wreq.clone();
                }
                let mut r = (*wreq).clone();
                r.params.seed = r.params.seed.map(|s| s.wrapping_add(j as u64));
                Arc::new(r)
            })
            .collect();
        let tokens = part.tokens;
        async move {
            // With a long prompt the other choices wait for the first one's first event:
            // by then its prompt's KV blocks are in its engine's prefix cache, and prefix
            // affinity routes the others there, so the prompt is computed once rather
            // than n times.
            if n > 1 && tokens as usize >= STAGGER_PROMPT_TOKENS {
                let first = route(wreqs[0].clone(), tokens, 1).await?;
                let rest = futures::future::try_join_all(
                    wreqs[1..].iter().map(|r| route(r.clone(), tokens, 1)),
                )
                .await?;
                Ok::<_, ApiError>(std::iter::once(first).chain(rest).collect::<Vec<_>>())
            } else {
                futures::future::try_join_all(wreqs.iter().map(|r| route(r.clone(), tokens, 1)))
                    .await
            }
        }
    });
    let routed = futures::future::try_join_all(groups).await?;
    meter.worker = routed[0][0].0.worker().name().to_string();
    tracing::debug!(worker = %meter.worker, choices, prompts = parts.len(), "routed");
    let sse = SseStream {
        renderer,
        choices: routed
            .into_iter()
            .zip(parts)
            .enumerate()
            .flat_map(|(prompt, (group, part))| {
                group.into_iter().map(move |(lease, events, first)| Choice {
                    lease,
                    events,
                    first: Some(first),
                    prompt,
                    echo: part.echo.clone(),
                    text: String::new(),
                    logprobs: Vec::new(),
                    score: (0.0, 0),
                    done: None,
                    embedding: Vec::new(),
                })
            })
            .collect(),
        _concurrency_slot: concurrency_slot,
        deadline,
        prompt_logprobs,
        keep,
    };
    if stream {
        Ok(Reply::Stream(sse))
    } else {
        sse.collect(meter).await.map(Reply::Whole)
    }
}

/// A conversation with the fewest oldest turns dropped for it and its answer to fit the
/// pool's context (`truncation: "auto"`), where the pool tokenizes and knows its context;
/// otherwise as it is. With its token ids where the pool tokenizes.
fn truncated(
    pool: &Pool,
    messages: Vec<crate::worker::ChatMessage>,
    max_tokens: usize,
) -> (crate::worker::Prompt, Option<Vec<u32>>) {
    let as_it_is = |ms: Vec<crate::worker::ChatMessage>| {
        let p = crate::worker::Prompt::Chat(ms);
        let ids = pool.tokenize_prompt(&p);
        (p, ids)
    };
    let Some(context) = pool.max_context() else {
        return as_it_is(messages);
    };
    // The ids of the last try that fitted: those of the messages chosen (the search
    // ends on the fewest dropped that fit, its last success).
    let mut fitted = None;
    let fits = |ms: &[crate::worker::ChatMessage]| {
        let ids = pool.tokenize_prompt(&crate::worker::Prompt::Chat(ms.to_vec()));
        let fit = ids
            .as_ref()
            .is_some_and(|ids| ids.len() + max_tokens <= context);
        if fit {
            fitted = ids;
        }
        fit
    };
    match crate::truncate::truncated(&messages, fits) {
        Some(kept) => {
            tracing::debug!(
                dropped = messages.len() - kept.len(),
                "truncated the conversation to fit the context"
            );
            (crate::worker::Prompt::Chat(kept), fitted)
        }
        // Whole: it fitted at the first try, or does not fit at all (tokenized again, to
        // be refused for its length).
        None if fitted.is_some() => (crate::worker::Prompt::Chat(messages), fitted),
        None => as_it_is(messages),
    }
}

/// One prompt of a request: its token ids and count (where the pool tokenizes), and the
/// text that `echo` sends back before its choices' completions.
struct PromptPart {
    prompt: crate::worker::Prompt,
    ids: Option<Arc<[u32]>>,
    tokens: u32,
    echo: Option<String>,
}

impl PromptPart {
    /// `scored`: the prompt's log-probabilities were asked for, so the worker sends the
    /// prompt's tokens (and, where the gateway has no tokenizer, its text).
    /// `ids`: the prompt's token ids, where the pool tokenizes.
    fn new(
        prompt: crate::worker::Prompt,
        ids: Option<Vec<u32>>,
        pool: &Pool,
        echo: bool,
        scored: bool,
    ) -> Result<Self, ApiError> {
        let ids: Option<Arc<[u32]>> = ids.map(Arc::from);
        let tokens = ids.as_ref().map_or_else(
            || crate::worker::estimate_prompt_tokens(&prompt),
            |ids| ids.len() as u32,
        );
        // One of token ids echoes as its text; scored, the worker echoes what the gateway
        // cannot.
        let echo = match (&prompt, echo) {
            (crate::worker::Prompt::Text(t), true) => Some(t.clone()),
            (crate::worker::Prompt::Tokens(ids), true) => match pool.detokenize(ids) {
                Some(text) => Some(text),
                None if scored => None,
                None => return Err(ApiError::unsupported(
                    "echo",
                    "`echo` without `logprobs` of a prompt of token ids outside the model's vocabulary, or on a pool without its tokenizer,",
                )),
            },
            _ => None,
        };
        Ok(Self {
            prompt,
            ids,
            tokens,
            echo,
        })
    }
}

/// How long and how many requests may wait for a worker slot, and who this one is.
#[derive(Clone)]
struct Queue {
    depth: usize,
    until: TokioInstant,
    who: crate::route::room::Who,
}

/// Picks a worker and gets its first event, retrying on other workers while nothing has
/// been sent to the client.
async fn dispatch(
    pool: &Pool,
    wreq: &Arc<WorkerRequest>,
    input_tokens: u32,
    max_retries: u32,
    deadline: TokioInstant,
    queue: Queue,
) -> Result<(Lease, EventStream, WorkerEvent), ApiError> {
    let tokens = input_tokens as u64 + wreq.params.max_tokens as u64;
    let key = pool.key(&wreq.tenant, &wreq.prompt, wreq.prompt_ids.as_deref());
    let mut tried = Vec::new();
    let mut last: Option<ApiError> = None;
    for attempt in 0..=max_retries {
        let until = queue.until.min(deadline);
        let mut lease = match pool
            .pick_or_wait(tokens, &tried, key, queue.depth, until, &queue.who)
            .await
        {
            Ok(l) => l,
            Err(why) => {
                return Err(last.unwrap_or_else(|| ApiError::Overloaded {
                    message: match why {
                        NoWorker::Saturated => format!(
                            "All workers of pool `{}` are at capacity and the wait for one is over; retry shortly. (Not counted against your contract.)",
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

/// What a worker's answer that failed (`Some`) or ended early (`None`) after its first
/// event is to the client; the worker's breaker hears of it where it was to blame.
fn broke(lease: &mut Lease, error: Option<WorkerError>) -> ApiError {
    match error {
        Some(e) => {
            if e.counts_against_worker() {
                lease.failure();
            }
            tracing::warn!(worker = lease.worker().name(), error = %e, "worker failed mid-request");
            worker_error(e)
        }
        None => {
            lease.failure();
            ApiError::Upstream("The worker's answer ended early.".into())
        }
    }
}

/// An embeddings request's answers: each input's vector, in input order, and their usage.
struct Embedded {
    vectors: Vec<Vec<f32>>,
    usage: crate::worker::Usage,
    /// The worker that answered the first input (for the meter).
    worker: String,
}

/// `parts` cut into runs of consecutive inputs that one routed request may carry: at most
/// `batch.inputs`, at most `batch.tokens` in all (an input longer than that alone), and all
/// text or all token ids (OpenAI's API takes a list of either, not both).
fn embed_groups(parts: &[PromptPart], batch: crate::worker::EmbedBatch) -> Vec<Range<usize>> {
    let ids = |p: &PromptPart| matches!(p.prompt, crate::worker::Prompt::Tokens(_));
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut tokens = 0u64;
    for (i, p) in parts.iter().enumerate() {
        let t = p.tokens as u64;
        match groups.last_mut() {
            Some(g)
                if g.len() < batch.inputs
                    && tokens + t <= batch.tokens
                    && ids(&parts[g.start]) == ids(p) =>
            {
                g.end = i + 1;
                tokens += t;
            }
            _ => {
                groups.push(i..i + 1);
                tokens = t;
            }
        }
    }
    groups
}

impl Embedded {
    /// Routes `parts` (through `route`), as many at a time as the pool's workers take in
    /// one request ([`Pool::embed_batch`]: one, unless they all take more), with at most
    /// the pool's capacity (and [`MAX_CHOICES`]) of those requests in flight at once, the
    /// next as one ends: a request of many inputs (up to
    /// [`crate::api::validate::MAX_EMBEDDING_INPUTS`]) neither fills the pool's wait room
    /// nor holds more of its slots than the pool has. The first failure fails the request
    /// (the requests still running are dropped, so cancelled).
    async fn gather<'p, F, Fut>(
        pool: &Pool,
        parts: &'p [PromptPart],
        route: F,
        deadline: TokioInstant,
    ) -> Result<Self, ApiError>
    where
        F: Fn(&'p [PromptPart]) -> Fut,
        Fut: std::future::Future<Output = Result<(Lease, EventStream, WorkerEvent), ApiError>>,
    {
        let in_flight = (pool.capacity().max(1) as usize).min(MAX_CHOICES);
        // Made up front (futures do nothing until polled): a stream that maps as it goes
        // would keep a closure over borrowed parts in this future, which then is not
        // `Send` for every lifetime.
        let requests: Vec<_> = embed_groups(parts, pool.embed_batch())
            .into_iter()
            .map(|group| {
                let routed = route(&parts[group.clone()]);
                async move {
                    let (lease, events, first) = routed.await?;
                    let (vectors, usage, worker) =
                        embeddings_of(lease, events, first, group.len(), deadline).await?;
                    Ok::<_, ApiError>((group.start, vectors, usage, worker))
                }
            })
            .collect();
        let mut answers: Vec<(usize, Vec<Vec<f32>>, crate::worker::Usage, String)> =
            futures::stream::iter(requests)
                .buffer_unordered(in_flight)
                .try_collect()
                .await?;
        answers.sort_unstable_by_key(|a| a.0);
        let worker = answers.first().map(|a| a.3.clone()).unwrap_or_default();
        let usage = answers
            .iter()
            .fold(crate::worker::Usage::default(), |mut t, a| {
                t.prompt_tokens = t.prompt_tokens.saturating_add(a.2.prompt_tokens);
                t.cached_tokens = t.cached_tokens.saturating_add(a.2.cached_tokens);
                t
            });
        Ok(Self {
            vectors: answers.into_iter().flat_map(|a| a.1).collect(),
            usage,
            worker,
        })
    }

    /// Metered, then one JSON body: rendered on the runtime's blocking threads when it
    /// is large ([`RENDER_APART_FLOATS`]).
    async fn answer(self, mut renderer: Renderer, meter: &mut Meter) -> Result<Response, ApiError> {
        meter.worker = self.worker;
        let usage = self.usage;
        meter.success(usage).await;
        let floats: usize = self.vectors.iter().map(Vec::len).sum();
        let vectors = self.vectors;
        let render = move || {
            let out: Vec<ChoiceOut<'_>> = vectors
                .iter()
                .map(|v| ChoiceOut {
                    text: "",
                    logprobs: &[],
                    finish: crate::worker::FinishReason::Stop,
                    embedding: v,
                })
                .collect();
            renderer.full(&out, usage)
        };
        let body = apart_if(
            floats >= RENDER_APART_FLOATS,
            "rendering the answer",
            render,
        )
        .await?;
        Ok(([(http::header::CONTENT_TYPE, "application/json")], body).into_response())
    }
}

/// Embeddings answers of at least this many numbers in all are rendered on the runtime's
/// blocking threads: 2,048 vectors of 576 take about 40 ms as JSON numbers (7 ms as
/// base64), which on a serving thread would hold up its other connections.
const RENDER_APART_FLOATS: usize = 1 << 16;

/// Whole answers of about this many bytes of JSON or more are rendered on the runtime's
/// blocking threads (a megabyte takes a millisecond or more: `n` long choices, or
/// log-probabilities with alternatives for every token).
const RENDER_APART_BYTES: usize = 1 << 20;

/// The vectors of a routed request of `inputs` embeddings inputs, and their usage, from
/// its worker's events (its first one given), and the worker's name. A worker that
/// answers another number of vectors has failed.
async fn embeddings_of(
    mut lease: Lease,
    mut events: EventStream,
    first: WorkerEvent,
    inputs: usize,
    deadline: TokioInstant,
) -> Result<(Vec<Vec<f32>>, crate::worker::Usage, String), ApiError> {
    let mut vectors = Vec::with_capacity(inputs);
    let mut next = Some(Ok(first));
    loop {
        match next {
            Some(Ok(WorkerEvent::Embedding(v))) => vectors.push(v),
            Some(Ok(WorkerEvent::Done { usage, .. })) if vectors.len() == inputs => {
                lease.success();
                return Ok((vectors, usage, lease.worker().name().to_string()));
            }
            Some(Ok(WorkerEvent::Done { .. })) => {
                let e = WorkerError::Protocol(format!(
                    "answered {} vectors for {inputs} inputs",
                    vectors.len()
                ));
                return Err(broke(&mut lease, Some(e)));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(broke(&mut lease, Some(e))),
            None => return Err(broke(&mut lease, None)),
        }
        next = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| ApiError::Timeout)?;
    }
}

/// One choice of a routed request: its worker's events, and what it has produced.
struct Choice {
    lease: Lease,
    events: EventStream,
    first: Option<WorkerEvent>,
    /// Which of the request's prompts it completes, and that prompt's `echo` (`None` with
    /// `echo` where the worker echoes it: [`WorkerEvent::Prompt`]'s text).
    prompt: usize,
    echo: Option<String>,
    text: String,
    logprobs: Vec<crate::worker::TokenLogprob>,
    /// Its completion tokens' log-probabilities added up, and how many (`best_of`).
    score: (f64, u32),
    /// How it finished, once it has.
    done: Option<(crate::worker::FinishReason, crate::worker::Usage)>,
    /// An embeddings request's answer.
    embedding: Vec<f32>,
}

/// Stores a finished `/v1/responses` answer when it is to be stored (through the store's
/// writer thread, committed with others); a failure is logged, and the answer still goes
/// out.
async fn store_answer(renderer: &mut Renderer) {
    let Some((saver, answer)) = renderer.take_stored() else {
        return;
    };
    if let Err(e) = saver.store.save(answer).await {
        tracing::error!(error = %e, "storing the response failed");
    }
}

/// A routed request's remaining life: its choices' events, rendered.
struct SseStream {
    renderer: Renderer,
    choices: Vec<Choice>,
    _concurrency_slot: ConcurrencySlot,
    deadline: TokioInstant,
    /// `echo` with `logprobs`: streamed, the prompt goes out with its tokens'
    /// log-probabilities when the worker sends them ([`WorkerEvent::Prompt`]).
    prompt_logprobs: bool,
    /// Choices returned per prompt (`n`); the others (`best_of` past `n`) are dropped
    /// once all have ended (whole answers only).
    keep: usize,
}

enum Step {
    /// Choice `usize`'s next event.
    Event(usize, WorkerEvent),
    Failed(ApiError),
}

/// The choices to return: of each prompt's (consecutive, as routed), the `keep` with the
/// highest mean log-probability per completion token, best first (ties: the earlier
/// choice); all of them, in order, when each prompt has no more than `keep`.
fn best(choices: &[Choice], keep: usize) -> impl Iterator<Item = &Choice> {
    let mean = |c: &Choice| match c.score.1 {
        0 => 0.0,
        k => c.score.0 / k as f64,
    };
    let mut picked = Vec::with_capacity(choices.len());
    for group in choices.chunk_by(|a, b| a.prompt == b.prompt) {
        let mut order: Vec<&Choice> = group.iter().collect();
        if order.len() > keep {
            order.sort_by(|a, b| mean(b).total_cmp(&mean(a)));
            order.truncate(keep);
        }
        picked.extend(order);
    }
    picked.into_iter()
}

/// The usage of a request's choices together: each prompt once (each of its choices'
/// sequences computed it, possibly from the prefix cache; the least cached counts), the
/// completions added up.
fn total_usage(choices: &[Choice]) -> crate::worker::Usage {
    // Per prompt: its prompt tokens and the fewest of them cached.
    let mut prompts: Vec<Option<(u32, u32)>> = Vec::new();
    let mut completion_tokens = 0;
    for c in choices {
        let Some((_, u)) = c.done else { continue };
        completion_tokens += u.completion_tokens;
        if prompts.len() <= c.prompt {
            prompts.resize(c.prompt + 1, None);
        }
        let (p, cached) = prompts[c.prompt].get_or_insert((u.prompt_tokens, u.cached_tokens));
        *p = (*p).max(u.prompt_tokens);
        *cached = (*cached).min(u.cached_tokens);
    }
    let prompts = prompts.iter().flatten();
    crate::worker::Usage {
        prompt_tokens: prompts.clone().map(|p| p.0).sum(),
        completion_tokens,
        cached_tokens: prompts.map(|p| p.1).sum(),
    }
}

impl SseStream {
    /// The next event of any unfinished choice (first events first, in choice order).
    async fn next_step(&mut self) -> Step {
        for (i, c) in self.choices.iter_mut().enumerate() {
            if let Some(ev) = c.first.take() {
                return Step::Event(i, ev);
            }
        }
        let next = if self.choices.len() == 1 {
            let e = &mut self.choices[0].events;
            tokio::time::timeout_at(self.deadline, async { (0, e.next().await) }).await
        } else {
            let pending = self
                .choices
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| c.done.is_none())
                .map(|(i, c)| Box::pin(async move { (i, c.events.next().await) }));
            tokio::time::timeout_at(self.deadline, futures::future::select_all(pending))
                .await
                .map(|(got, _, _)| got)
        };
        let (i, ev) = match next {
            Err(_) => return Step::Failed(ApiError::Timeout),
            Ok(got) => got,
        };
        match ev {
            Some(Ok(ev)) => Step::Event(i, ev),
            Some(Err(e)) => Step::Failed(broke(&mut self.choices[i].lease, Some(e))),
            None => Step::Failed(broke(&mut self.choices[i].lease, None)),
        }
    }

    /// Takes choice `i`'s end; true once every choice has ended.
    fn finish(
        &mut self,
        i: usize,
        finish: crate::worker::FinishReason,
        usage: crate::worker::Usage,
    ) -> bool {
        let c = &mut self.choices[i];
        c.lease.success();
        c.done = Some((finish, usage));
        self.choices.iter().all(|c| c.done.is_some())
    }

    /// The whole answer's JSON body (the best `keep` choices of each prompt).
    fn render(&mut self, usage: crate::worker::Usage) -> bytes::Bytes {
        let out: Vec<ChoiceOut<'_>> = best(&self.choices, self.keep)
            .map(|c| ChoiceOut {
                text: &c.text,
                logprobs: &c.logprobs,
                finish: c.done.map_or(crate::worker::FinishReason::Stop, |d| d.0),
                embedding: &c.embedding,
            })
            .collect();
        self.renderer.full(&out, usage)
    }

    /// About how many bytes of JSON the whole answer takes: its texts, and ~100 for each
    /// token's log-probability and for each alternative's.
    fn answer_bytes(&self) -> usize {
        self.choices
            .iter()
            .map(|c| {
                let scored: usize = c.logprobs.iter().map(|t| 1 + t.top_logprobs.len()).sum();
                c.text.len() + 100 * scored
            })
            .sum()
    }

    /// Non-streamed: gather the whole answer, then one JSON body (rendered on the
    /// runtime's blocking threads when it is large: [`RENDER_APART_BYTES`]).
    async fn collect(mut self, meter: &mut Meter) -> Result<Response, ApiError> {
        for c in &mut self.choices {
            c.text = c.echo.clone().unwrap_or_default();
        }
        loop {
            match self.next_step().await {
                Step::Event(
                    i,
                    WorkerEvent::Delta {
                        text,
                        tokens,
                        logprobs,
                    },
                ) => {
                    meter.tokens(tokens);
                    let c = &mut self.choices[i];
                    c.text.push_str(&text);
                    for t in logprobs.iter().filter(|t| t.logprob.is_finite()) {
                        c.score.0 += t.logprob as f64;
                        c.score.1 += 1;
                    }
                    c.logprobs.extend(logprobs);
                }
                Step::Event(i, WorkerEvent::Embedding(v)) => self.choices[i].embedding = v,
                Step::Event(i, WorkerEvent::Prompt { logprobs, text }) => {
                    // The prompt's tokens come first, before the completion's.
                    let c = &mut self.choices[i];
                    c.logprobs.splice(0..0, logprobs);
                    if let (None, Some(text)) = (&c.echo, text) {
                        c.text.insert_str(0, &text);
                    }
                }
                Step::Event(
                    i,
                    WorkerEvent::Done {
                        finish_reason,
                        usage,
                    },
                ) => {
                    if !self.finish(i, finish_reason, usage) {
                        continue;
                    }
                    let usage = total_usage(&self.choices);
                    meter.success(usage).await;
                    let apart = self.answer_bytes() >= RENDER_APART_BYTES;
                    let (body, mut done) = apart_if(apart, "rendering the answer", move || {
                        (self.render(usage), self)
                    })
                    .await?;
                    store_answer(&mut done.renderer).await;
                    return Ok(
                        ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
                    );
                }
                Step::Failed(e) => return Err(e),
            }
        }
    }

    /// Streamed: SSE frames produced as the client reads them.
    fn into_response(mut self, meter: Meter) -> Response {
        let mut head = BytesMut::new();
        self.renderer.role_frame(&mut head);
        if !self.prompt_logprobs {
            for (i, c) in self.choices.iter_mut().enumerate() {
                if let Some(prompt) = c.echo.take() {
                    self.renderer.delta_frame(&mut head, i, &prompt, &[]);
                }
            }
        }
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
                    Step::Event(
                        i,
                        WorkerEvent::Delta {
                            text,
                            tokens,
                            logprobs,
                        },
                    ) => {
                        meter.tokens(tokens);
                        s.renderer.delta_frame(&mut out, i, &text, &logprobs);
                        false
                    }
                    // Embeddings are never streamed.
                    Step::Event(_, WorkerEvent::Embedding(_)) => false,
                    Step::Event(i, WorkerEvent::Prompt { logprobs, text }) => {
                        let prompt = s.choices[i].echo.take().or(text).unwrap_or_default();
                        s.renderer.delta_frame(&mut out, i, &prompt, &logprobs);
                        false
                    }
                    Step::Event(
                        i,
                        WorkerEvent::Done {
                            finish_reason,
                            usage,
                        },
                    ) => {
                        let all = s.finish(i, finish_reason, usage);
                        let total = all.then(|| total_usage(&s.choices));
                        if let Some(total) = total {
                            // Durable before the final frames go out (see `meter`).
                            meter.success(total).await;
                        }
                        s.renderer.finish_frame(&mut out, i, finish_reason);
                        if let Some(total) = total {
                            s.renderer.end_frames(&mut out, total);
                            // Stored before its last bytes go out (see `response_store`).
                            store_answer(&mut s.renderer).await;
                        }
                        all
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
        crate::api::render::event_stream(Body::from_stream(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{EmbedBatch, Prompt};

    fn part(prompt: Prompt, tokens: u32) -> PromptPart {
        PromptPart {
            prompt,
            ids: None,
            tokens,
            echo: None,
        }
    }

    #[test]
    fn embeddings_inputs_are_grouped_by_count_tokens_and_kind() {
        let text = |t| part(Prompt::Text("x".into()), t);
        let ids = |t| part(Prompt::Tokens(vec![1]), t);
        let parts = [text(1), text(1), text(1), text(1), text(1)];
        assert_eq!(
            embed_groups(&parts, EmbedBatch::ONE),
            [0..1, 1..2, 2..3, 3..4, 4..5]
        );
        let two = EmbedBatch {
            inputs: 2,
            tokens: u64::MAX,
        };
        assert_eq!(embed_groups(&parts, two), [0..2, 2..4, 4..5]);
        // Tokens in all: at most 10 a group, a longer input alone.
        let by_tokens = EmbedBatch {
            inputs: 100,
            tokens: 10,
        };
        let parts = [
            text(4),
            text(6),
            text(1),
            text(30),
            text(9),
            text(1),
            text(1),
        ];
        assert_eq!(
            embed_groups(&parts, by_tokens),
            [0..2, 2..3, 3..4, 4..6, 6..7]
        );
        // Text and token ids never share a group.
        let parts = [text(1), text(1), ids(1), ids(1), text(1)];
        let many = EmbedBatch {
            inputs: 100,
            tokens: u64::MAX,
        };
        assert_eq!(embed_groups(&parts, many), [0..2, 2..4, 4..5]);
        assert!(embed_groups(&[], many).is_empty());
    }
}
