//! The `loadtest` tool's scenario runner against a real gateway, with the shipped example
//! (`config/examples/two-tenants.toml` played by `config/scenarios/two-tenants.toml`):
//! the report shows each tenant what its contract says — the tenant inside its contract
//! served in full, the one offering about 3.5 times its contract admitted at it and
//! refused past it — and reads the contracts from the gateway's own headers. Closed-loop
//! tenants on the completions endpoint, on the Responses API (streamed) and on embeddings
//! ride along. With `config/examples/fair-share.toml`,
//! a fleet too small for two tenants is shared by their weights. A contract raised while
//! the load runs shows in the report's timeline. Multi-turn users carry their
//! conversations (and the engine's prefix cache serves them). A batch tenant's requests
//! run as a batch beside interactive users. Every shipped scenario and example config
//! reads.

use crate::common;
use common::*;
use loadtest::scenario::Scenario;

#[tokio::test(flavor = "multi_thread")]
async fn a_scenario_reports_each_tenant_held_to_its_contract() {
    let initech = format!(
        "\n[[tenants]]\nid = \"initech\"\nkeys_sha256 = [\"{KEY_SHA256}\"]\ntokens_per_second = 100000.0\n"
    );
    let (_gw, mut sc, _) = example("two-tenants", |c| c + &initech);
    let more = format!(
        r#"
[[tenants]]
name = "initech"
key = "{KEY}"
model = "sim-8b"
endpoint = "completions"
max_tokens = 8
prompt = "Hello"
users = 2
think_ms = 50

[[tenants]]
name = "hooli"
key = "{KEY}"
model = "sim-8b"
endpoint = "responses"
stream = true
max_tokens = 8
prompt = "Hello"
users = 1
think_ms = 50

[[tenants]]
name = "umbrella"
key = "{KEY}"
model = "sim-8b"
endpoint = "embeddings"
prompt = "Hello there"
inputs = 3
users = 1
think_ms = 50
"#
    );
    let extra: Scenario = Scenario::parse(&format!("target = \"{}\"\n{more}", sc.target)).unwrap();
    sc.tenants.extend(extra.tenants);
    sc.duration_secs = 4.0;
    sc.check().unwrap();
    let report = loadtest::run::execute(&sc).await.unwrap();
    eprint!("{}", report.table());
    let [acme, globex, initech, hooli, umbrella] = &report.tenants[..] else {
        panic!("{report:?}")
    };
    // The contracts as the gateway states them (RateLimit-Policy).
    assert_eq!(acme.contract_tokens_per_s, Some(4000.0));
    assert_eq!(globex.contract_tokens_per_s, Some(1000.0));
    // Inside its contract: every request served, streamed, with time to first token and
    // gaps between tokens measured.
    assert!(acme.sent > 30, "{acme:?}");
    assert_eq!(
        (acme.ok, acme.limited, acme.stream_errors),
        (acme.sent, 0, 0),
        "{acme:?}"
    );
    assert!(acme.share_of_contract.unwrap() < 0.9, "{acme:?}");
    assert!(
        acme.ttft.p50_ms.unwrap() < acme.e2e.p50_ms.unwrap(),
        "{acme:?}"
    );
    assert!(acme.inter_token.p50_ms.is_some(), "{acme:?}");
    // About three times its contract: admitted at the contract (the burst left after the
    // warm-up and the refunds of short answers allow a little more), refused past it.
    let share = globex.share_of_contract.unwrap();
    assert!((0.75..1.45).contains(&share), "{globex:?}");
    assert!(globex.limited > globex.ok, "{globex:?}");
    assert_eq!(globex.ok + globex.limited, globex.sent, "{globex:?}");
    assert!(
        globex.inter_token.p50_ms.is_none(),
        "not streamed: {globex:?}"
    );
    // Closed loop: its users' requests, all answered.
    assert_eq!(initech.users, Some(2));
    assert!(initech.sent > 4, "{initech:?}");
    assert_eq!(
        (initech.ok, initech.limited),
        (initech.sent, 0),
        "{initech:?}"
    );
    assert!(initech.completion_tokens_per_s > 0.0, "{initech:?}");
    // The Responses API's event stream, read as the others' streams are.
    assert!(hooli.sent > 2, "{hooli:?}");
    assert_eq!(
        (hooli.ok, hooli.limited, hooli.stream_errors),
        (hooli.sent, 0, 0),
        "{hooli:?}"
    );
    assert!(hooli.inter_token.p50_ms.is_some(), "{hooli:?}");
    assert!(hooli.completion_tokens_per_s > 0.0, "{hooli:?}");
    // Embeddings: input tokens only.
    assert!(umbrella.sent > 2, "{umbrella:?}");
    assert_eq!(
        (umbrella.ok, umbrella.limited),
        (umbrella.sent, 0),
        "{umbrella:?}"
    );
    // Three inputs a request, each "Hello there" (3 tokens as simulated workers count).
    let per_request = umbrella.prompt_tokens_per_s * 4.0 / umbrella.ok as f64;
    assert!(
        (per_request - 9.0).abs() < 1e-9,
        "{per_request}: {umbrella:?}"
    );
    assert_eq!(umbrella.completion_tokens_per_s, 0.0, "{umbrella:?}");
    // The timeline adds up to the totals, a line per second of the window.
    for t in &report.tenants {
        assert_eq!(t.timeline.len(), 4, "{t:?}");
        let sum = |f: fn(&loadtest::report::Second) -> u64| t.timeline.iter().map(f).sum::<u64>();
        assert_eq!(
            (sum(|s| s.sent), sum(|s| s.ok), sum(|s| s.limited)),
            (t.sent, t.ok, t.limited)
        );
        let weighted: f64 = t.timeline.iter().map(|s| s.weighted_tokens).sum();
        assert!(
            (weighted / 4.0 - t.weighted_tokens_per_s).abs() < 1e-6,
            "{t:?}"
        );
    }
}

/// An operator raises a tenant's contract while the load runs (the gateway watches its
/// file): the timeline shows the admitted rate step up from the next second on.
#[tokio::test(flavor = "multi_thread")]
async fn a_contract_raised_mid_run_shows_in_the_timeline() {
    // A burst of one second, so that the warm-up spends it.
    let (gw, mut sc, config) = example("two-tenants", |c| {
        c.replace("burst_seconds = 5.0", "burst_seconds = 1.0")
    });
    sc.warmup_secs = 1.0;
    sc.duration_secs = 5.0;
    sc.tenants.retain(|t| t.name == "globex");
    let raised = config.replace("tokens_per_second = 1000.0", "tokens_per_second = 10000.0");
    let run = loadtest::run::execute(&sc);
    let reload = async {
        // Two seconds into the window (after the run's 0.1 s start and 1 s warm-up).
        tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
        gw.write_config(&raised);
    };
    let (report, ()) = tokio::join!(run, reload);
    let report = report.unwrap();
    eprint!("{}{}", report.table(), report.timeline());
    let t = &report.tenants[0];
    let w: Vec<f64> = t.timeline.iter().map(|s| s.weighted_tokens).collect();
    // Before: held to 1,000 tokens/s (the burst left after the warm-up on top). After: all
    // of its ~3,500 offered.
    assert!(w[0] < 1600.0 && w[1] < 1600.0, "{w:?}");
    assert!(w[3] > 2500.0 && w[4] > 2500.0, "{w:?}");
    assert_eq!(t.timeline[4].limited, 0, "{t:?}");
    // The contract reported is the latest the gateway stated.
    assert_eq!(t.contract_tokens_per_s, Some(10000.0), "{t:?}");
}

/// The shipped example config on ephemeral loopback ports, changed by `edit`; the gateway
/// started with it, its scenario aimed at that gateway, and the config text it started
/// with.
fn example(name: &str, edit: impl FnOnce(String) -> String) -> (Gateway, Scenario, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let config = edit(
        std::fs::read_to_string(format!("{root}/config/examples/{name}.toml"))
            .unwrap()
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:8081", "127.0.0.1:0"),
    );
    let gw = Gateway::start(&config);
    let text = std::fs::read_to_string(format!("{root}/config/scenarios/{name}.toml")).unwrap();
    let mut sc = Scenario::parse(&text).unwrap();
    sc.target = gw.base.clone();
    (gw, sc, config)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scenario_shows_a_short_fleet_shared_by_weight() {
    let (_gw, mut sc, _) = example("fair-share", |c| c);
    sc.warmup_secs = 1.0;
    sc.duration_secs = 3.0;
    let report = loadtest::run::execute(&sc).await.unwrap();
    eprint!("{}", report.table());
    let [big, small] = &report.tenants[..] else {
        panic!("{report:?}")
    };
    // Both inside their contracts: nobody refused, everyone waits for the fleet.
    for t in [big, small] {
        assert_eq!((t.ok, t.limited, t.saturated), (t.sent, 0, 0), "{t:?}");
    }
    // Weights 3:1: the slots go about 3:1, and the lighter tenant waits longer.
    let ratio = big.ok as f64 / small.ok.max(1) as f64;
    assert!((2.2..4.2).contains(&ratio), "{ratio}: {report:?}");
    assert!(small.ttft.p50_ms > big.ttft.p50_ms, "{report:?}");
}

/// Multi-turn users (`turns`) on the engine (synthetic model, prefix caching on): each
/// turn carries the conversation so far (chat: as messages; Responses: continued by
/// `previous_response_id` from the gateway's store), so later turns' prompts are longer
/// and mostly served from the engine's prefix cache.
#[tokio::test(flavor = "multi_thread")]
async fn multi_turn_users_carry_their_conversations() {
    let (_dir, model) = synthetic_model_file();
    let dir = std::env::temp_dir().join(format!("tollgate-turns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = engine_config(&model, "")
        + &format!(
            "\n[responses]\nstore = true\npath = {:?}\n",
            dir.join("responses.db").display().to_string()
        );
    let gw = Gateway::start(&cfg);
    let tenant = |name: &str, endpoint: &str, turns: u32| {
        format!(
            "[[tenants]]\nname = \"{name}\"\nkey = \"{KEY}\"\nmodel = \"m\"\nendpoint = \"{endpoint}\"\nstream = true\nmax_tokens = 6\nprompt_words = 12\ntemperature = 0\nusers = 2\nturns = {turns}\n"
        )
    };
    let text = format!(
        "target = \"{}\"\nduration_secs = 4\nwarmup_secs = 0.5\n{}{}{}",
        gw.base,
        tenant("single", "chat", 1),
        tenant("chat", "chat", 4),
        tenant("responses", "responses", 4)
    );
    let sc = Scenario::parse(&text).unwrap();
    let report = loadtest::run::execute(&sc).await.unwrap();
    eprint!("{}", report.table());
    let [single, chat, responses] = &report.tenants[..] else {
        panic!("{report:?}")
    };
    let per_request = |t: &loadtest::report::TenantReport| t.prompt_tokens_per_s / t.ok_rps;
    for t in [single, chat, responses] {
        assert!(t.ok > 8, "{t:?}");
        assert_eq!((t.ok, t.stream_errors), (t.sent, 0), "{t:?}");
    }
    for t in [chat, responses] {
        assert!(
            per_request(t) > 1.5 * per_request(single),
            "longer prompts: {} vs {}",
            per_request(t),
            per_request(single)
        );
        assert!(
            t.cached_tokens_per_s > 0.3 * t.prompt_tokens_per_s,
            "the conversation so far from the prefix cache: {t:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_shipped_scenario_and_example_config_reads() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
    let mut n = 0;
    for entry in std::fs::read_dir(format!("{root}/scenarios")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    for entry in std::fs::read_dir(format!("{root}/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(n >= 4, "{n} files");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_tenant_runs_its_requests_as_a_batch_beside_interactive_users() {
    // 8 tokens at 5 ms: 40 ms a request, 4 of the batch's at a time.
    let sim = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 5.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 8, max_output_tokens = 8 }"#;
    let gw =
        Gateway::start(&(config(sim, "", "") + "\n[batches]\nenabled = true\nconcurrency = 4\n"));
    let text = format!(
        r#"
target = "{}"
duration_secs = 3
warmup_secs = 2

[[tenants]]
name = "chat"
key = "{KEY}"
model = "m"
stream = true
max_tokens = 8
prompt_words = 8
users = 2

[[tenants]]
name = "bulk"
key = "{KEY}"
model = "m"
max_tokens = 8
prompt_words = 8
batch = 2000
"#,
        gw.base
    );
    let sc = Scenario::parse(&text).expect("scenario");
    let report = loadtest::run::execute(&sc).await.expect("run");
    eprint!("{}", report.table());
    let [chat, bulk] = &report.tenants[..] else {
        panic!("{report:?}")
    };
    assert!(chat.ok > 10 && chat.ok == chat.sent, "{chat:?}");
    assert_eq!(bulk.batch, Some(2000));
    // The batch's requests finished in the window, each answered (8 tokens apiece).
    assert!(bulk.ok > 0 && bulk.ok == bulk.sent, "{bulk:?}");
    assert_eq!(bulk.transport_errors, 0, "{bulk:?}");
    let tokens = bulk.completion_tokens_per_s * sc.duration_secs;
    assert!((tokens - 8.0 * bulk.ok as f64).abs() < 1.0, "{bulk:?}");
    assert!(
        bulk.ttft.p50_ms.is_none(),
        "a batch has no latencies to show"
    );
    // Not done by the window's end: the run cancelled it.
    let listed = get_json(gw.url("/v1/batches"), KEY).await;
    let status = listed["data"][0]["status"].as_str().expect("a batch");
    assert!(["cancelling", "cancelled"].contains(&status), "{listed}");
    // The table names it.
    assert!(report.table().contains("batch 2000"), "{}", report.table());
}
