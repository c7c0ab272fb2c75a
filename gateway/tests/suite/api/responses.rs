//! The Responses API with its store: stored answers per tenant through a kill, item
//! references, the storage quota, background responses and their cancel.

use super::*;

/// Stored answers of the Responses API (`[responses] store = true`): continued with
/// `previous_response_id` (the conversation comes back as the prompt), read back and
/// deleted by their tenant only, never stored when the request says `store: false`, and
/// still there after the gateway is killed and started again.
#[tokio::test]
async fn stored_responses_are_their_tenants_and_survive_a_kill() {
    let (dir, stored) = response_store("stored");
    let cfg = config(FAST_SIM, &other_tenant(), "") + &stored;
    let c = client();
    let send =
        |gw: &Gateway, key: &str, method: reqwest::Method, path: &str, body: Option<&str>| {
            let mut r = c.request(method, gw.url(path)).bearer_auth(key);
            if let Some(b) = body {
                r = r
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            r.send()
        };
    let mut gw = Gateway::start(&cfg);
    let post = reqwest::Method::POST;
    let r = send(
        &gw,
        KEY,
        post.clone(),
        "/v1/responses",
        Some(r#"{"model":"m","input":"hello there"}"#),
    )
    .await
    .unwrap();
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["store"], true, "{first}");
    let id = first["id"].as_str().unwrap().to_string();
    // Continued: the stored conversation is the new request's prompt.
    let body = format!(r#"{{"model":"m","input":"and again","previous_response_id":"{id}"}}"#);
    let second: Value = send(&gw, KEY, post.clone(), "/v1/responses", Some(&body))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["previous_response_id"], id.as_str(), "{second}");
    let tokens = |v: &Value| v["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        tokens(&second) > tokens(&first) + first["usage"]["output_tokens"].as_u64().unwrap(),
        "{first}\n{second}"
    );
    // Its input items: the first answer's conversation, then its own input; the first
    // answer's output under the id it was sent with.
    let get = reqwest::Method::GET;
    let second_id = second["id"].as_str().unwrap().to_string();
    let items = format!("/v1/responses/{second_id}/input_items");
    let listed: Value = send(&gw, KEY, get.clone(), &format!("{items}?order=asc"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = listed["data"].as_array().expect("data");
    let said: Vec<(&str, &str)> = data
        .iter()
        .map(|i| {
            (
                i["role"].as_str().unwrap(),
                i["content"][0]["text"].as_str().unwrap(),
            )
        })
        .collect();
    let answer = first["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(
        said,
        [
            ("user", "hello there"),
            ("assistant", answer),
            ("user", "and again")
        ],
        "{listed}"
    );
    assert_eq!(data[1]["id"], first["output"][0]["id"]);
    assert_eq!(listed["has_more"], false);
    let newest: Value = send(&gw, KEY, get.clone(), &format!("{items}?limit=1"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(newest["data"][0]["id"], data[2]["id"], "newest first");
    assert_eq!(newest["has_more"], true);
    let r = send(&gw, KEY, get.clone(), &format!("{items}?limit=500"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let first_items = format!("/v1/responses/{id}/input_items");
    let r = send(&gw, OTHER, get.clone(), &first_items, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another tenant's");
    // Another tenant cannot read, continue or delete it.
    let path = format!("/v1/responses/{id}");
    assert_eq!(
        send(&gw, OTHER, get.clone(), &path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    let r = send(&gw, OTHER, post.clone(), "/v1/responses", Some(&body))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "previous_response_id");
    assert_eq!(v["error"]["code"], "previous_response_not_found");
    let delete = reqwest::Method::DELETE;
    assert_eq!(
        send(&gw, OTHER, delete.clone(), &path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    // `store: false`: answered, not kept.
    let unkept: Value = send(
        &gw,
        KEY,
        post.clone(),
        "/v1/responses",
        Some(r#"{"model":"m","input":"x","store":false}"#),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(unkept["store"], false);
    let unkept_path = format!("/v1/responses/{}", unkept["id"].as_str().unwrap());
    assert_eq!(
        send(&gw, KEY, get.clone(), &unkept_path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    // Killed and started again: the answer is there, as it was sent.
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(gw);
    let gw = Gateway::start(&cfg);
    let r = send(&gw, KEY, get.clone(), &path, None).await.unwrap();
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again, first);
    let r = send(&gw, KEY, get.clone(), &format!("{items}?order=asc"), None)
        .await
        .unwrap();
    let relisted: Value = r.json().await.unwrap();
    assert_eq!(relisted, listed, "the same items under the same ids");
    let r = send(&gw, KEY, delete.clone(), &path, None).await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (&v["id"], &v["deleted"]),
        (&Value::from(id.as_str()), &Value::from(true))
    );
    assert_eq!(
        send(&gw, KEY, get.clone(), &path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    // The answer that continued it still holds the whole conversation, and is continued.
    let r = send(&gw, KEY, get.clone(), &format!("{items}?order=asc"), None)
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        listed,
        "after the first went"
    );
    let body = format!(r#"{{"model":"m","input":"more","previous_response_id":"{second_id}"}}"#);
    let third: Value = send(&gw, KEY, post.clone(), "/v1/responses", Some(&body))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(tokens(&third) > tokens(&second), "{second}\n{third}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `item_reference` inputs: a tenant's stored items (an answer's output, its input) stand
/// in a new request's input, and in a conversation's items, as copies with ids of their
/// own; an id the tenant has no item under is a 400 naming the reference. Without a store
/// they are refused.
#[tokio::test]
async fn item_references_stand_for_the_tenants_stored_items() {
    let (dir, stored) = response_store("item-refs");
    let gw = Gateway::start(&(config(FAST_SIM, &other_tenant(), "") + &stored));
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let ask = |body: Value| call_json(&gw, KEY, post.clone(), "/v1/responses", Some(body));
    let first = ask(serde_json::json!({"model": "m", "input": "hello there"})).await;
    let out = &first["output"][0];
    let out_id = out["id"].as_str().expect("an output id");
    let answer = out["content"][0]["text"].as_str().expect("text");
    let items = |id: &Value| {
        format!(
            "/v1/responses/{}/input_items?order=asc",
            id.as_str().expect("an id")
        )
    };
    let inputs = call_json(&gw, KEY, get.clone(), &items(&first["id"]), None).await;
    let in_id = inputs["data"][0]["id"].as_str().expect("an input id");

    // Both items referenced (typed, and as a bare id), then a new turn.
    let body = serde_json::json!({"model": "m", "input": [
        {"type": "item_reference", "id": in_id}, {"id": out_id},
        {"role": "user", "content": "and again"}]});
    let second = ask(body.clone()).await;
    // Counted ahead the same way.
    let path = "/v1/responses/input_tokens";
    let counted = call_json(&gw, KEY, post.clone(), path, Some(body.clone())).await;
    assert_eq!(
        counted["input_tokens"], second["usage"]["input_tokens"],
        "{counted}"
    );
    let tokens = |v: &Value, k: &str| v["usage"][k].as_u64().expect("usage");
    assert!(
        tokens(&second, "input_tokens")
            > tokens(&first, "input_tokens") + tokens(&first, "output_tokens"),
        "the referenced items are in the prompt: {first}\n{second}"
    );
    let listed = call_json(&gw, KEY, get.clone(), &items(&second["id"]), None).await;
    let data = listed["data"].as_array().expect("data");
    let said: Vec<(&str, &str)> = data
        .iter()
        .map(|i| {
            (
                i["role"].as_str().expect("role"),
                i["content"][0]["text"].as_str().expect("text"),
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            ("user", "hello there"),
            ("assistant", answer),
            ("user", "and again")
        ]
    );
    assert!(
        data[0]["id"] != in_id && data[1]["id"] != out_id,
        "copies: {listed}"
    );

    // Another tenant's item, and no item at all: 400s naming the reference.
    for (key, id) in [(OTHER, out_id), (KEY, "msg_nothing")] {
        let body = serde_json::json!({"model": "m", "input": [
            {"role": "user", "content": "x"}, {"type": "item_reference", "id": id}]});
        let r = call(&gw, key, post.clone(), "/v1/responses", Some(body))
            .await
            .expect("sent");
        assert_eq!(r.status(), 400, "{key} {id}");
        let e: Value = r.json().await.expect("JSON");
        assert_eq!(e["error"]["param"], "input[1].id", "{e}");
        assert_eq!(e["error"]["code"], "item_not_found", "{e}");
    }

    // A conversation made of a referenced item.
    let made = serde_json::json!({"items": [{"type": "item_reference", "id": out_id}]});
    let conv = call_json(&gw, KEY, post.clone(), "/v1/conversations", Some(made)).await;
    let path = format!(
        "/v1/conversations/{}/items",
        conv["id"].as_str().expect("id")
    );
    let items = call_json(&gw, KEY, get, &path, None).await;
    assert_eq!(items["data"][0]["content"][0]["text"], answer, "{items}");
    assert_eq!(items["data"][0]["role"], "assistant");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    // Without a store: refused, naming the item.
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let r = common::post(&gw, "/v1/responses", &body.to_string()).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("JSON");
    assert_eq!(e["error"]["param"], "input[0]", "{e}");
}

/// A tenant at its storage quota (`max_stored_mib`) is refused what would store more
/// (403 `storage_quota_exceeded`: answers, conversations, items) but not what stores
/// nothing; deleting makes room again; other tenants are not held to its quota.
#[tokio::test]
async fn a_tenant_at_its_storage_quota_stores_no_more() {
    let (dir, stored) = response_store("quota");
    // About 500 bytes: one answer takes it past.
    let other = other_tenant() + "max_stored_mib = 0.0005\n";
    let gw = Gateway::start(&(config(FAST_SIM, &other, ADMIN_SERVER) + &stored));
    let post = reqwest::Method::POST;
    let status = async |key: &str, path: &str, body: Value| {
        let r = call(&gw, key, post.clone(), path, Some(body))
            .await
            .expect("sent");
        (r.status(), r.json::<Value>().await.expect("JSON"))
    };
    let ask = |store: bool| serde_json::json!({"model": "m", "input": "hello", "store": store});
    let (code, first) = status(OTHER, "/v1/responses", ask(true)).await;
    assert_eq!(code, 200, "under its quota");
    for (path, body) in [
        ("/v1/responses", ask(true)),
        ("/v1/conversations", serde_json::json!({})),
    ] {
        let (code, e) = status(OTHER, path, body).await;
        assert_eq!(code, 403, "{path}");
        assert_eq!(e["error"]["code"], "storage_quota_exceeded", "{e}");
        let message = e["error"]["message"].as_str().expect("a message");
        assert!(message.contains("quota of 524 bytes"), "{e}");
    }
    let (code, _) = status(OTHER, "/v1/responses", ask(false)).await;
    assert_eq!(code, 200, "storing nothing is not held to the quota");
    let (code, _) = status(KEY, "/v1/responses", ask(true)).await;
    assert_eq!(code, 200, "another tenant's quota is its own");
    // The operator sees it at its quota.
    let stored = get_json(gw.admin_url("/admin/stored"), ADMIN_TOKEN).await;
    let at = stored["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["tenant"] == "other")
        .expect("other's");
    assert_eq!(at["quota_bytes"], 524, "{stored}");
    assert!(
        at["held_bytes"].as_u64() >= Some(524) && at["held_bytes"] == at["bytes"],
        "{stored}"
    );
    // Deleted: room again.
    let path = format!("/v1/responses/{}", first["id"].as_str().expect("an id"));
    let r = call(&gw, OTHER, reqwest::Method::DELETE, &path, None)
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let (code, _) = status(OTHER, "/v1/conversations", serde_json::json!({})).await;
    assert_eq!(code, 200);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Background responses (`background: true`, with the store): answered at once
/// `in_progress`, run to the end apart from the client (polled with `GET`), cancelled
/// with `POST …/cancel` (the worker's sequence stops; the answer stays `cancelled`);
/// streamed, it runs on when its client drops the stream, whose events are followed
/// again with `GET …?stream=true&starting_after=N`; refused with `store: false`.
#[tokio::test]
async fn background_responses_run_apart_and_can_be_cancelled() {
    let (dir, stored) = response_store("bg");
    let cfg = config(SLOW_SIM, "", "") + &stored;
    let gw = Gateway::start(&cfg);
    let c = client();
    let post =
        |path: String, body: Value| c.post(gw.url(&path)).bearer_auth(KEY).json(&body).send();
    let get = |path: String| c.get(gw.url(&path)).bearer_auth(KEY).send();
    let ask = |tokens: u32| {
        serde_json::json!({"model": "m", "input": "hi", "background": true,
                           "max_output_tokens": tokens})
    };
    // Polled until it is no longer in progress (2 s at most).
    let ended = |id: String| async move {
        let mut done = Value::Null;
        for _ in 0..200 {
            done = get(format!("/v1/responses/{id}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if done["status"] != "in_progress" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        done
    };
    let started = std::time::Instant::now();
    let r = post("/v1/responses".into(), ask(5)).await.unwrap();
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await.unwrap();
    assert_eq!(
        (first["status"].as_str(), first["background"].as_bool()),
        (Some("in_progress"), Some(true)),
        "{first}"
    );
    let id = first["id"].as_str().expect("an id").to_string();
    let input_ids = |id: String| async move {
        let listed: Value = get(format!("/v1/responses/{id}/input_items"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|i| i["id"].clone())
            .collect::<Vec<_>>()
    };
    let while_running = input_ids(id.clone()).await;
    let done = ended(id.clone()).await;
    assert_eq!(done["status"], "incomplete", "{done}");
    assert_eq!(
        input_ids(id.clone()).await,
        while_running,
        "its input's ids, start to end"
    );
    assert_eq!(done["usage"]["output_tokens"], 5, "{done}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(80));
    // A long one, cancelled: stored `cancelled`, and it stays so.
    let long: Value = post("/v1/responses".into(), ask(400))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = long["id"].as_str().expect("an id").to_string();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = post(format!("/v1/responses/{id}/cancel"), Value::Null)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let again: Value = get(format!("/v1/responses/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "cancelled", "{again}");
    // Its request is over (not served on to its 400 tokens).
    let m = gw.metrics().await;
    let inflight = r#"tollgate_in_flight_requests{tenant="demo",model="m"}"#;
    assert_eq!(metric(&m, inflight), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "tollgate_background_responses_running"),
        Some(0.0)
    );
    // Stored: the first answer as it started and as it ended, the second as it started,
    // and cancelled.
    let ok = metric(&m, r#"tollgate_stored_answers_total{result="ok"}"#);
    assert_eq!(ok, Some(4.0), "{m}");
    // Cancelling again answers it as it is; a response that is not a background one is
    // refused.
    let r = post(format!("/v1/responses/{id}/cancel"), Value::Null)
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    // Refused: not stored.
    let mut body = ask(5);
    body["store"] = Value::Bool(false);
    let r = post("/v1/responses".into(), body).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "store", "{v}");
    // Streamed: the client drops its stream after two events; the answer runs on, and
    // its events are followed again from where the client left them.
    let mut body = ask(8);
    body["stream"] = Value::Bool(true);
    let r = post("/v1/responses".into(), body).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    while got.windows(2).filter(|w| w == b"\n\n").count() < 2 {
        got.extend_from_slice(&stream.next().await.expect("more events").expect("bytes"));
    }
    drop(stream);
    let data = |text: &str| -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(|d| serde_json::from_str(d).expect("JSON"))
            .collect()
    };
    let first = &data(&String::from_utf8_lossy(&got))[0];
    assert_eq!(first["type"], "response.created", "{first}");
    assert_eq!(first["sequence_number"], 0);
    let id = first["response"]["id"].as_str().expect("an id").to_string();
    let done = ended(id.clone()).await;
    assert_eq!(
        (&done["status"], &done["usage"]["output_tokens"]),
        (&Value::from("incomplete"), &Value::from(8)),
        "run to its end without its client: {done}"
    );
    let r = get(format!("/v1/responses/{id}?stream=true&starting_after=1"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rest = data(&r.text().await.unwrap());
    let numbers: Vec<u64> = rest
        .iter()
        .filter_map(|e| e["sequence_number"].as_u64())
        .collect();
    assert_eq!(numbers, (2..2 + rest.len() as u64).collect::<Vec<_>>());
    let last = rest.last().expect("events");
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(last["response"], done);
    let r = get(format!("/v1/responses/{id}?stream=maybe"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Deleted while it runs: stopped, and its end does not store it again.
    let running: Value = post("/v1/responses".into(), ask(12))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!("/v1/responses/{}", running["id"].as_str().expect("an id"));
    let r = c
        .delete(gw.url(&path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        get(path.clone()).await.unwrap().status(),
        404,
        "stays deleted"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_background_responses_running"),
        Some(0.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A background response cut off by a crash (kill -9) is stored `failed` when the gateway
/// starts again, not left `in_progress` for ever.
#[tokio::test]
async fn a_background_response_cut_off_by_a_crash_is_stored_failed() {
    let (dir, stored) = response_store("crash");
    let cfg = config(SLOW_SIM, "", "") + &stored;
    let mut gw = Gateway::start(&cfg);
    let body = r#"{"model":"m","input":"hi","background":true,"max_output_tokens":400}"#;
    let started: Value = post(&gw, "/v1/responses", body).await.json().await.unwrap();
    assert_eq!(started["status"], "in_progress", "{started}");
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(gw);
    let gw = Gateway::start(&cfg);
    let path = format!("/v1/responses/{}", started["id"].as_str().unwrap());
    let r = client()
        .get(gw.url(&path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "server_error", "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
