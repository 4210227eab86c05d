"""Runs an agent's tool loop and structured output through a Meridian
gateway with the official OpenAI Python SDK, unchanged but for its base URL
and key (OPENAI_BASE_URL, OPENAI_API_KEY), against the model MODEL; checks
every tool call's arguments and every structured answer against their JSON
schemas with `jsonschema`, and prints one JSON object with what it saw. Run
by tests/tests/passthrough.rs."""

import json
import os

import jsonschema
import pydantic
from openai import OpenAI

client = OpenAI(max_retries=0)
model = os.environ["MODEL"]
seen = {}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string"}, "offset_hours": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["tz", "offset_hours"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
tools = [
    {"type": "function", "function": {"name": name, "description": name, "parameters": schema, "strict": True}}
    for name, schema in SCHEMAS.items()
]
question = [{"role": "user", "content": "What is the weather and the time in Oslo?"}]


def check_calls(calls):
    """Each call names an offered tool and has arguments valid against it."""
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    return [call["name"] for call in calls]


# 1. Not streamed: the model calls both tools at once.
first = client.chat.completions.create(model=model, messages=question, tools=tools, seed=5)
message = first.choices[0].message
calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
seen["call"] = {
    "finish_reason": first.choices[0].finish_reason,
    "content": message.content,
    "names": check_calls(calls),
    "ids_unique": len({c["id"] for c in calls}) == len(calls),
}

# The tool results go back with the assistant's calls; the model answers.
follow_up = question + [message.model_dump(exclude_none=True)] + [
    {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"ok": c["name"]})} for c in calls
]
final = client.chat.completions.create(model=model, messages=follow_up, tools=tools, seed=5)
seen["answer"] = {
    "finish_reason": final.choices[0].finish_reason,
    "has_text": bool(final.choices[0].message.content),
    "tool_calls": final.choices[0].message.tool_calls,
}

# 2. Streamed: the calls arrive as indexed fragments, joined here as an
# agent framework joins them.
joined, finish = {}, None
for chunk in client.chat.completions.create(model=model, messages=question, tools=tools, seed=5, stream=True):
    if not chunk.choices:
        continue
    choice = chunk.choices[0]
    for fragment in choice.delta.tool_calls or []:
        call = joined.setdefault(fragment.index, {"id": None, "name": "", "arguments": ""})
        if fragment.id:
            call["id"] = fragment.id
        if fragment.function and fragment.function.name:
            call["name"] += fragment.function.name
        if fragment.function and fragment.function.arguments:
            call["arguments"] += fragment.function.arguments
    finish = choice.finish_reason or finish
streamed = [joined[i] for i in sorted(joined)]
seen["stream"] = {"finish_reason": finish, "names": check_calls(streamed), "same_as_whole": streamed == calls}

# The SDK's own stream helper accumulates the same calls.
with client.chat.completions.stream(model=model, messages=question, tools=tools, seed=5) as stream:
    helper = stream.get_final_completion()
seen["stream_helper"] = [c.function.name for c in helper.choices[0].message.tool_calls]

# 3. Structured output: a JSON schema, and the SDK's pydantic parse helper.
PLAN = {
    "type": "object",
    "properties": {
        "steps": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
    },
    "required": ["steps", "days"],
    "additionalProperties": False,
}
structured = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Plan a trip."}],
    response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN, "strict": True}},
    seed=5,
)
document = json.loads(structured.choices[0].message.content)
jsonschema.validate(document, PLAN)
seen["structured"] = document


class Trip(pydantic.BaseModel):
    destination: str
    nights: int


parsed = client.chat.completions.parse(
    model=model, messages=[{"role": "user", "content": "Pick a trip."}], response_format=Trip, seed=5
)
seen["parsed"] = parsed.choices[0].message.parsed.model_dump()

print(json.dumps(seen, default=str))
