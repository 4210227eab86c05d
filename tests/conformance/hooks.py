"""Schemathesis hooks for Meridian's OpenAI conformance run.

Loaded by `schemathesis run` through SCHEMATHESIS_HOOKS (tests/tests/conformance.rs
sets it). They narrow OpenAI's description, in memory, to the operations listed in
operations.txt; pin every model-id schema to the models the deployment lists at
GET /v1/models, since the description's ids are OpenAI's own and Meridian serves
others; send the API key; and count, per operation, the cases sent, the cases that
failed a check, and the valid cases Meridian refused, so refusals are never silent.

Environment:
  CONFORMANCE_BASE_URL    the deployment's OpenAI base URL, e.g. http://127.0.0.1:8080/v1
  CONFORMANCE_API_KEY     bearer key sent with every request (optional)
  CONFORMANCE_OPERATIONS  operation list (default: operations.txt beside this file)
  CONFORMANCE_SUMMARY     where the per-operation counts are written as JSON
"""

import atexit
import collections
import json
import os
import re
import threading
from urllib.parse import urlparse

import jsonschema
import requests
import schemathesis
from schemathesis.generation import GenerationMode
from schemathesis.generation.meta import REQUEST_SHAPE_PROBES

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_URL = os.environ["CONFORMANCE_BASE_URL"].rstrip("/")
API_KEY = os.environ.get("CONFORMANCE_API_KEY")
OPERATIONS = os.environ.get("CONFORMANCE_OPERATIONS", os.path.join(HERE, "operations.txt"))
SUMMARY = os.environ.get("CONFORMANCE_SUMMARY")

# Which served models each model-id schema of the description is pinned to:
# "chat" (chat and text completions), "embedding", "moderation", or "all". A request-body
# property named `model` that none of these covers stops the run (see
# `unpinned_models`), so a new operation cannot test OpenAI's ids by mistake.
PINNED_SCHEMAS = {
    "ModelIdsShared": "chat",
    "ModelIdsResponses": "chat",
}
PINNED_PROPERTIES = {
    ("CreateCompletionRequest", "model"): "chat",
    ("CreateEmbeddingRequest", "model"): "embedding",
    ("CreateModerationRequest", "model"): "moderation",
}
# `model` properties left as the description has them, with why.
FREE_PROPERTIES = {
    # Chat's moderated completions name a moderation model; Meridian serves
    # none, so no listed id fits better than any string, and the run counts
    # how `moderation` is refused.
    ("ModerationParam", "model"),
    # The Responses image-generation tool names an image model; Meridian
    # refuses the tool by its type (`tools[i].type`), whatever the model.
    ("ImageGenTool", "model"),
}
# Path parameters naming a model, e.g. GET /models/{model}.
PINNED_PATH_PARAMETERS = {"model": "all"}
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
# The flag of an operation in operations.txt that must serve every valid
# case: one it refuses fails the run (conformance.rs), instead of only
# being counted.
ACCEPTS_ALL = "accepts-all-valid"
MUST_ACCEPT = set()


def headers():
    """For the hooks' own requests; schemathesis' get theirs from `ApiKey`."""
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def read_operations():
    try:
        with open(OPERATIONS, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as e:
        raise SystemExit(f"conformance: cannot read the operation list {OPERATIONS}: {e}")
    operations = set()
    for line in filter(None, lines):
        method, path, *flags = line.split()
        if not path.startswith("/") or any(f != ACCEPTS_ALL for f in flags):
            raise SystemExit(f"conformance: {OPERATIONS}: `{line}` is not `METHOD /path [{ACCEPTS_ALL}]`")
        operations.add((method.lower(), path))
        if flags:
            MUST_ACCEPT.add(f"{method.upper()} {path}")
    if not operations:
        raise SystemExit(f"conformance: {OPERATIONS} lists no operation")
    return operations


def served_models():
    """The deployment's model ids, split by what they answer: a model that
    embeds a probe text is an embedding model, one that moderates it a
    moderation model; /v1/models does not say."""
    url = f"{BASE_URL}/models"
    response = requests.get(url, headers=headers(), timeout=30)
    if response.status_code != 200:
        raise SystemExit(f"conformance: GET {url} answered {response.status_code}: {response.text[:300]}")
    ids = sorted(m["id"] for m in response.json()["data"])

    def answering(path):
        return [
            model
            for model in ids
            if requests.post(
                f"{BASE_URL}/{path}",
                json={"model": model, "input": "conformance probe"},
                headers=headers(),
                timeout=30,
            ).status_code
            == 200
        ]

    embedding, moderation = answering("embeddings"), answering("moderations")
    chat = [m for m in ids if m not in embedding and m not in moderation]
    print(f"conformance: served model ids: chat {chat}, embedding {embedding}, moderation {moderation}", flush=True)
    return {"all": ids, "chat": chat, "embedding": embedding, "moderation": moderation}


def pinned(schema, kind, models):
    """`schema` narrowed to the served models of `kind`, its documentation kept."""
    ids = models[kind]
    if not ids:
        raise SystemExit(f"conformance: the deployment at {BASE_URL} lists no {kind} model ({models['all']})")
    keep = {k: v for k, v in schema.items() if k in ("description", "title")}
    return {**keep, "type": "string", "enum": list(ids)}


def request_schemas(raw, operations):
    """Names of the component schemas reachable from the served operations'
    request bodies, and the path to every `model` property met on the way,
    with the schema it names."""
    schemas = raw["components"]["schemas"]
    reached, models = set(), []

    def walk(node, where):
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in reached:
                reached.add(name)
                walk(schemas[name], name)
        properties = node.get("properties")
        if isinstance(properties, dict) and isinstance(properties.get("model"), dict):
            models.append((where, properties["model"]))
        for key, value in node.items():
            if key != "$ref":
                walk(value, f"{where}.{key}")

    for path, method in operations:
        walk(raw["paths"][path][method].get("requestBody", {}), f"{method.upper()} {path}")
    return reached, models


def pin_models(raw, served, models):
    schemas = raw["components"]["schemas"]
    reached, _ = request_schemas(raw, served)
    for name, kind in PINNED_SCHEMAS.items():
        if name not in schemas:
            raise SystemExit(f"conformance: the description has no schema {name} to pin")
        if name in reached:
            schemas[name] = pinned(schemas[name], kind, models)
    for (name, prop), kind in PINNED_PROPERTIES.items():
        props = schemas.get(name, {}).get("properties", {})
        if prop not in props:
            raise SystemExit(f"conformance: the description has no property {name}.{prop} to pin")
        if name in reached:
            props[prop] = pinned(props[prop], kind, models)
    for local, method in served:
        for parameter in raw["paths"][local][method].get("parameters", []):
            kind = PINNED_PATH_PARAMETERS.get(parameter.get("name"))
            if parameter.get("in") == "path" and kind:
                parameter["schema"] = pinned(parameter["schema"], kind, models)
    # Checked after pinning: a `model` left free would test OpenAI's ids.
    _, found = request_schemas(raw, served)
    left = [
        f"{where}.properties.model"
        for where, schema in found
        if "enum" not in resolve(schemas, schema) and (where, "model") not in FREE_PROPERTIES
    ]
    if left:
        raise SystemExit(
            "conformance: model ids not pinned to served models (add them to PINNED_* in hooks.py): "
            + ", ".join(left)
        )


def resolve(schemas, schema):
    ref = schema.get("$ref", "")
    return schemas[ref.rsplit("/", 1)[1]] if ref.startswith("#/components/schemas/") else schema


@schemathesis.hook
def before_load_schema(context, raw_schema):
    base_path = urlparse(raw_schema["servers"][0]["url"]).path.rstrip("/")
    wanted = read_operations()
    served = set()
    for method, path in wanted:
        if not path.startswith(base_path + "/"):
            raise SystemExit(f"conformance: `{method.upper()} {path}` is outside the description's base path {base_path}")
        local = path[len(base_path):]
        if method not in raw_schema["paths"].get(local, {}):
            raise SystemExit(f"conformance: the description has no operation `{method.upper()} {path}`")
        served.add((local, method))
    # Everything else goes, so schemathesis neither tests nor loads it.
    for local in list(raw_schema["paths"]):
        item = raw_schema["paths"][local]
        for method in [m for m in item if m in METHODS and (local, m) not in served]:
            del item[method]
        if not any(m in item for m in METHODS):
            del raw_schema["paths"][local]
    raw_schema.pop("webhooks", None)
    pin_models(raw_schema, served, served_models())
    error_response(raw_schema)
    errors_wrapped(raw_schema)
    stream_events_as_json(raw_schema)
    discriminators_by_value(raw_schema)


# The description's error object (ErrorResponse, its Error inlined), which
# `error_object_conformance` holds every error answer to; set when the
# description loads.
ERROR_RESPONSE = []


def error_response(raw):
    schemas = raw["components"]["schemas"]
    for name in ("ErrorResponse", "Error"):
        if name not in schemas:
            raise SystemExit(f"conformance: the description has no schema {name}")
    schema = {**schemas["ErrorResponse"], "properties": {"error": schemas["Error"]}}
    ERROR_RESPONSE.append(jsonschema.Draft202012Validator(schema))


def errors_wrapped(raw):
    """A few error responses of the description (the 404s of DELETE
    /responses/{id} and POST /responses/{id}/cancel) give the bare `Error`
    where every other one gives `ErrorResponse`, `{"error": Error}`. OpenAI's
    API answers every error wrapped, and the SDKs read `body["error"]`, so
    Meridian answers wrapped everywhere; the slip is said the same way as
    the rest here, and `error_object_conformance` checks the body."""
    for item in raw["paths"].values():
        for method in (m for m in item if m in METHODS):
            for status, response in item[method].get("responses", {}).items():
                media = response.get("content", {}).get("application/json", {})
                if str(status) >= "400" and media.get("schema", {}).get("$ref") == "#/components/schemas/Error":
                    media["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}


@schemathesis.check
def error_object_conformance(ctx, response, case):
    """Every error answer, whatever its status and whoever wrote it (gateway
    or region), is the description's error object: the description documents
    success statuses only, so `response_schema_conformance` never looks at
    errors, and typed clients parse them all the same."""
    if response.status_code < 400 or not ERROR_RESPONSE:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.content[:200]!r}")
    problem = jsonschema.exceptions.best_match(ERROR_RESPONSE[0].iter_errors(body))
    if problem is not None:
        raise AssertionError(
            f"a {response.status_code} whose body is not OpenAI's error object: {problem.message}; body {str(body)[:200]}"
        )
    return None


def discriminators_by_value(raw):
    """A `discriminator` without a `mapping` names, by OpenAPI's default, the
    schemas themselves: a tool call would have to say `"type":
    "ChatCompletionMessageToolCall"`. What the description means, and what
    OpenAI sends, is each alternative's own value of that property
    (`function`, `custom`), which its schema pins with a one-value enum.
    Said with an explicit mapping from those values; alternatives without
    such a value are left as they are."""
    schemas = raw.get("components", {}).get("schemas", {})

    def value(ref, prop):
        target = resolve(schemas, {"$ref": ref})
        pinned = target.get("properties", {}).get(prop, {})
        pinned = resolve(schemas, pinned)
        if "const" in pinned:
            return pinned["const"]
        enum = pinned.get("enum", [])
        return enum[0] if len(enum) == 1 else None

    def walk(node):
        if isinstance(node, dict):
            d = node.get("discriminator")
            alternatives = node.get("oneOf") or node.get("anyOf") or []
            if isinstance(d, dict) and "mapping" not in d and alternatives:
                refs = [a.get("$ref") for a in alternatives if isinstance(a, dict)]
                values = [value(r, d["propertyName"]) if r else None for r in refs]
                if all(values) and len(set(values)) == len(values):
                    d["mapping"] = dict(zip(values, refs))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(raw)


def stream_events_as_json(raw):
    """The description gives a `text/event-stream` response the schema of one
    event's JSON payload, as OpenAPI 3.0 tools read it; schemathesis applies a
    stream's schema to each parsed event (`{"data": ..., "event": ...}`), as
    OpenAPI 3.2 does, so every event would fail. Said in the 3.2 way instead:
    each event's `data` is that JSON, or the literal `[DONE]` that ends an
    OpenAI stream. The payload schema itself is unchanged."""
    for item in raw["paths"].values():
        for method in (m for m in item if m in METHODS):
            for response in item[method].get("responses", {}).values():
                media = response.get("content", {}).get("text/event-stream")
                if not media or "schema" not in media:
                    continue
                payload = media["schema"]
                media["schema"] = {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "anyOf": [
                                {"const": "[DONE]"},
                                {"contentMediaType": "application/json", "contentSchema": payload},
                            ]
                        }
                    },
                }


if API_KEY:

    @schemathesis.auth()
    class ApiKey:
        """The tenant key on every request, negative cases included: they test
        bodies and parameters, not authentication."""

        def get(self, case, context):
            return API_KEY

        def set(self, case, data, context):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


LOCK = threading.Lock()
CASES = collections.Counter()
FAILED = collections.defaultdict(set)
FAILURES = collections.defaultdict(dict)
REFUSED = collections.defaultdict(collections.Counter)
BASE_PATH = urlparse(BASE_URL).path.rstrip("/")


def label(case):
    # The operation's, not the case's: a probe with another method counts
    # toward the operation it probes.
    return f"{case.operation.method.upper()} {BASE_PATH}{case.operation.path}"


def is_valid(case):
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return False
    scenario = getattr(meta.phase.data, "scenario", None)
    return scenario not in REQUEST_SHAPE_PROBES


def reason(response):
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    # Positions and generated numbers would split one reason into many.
    message = re.sub(r" at line \d+ column \d+", "", str(message))
    message = re.sub(r"`-?\d+(\.\d+)?`", "`N`", message)
    message = re.sub(r"\d{4,}", "N", message)
    return f"{response.status_code} {message[:160]}"


@schemathesis.hook
def after_call(context, case, response):
    with LOCK:
        CASES[label(case)] += 1
        if is_valid(case) and 400 <= response.status_code < 500:
            REFUSED[label(case)][reason(response)] += 1


@schemathesis.hook
def filter_failure(context, failure, case, response):
    # Only watches: every failure is kept and reported by schemathesis.
    with LOCK:
        FAILED[label(case)].add(case.id)
        first_line = (failure.message.strip().splitlines() or [""])[0]
        FAILURES[label(case)].setdefault(f"{failure.title}: {first_line[:200]}", str(case.body)[:300])
    return True


@atexit.register
def summarize():
    with LOCK:
        operations = {}
        for op in sorted(CASES):
            operations[op] = {
                "must_accept": op in MUST_ACCEPT,
                "cases": CASES[op],
                "passed": CASES[op] - len(FAILED[op]),
                "refused_valid": sum(REFUSED[op].values()),
                "top_refusals": REFUSED[op].most_common(5),
                "failures": FAILURES[op],
            }
    print("conformance: per operation (cases, passed, valid cases refused)", flush=True)
    for op, s in operations.items():
        print(f"  {op}: {s['cases']} cases, {s['passed']} passed, {s['refused_valid']} valid refused", flush=True)
        for text, count in s["top_refusals"]:
            print(f"      {count:5} x {text}", flush=True)
        for failure, body in s["failures"].items():
            print(f"      failure: {failure}  (first with body {body[:120]})", flush=True)
    if SUMMARY:
        with open(SUMMARY, "w", encoding="utf-8") as f:
            json.dump(operations, f, indent=2)
