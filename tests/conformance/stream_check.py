"""Streamed chat completions checked chunk by chunk against OpenAI's description.

schemathesis does not read server-sent events, so this reads them: for each
scenario it streams one chat completion from the deployment and validates
every `data:` event but `[DONE]` against CreateChatCompletionStreamResponse,
its references resolved inside the description. Prints one JSON object:
{scenario: {"chunks": n, "usage_chunk": {...} | null, "errors": [...]}}.

Usage: stream_check.py BASE_URL DESCRIPTION MODEL  (BASE_URL ends in /v1)
"""

import json
import sys

import jsonschema
import referencing
import requests
import yaml

SCHEMA = "CreateChatCompletionStreamResponse"
DESCRIPTION_URI = "urn:openai-openapi"


def read_nullable(node):
    """`node` with OpenAPI 3.0's `nullable: true` read as "or null".

    The description is OpenAPI 3.1 yet still marks over a hundred schemas
    with 3.0's `nullable`, among them `finish_reason` of stream chunks, which
    OpenAI itself sends as null in every chunk but the last. Plain JSON Schema
    ignores the keyword; schemathesis, for the rest of the conformance run,
    reads it as allowing null. This check reads it the same way."""
    if isinstance(node, list):
        return [read_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: read_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


def validator(description_path):
    with open(description_path, encoding="utf-8") as f:
        description = read_nullable(yaml.safe_load(f))
    if SCHEMA not in description["components"]["schemas"]:
        raise SystemExit(f"stream_check: {description_path} has no schema {SCHEMA}")
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; the description's
    # `#/components/...` references resolve against the description itself.
    resource = referencing.Resource.from_contents(
        description, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource(DESCRIPTION_URI, resource)
    schema = {"$ref": f"{DESCRIPTION_URI}#/components/schemas/{SCHEMA}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def events(response):
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield data


def check(base_url, check_chunk, model, extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Name three rivers, one word each."}],
        "max_tokens": 24,
        "stream": True,
        **extra,
    }
    with requests.post(f"{base_url}/chat/completions", json=body, stream=True, timeout=60) as response:
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            return {"chunks": 0, "usage_chunk": None,
                    "errors": [f"answered {response.status_code} {content_type}: {response.text[:300]}"]}
        chunks, errors, usage = 0, [], None
        for data in events(response):
            chunks += 1
            try:
                chunk = json.loads(data)
            except ValueError as e:
                errors.append(f"chunk {chunks} is not JSON ({e}): {data[:200]}")
                continue
            for error in check_chunk.iter_errors(chunk):
                path = "/".join(str(p) for p in error.absolute_path) or "(root)"
                errors.append(f"chunk {chunks} at {path}: {error.message[:300]}")
            if chunk.get("usage") is not None:
                usage = chunk
        return {"chunks": chunks, "usage_chunk": usage, "errors": errors}


def main():
    base_url, description_path, model = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
    check_chunk = validator(description_path)
    scenarios = {
        "plain": {},
        "include_usage": {"stream_options": {"include_usage": True}},
    }
    print(json.dumps({name: check(base_url, check_chunk, model, extra) for name, extra in scenarios.items()}))


if __name__ == "__main__":
    main()
