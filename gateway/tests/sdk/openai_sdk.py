"""The official OpenAI Python SDK against a running tollgate gateway.

Usage: python openai_sdk.py BASE_URL KEY MODEL [engine OPEN_BRACKET_ID]
With `engine` (a real model behind the gateway), also checks log-probabilities in both
endpoints, JSON mode, structured output (a Pydantic model through the SDK's `parse`)
and tool calls (several at once: `OPEN_BRACKET_ID`, the token `[`, is pushed up with
`logit_bias` so that the model opens the array of calls); without, checks that they are
refused (simulated workers).
Exits non-zero (with a traceback) on any mismatch; prints "ok" at the end.
"""
import json
import pathlib
import re
import sys

import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
engine = sys.argv[4:5] == ["engine"]
open_bracket = sys.argv[5] if len(sys.argv) > 5 else None
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

# Models.
ids = [m.id for m in client.models.list()]
assert model in ids, ids
assert client.models.retrieve(model).id == model
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

# A chat completion, with usage.
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6, temperature=0
)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant"
assert r.choices[0].message.content, r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0, r.usage
assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == 6)
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# A streamed chat with usage.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello"}],
    max_tokens=6,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            text += c.delta.content
        if c.finish_reason:
            finish = c.finish_reason
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
assert finish == r.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
assert usage.prompt_tokens == r.usage.prompt_tokens, usage

# Embeddings: the SDK asks for base64 and decodes it; floats when asked. One unit vector
# per input, the same input the same vector.
e = client.embeddings.create(model=model, input=["Say hello", "Something else", "Say hello"])
assert e.object == "list" and [d.index for d in e.data] == [0, 1, 2], e
vectors = [d.embedding for d in e.data]
assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vectors), [len(v) for v in vectors]
assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
assert e.usage.prompt_tokens > 0 and e.usage.total_tokens == e.usage.prompt_tokens, e.usage
floats = client.embeddings.create(model=model, input="Say hello", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[0])) < 1e-6
try:
    client.embeddings.create(model=model, input="x", dimensions=8)
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as err:
    assert err.body["param"] == "dimensions", err.body

# A legacy completion.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0)
assert c.choices[0].text and 0 < c.usage.completion_tokens <= 3, c


def hello(max_tokens=6, **extra):
    """A short greedy chat with `extra` options."""
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=max_tokens, temperature=0, **extra
    )


def refused(**extra):
    """The BadRequestError's body for a chat with `extra` options."""
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], **extra)
    except openai.BadRequestError as e:
        return e.body
    raise AssertionError(f"expected BadRequestError for {extra}")


# Several choices.
r = hello(n=2, seed=3)
assert [c.index for c in r.choices] == [0, 1], r
assert all(c.message.content for c in r.choices), r

# Penalties and logit bias are accepted (and applied by engines).
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello"}],
    max_tokens=4,
    temperature=0,
    presence_penalty=0.2,
    frequency_penalty=0.5,
    logit_bias={"0": -100},
)
assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0, r

# Log-probabilities: parsed by the SDK's own types.
if engine:
    r = hello(logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert "".join(t.token for t in items) == r.choices[0].message.content, items
    for t in items:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
        assert t.top_logprobs[0].token == t.token, t
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token, t
    stream = hello(logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in items]
    c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text, lp
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset), lp
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs), lp
    # best_of: three drawn, the most likely one returned, all three counted.
    b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=1, seed=5, best_of=3)
    assert len(b.choices) == 1 and b.choices[0].logprobs is None, b
    assert b.usage.completion_tokens >= 3, b.usage
    # Scoring, as evaluation harnesses do: prompts of text and of token ids in one
    # request, echoed with their tokens' log-probabilities (the first None), and one
    # generated token at the end of each list.
    scored = client.completions.create(
        model=model, prompt=["Once upon a time", [1, 2, 3]], max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    assert [c.index for c in scored.choices] == [0, 1], scored
    first = scored.choices[0]
    assert first.text.startswith("Once upon a time"), first
    assert first.logprobs.token_logprobs[0] is None and first.logprobs.top_logprobs[0] is None, first
    assert all(x <= 0 for x in first.logprobs.token_logprobs[1:]), first
    assert len(scored.choices[1].logprobs.tokens) == 4, scored.choices[1]
    assert scored.usage.completion_tokens == 2, scored.usage
    # JSON mode: one JSON object.
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop", r
    obj = json.loads(r.choices[0].message.content)
    assert isinstance(obj, dict), obj
    # Structured output: the SDK's own `parse` with a Pydantic model (it sends the model's
    # strict JSON schema and validates the answer against the model).
    import datetime
    from typing import Literal

    import pydantic

    class Cat(pydantic.BaseModel):
        name: str
        age: int = pydantic.Field(ge=0, le=30)  # minimum and maximum
        color: Literal["black", "white", "orange", "grey"]
        born: datetime.date  # a `format: date` string

    chat = client.beta.chat.completions if hasattr(client, "beta") and hasattr(client.beta, "chat") else client.chat.completions
    r = chat.parse(
        model=model,
        messages=[
            {"role": "user", "content": "Describe a cat as a JSON object with a name, an age, a color and a birth date."}
        ],
        max_tokens=120,
        temperature=0,
        response_format=Cat,
    )
    assert r.choices[0].finish_reason == "stop", r
    cat = r.choices[0].message.parsed
    assert isinstance(cat, Cat), r
    print("structured output:", r.choices[0].message.content)
    # Tool calling: a call whose arguments the SDK reads back; then the tool's result in
    # the conversation.
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model=model, messages=ask, tools=[weather], tool_choice="required", max_tokens=60, temperature=0
    )
    assert r.choices[0].finish_reason == "tool_calls", r
    call = r.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "unit"}, call
    print("tool call:", call.function.name, call.function.arguments)
    # Streamed: the name first, the arguments in pieces, as the SDK's chunk types read them.
    chunks = list(
        client.chat.completions.create(
            model=model, messages=ask, tools=[weather], tool_choice="required", max_tokens=60, temperature=0, stream=True
        )
    )
    deltas = [tc for ch in chunks for c in ch.choices if c.delta.tool_calls for tc in c.delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2, deltas
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == args, deltas
    assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]
    # Several calls in one answer (parallel tool calls): the SDK reads each, whole and
    # streamed (its deltas sorted by index). The cities are an enum, so that the pushed-up
    # `[` can only open the array of calls.
    cities = json.loads(json.dumps(weather))
    cities["function"]["parameters"]["properties"]["city"] = {"enum": ["Paris", "Oslo", "Rome"]}
    both = dict(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris and in Oslo?"}],
        tools=[cities],
        tool_choice="required",
        max_tokens=200,
        temperature=0,
        logit_bias={open_bracket: 30},
    )
    r2 = client.chat.completions.create(**both)
    calls = r2.choices[0].message.tool_calls
    assert r2.choices[0].finish_reason == "tool_calls" and len(calls) >= 2, r2
    assert len({c.id for c in calls}) == len(calls), calls
    for c in calls:
        assert c.function.name == "get_weather" and set(json.loads(c.function.arguments)) == {"city", "unit"}, c
    print("parallel tool calls:", [c.function.arguments for c in calls])
    streamed = {}
    for ch in client.chat.completions.create(**both, stream=True):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if tc.id:
                assert tc.index == len(streamed), tc
                streamed[tc.index] = [tc.function.name, ""]
            streamed[tc.index][1] += tc.function.arguments or ""
    assert [(n, json.loads(a)) for n, a in streamed.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ], streamed
    r = client.chat.completions.create(
        model=model,
        messages=ask
        + [
            r.choices[0].message,
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
        ],
        tools=[weather],
        max_tokens=60,
        temperature=0,
    )
    m = r.choices[0].message
    assert (m.tool_calls and r.choices[0].finish_reason == "tool_calls") or m.content is not None, r
    print("after the result:", m.content if m.content is not None else m.tool_calls[0].function.arguments)
    assert "multipleOf" in refused(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 2}},
        }
    )["message"]
    # Predicted outputs: the model copies a function, drafted from the prediction; the
    # same answer as without one, and the usage says how much of it was kept.
    code = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n"
    copy = [{"role": "user", "content": "Copy this code exactly:\n\n```python\n" + code + "```"}]
    plain = client.chat.completions.create(model=model, messages=copy, max_tokens=60, temperature=0)
    predicted = client.chat.completions.create(
        model=model,
        messages=copy,
        max_tokens=60,
        temperature=0,
        prediction={"type": "content", "content": "```python\n" + code + "```"},
    )
    assert predicted.choices[0].message.content == plain.choices[0].message.content, (plain, predicted)
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0, predicted.usage
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0, plain.usage
    print("prediction:", details.accepted_prediction_tokens, "kept,", details.rejected_prediction_tokens, "not")
    # vLLM's stop and length options (as load generators send them): a short answer run
    # to `max_tokens` past its end of sequence, and one held to `min_tokens`.
    short = hello(max_tokens=60)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 60, short
    long = hello(max_tokens=60, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 60, long
    assert long.choices[0].message.content.startswith(short.choices[0].message.content), long
    n = short.usage.completion_tokens + 5
    held = hello(max_tokens=60, extra_body={"min_tokens": n})
    assert held.usage.completion_tokens >= n, held.usage
    # vLLM's `min_p` and `repetition_penalty`: `min_p` 1 keeps only the most likely token,
    # so a hot sampled answer is the greedy one; a penalty on the prompt's tokens (the
    # code to copy) changes the answer.
    def copied(**extra):
        return client.chat.completions.create(model=model, messages=copy, max_tokens=30, **extra).choices[0].message.content

    greedy = copied(temperature=0)
    assert copied(temperature=1.5, seed=3, extra_body={"min_p": 1.0}) == greedy
    assert copied(temperature=0, extra_body={"repetition_penalty": 1.5}) != greedy
    # vLLM's `truncate_prompt_tokens`: the prompt's last 4 tokens only (cut at the gateway,
    # which tokenizes for an engine pool).
    words = "one two three four five six seven eight"
    cut = client.completions.create(model=model, prompt=words, max_tokens=3, temperature=0, extra_body={"truncate_prompt_tokens": 4})
    assert cut.usage.prompt_tokens == 4, cut.usage
    # vLLM's structured outputs: a classification held to its labels, a date to its shape.
    labels = ["positive", "negative", "neutral"]
    review = [{"role": "user", "content": "Is this review positive, negative or neutral? 'I loved every minute of it.'"}]
    label = client.chat.completions.create(model=model, messages=review, max_tokens=8, temperature=0, extra_body={"guided_choice": labels})
    assert label.choices[0].message.content in labels and label.choices[0].finish_reason == "stop", label
    when = [{"role": "user", "content": "On what date did Apollo 11 land on the Moon?"}]
    date = client.chat.completions.create(model=model, messages=when, max_tokens=16, temperature=0, extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.choices[0].message.content), date
    print("guided:", label.choices[0].message.content, date.choices[0].message.content)
    # vLLM's `guided_grammar` (its SQL example): a query of the grammar's, whole.
    sql = (pathlib.Path(__file__).resolve().parents[3] / "kernels/testdata/vllm_sql.gbnf").read_text()
    ask = [{"role": "user", "content": "Write an SQL query that selects col_1 from table_2 where col_2 is 1."}]
    query = client.chat.completions.create(model=model, messages=ask, max_tokens=32, temperature=0, extra_body={"guided_grammar": sql})
    said = query.choices[0].message.content
    assert re.fullmatch(r"SELECT col_[12]  from table_[12]  where col_[12] = [12] ", said), query
    assert query.choices[0].finish_reason == "stop", query
    print("grammar:", said)
    # vLLM's `prompt_logprobs`: each prompt token's id, rank and log-probability, with the
    # most likely at its place; the real model finds some of a familiar sentence's tokens
    # the most likely.
    scored = client.completions.create(model=model, prompt="The capital of France is Paris.", max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2})
    listed = scored.model_dump()["choices"][0]["prompt_logprobs"]
    assert listed[0] is None and len(listed) == scored.usage.prompt_tokens, listed
    ranks = [next(iter(e.values()))["rank"] for e in listed[1:]]
    assert all(r >= 1 for r in ranks) and 1 in ranks, ranks
    print("prompt ranks:", ranks)
    # vLLM's `continue_final_message`: the answer goes on from the assistant's own start.
    prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]
    cont = client.chat.completions.create(model=model, messages=prefill, max_tokens=8, temperature=0, extra_body={"continue_final_message": True, "add_generation_prompt": False})
    said = cont.choices[0].message.content
    assert said and not said.startswith("My favourite"), cont
    print("continued: My favourite colour is" + said)
    # vLLM's `bad_words`: the greedy answer's first word, banned, changes the answer.
    first = greedy.split()[0]
    assert copied(temperature=0, extra_body={"bad_words": [first]}) != greedy, first
else:
    assert "logprobs" in refused(logprobs=True)["message"]
    assert "JSON mode" in refused(response_format={"type": "json_object"})["message"]
    assert "regular expression" in refused(extra_body={"guided_regex": "a+"})["message"]

# Errors become the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
assert refused(temperature=9)["param"] == "temperature"
assert refused(prediction={"type": "text", "content": "x"})["param"] == "prediction"
assert refused(prediction={"type": "content", "content": [{"type": "image_url"}]})["param"] == "prediction.content[0]"
# vLLM's `ignore_eos` and `min_tokens` hold every worker's answers to their lengths.
r = hello(max_tokens=20, extra_body={"ignore_eos": True, "stop_token_ids": [2]})
assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length", r
assert hello(max_tokens=20, extra_body={"min_tokens": 14}).usage.completion_tokens >= 14
assert refused(max_tokens=4, extra_body={"min_tokens": 5})["param"] == "min_tokens"
assert refused(extra_body={"repetition_penalty": 0})["param"] == "repetition_penalty"
assert refused(extra_body={"min_p": 2})["param"] == "min_p"
assert refused(extra_body={"allowed_token_ids": []})["param"] == "allowed_token_ids"
# vLLM's `min_p` and `repetition_penalty` are taken by every worker.
assert hello(extra_body={"min_p": 0.1, "repetition_penalty": 1.2}).choices[0].message.content
# A prediction is taken by every worker (those that cannot draft from it answer the same).
r = hello(prediction={"type": "content", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]})
assert r.choices[0].message.content, r
try:
    openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError:
    pass

print("ok")
