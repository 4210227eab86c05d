"""Talks to Meridian's simulator speaking Anthropic's Messages API
(`meridian sim --protocol anthropic`) with the official Anthropic Python SDK,
unchanged but for its base URL and key (ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY):
a plain message, a streamed one, and a tool_use answer whose input is checked
against the tool's schema with `jsonschema`. The SDK's own parser checks the
wire shapes; the script prints one JSON object with what it saw. Run by
tests/tests/anthropic.rs."""

import json

import anthropic
import jsonschema

client = anthropic.Anthropic(max_retries=0)
model = "sim"
seen = {}
question = [{"role": "user", "content": "Tell me about edge inference."}]

plain = client.messages.create(model=model, max_tokens=32, messages=question, system="Be brief.")
seen["plain"] = {
    "type": plain.content[0].type,
    "has_text": bool(plain.content[0].text),
    "stop_reason": plain.stop_reason,
    "input_tokens": plain.usage.input_tokens,
    "output_tokens": plain.usage.output_tokens,
}

with client.messages.stream(model=model, max_tokens=32, messages=question, system="Be brief.") as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
seen["stream"] = {
    "same_as_plain": text == plain.content[0].text and final.content[0].text == text,
    "stop_reason": final.stop_reason,
    "output_tokens": final.usage.output_tokens,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
tools = [{"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER}]
ask = [{"role": "user", "content": "Weather in Oslo?"}]
called = client.messages.create(model=model, max_tokens=256, messages=ask, tools=tools)
uses = [b for b in called.content if b.type == "tool_use"]
for use in uses:
    jsonschema.validate(use.input, WEATHER)
with client.messages.stream(model=model, max_tokens=256, messages=ask, tools=tools) as stream:
    streamed = stream.get_final_message()
streamed_uses = [b for b in streamed.content if b.type == "tool_use"]
for use in streamed_uses:
    jsonschema.validate(use.input, WEATHER)
answered = client.messages.create(
    model=model,
    max_tokens=64,
    tools=tools,
    messages=ask
    + [
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "12 C"} for u in uses],
        },
    ],
)
seen["tools"] = {
    "stop_reason": called.stop_reason,
    "names": [u.name for u in uses],
    "streamed_stop_reason": streamed.stop_reason,
    "streamed_same": [u.input for u in streamed_uses] == [u.input for u in uses],
    "answer_stop_reason": answered.stop_reason,
    "answer_types": [b.type for b in answered.content],
}
print(json.dumps(seen))
