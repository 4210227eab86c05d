"""Drives a Meridian gateway with the official OpenAI Python SDK, unchanged
but for its base URL and key (OPENAI_BASE_URL, OPENAI_API_KEY), and prints
one JSON object with what it saw. Run by tests/tests/openai_sdk.rs."""

import json

import openai
from openai import OpenAI

client = OpenAI(max_retries=0)
seen = {"sdk_version": openai.__version__}
messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

chat = client.chat.completions.create(
    model="sim-fast",
    messages=messages,
    max_tokens=6,
    seed=3,
)
seen["chat"] = {
    "object": chat.object,
    "model": chat.model,
    "content": chat.choices[0].message.content,
    "finish_reason": chat.choices[0].finish_reason,
    "total_tokens": chat.usage.total_tokens,
}

deltas, usage = [], None
for chunk in client.chat.completions.create(
    model="sim-fast",
    messages=messages,
    max_tokens=6,
    seed=3,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        deltas.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.total_tokens
seen["stream"] = {"text": "".join(deltas), "total_tokens": usage}

# Typed clients generated from OpenAI's description need these keys present
# (null when empty); the Python SDK would accept their absence.
raw = client.chat.completions.with_raw_response.create(
    model="sim-fast", messages=messages, max_tokens=2
).http_response.json()
seen["required_keys"] = {
    "logprobs": "logprobs" in raw["choices"][0],
    "refusal": "refusal" in raw["choices"][0]["message"],
}

seen["models"] = sorted(m.id for m in client.models.list())
seen["retrieved"] = client.models.retrieve("sim-fast").id
try:
    client.models.retrieve("no-such-model")
    seen["retrieve_missing"] = None
except openai.NotFoundError as e:
    seen["retrieve_missing"] = e.status_code

emb = client.embeddings.create(model="all-minilm-l6-v2", input=["edge", "inference"])
seen["embeddings"] = {"count": len(emb.data), "dims": len(emb.data[0].embedding)}

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    seen["not_found"] = None
except openai.NotFoundError as e:
    seen["not_found"] = e.status_code
try:
    client.chat.completions.create(model="sim-fast", messages=[])
    seen["bad_request"] = None
except openai.BadRequestError as e:
    seen["bad_request"] = e.status_code

print(json.dumps(seen))
