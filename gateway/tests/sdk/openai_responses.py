"""The official OpenAI Python SDK's Responses API (`client.responses`) against tollgate.

Usage: python openai_responses.py BASE_URL KEY MODEL [engine OPEN_BRACKET_ID]
With `engine` (a real model behind the gateway), also checks log-probabilities,
structured output (a Pydantic model through `responses.parse`) and function calls, whole
and streamed; without, checks that they are refused (simulated workers).
Exits non-zero (with a traceback) on any mismatch; prints "ok" at the end.
"""
import json
import sys

import openai
import time

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
engine = sys.argv[4:5] == ["engine"]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

# The same greedy answer as the chat endpoint gives for the same turn.
chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6, temperature=0
)
r = client.responses.create(model=model, input="Say hello", max_output_tokens=6, temperature=0)
assert r.object == "response" and r.id.startswith("resp_"), r
assert r.output_text == chat.choices[0].message.content, (r.output_text, chat)
assert r.status in ("completed", "incomplete"), r
assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length"), r
if r.status == "incomplete":
    assert r.incomplete_details.reason == "max_output_tokens", r
assert r.usage.output_tokens == chat.usage.completion_tokens, r.usage
assert r.usage.input_tokens == chat.usage.prompt_tokens, r.usage
assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
assert r.max_output_tokens == 6 and r.temperature == 0, r
[msg] = r.output
hello = r
assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text", msg

# Instructions and items: the same turns as a system message and the chat's messages.
turns = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Again"},
]
chat = client.chat.completions.create(model=model, messages=turns, max_tokens=5, temperature=0)
r = client.responses.create(
    model=model,
    instructions="Answer in one word.",
    input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "user", "content": "Again"},
    ],
    max_output_tokens=5,
    temperature=0,
    metadata={"run": "sdk"},
)
assert r.output_text == chat.choices[0].message.content, (r.output_text, chat)
assert r.instructions == "Answer in one word." and r.metadata == {"run": "sdk"}, r

# Streamed: the SDK's typed events, in order, numbered, ending with the whole response.
events = list(client.responses.create(model=model, input="Say hello", max_output_tokens=6, temperature=0, stream=True))
kinds = [e.type for e in events]
assert kinds[:4] == [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
], kinds
assert kinds[-4:] == [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.incomplete" if hello.status == "incomplete" else "response.completed",
], kinds
assert [e.sequence_number for e in events] == list(range(len(events))), events
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
final = events[-1].response
assert text == hello.output_text == final.output_text, (text, hello.output_text, final.output_text)
assert final.usage.output_tokens == hello.usage.output_tokens, final.usage
# The SDK's stream helper reads the same events (its final response is that of a
# `response.completed` event: an answer cut by `max_output_tokens` ends `incomplete`).
with client.responses.stream(model=model, input="Say hello", max_output_tokens=6, temperature=0) as s:
    helped = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    assert helped == text
    if hello.status == "completed":
        assert s.get_final_response().output_text == text


def refused(**extra):
    """The BadRequestError's body for a response with `extra` options."""
    try:
        client.responses.create(**{"model": model, "input": "x", **extra})
    except openai.BadRequestError as e:
        return e.body
    raise AssertionError(f"expected BadRequestError for {extra}")


weather = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}

if engine:
    # Log-probabilities, in the SDK's types.
    r = client.responses.create(
        model=model,
        input="Say hello",
        max_output_tokens=6,
        temperature=0,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    lp = r.output[0].content[0].logprobs
    assert "".join(t.token for t in lp) == r.output_text, lp
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp), lp
    # Structured output: `responses.parse` with a Pydantic model.
    import pydantic

    class Cat(pydantic.BaseModel):
        name: str
        age: int = pydantic.Field(ge=0, le=30)

    p = client.responses.parse(
        model=model,
        input="Describe a cat as a JSON object with a name and an age.",
        max_output_tokens=80,
        temperature=0,
        text_format=Cat,
    )
    assert p.status == "completed" and isinstance(p.output_parsed, Cat), p
    print("responses structured output:", p.output_text)
    # Function calls: an item the SDK reads, then its output sent back as an item.
    ask = "What is the weather in Paris?"
    r = client.responses.create(
        model=model, input=ask, tools=[weather], tool_choice="required", max_output_tokens=60, temperature=0
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_"), r.output
    args = json.loads(calls[0].arguments)
    assert set(args) == {"city", "unit"}, args
    print("responses tool call:", calls[0].arguments)
    # Streamed: the call's item, its arguments in deltas, then done.
    events = list(
        client.responses.create(
            model=model, input=ask, tools=[weather], tool_choice="required", max_output_tokens=60, temperature=0,
            stream=True,
        )
    )
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added[0].type == "function_call" and added[0].name == "get_weather", added
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(pieces) == args, pieces
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done[0].arguments) == args, done
    assert events[-1].type == "response.completed", events[-1]
    r = client.responses.create(
        model=model,
        input=[
            {"role": "user", "content": ask},
            {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 18}'},
        ],
        tools=[weather],
        max_output_tokens=40,
        temperature=0,
    )
    assert r.output and r.usage.output_tokens > 0, r
    print("responses after the result:", r.output_text or r.output[0])
    assert "multipleOf" in refused(
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer", "multipleOf": 2}}}
    )["message"]
else:
    assert "JSON mode" in refused(text={"format": {"type": "json_object"}})["message"]
    assert refused(include=["message.output_text.logprobs"])["message"]

# Stored responses, where the gateway stores them (`[responses] store = true`): read
# back, continued with `previous_response_id`, deleted; elsewhere continuing is refused.
kept = client.responses.create(model=model, input="Say hello", max_output_tokens=6, temperature=0)
# Counted ahead: the input tokens the response took.
counted = client.responses.input_tokens.count(model=model, input="Say hello")
assert counted.input_tokens == kept.usage.input_tokens, (counted, kept.usage)
if kept.store:
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    more = client.responses.create(
        model=model, input="Again", previous_response_id=kept.id, max_output_tokens=6, temperature=0
    )
    assert more.previous_response_id == kept.id, more
    assert more.usage.input_tokens > kept.usage.input_tokens + kept.usage.output_tokens, (kept.usage, more.usage)
    # Its input items: the kept answer's input and output, then its own input; newest
    # first by default, and the SDK's pager walks them a page at a time.
    items = client.responses.input_items.list(more.id)
    assert [i.role for i in items.data] == ["user", "assistant", "user"], items
    assert items.data[0].content[0].text == "Again" and items.data[1].id == kept.output[0].id, items
    walked = [i.id for i in client.responses.input_items.list(more.id, limit=1, order="asc")]
    assert walked == [i.id for i in reversed(items.data)], walked
    # Item references: the kept answer's output stands in a new request's input (a copy).
    ref = client.responses.create(
        model=model,
        input=[{"type": "item_reference", "id": kept.output[0].id}, {"role": "user", "content": "Again"}],
        max_output_tokens=6,
        temperature=0,
    )
    refs = client.responses.input_items.list(ref.id, order="asc").data
    assert [i.role for i in refs] == ["assistant", "user"], refs
    assert refs[0].content[0].text == kept.output_text and refs[0].id != kept.output[0].id, refs
    assert refused(input=[{"type": "item_reference", "id": "msg_none"}])["code"] == "item_not_found"
    client.responses.delete(kept.id)
    try:
        client.responses.retrieve(kept.id)
        raise AssertionError("expected NotFoundError")
    except openai.NotFoundError:
        pass
    assert refused(previous_response_id="resp_123")["code"] == "previous_response_not_found"
    # Background: answered at once, polled to its end; cancelling a finished one answers it.
    bg = client.responses.create(model=model, input="Say hello", max_output_tokens=6, background=True)
    assert bg.background and bg.status in ("queued", "in_progress"), bg
    for _ in range(500):
        if bg.status not in ("queued", "in_progress"):
            break
        time.sleep(0.01)
        bg = client.responses.retrieve(bg.id)
    assert bg.status in ("completed", "incomplete") and bg.output_text, bg
    assert client.responses.cancel(bg.id).status == bg.status
    # Background and streamed: its events as any stream's, and followed again later.
    seen = list(
        client.responses.create(model=model, input="Say hello", max_output_tokens=6, background=True, stream=True)
    )
    assert seen[0].type == "response.created" and seen[0].response.background, seen[0]
    assert seen[-1].type in ("response.completed", "response.incomplete"), seen[-1]
    again = list(client.responses.retrieve(seen[0].response.id, stream=True, starting_after=1))
    assert [e.sequence_number for e in again] == [e.sequence_number for e in seen[2:]], again
    # Conversations: items in order; a response in one reads them first, then its input
    # and output are added to it.
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}], metadata={"topic": "names"}
    )
    assert conv.object == "conversation" and conv.metadata == {"topic": "names"}, conv
    said = client.responses.create(
        model=model, conversation=conv.id, input="What is my name?", max_output_tokens=6, temperature=0
    )
    assert said.conversation.id == conv.id, said
    alone = client.responses.create(model=model, input="What is my name?", max_output_tokens=6, temperature=0)
    assert said.usage.input_tokens > alone.usage.input_tokens, (said.usage, alone.usage)
    items = client.conversations.items.list(conv.id, order="asc")
    assert [i.role for i in items.data] == ["user", "user", "assistant"], items
    assert items.data[1].content[0].text == "What is my name?" and items.data[2].id == said.output[0].id, items
    added = client.conversations.items.create(conv.id, items=[{"role": "user", "content": "Thanks"}])
    thanks = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert thanks.content[0].text == "Thanks", thanks
    assert client.conversations.items.delete(thanks.id, conversation_id=conv.id).id == conv.id
    assert len(client.conversations.items.list(conv.id).data) == 3
    # The SDK's auto-pagination walks it a page at a time (`after` the last id), either way.
    for order in ("asc", "desc"):
        walked = [i.id for i in client.conversations.items.list(conv.id, order=order, limit=1)]
        want = [i.id for i in items.data]
        assert walked == (want if order == "asc" else want[::-1]), (order, walked)
    try:
        client.conversations.items.list(conv.id, after="msg_nonesuch")
        raise AssertionError("an unknown cursor was taken")
    except openai.BadRequestError as e:
        assert e.body["param"] == "after", e.body
    assert client.conversations.update(conv.id, metadata={"topic": "other"}).metadata == {"topic": "other"}
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "other"}
    assert refused(conversation=conv.id, previous_response_id=kept.id)["param"] == "conversation"
    print("conversation items:", [(i.role, i.content[0].text) for i in items.data])
    assert client.conversations.delete(conv.id).deleted
    try:
        client.conversations.retrieve(conv.id)
        raise AssertionError("expected NotFoundError")
    except openai.NotFoundError:
        pass
    assert client.responses.create(model=model, input="x", max_output_tokens=2, store=False).store is False
else:
    assert refused(previous_response_id="resp_123")["param"] == "previous_response_id"
    assert refused(conversation="conv_123")["param"] == "conversation"
    assert refused(background=True)["param"] == "background"

# Errors in the Responses API's own terms.
assert refused(max_output_tokens=0)["param"] == "max_output_tokens"
assert refused(tools=[{"type": "web_search"}])["param"] == "tools[0].type"
body = refused(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}])
assert body["param"] == "input[0].content[0]", body
try:
    client.responses.create(model="no-such-model", input="x")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print("ok")
