"""Streamed chat completions checked chunk by chunk against OpenAI's description.

schemathesis does not read server-sent events, so this reads them: for each
scenario it streams one chat completion from the deployment and validates
every `data:` event but `[DONE]` against CreateChatCompletionStreamResponse,
its references resolved inside the description. An event carrying `error`
(a stream cut after it started, as OpenAI's API sends one and its SDKs raise
it) is validated against ErrorResponse instead: the description's stream
schema does not speak of it. Prints one JSON object:
{scenario: {"chunks": n, "error_events": n, "usage_chunk": {...} | null,
"errors": [...]}}.

Usage: stream_check.py BASE_URL DESCRIPTION MODEL SLOW_MODEL
  (BASE_URL ends in /v1; SLOW_MODEL answers slower than a 500 ms deadline)
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


def validators(description_path):
    """For chunks, and for error events."""
    with open(description_path, encoding="utf-8") as f:
        description = read_nullable(yaml.safe_load(f))
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; the description's
    # `#/components/...` references resolve against the description itself.
    resource = referencing.Resource.from_contents(
        description, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource(DESCRIPTION_URI, resource)

    def of(name):
        if name not in description["components"]["schemas"]:
            raise SystemExit(f"stream_check: {description_path} has no schema {name}")
        schema = {"$ref": f"{DESCRIPTION_URI}#/components/schemas/{name}"}
        return jsonschema.Draft202012Validator(schema, registry=registry)

    return of(SCHEMA), of("ErrorResponse")


def events(response):
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield data


def check(base_url, checks, model, extra, headers):
    check_chunk, check_error = checks
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Name three rivers, one word each."}],
        "max_tokens": 24,
        "stream": True,
        **extra,
    }
    with requests.post(
        f"{base_url}/chat/completions", json=body, headers=headers, stream=True, timeout=60
    ) as response:
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            return {"chunks": 0, "error_events": 0, "usage_chunk": None,
                    "errors": [f"answered {response.status_code} {content_type}: {response.text[:300]}"]}
        chunks, error_events, errors, usage = 0, 0, [], None
        for data in events(response):
            chunks += 1
            try:
                chunk = json.loads(data)
            except ValueError as e:
                errors.append(f"chunk {chunks} is not JSON ({e}): {data[:200]}")
                continue
            is_error = isinstance(chunk, dict) and "error" in chunk
            error_events += is_error
            for error in (check_error if is_error else check_chunk).iter_errors(chunk):
                path = "/".join(str(p) for p in error.absolute_path) or "(root)"
                errors.append(f"chunk {chunks} at {path}: {error.message[:300]}")
            if not is_error and chunk.get("usage") is not None:
                usage = chunk
        return {"chunks": chunks, "error_events": error_events, "usage_chunk": usage, "errors": errors}


def main():
    base_url, description_path, model, slow_model = sys.argv[1].rstrip("/"), *sys.argv[2:5]
    checks = validators(description_path)
    scenarios = {
        "plain": (model, {}, {}),
        "include_usage": (model, {"stream_options": {"include_usage": True}}, {}),
        # Meridian's deadline cuts the stream after its first chunks.
        "cut": (slow_model, {}, {"x-meridian-timeout-ms": "500"}),
    }
    print(json.dumps({
        name: check(base_url, checks, model, extra, headers)
        for name, (model, extra, headers) in scenarios.items()
    }))


if __name__ == "__main__":
    main()
