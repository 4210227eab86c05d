"""Moderates through a Meridian gateway with the official OpenAI Python SDK,
unchanged but for its base URL and key (OPENAI_BASE_URL, OPENAI_API_KEY):
`client.moderations.create` without a model (OpenAI's default), with a list
of texts, and with text and image parts, parsed into the SDK's own types.
Prints one JSON object with what it got. Run by tests/tests/moderations.rs."""

import json

from openai import OpenAI

client = OpenAI(max_retries=0)
one = client.moderations.create(input="I want to kill them.")
many = client.moderations.create(input=["a calm sentence", "you idiot"])
parts = client.moderations.create(
    model="omni-moderation-latest",
    input=[
        {"type": "text", "text": "a picture of a cat"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ],
)
print(json.dumps({
    "model": one.model,
    "id": one.id,
    "flagged": one.results[0].flagged,
    "violence": one.results[0].categories.violence,
    "violence_score": one.results[0].category_scores.violence,
    "many": [r.flagged for r in many.results],
    "harassment": many.results[1].categories.harassment,
    "applied_violence": parts.results[0].category_applied_input_types.violence,
    "applied_hate": parts.results[0].category_applied_input_types.hate,
}))
