"""Drives a Meridian gateway's Responses API (/v1/responses) with the official
OpenAI Python SDK, unchanged but for its base URL and key (OPENAI_BASE_URL,
OPENAI_API_KEY), against the model MODEL: plain and streamed responses, the
SDK's stream and parse helpers, a function tool round trip, structured
output, conversation state by previous_response_id, input items, retrieval,
deletion and the errors around them; conversations with their items, and
responses appended to them; background responses polled and cancelled. Each step records what it saw; a step
that fails unexpectedly records its error and the rest still run, so the test
shows every failure at once. Prints one JSON object. Run by
tests/tests/responses.rs."""

import json
import os
import time

import jsonschema
import openai
import pydantic
from openai import OpenAI

client = OpenAI(max_retries=0)
model = os.environ["MODEL"]
# A model that takes seconds per answer, for a background response to cancel.
slow_model = os.environ["SLOW_MODEL"]
seen = {}
# Responses made by one step and reused by later ones.
kept = {}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER, "strict": True}]
TRIP = {
    "type": "object",
    "properties": {"destination": {"type": "string"}, "nights": {"type": "integer", "minimum": 1}},
    "required": ["destination", "nights"],
    "additionalProperties": False,
}


class Trip(pydantic.BaseModel):
    destination: str
    nights: int = pydantic.Field(ge=1)


def valid(text, schema):
    """Whether text is JSON valid against schema; a bool, so the test can say which step broke."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (TypeError, ValueError, jsonschema.ValidationError):
        return False
    return True


def refusal(call):
    """What a request that must fail raised. Only API errors count as a
    refusal: a broken connection is a failure of the step."""
    try:
        call()
    except openai.APIStatusError as e:
        # The SDK unwraps {"error": {...}} into e.body.
        body = e.body if isinstance(e.body, dict) else {}
        return {"exception": type(e).__name__, "status_code": e.status_code, "param": body.get("param"), "code": body.get("code")}
    return {"exception": None}


def types_in_order(events):
    """Distinct event types in order of first appearance."""
    return list(dict.fromkeys(event.type for event in events))


def plain():
    r = client.responses.create(model=model, input="Say hello", instructions="Be brief.")
    u = r.usage
    return {
        "status": r.status,
        "object": r.object,
        "id_prefix_ok": r.id.startswith("resp_"),
        "output_text_nonempty": r.output_text != "",
        "output_types": [item.type for item in r.output],
        "usage_ok": u is not None
        and u.input_tokens > 0
        and u.output_tokens > 0
        and u.total_tokens == u.input_tokens + u.output_tokens,
        "instructions": r.instructions,
        "store": r.store,
    }


def streamed():
    events = list(client.responses.create(model=model, input="Say hello", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = [e.response for e in events if e.type == "response.completed"]
    final = completed[-1] if completed else None
    # The helper is how most users stream: it rebuilds the response from the
    # events and fails if they do not fit together.
    helper_text = ""
    with client.responses.stream(model=model, input="Say hello") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                helper_text += event.delta
        helper = stream.get_final_response()
    return {
        "types": types_in_order(events),
        "sequence_ok": [e.sequence_number for e in events] == list(range(len(events))),
        "text_nonempty": text != "",
        "text_matches": final is not None and text == final.output_text,
        "status": final.status if final else None,
        "id_prefix_ok": final is not None and final.id.startswith("resp_"),
        # Every lifecycle event describes the same response.
        "one_id": len({e.response.id for e in events if hasattr(e, "response")}) == 1,
        "helper_text_matches": helper_text != "" and helper.output_text == helper_text,
        "helper_status": helper.status,
    }


def tool_round_trip():
    first = client.responses.create(model=model, input="What is the weather in Oslo?", tools=tools)
    calls = [item for item in first.output if item.type == "function_call"]
    result = {
        "output_types": [item.type for item in first.output],
        "names": [call.name for call in calls],
        "arguments_valid": bool(calls) and all(valid(call.arguments, WEATHER) for call in calls),
        "call_ids_nonempty": bool(calls) and all(call.call_id for call in calls),
    }
    # The client holds no history: the server must find the calls by
    # previous_response_id to pair them with these results.
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": json.dumps({"temp": 7})} for c in calls]
    second = client.responses.create(model=model, input=outputs, tools=tools, previous_response_id=first.id)
    result["answer"] = {
        "output_types": [item.type for item in second.output],
        "output_text_nonempty": second.output_text != "",
        "previous_response_id_ok": second.previous_response_id == first.id,
    }
    return result


def streamed_tools():
    events = list(client.responses.create(model=model, input="What is the weather in Oslo?", tools=tools, stream=True))
    joined, done = {}, {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            joined[e.output_index] = joined.get(e.output_index, "") + e.delta
        elif e.type == "response.function_call_arguments.done":
            done[e.output_index] = e.arguments
    completed = [e.response for e in events if e.type == "response.completed"]
    output = completed[-1].output if completed else []
    whole = {i: item.arguments for i, item in enumerate(output) if item.type == "function_call"}
    return {
        "types": types_in_order(events),
        "sequence_ok": [e.sequence_number for e in events] == list(range(len(events))),
        "names": [item.name for item in output if item.type == "function_call"],
        "deltas_match": bool(whole) and joined == whole,
        "done_match": bool(whole) and done == whole,
        "arguments_valid": bool(whole) and all(valid(args, WEATHER) for args in whole.values()),
    }


def structured():
    text = {"format": {"type": "json_schema", "name": "trip", "schema": TRIP, "strict": True}}
    r = client.responses.create(model=model, input="Plan a trip", text=text)
    result = {"status": r.status, "valid": valid(r.output_text, TRIP)}
    # The parse helper derives the schema from the pydantic model and
    # validates the answer itself, raising if it does not fit.
    try:
        parsed = client.responses.parse(model=model, input="Plan a trip", text_format=Trip).output_parsed
        result["parsed_ok"] = (
            isinstance(parsed, Trip) and isinstance(parsed.destination, str) and isinstance(parsed.nights, int)
        )
    except (pydantic.ValidationError, ValueError) as e:
        result["parsed_ok"] = False
        result["parse_error"] = f"{type(e).__name__}: {e}"
    return result


def first_text(item):
    """The text of an input item's first content part, if it has one."""
    content = getattr(item, "content", None) or []
    return getattr(content[0], "text", None) if content else None


def chain():
    r1 = client.responses.create(model=model, input="My name is Ada.")
    r2 = client.responses.create(model=model, input="What is my name?", previous_response_id=r1.id)
    r3 = client.responses.create(model=model, input="And again?", previous_response_id=r2.id)
    kept.update(r1=r1, r2=r2)
    # .data, not iteration: a wrong has_more would make the SDK page forever.
    newest_first = client.responses.input_items.list(r3.id)
    oldest_first = client.responses.input_items.list(r3.id, order="asc")
    return {
        "ids_distinct": len({r1.id, r2.id, r3.id}) == 3,
        "r2_previous_ok": r2.previous_response_id == r1.id,
        "r3_previous_ok": r3.previous_response_id == r2.id,
        "output_text_nonempty": all(r.output_text != "" for r in (r1, r2, r3)),
        "input_items": [[item.type, getattr(item, "role", None)] for item in newest_first.data],
        "input_items_count": len(newest_first.data),
        "has_more": newest_first.has_more,
        "desc_first_text": first_text(newest_first.data[0]) if newest_first.data else None,
        "asc_first_text": first_text(oldest_first.data[0]) if oldest_first.data else None,
        "asc_is_reversed_desc": [i.id for i in oldest_first.data] == [i.id for i in reversed(newest_first.data)],
    }


def retrieve():
    r1 = kept["r1"]
    got = client.responses.retrieve(r1.id)
    return {"id_matches": got.id == r1.id, "status": got.status, "output_text_matches": got.output_text == r1.output_text}


def delete():
    r2 = kept["r2"]
    # The raw response shows what the server sent; parse() is what the plain
    # client.responses.delete() call returns.
    raw = client.responses.with_raw_response.delete(r2.id)
    try:
        body = json.loads(raw.text) if raw.text else None
    except ValueError:
        body = raw.text
    return {
        "status_code": raw.status_code,
        "body": body,
        "returned": repr(raw.parse()),
        "retrieve_after_delete": refusal(lambda: client.responses.retrieve(r2.id)),
        "delete_again": refusal(lambda: client.responses.delete(r2.id)),
        "continue_after_delete": refusal(lambda: client.responses.create(model=model, input="x", previous_response_id=r2.id)),
    }


def not_stored():
    r = client.responses.create(model=model, input="x", store=False)
    return {
        "store": r.store,
        "output_text_nonempty": r.output_text != "",
        "retrieve": refusal(lambda: client.responses.retrieve(r.id)),
        "continue": refusal(lambda: client.responses.create(model=model, input="x", previous_response_id=r.id)),
    }


def unknown_previous():
    return refusal(lambda: client.responses.create(model=model, input="x", previous_response_id="resp_doesnotexist"))


def conversations():
    conv = client.conversations.create(metadata={"topic": "trip"})
    r1 = client.responses.create(model=model, input="I want to see fjords.", conversation=conv.id)
    r2 = client.responses.create(model=model, input="Where should I go?", conversation={"id": conv.id})
    listed = client.conversations.items.list(conv.id, order="asc")
    items = listed.data
    first = items[0].id if items else None
    added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Thanks!"}])
    got = client.conversations.items.retrieve(first, conversation_id=conv.id) if first else None
    client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    after_delete = client.conversations.items.list(conv.id, order="asc").data
    updated = client.conversations.update(conv.id, metadata={"topic": "norway"})
    retrieved = client.conversations.retrieve(conv.id)
    deleted = client.conversations.delete(conv.id)
    return {
        "id_prefix_ok": conv.id.startswith("conv_"),
        "object": conv.object,
        "metadata": conv.metadata,
        "response_conversation": [getattr(r.conversation, "id", None) == conv.id for r in (r1, r2)],
        "second_input_tokens_larger": r2.usage.input_tokens > r1.usage.input_tokens,
        "items": [[i.type, getattr(i, "role", None)] for i in items],
        "first_text": first_text(items[0]) if items else None,
        "has_more": listed.has_more,
        "retrieved_item_matches": got is not None and got.id == first,
        "added": len(added.data),
        "count_after_delete": len(after_delete),
        "updated_metadata": updated.metadata,
        "retrieved_metadata": retrieved.metadata,
        "deleted": deleted.deleted,
        "retrieve_after_delete": refusal(lambda: client.conversations.retrieve(conv.id)),
        "respond_after_delete": refusal(lambda: client.responses.create(model=model, input="x", conversation=conv.id)),
    }


def background():
    r = client.responses.create(model=model, input="Write a haiku.", background=True)
    first = {"status": r.status, "background": r.background}
    # Polled as the SDK's users poll: the job runs without the client.
    deadline = time.time() + 30
    while r.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.1)
        r = client.responses.retrieve(r.id)
    follow = client.responses.create(model=model, input="Another one.", previous_response_id=r.id)
    # The slow model takes seconds per answer: cancelled while it runs.
    slow = client.responses.create(model=slow_model, input="A long story.", background=True, max_output_tokens=200)
    cancelled = client.responses.cancel(slow.id)
    later = client.responses.retrieve(slow.id)
    return {
        "first": first,
        "status": r.status,
        "output_text_nonempty": r.output_text != "",
        "usage_ok": r.usage is not None and r.usage.output_tokens > 0,
        "same_when_retrieved_again": client.responses.retrieve(r.id).output[0].id == r.output[0].id,
        "follow_input_tokens_larger": follow.usage.input_tokens > r.usage.input_tokens,
        "cancelled": cancelled.status,
        "cancelled_later": later.status,
        "cancel_foreground": refusal(lambda: client.responses.cancel(follow.id)),
    }


steps = {
    "plain": plain,
    "streamed": streamed,
    "tools": tool_round_trip,
    "streamed_tools": streamed_tools,
    "structured": structured,
    "chain": chain,
    "retrieve": retrieve,
    "delete": delete,
    "not_stored": not_stored,
    "unknown_previous": unknown_previous,
    "conversations": conversations,
    "background": background,
}
for name, step in steps.items():
    try:
        seen[name] = step()
    except Exception as e:
        seen[name] = {"error": f"{type(e).__name__}: {e}"}

print(json.dumps(seen, default=str))
