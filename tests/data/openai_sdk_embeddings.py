"""Asks a Meridian gateway for embeddings with the official OpenAI Python SDK,
unchanged but for its base URL and key (OPENAI_BASE_URL, OPENAI_API_KEY),
as an application would: `client.embeddings.create`, which asks for base64
by default and decodes it. Prints one JSON object with what it got. Run by
tests/tests/embeddings_upstream.rs."""

import json
import os

from openai import OpenAI

client = OpenAI(max_retries=0)
inputs = json.loads(os.environ["INPUTS"])
res = client.embeddings.create(model=os.environ["MODEL"], input=inputs)
one = client.embeddings.create(model=os.environ["MODEL"], input=inputs[0], encoding_format="float")
print(json.dumps({
    "model": res.model,
    "indexes": [d.index for d in res.data],
    "vectors": [d.embedding for d in res.data],
    "prompt_tokens": res.usage.prompt_tokens,
    "float_vector": one.data[0].embedding,
}))
