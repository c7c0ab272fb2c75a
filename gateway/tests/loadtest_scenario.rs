//! The `loadtest` tool's scenario runner against a real gateway, with the shipped example
//! (`config/examples/two-tenants.toml` played by `config/scenarios/two-tenants.toml`):
//! the report shows each tenant what its contract says — the tenant inside its contract
//! served in full, the one offering about 3.5 times its contract admitted at it and
//! refused past it — and reads the contracts from the gateway's own headers. A closed-loop
//! tenant on the completions endpoint rides along.

mod common;
use common::*;
use loadtest::scenario::Scenario;

#[tokio::test(flavor = "multi_thread")]
async fn a_scenario_reports_each_tenant_held_to_its_contract() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let config = std::fs::read_to_string(format!("{root}/config/examples/two-tenants.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8081", "127.0.0.1:0")
        + &format!(
            "\n[[tenants]]\nid = \"initech\"\nkeys_sha256 = [\"{KEY_SHA256}\"]\ntokens_per_second = 100000.0\n"
        );
    let gw = Gateway::start(&config);
    let scenario = std::fs::read_to_string(format!("{root}/config/scenarios/two-tenants.toml"))
        .unwrap()
        + &format!(
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
"#
        );
    let mut sc = Scenario::parse(&scenario).unwrap();
    sc.target = gw.base.clone();
    sc.duration_secs = 4.0;
    sc.check().unwrap();
    let report = loadtest::run::execute(&sc).await.unwrap();
    eprint!("{}", report.table());
    let [acme, globex, initech] = &report.tenants[..] else {
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
}
