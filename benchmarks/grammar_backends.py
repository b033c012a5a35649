#!/usr/bin/env python3
"""llguidance vs xgrammar on this machine, with the default model's own tokenizer.

Measures, for each grammar library, what constrained decoding costs shoal:
- tokenizer init: building the library's view of the vocabulary (once per model load);
- compile: a 50-property nested JSON schema to a ready matcher, cold (no cache), and the first
  token mask after it (llguidance builds its lexer lazily, so part of its work moves there);
- mask time per token: filling the allowed-token bitmask at every step of realistic
  generations (valid instances of the schema, tokenized as the model would write them),
  then advancing the matcher with the token; P50/P99 over all steps.

Both run single-threaded on the calling thread (as shoal's mask worker does).

    python benchmarks/grammar_backends.py [--model PATH] [--instances 8] [--repeats 5]

xgrammar is installed without its declared triton/transformers dependencies (pip install
--no-deps xgrammar apache-tvm-ffi): triton serves its GPU kernels only, and the vocabulary is
handed to it directly here.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable

WORDS = ["amber", "harbour", "violet", "granite", "meadow", "lantern", "copper", "orchid",
         "falcon", "tundra", "saffron", "willow", "quartz", "ember", "cobalt", "juniper"]
COLOURS = ["red", "green", "blue", "cyan", "magenta", "yellow"]


# ---- the schema and its instances ------------------------------------------------------------
def _leaf(kind: int) -> dict:
    """One of six property shapes, in turn: the keywords schemas in the wild use most."""
    return [
        {"type": "string", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": 100000},
        {"type": "number", "minimum": -1000, "maximum": 1000},
        {"type": "boolean"},
        {"type": "string", "enum": COLOURS},
        {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
    ][kind % 6]


def nested_schema(num_properties: int = 50, per_object: int = 10) -> dict:
    """`num_properties` leaf properties spread over nested objects of `per_object` each:
    group_i holds its leaves and group_{i+1}, so the schema is as deep as it has groups."""
    groups = [list(range(start, min(start + per_object, num_properties)))
              for start in range(0, num_properties, per_object)]
    inner: dict | None = None
    for index in reversed(range(len(groups))):
        props = {f"field_{k}": _leaf(k) for k in groups[index]}
        if inner is not None:
            props[f"group_{index + 1}"] = inner
        inner = {"type": "object", "properties": props, "required": list(props),
                 "additionalProperties": False}
    assert inner is not None
    return {"title": "Nested", **inner}


def instance_of(schema: dict, rng: random.Random) -> object:
    """A valid value of a schema built by nested_schema (its keywords only)."""
    kind = schema.get("type")
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if kind == "object":
        return {name: instance_of(sub, rng) for name, sub in schema["properties"].items()}
    if kind == "array":
        return [instance_of(schema["items"], rng)
                for _ in range(rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3)))]
    if kind == "string":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        return text[:schema.get("maxLength", 40)].strip() or "x"
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 1000))
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", 0), schema.get("maximum", 1)), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    raise ValueError(f"no instances for {schema!r}")


# ---- the two libraries -----------------------------------------------------------------------
class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance

        from shoal.engine.structured.grammar import fill_bitmask

        self.llg = llguidance
        self.fill = fill_bitmask            # what the engine calls
        self.vocab_size = tokenizer.vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(),
                                                n_vocab=tokenizer.vocab_size,
                                                eos_token=sorted(tokenizer.eos_token_ids))

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher

    def fill_mask(self, matcher, bitmask) -> None:
        self.fill(matcher, bitmask, 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar

        self.xgr = xgrammar
        vocab = [""] * tokenizer.vocab_size
        for text, index in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            vocab[index] = text
        self.info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.BYTE_LEVEL,
                                           vocab_size=tokenizer.vocab_size,
                                           stop_token_ids=sorted(tokenizer.eos_token_ids))
        self.vocab_size = tokenizer.vocab_size

    def compile(self, schema: dict):
        # NOTE: a fresh compiler each time: its cache would otherwise answer the repeats.
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema))
        return self.xgr.GrammarMatcher(compiled)

    def fill_mask(self, matcher, bitmask) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


# ---- measurements ----------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))]


def timed(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def allowed(bitmask, token: int) -> bool:
    word = int(bitmask[0, token // 32]) & 0xFFFFFFFF
    return bool((word >> (token % 32)) & 1)


def measure(backend_cls, tokenizer, schema: dict, docs: list[list[int]], repeats: int) -> dict:
    import torch

    inits = []
    backend = None
    for _ in range(repeats):
        seconds, backend = timed(backend_cls, tokenizer)
        inits.append(seconds)
    bitmask = torch.zeros((1, (tokenizer.vocab_size + 31) // 32), dtype=torch.int32)
    compiles, first_masks = [], []
    for _ in range(repeats):
        seconds, matcher = timed(backend.compile, schema)
        compiles.append(seconds)
        seconds, _ = timed(backend.fill_mask, matcher, bitmask)
        first_masks.append(seconds)
    masks: list[float] = []
    accepts: list[float] = []
    for doc in docs:
        matcher = backend.compile(schema)
        for token in doc:
            seconds, _ = timed(backend.fill_mask, matcher, bitmask)
            masks.append(seconds)
            if not allowed(bitmask, token):
                raise RuntimeError(f"{backend.name}: the mask refused token {token} of a valid document")
            seconds, ok = timed(backend.accept, matcher, token)
            accepts.append(seconds)
            if not ok:
                raise RuntimeError(f"{backend.name}: token {token} of a valid document not accepted")
    return {"backend": backend.name, "tokenizer_init_s": statistics.median(inits),
            "compile_s": statistics.median(compiles), "first_mask_s": statistics.median(first_masks),
            "mask_p50_ms": pct(masks, 50) * 1e3, "mask_p99_ms": pct(masks, 99) * 1e3,
            "mask_mean_ms": statistics.fmean(masks) * 1e3, "mask_max_ms": max(masks) * 1e3,
            "accept_p50_ms": pct(accepts, 50) * 1e3, "steps": len(masks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: shoal's default model)")
    parser.add_argument("--instances", type=int, default=8, help="documents generated per backend")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of init and compile (median)")
    parser.add_argument("--properties", type=int, default=50)
    args = parser.parse_args()

    import torch

    from shoal.model.default_model import default_model_path
    from shoal.model.loader import open_model
    from shoal.text.tokenizer import Tokenizer

    torch.set_num_threads(1)
    path = args.model or str(default_model_path())
    source = open_model(path)
    tokenizer = Tokenizer.from_gguf_metadata(source.metadata, path)
    schema = nested_schema(args.properties)
    rng = random.Random(0)
    docs = [tokenizer.encode(json.dumps(instance_of(schema, rng), ensure_ascii=False),
                             add_special_tokens=False) for _ in range(args.instances)]
    print("command:", " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    print(f"model: {path}  vocab: {tokenizer.vocab_size}  schema: {args.properties} properties, "
          f"{len(json.dumps(schema))} bytes  steps: {sum(map(len, docs))} over {len(docs)} documents")
    rows = [measure(cls, tokenizer, schema, docs, args.repeats) for cls in (Llguidance, Xgrammar)]
    header = (f"{'backend':<11} {'tok init':>9} {'compile':>9} {'1st mask':>9} {'mask P50':>9} "
              f"{'mask P99':>9} {'mask mean':>9} {'mask max':>9} {'accept P50':>10}")
    print(header)
    for r in rows:
        print(f"{r['backend']:<11} {r['tokenizer_init_s'] * 1e3:7.1f}ms {r['compile_s'] * 1e3:7.2f}ms "
              f"{r['first_mask_s'] * 1e3:7.2f}ms {r['mask_p50_ms']:7.3f}ms {r['mask_p99_ms']:7.3f}ms "
              f"{r['mask_mean_ms']:7.3f}ms {r['mask_max_ms']:7.3f}ms {r['accept_p50_ms']:8.3f}ms")


if __name__ == "__main__":
    main()
