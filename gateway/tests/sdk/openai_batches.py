"""The official OpenAI Python SDK's Files and Batches APIs (`client.files`,
`client.batches`) against tollgate.

Usage: python openai_batches.py BASE_URL KEY MODEL [engine ...]
Uploads a batch input file, runs a batch of chat and embeddings requests, reads its output
file, and checks each answer against the same request sent directly (greedy, so the same
words); lists, cancels (refused once ended) and deletes.
Exits non-zero (with a traceback) on any mismatch; prints "ok" at the end.
"""
import io
import json
import sys
import time

import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
engine = sys.argv[4:5] == ["engine"]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

questions = ["Say hello", "Name a color", "What is 2+2?"]
bodies = [
    {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0}
    for q in questions
]
lines = [
    {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
    for i, b in enumerate(bodies)
]
data = "\n".join(json.dumps(l) for l in lines).encode()
f = client.files.create(file=("questions.jsonl", io.BytesIO(data)), purpose="batch")
assert f.object == "file" and f.purpose == "batch" and f.bytes == len(data), f
assert f.filename == "questions.jsonl", f
assert client.files.retrieve(f.id).id == f.id
assert client.files.content(f.id).read() == data
try:
    # Kept two hours (SDKs from late 2025 on send `expires_after`).
    kept = client.files.create(
        file=("kept.jsonl", io.BytesIO(data)), purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert kept.expires_at - kept.created_at == 7200, kept
    client.files.delete(kept.id)
except TypeError:
    pass

b = client.batches.create(
    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
    metadata={"run": "sdk"},
)
assert b.object == "batch" and b.status == "validating" and b.metadata == {"run": "sdk"}, b
deadline = time.time() + 120
while b.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, b
    time.sleep(0.1)
    b = client.batches.retrieve(b.id)
assert b.status == "completed", b
assert b.request_counts.total == 3 and b.request_counts.completed == 3, b
assert b.error_file_id is None, b
out = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines()]
assert [o["custom_id"] for o in out] == ["q0", "q1", "q2"], out
for o, body in zip(out, bodies):
    assert o["response"]["status_code"] == 200 and o["error"] is None, o
    answer = o["response"]["body"]
    direct = client.chat.completions.create(**body)
    if engine:
        # Greedy: the batch gives the words a direct request gives.
        assert answer["choices"][0]["message"]["content"] == direct.choices[0].message.content, (answer, direct)
    assert answer["usage"]["prompt_tokens"] == direct.usage.prompt_tokens, (answer, direct)
assert b.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out), b

# Embeddings run as a batch too.
emb = [{"custom_id": "e0", "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": "a text"}}]
ef = client.files.create(file=("e.jsonl", io.BytesIO(json.dumps(emb[0]).encode())), purpose="batch")
eb = client.batches.create(input_file_id=ef.id, endpoint="/v1/embeddings", completion_window="24h")
while eb.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, eb
    time.sleep(0.1)
    eb = client.batches.retrieve(eb.id)
assert eb.status == "completed" and eb.request_counts.completed == 1, eb
[e] = [json.loads(l) for l in client.files.content(eb.output_file_id).text.splitlines()]
direct = client.embeddings.create(model=model, input="a text", encoding_format="float")
assert e["custom_id"] == "e0", e
assert e["response"]["body"]["data"][0]["embedding"] == direct.data[0].embedding
assert eb.usage.input_tokens == direct.usage.prompt_tokens, (eb, direct)

# The Responses API too: each answer a `response` object.
ask = {"model": model, "input": "Say hello", "max_output_tokens": 6, "temperature": 0, "store": False}
rl = {"custom_id": "p0", "method": "POST", "url": "/v1/responses", "body": ask}
rf = client.files.create(file=("r.jsonl", io.BytesIO(json.dumps(rl).encode())), purpose="batch")
rb = client.batches.create(input_file_id=rf.id, endpoint="/v1/responses", completion_window="24h")
while rb.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, rb
    time.sleep(0.1)
    rb = client.batches.retrieve(rb.id)
assert rb.status == "completed" and rb.request_counts.completed == 1, rb
[p] = [json.loads(l) for l in client.files.content(rb.output_file_id).text.splitlines()]
answer = p["response"]["body"]
assert answer["object"] == "response" and answer["status"] in ("completed", "incomplete"), answer
direct = client.responses.create(**ask)
if engine:
    text = "".join(c["text"] for o in answer["output"] for c in o["content"])
    assert text == direct.output_text, (answer, direct)
assert rb.usage.input_tokens == direct.usage.input_tokens, (rb, direct)
assert rb.usage.output_tokens == answer["usage"]["output_tokens"], rb

listed = [x.id for x in client.batches.list(limit=10)]
assert listed[:3] == [rb.id, eb.id, b.id], listed
try:
    client.batches.cancel(b.id)
    raise AssertionError("an ended batch was cancelled")
except openai.BadRequestError:
    pass
try:
    client.batches.retrieve("batch_nope")
    raise AssertionError("an unknown batch was found")
except openai.NotFoundError:
    pass
assert client.files.delete(f.id).deleted
ids = [x.id for x in client.files.list()]
assert f.id not in ids and b.output_file_id in ids, ids
print("ok")
