//! The Conversations API: a tenant's conversations, answers added to them, items through
//! a kill.

use super::*;

/// The Conversations API (`[responses] store = true`): a conversation is its tenant's;
/// a response in it, streamed, reads its items first and adds its input and output; its
/// items survive the gateway being killed and started again.
#[tokio::test]
async fn conversations_are_their_tenants_and_answers_add_to_them() {
    let (dir, stored) = response_store("conv");
    let cfg = config(FAST_SIM, &other_tenant(), ADMIN_SERVER) + &stored;
    let c = client();
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let mut gw = Gateway::start(&cfg);
    let conv: Value = call(
        &gw,
        KEY,
        post.clone(),
        "/v1/conversations",
        Some(serde_json::json!({"items": [{"role": "user", "content": "I am Ada."}]})),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = conv["id"].as_str().expect("an id").to_string();
    assert_eq!(conv["object"], "conversation", "{conv}");
    let path = format!("/v1/conversations/{id}");
    let items = format!("{path}/items?order=asc");
    for (key, status) in [(KEY, 200), (OTHER, 404)] {
        let r = call(&gw, key, get.clone(), &path, None).await.unwrap();
        assert_eq!(r.status(), status, "{key}");
        let r = call(&gw, key, get.clone(), &items, None).await.unwrap();
        assert_eq!(r.status(), status, "{key}");
    }
    // Another tenant's response cannot be in it.
    let ask = serde_json::json!({"model": "m", "input": "Who am I?", "conversation": id,
                                 "stream": true, "max_output_tokens": 4});
    let r = call(&gw, OTHER, post.clone(), "/v1/responses", Some(ask.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Streamed in it: the answer's events, then its input and output are its items.
    let r = call(&gw, KEY, post.clone(), "/v1/responses", Some(ask))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = r.text().await.unwrap();
    let done = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "response.completed" || e["type"] == "response.incomplete")
        .expect("a last event");
    let answer = &done["response"];
    assert_eq!(answer["conversation"]["id"], id.as_str(), "{answer}");
    let listed: Value = call(&gw, KEY, get.clone(), &items, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = listed["data"].as_array().expect("data");
    let roles: Vec<&str> = data.iter().filter_map(|i| i["role"].as_str()).collect();
    assert_eq!(roles, ["user", "user", "assistant"], "{listed}");
    assert_eq!(data[2]["id"], answer["output"][0]["id"]);
    assert_eq!(
        data[2]["content"][0]["text"],
        answer["output"][0]["content"][0]["text"]
    );
    // Killed and started again: the same items.
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(gw);
    let gw = Gateway::start(&cfg);
    let again: Value = call(&gw, KEY, get.clone(), &items, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again, listed);
    // A second answer in it (it continues the first): its input items are the
    // conversation's items before it, then its input.
    let ask = serde_json::json!({"model": "m", "input": "And now?", "conversation": id,
                                 "max_output_tokens": 4});
    let second: Value = call(&gw, KEY, post.clone(), "/v1/responses", Some(ask))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second_items = format!(
        "/v1/responses/{}/input_items?order=asc",
        second["id"].as_str().expect("an id")
    );
    let given: Value = call(&gw, KEY, get.clone(), &second_items, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let given = given["data"].as_array().expect("data");
    assert_eq!(&given[..3], &data[..], "{given:?}");
    assert_eq!(given[3]["content"][0]["text"], "And now?");
    assert_eq!(given.len(), 4);
    let r = call(&gw, OTHER, reqwest::Method::DELETE, &path, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The operator sees what each tenant stores, and deletes all of one tenant's.
    let admin = |method: reqwest::Method, path: &str| {
        c.request(method, gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let stored: Value = admin(get.clone(), "/admin/stored")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let demo = &stored["tenants"][0];
    assert_eq!(
        (
            &demo["tenant"],
            &demo["answers"],
            &demo["conversations"],
            &demo["conversation_items"]
        ),
        (
            &Value::from("demo"),
            &Value::from(2),
            &Value::from(1),
            &Value::from(5)
        ),
        "{stored}"
    );
    let r = admin(reqwest::Method::DELETE, "/admin/stored/demo")
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["deleted"],
        serde_json::json!({"answers": 2, "conversations": 1}),
        "{v}"
    );
    let r = call(&gw, KEY, get.clone(), &path, None).await.unwrap();
    assert_eq!(r.status(), 404);
    let r = call(&gw, KEY, reqwest::Method::DELETE, &path, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let stored: Value = admin(get, "/admin/stored")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["tenants"], serde_json::json!([]), "{stored}");
    let _ = std::fs::remove_dir_all(&dir);
}
