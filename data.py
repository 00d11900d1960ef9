"""Data for every stage: caption files, manifests, images, the embedding cache, samplers, synthetic data.

Plain Python + numpy + PIL; no project imports, so each stage script reads data the same way.
Every reader names the file and line of bad input and what it expected; nothing is silently dropped.
"""
import json
import os


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and what was expected."""


def read_jsonl(path):
    """Yield (line_number, object) for each non-empty line of a JSONL file, with clear errors."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


# === captions and caption pairs (stage 1, c2c eval) ===


# === image-text manifests, images and transforms (stage 2, retrieval eval) ===


# === embedding cache (embed_captions.py writes, post_train.py reads) ===


# === samplers: deterministic, rank-split, resumable ===


# === synthetic image-caption data (the tiny pipeline) ===
