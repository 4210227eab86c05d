"""Runs chat, a streamed chat, a parallel tool loop, an image question and a
field Anthropic has no counterpart for through a Meridian gateway whose model
MODEL is served by an Anthropic-protocol upstream, with the official OpenAI
Python SDK unchanged but for its base URL and key (OPENAI_BASE_URL,
OPENAI_API_KEY). Prints one JSON object with what it saw. Run by
tests/tests/anthropic.rs."""

import json
import os

import jsonschema
import openai
from openai import OpenAI

client = OpenAI(max_retries=0)
model = os.environ["MODEL"]
seen = {}

question = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about edge inference."},
]
whole = client.chat.completions.create(model=model, messages=question, max_tokens=24)
stream = client.chat.completions.create(
    model=model,
    messages=question,
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
    extra_headers={"cache-control": "no-store"},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.completion_tokens
seen["chat"] = {
    "finish_reason": whole.choices[0].finish_reason,
    "has_text": bool(whole.choices[0].message.content),
    "prompt_tokens": whole.usage.prompt_tokens,
    "completion_tokens": whole.usage.completion_tokens,
    "stream_same": "".join(pieces) == whole.choices[0].message.content,
    "stream_finish": finish,
    "stream_usage": usage,
}

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
tools = [
    {"type": "function", "function": {"name": n, "description": n, "parameters": s}} for n, s in SCHEMAS.items()
]
ask = [{"role": "user", "content": "Weather and time in Oslo?"}]
first = client.chat.completions.create(model=model, messages=ask, tools=tools)
calls = first.choices[0].message.tool_calls or []
for c in calls:
    jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
streamed = client.chat.completions.create(
    model=model, messages=ask, tools=tools, stream=True, extra_headers={"cache-control": "no-store"}
)
fragments = {}
for chunk in streamed:
    for f in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        entry = fragments.setdefault(f.index, {"name": "", "arguments": ""})
        entry["name"] += (f.function.name or "") if f.function else ""
        entry["arguments"] += (f.function.arguments or "") if f.function else ""
answer = client.chat.completions.create(
    model=model,
    tools=tools,
    messages=ask
    + [first.choices[0].message.model_dump(exclude_none=True)]
    + [{"role": "tool", "tool_call_id": c.id, "content": "12 C"} for c in calls],
)
seen["tools"] = {
    "finish_reason": first.choices[0].finish_reason,
    "names": [c.function.name for c in calls],
    "stream_names": [fragments[i]["name"] for i in sorted(fragments)],
    "stream_arguments_same": [fragments[i]["arguments"] for i in sorted(fragments)]
    == [c.function.arguments for c in calls],
    "answer_finish": answer.choices[0].finish_reason,
    "answer_has_text": bool(answer.choices[0].message.content),
}

image = client.chat.completions.create(
    model=model,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these pictures?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        }
    ],
)
seen["image"] = {"has_text": bool(image.choices[0].message.content)}

try:
    client.chat.completions.create(model=model, messages=ask, logprobs=True)
    seen["refused"] = None
except openai.BadRequestError as e:
    seen["refused"] = {"status": e.status_code, "message": e.message}
print(json.dumps(seen))
