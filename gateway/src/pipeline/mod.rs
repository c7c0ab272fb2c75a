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
//! settled with what was really generated. An embeddings request's inputs go out a
//! pool's batch at a time (`embed`); a routed request's choices become its answer in
//! `choices`.

use crate::api::error::ApiError;
use crate::api::render::Renderer;
use crate::api::validate::InferenceRequest;
use crate::config::{Overflow, Tier};
use crate::limits::{headers, AdmitError, Buckets, ConcurrencySlot, Contract, Limiter};
use crate::metrics::{Meter, MeterCtx};
use crate::route::{Lease, NoWorker, Pool};
use crate::state::AppState;
use crate::tenants::Tenant;
use crate::worker::{EventStream, WorkerError, WorkerEvent, WorkerRequest};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;

mod choices;
mod embed;

use choices::{Choice, SseStream};
use embed::Embedded;

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
        keep_last: req.params.truncate_prompt_tokens,
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
    /// `truncate_prompt_tokens`: the prompt's last tokens only, where the pool tokenizes
    /// (else the worker cuts it).
    keep_last: Option<u32>,
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
            let (prompt, mut ids) = match prompt {
                crate::worker::Prompt::Chat(ms, args) if how.truncate => {
                    truncated(pool, ms, args, how.max_tokens)
                }
                p => {
                    let ids = pool.tokenize_prompt(&p);
                    (p, ids)
                }
            };
            if let (Some(keep), Some(ids)) = (how.keep_last, ids.as_mut()) {
                crate::worker::keep_last(ids, keep, pool.max_context());
            }
            PromptPart::new(prompt, ids, pool, how.echo, how.scored)
        })
        .collect()
}

/// Serves one validated request end to end.
pub async fn serve(state: &AppState, ctx: RequestCtx, mut req: InferenceRequest) -> Response {
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
    if let Some(defaults) = live.template_defaults(&req.model) {
        for p in &mut req.prompts {
            if let crate::worker::Prompt::Chat(_, args) = p {
                *args = crate::worker::with_template_defaults(args.take(), Some(defaults));
            }
        }
    }
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
    let (echo_top, prompt_top) = (params.logprobs.unwrap_or(0) as usize, params.prompt_top);
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
                    reasoning: String::new(),
                    logprobs: Vec::new(),
                    score: (0.0, 0),
                    done: None,
                    embedding: Vec::new(),
                    prompt_logprobs: None,
                })
            })
            .collect(),
        _concurrency_slot: concurrency_slot,
        deadline,
        prompt_logprobs,
        echo_top,
        prompt_top,
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
    args: crate::worker::TemplateArgs,
    max_tokens: usize,
) -> (crate::worker::Prompt, Option<Vec<u32>>) {
    let as_it_is = |ms: Vec<crate::worker::ChatMessage>| {
        let p = crate::worker::Prompt::Chat(ms, args.clone());
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
        let ids = pool.tokenize_prompt(&crate::worker::Prompt::Chat(ms.to_vec(), args.clone()));
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
            (crate::worker::Prompt::Chat(kept, args), fitted)
        }
        // Whole: it fitted at the first try, or does not fit at all (tokenized again, to
        // be refused for its length).
        None if fitted.is_some() => (crate::worker::Prompt::Chat(messages, args), fitted),
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
            code,
            param,
        } => ApiError::BadRequest {
            message,
            param,
            code,
        },
        WorkerError::Rejected {
            status, message, ..
        } => ApiError::Upstream(format!(
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
