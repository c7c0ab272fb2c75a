//! A load scenario: the tenants to play, each with its key, its traffic (open loop at a
//! rate, or closed loop with a number of users) and its requests' shape, read from a TOML
//! file (`config/scenarios/*.toml`) and checked whole before any request is sent.

use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The gateway's base URL (`http://host:port`).
    pub target: String,
    /// Seconds of measured load.
    #[serde(default = "default_duration")]
    pub duration_secs: f64,
    /// Seconds of load before the measured window (not counted).
    #[serde(default = "default_warmup")]
    pub warmup_secs: f64,
    /// How long requests still in flight at the window's end may take to finish; those
    /// that do not are counted `unfinished`.
    #[serde(default = "default_drain")]
    pub drain_secs: f64,
    /// Seed of the arrivals and of the prompts' words: a rerun offers the same load.
    #[serde(default)]
    pub seed: u64,
    pub tenants: Vec<TenantLoad>,
}

/// Which endpoint a tenant's requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Chat,
    Completions,
    /// `/v1/responses` (OpenAI's Responses API).
    Responses,
    /// `/v1/embeddings`: the prompt is the input (nothing generated, never streamed).
    Embeddings,
}

/// How open-loop requests are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Exponential gaps (a Poisson process): bursts as real clients make them.
    #[default]
    Poisson,
    /// Equal gaps.
    Uniform,
}

/// One tenant's traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLoad {
    /// The name the report uses.
    pub name: String,
    /// The tenant's API key, or the environment variable that holds it.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_env: Option<String>,
    pub model: String,
    #[serde(default = "default_endpoint")]
    pub endpoint: Endpoint,
    #[serde(default)]
    pub stream: bool,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub temperature: Option<f32>,
    /// The prompt, or a number of random words (different for every request, so that no
    /// prefix cache makes them cheap).
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub prompt_words: Option<u32>,
    /// Embeddings: inputs per request (each its own random words with `prompt_words`).
    #[serde(default = "default_inputs")]
    pub inputs: u32,
    /// Open loop: requests per second offered, whatever the answers.
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default)]
    pub arrival: Arrival,
    /// Open loop: keep-alive connections (requests past them wait, and the wait counts).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Closed loop: users, each sending its next request when its last one ended.
    #[serde(default)]
    pub users: Option<usize>,
    /// Batch: this many requests sent as one batch (`/v1/files`, then `/v1/batches`) when
    /// the run starts, and followed to the window's end: its row counts the requests the
    /// batch finished in the window and their tokens (no latencies: a batch has none to
    /// show). Its requests are the tenant's (`stream` must be false); the batch is
    /// cancelled at the end if it has not ended.
    #[serde(default)]
    pub batch: Option<usize>,
    /// Closed loop: a user's pause between requests.
    #[serde(default)]
    pub think_ms: u64,
    /// Closed loop: requests per conversation. Past the first, a user's request carries
    /// its conversation so far (chat: the earlier turns as messages; completions: as
    /// text; responses: `previous_response_id` where the gateway stores answers, else the
    /// earlier turns as input items), then a new one begins. A failed turn begins anew.
    #[serde(default = "default_turns")]
    pub turns: u32,
    /// The model's `output_weight`, for the weighted-tokens column (`input + weight ×
    /// output`, as the gateway charges).
    #[serde(default = "default_output_weight")]
    pub output_weight: f64,
    /// More fields for every request's body (`response_format`, `tools`, …).
    #[serde(default)]
    pub extra: Option<toml::Table>,
}

fn default_duration() -> f64 {
    10.0
}
fn default_warmup() -> f64 {
    2.0
}
fn default_drain() -> f64 {
    30.0
}
/// Most `inputs` an embeddings request may carry (the gateway's and OpenAI's limit).
pub const MAX_INPUTS: u32 = 2048;

fn default_endpoint() -> Endpoint {
    Endpoint::Chat
}
fn default_max_tokens() -> u32 {
    32
}
fn default_turns() -> u32 {
    1
}
fn default_inputs() -> u32 {
    1
}
fn default_connections() -> usize {
    64
}
fn default_output_weight() -> f64 {
    3.0
}

/// How a tenant's requests come.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Traffic {
    Open { rate: f64, arrival: Arrival },
    Closed { users: usize },
    Batch { requests: usize },
}

impl Scenario {
    /// Parses and checks a scenario; the error names the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check()?;
        Ok(s)
    }

    /// Checks what the types do not.
    pub fn check(&self) -> Result<(), String> {
        let uri: http::Uri = self.target.parse().map_err(|e| format!("target: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(format!(
                "target: want http://host:port, got {:?}",
                self.target
            ));
        }
        for (name, v) in [
            ("duration_secs", self.duration_secs),
            ("warmup_secs", self.warmup_secs),
            ("drain_secs", self.drain_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name}: must be a number ≥ 0"));
            }
        }
        if self.duration_secs <= 0.0 {
            return Err("duration_secs: must be > 0".into());
        }
        if self.tenants.is_empty() {
            return Err("tenants: at least one".into());
        }
        for (i, t) in self.tenants.iter().enumerate() {
            let at = format!("tenants[{i}] ({})", t.name);
            if self.tenants[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("{at}: two tenants are named {:?}", t.name));
            }
            t.traffic().map_err(|e| format!("{at}: {e}"))?;
            t.api_key().map_err(|e| format!("{at}: {e}"))?;
            if t.prompt.is_some() == t.prompt_words.is_some() {
                return Err(format!("{at}: set one of `prompt` and `prompt_words`"));
            }
            if t.turns == 0 {
                return Err(format!("{at}: turns must be ≥ 1"));
            }
            if t.turns > 1 && t.users.is_none() {
                return Err(format!(
                    "{at}: turns past 1 need a closed loop (`users`): a turn waits for the last"
                ));
            }
            if t.connections == 0 {
                return Err(format!("{at}: connections must be ≥ 1"));
            }
            if t.endpoint == Endpoint::Embeddings && (t.stream || t.turns > 1) {
                return Err(format!(
                    "{at}: embeddings are neither streamed nor conversations (`stream`, `turns`)"
                ));
            }
            if !(1..=MAX_INPUTS).contains(&t.inputs) {
                return Err(format!("{at}: inputs must be from 1 to {MAX_INPUTS}"));
            }
            if t.inputs > 1 && t.endpoint != Endpoint::Embeddings {
                return Err(format!(
                    "{at}: inputs past 1 are for `endpoint = \"embeddings\"`"
                ));
            }
            if !(t.output_weight.is_finite() && t.output_weight >= 0.0) {
                return Err(format!("{at}: output_weight must be ≥ 0"));
            }
        }
        Ok(())
    }
}

impl TenantLoad {
    /// Open or closed loop (exactly one of `rate` and `users`).
    pub fn traffic(&self) -> Result<Traffic, String> {
        match (self.rate, self.users, self.batch) {
            (Some(rate), None, None) if rate.is_finite() && rate > 0.0 => Ok(Traffic::Open {
                rate,
                arrival: self.arrival,
            }),
            (Some(_), None, None) => Err("rate must be > 0".into()),
            (None, Some(users), None) if users > 0 => Ok(Traffic::Closed { users }),
            (None, Some(_), None) => Err("users must be ≥ 1".into()),
            (None, None, Some(_)) if self.stream => {
                Err("a batch's requests are not streamed: set `stream = false`".into())
            }
            (None, None, Some(requests)) if requests > 0 => Ok(Traffic::Batch { requests }),
            (None, None, Some(_)) => Err("batch must be ≥ 1".into()),
            _ => Err(
                "set one of `rate` (open loop), `users` (closed loop) and `batch` (a batch)".into(),
            ),
        }
    }

    /// The key, from the file or the environment.
    pub fn api_key(&self) -> Result<String, String> {
        match (&self.key, &self.key_env) {
            (Some(k), None) => Ok(k.clone()),
            (None, Some(var)) => {
                std::env::var(var).map_err(|_| format!("key_env: ${var} is not set"))
            }
            _ => Err("set one of `key` and `key_env`".into()),
        }
    }

    /// Prompt `n`: the fixed one, or its random words (drawn from `seed` and `n`).
    fn prompt(&self, seed: u64, n: u64) -> String {
        match (&self.prompt, self.prompt_words) {
            (Some(p), _) => p.clone(),
            (None, words) => random_words(
                words.unwrap_or(0),
                seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ),
        }
    }

    /// The request path on the gateway.
    pub fn path(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// Request `n`'s body (its random words drawn from `seed` and `n`), the first of a
    /// conversation.
    pub fn body(&self, seed: u64, n: u64) -> Vec<u8> {
        self.turn(seed, n, &Conversation::default()).0
    }

    /// Request `n`'s body as the next turn of `conv`, and its new prompt.
    pub fn turn(&self, seed: u64, n: u64, conv: &Conversation) -> (Vec<u8>, String) {
        let prompt = self.prompt(seed, n);
        let mut body = json!({
            "model": self.model,
            "stream": self.stream,
        });
        let turns = |last: &str| {
            let mut m = Vec::with_capacity(conv.turns.len() * 2 + 1);
            for (asked, answered) in &conv.turns {
                m.push(json!({"role": "user", "content": asked}));
                m.push(json!({"role": "assistant", "content": answered}));
            }
            m.push(json!({"role": "user", "content": last}));
            Value::Array(m)
        };
        let max = match self.endpoint {
            Endpoint::Embeddings => {
                let input = match self.inputs {
                    1 => Value::String(prompt.clone()),
                    k => {
                        // Input i of request n draws as request n × k + i would.
                        let each = (0..k as u64).map(|i| self.prompt(seed, n * k as u64 + i));
                        Value::Array(each.map(Value::String).collect())
                    }
                };
                // Vectors as base64, as the OpenAI SDKs ask for them.
                let body =
                    json!({"model": self.model, "input": input, "encoding_format": "base64"});
                return (serde_json::to_vec(&body).unwrap_or_default(), prompt);
            }
            Endpoint::Chat => {
                body["messages"] = turns(&prompt);
                "max_tokens"
            }
            Endpoint::Completions => {
                let mut text = String::new();
                for (asked, answered) in &conv.turns {
                    text.push_str(asked);
                    text.push_str(answered);
                    text.push('\n');
                }
                text.push_str(&prompt);
                body["prompt"] = Value::String(text);
                "max_tokens"
            }
            Endpoint::Responses => {
                match (&conv.previous, conv.turns.is_empty()) {
                    (Some(id), _) => {
                        body["previous_response_id"] = json!(id);
                        body["input"] = Value::String(prompt.clone());
                    }
                    (None, true) => body["input"] = Value::String(prompt.clone()),
                    (None, false) => body["input"] = turns(&prompt),
                }
                "max_output_tokens"
            }
        };
        body[max] = json!(self.max_tokens);
        if self.stream && self.endpoint != Endpoint::Responses {
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(extra) = &self.extra {
            for (k, v) in extra {
                body[k] = serde_json::to_value(v).unwrap_or(Value::Null);
            }
        }
        (serde_json::to_vec(&body).unwrap_or_default(), prompt)
    }
}

/// A user's conversation so far (`turns` past 1): its turns' prompts and answers, and
/// the stored id of its last answer (what a Responses turn continues).
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub turns: Vec<(String, String)>,
    pub previous: Option<String>,
}

/// Words a prompt is made of: common, short, mostly one token each.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "on", "be",
    "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which",
    "one", "you", "were", "all", "we", "her", "she", "there", "would", "their", "will", "when",
    "who", "him", "been", "has", "more", "if", "no", "out", "so", "said", "what", "up", "its",
    "about", "than", "into", "them", "can", "only", "other", "time", "new", "some", "could",
    "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over", "such",
    "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must",
    "through", "back", "years", "where", "much", "your", "way", "well", "down", "should",
    "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very",
    "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between",
    "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last",
    "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came",
    "right", "used", "take", "three",
];

/// `n` random words from `seed`.
pub fn random_words(n: u32, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = String::with_capacity(n as usize * 6);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        target = "http://127.0.0.1:8080"
        duration_secs = 5
        [[tenants]]
        name = "a"
        key = "sk-a"
        model = "m"
        rate = 20
        prompt_words = 8
        [[tenants]]
        name = "b"
        key = "sk-b"
        model = "m"
        endpoint = "completions"
        stream = true
        users = 4
        prompt = "hello"
        extra = { top_p = 0.5 }
    "#;

    #[test]
    fn a_scenario_reads_and_makes_bodies() {
        let s = Scenario::parse(GOOD).unwrap();
        let (a, b) = (&s.tenants[0], &s.tenants[1]);
        assert_eq!(
            a.traffic().unwrap(),
            Traffic::Open {
                rate: 20.0,
                arrival: Arrival::Poisson
            }
        );
        assert_eq!(b.traffic().unwrap(), Traffic::Closed { users: 4 });
        let body: Value = serde_json::from_slice(&a.body(1, 0)).unwrap();
        let words = body["messages"][0]["content"].as_str().unwrap();
        assert_eq!(words.split(' ').count(), 8);
        // Each request its own words; the same seed, the same words.
        assert_ne!(a.body(1, 0), a.body(1, 1));
        assert_eq!(a.body(1, 5), a.body(1, 5));
        let body: Value = serde_json::from_slice(&b.body(1, 0)).unwrap();
        assert_eq!(body["prompt"], "hello");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["top_p"], 0.5);
        assert_eq!(b.path(), "/v1/completions");
        let mut r = b.clone();
        r.endpoint = Endpoint::Responses;
        let body: Value = serde_json::from_slice(&r.body(1, 0)).unwrap();
        assert_eq!(
            (&body["input"], &body["max_output_tokens"]),
            (&json!("hello"), &json!(b.max_tokens))
        );
        assert!(body.get("stream_options").is_none() && body.get("max_tokens").is_none());
        assert_eq!(r.path(), "/v1/responses");
        r.endpoint = Endpoint::Embeddings;
        let body: Value = serde_json::from_slice(&r.body(1, 0)).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "input": "hello", "encoding_format": "base64"})
        );
        assert_eq!(r.path(), "/v1/embeddings");
        // Several inputs: the fixed prompt each time, or each its own words.
        r.inputs = 3;
        let body: Value = serde_json::from_slice(&r.body(1, 0)).unwrap();
        assert_eq!(body["input"], json!(["hello", "hello", "hello"]));
        let mut w = a.clone();
        w.endpoint = Endpoint::Embeddings;
        w.inputs = 3;
        let body: Value = serde_json::from_slice(&w.body(1, 4)).unwrap();
        let inputs = body["input"].as_array().expect("a list");
        assert_eq!(inputs.len(), 3);
        assert_ne!(inputs[0], inputs[1]);
        assert_ne!(
            body,
            serde_json::from_slice::<Value>(&w.body(1, 5)).unwrap()
        );
        assert_eq!(inputs[0].as_str().unwrap().split(' ').count(), 8);
    }

    #[test]
    fn a_turn_carries_its_conversation() {
        let s = Scenario::parse(GOOD).unwrap();
        let mut t = s.tenants[1].clone();
        let conv = Conversation {
            turns: vec![("q1".into(), "a1".into()), ("q2".into(), "a2".into())],
            previous: None,
        };
        t.endpoint = Endpoint::Chat;
        let (body, prompt) = t.turn(1, 7, &conv);
        assert_eq!(prompt, "hello");
        let body: Value = serde_json::from_slice(&body).unwrap();
        let said: Vec<(&str, &str)> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            said,
            [
                ("user", "q1"),
                ("assistant", "a1"),
                ("user", "q2"),
                ("assistant", "a2"),
                ("user", "hello")
            ]
        );
        t.endpoint = Endpoint::Completions;
        let body: Value = serde_json::from_slice(&t.turn(1, 7, &conv).0).unwrap();
        assert_eq!(body["prompt"], "q1a1\nq2a2\nhello");
        t.endpoint = Endpoint::Responses;
        let body: Value = serde_json::from_slice(&t.turn(1, 7, &conv).0).unwrap();
        assert_eq!(
            body["input"].as_array().map(Vec::len),
            Some(5),
            "resent: not stored"
        );
        let stored = Conversation {
            previous: Some("resp_1".into()),
            ..conv
        };
        let body: Value = serde_json::from_slice(&t.turn(1, 7, &stored).0).unwrap();
        assert_eq!(
            (&body["previous_response_id"], &body["input"]),
            (&json!("resp_1"), &json!("hello"))
        );
    }

    #[test]
    fn bad_scenarios_are_refused_by_field() {
        for (change, why) in [
            (("rate = 20", "rate = 0"), "rate must be > 0"),
            (("rate = 20", "users = 2\nrate = 3"), "set one of `rate`"),
            (("prompt_words = 8", ""), "set one of `prompt`"),
            (
                ("key = \"sk-a\"", "key_env = \"TOLLGATE_NO_SUCH_VAR\""),
                "is not set",
            ),
            (("name = \"b\"", "name = \"a\""), "two tenants"),
            (("duration_secs = 5", "duration_secs = 0"), "duration_secs"),
            (
                (
                    "target = \"http://127.0.0.1:8080\"",
                    "target = \"127.0.0.1\"",
                ),
                "target",
            ),
            (
                ("prompt_words = 8", "prompt_words = 8\nspeed = 1"),
                "unknown field",
            ),
            (
                ("prompt_words = 8", "prompt_words = 8\nturns = 3"),
                "closed loop",
            ),
            (
                ("prompt = \"hello\"", "prompt = \"hello\"\nturns = 0"),
                "turns",
            ),
            (
                ("endpoint = \"completions\"", "endpoint = \"embeddings\""),
                "neither streamed",
            ),
            (
                ("prompt_words = 8", "prompt_words = 8\ninputs = 0"),
                "inputs",
            ),
            (
                ("prompt_words = 8", "prompt_words = 8\ninputs = 4"),
                "embeddings",
            ),
            (
                ("prompt_words = 8", "prompt_words = 8\ninputs = 2049"),
                "inputs must be from 1 to 2048",
            ),
        ] {
            let text = GOOD.replacen(change.0, change.1, 1);
            let e = Scenario::parse(&text).unwrap_err();
            assert!(e.contains(why), "{change:?}: {e}");
        }
    }
}
