#!/usr/bin/env python3
"""How closely fast mode follows exact mode (float32) on the same model, per weight recipe,
and optionally how closely llama.cpp follows it on the same GGUF.

Teacher-forced on a fixed text and on exact mode's own chat answers, through each mode's
serving path (fast: fused int8 ops and a bfloat16 KV cache; exact: float32 throughout):
perplexity of each mode, top-1 agreement, and mean KL(exact || fast) per position; plus
greedy 48-token chat answers that come out identical to exact mode's. Fast mode runs once
per weight recipe (SHOAL_FAST_WEIGHTS): `packed` (the GGUF's 4/8-bit blocks, int8
activations per 32-value block) and `int8` (SmoothQuant-calibrated int8 x int8).

With --llamacpp URL (a running llama-server on the same GGUF; never needed otherwise),
llama.cpp gets the same token ids (its /completion accepts them, so both tokenizers are out
of the comparison; the script also reports whether llama.cpp's own tokenizer agrees): greedy
answers (top_k 1, no prompt cache) and, teacher-forced, its top-N probabilities at every
position (`n_probs` with `n_predict: 1` on each growing prefix; raw softmax of the logits,
`post_sampling_probs: false`). llama.cpp returns only the top N, so KL is also given in a
form every column can be measured in: KL(exact || peer) over the peer's own top-N tokens
plus one bucket for all other tokens (exact's remaining mass vs the peer's remaining mass,
1 - sum of its top N). Merging tokens into one bucket can only lower KL (the log-sum
inequality), so this is a lower bound of the full KL; the shoal columns give both.

    python benchmarks/fast_quality.py --recipes packed,int8
    python benchmarks/fast_quality.py --recipes packed --llamacpp http://127.0.0.1:8081
"""
from __future__ import annotations

import argparse
import json
import math
import urllib.request
import statistics
from dataclasses import dataclass, field

import torch

from shoal import LLM, SamplingParams
from shoal.engine.model_runner import DirectWork

TEXT = ("The harbour had been busy since dawn. Fishing boats came in low in the water, and "
        "the gulls followed them, calling over the noise of the market. By noon the prices "
        "had fallen, and the traders began to pack their stalls. A child sat on the sea wall "
        "counting the boats that were still out, and the old harbourmaster watched the sky "
        "for the storm that the radio had promised. def mean(values):\n    return "
        "sum(values) / len(values)\n\nThe river runs south for two hundred kilometres before "
        "it reaches the coast, where it spreads into a wide delta of reeds and sandbanks.")
QUESTIONS = ["What is the capital of France?", "Name three rivers.", "Write a haiku about snow.",
             "Explain photosynthesis in one sentence.", "How do I reverse a list in Python?",
             "What is 12 times 12?", "Describe a cat.", "Why is the sky blue?",
             "Give me a tip for sleeping better.", "What does a compiler do?",
             "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
             "List the planets of the solar system.", "What is the boiling point of water?",
             "Suggest a name for a pet goldfish.", "How many legs does a spider have?",
             "Write one sentence about autumn.", "What is a prime number?",
             "Explain what a noun is.", "What should I pack for a beach trip?",
             "Summarise the plot of Cinderella.", "What is the largest ocean?",
             "How do bees make honey?", "Give an example of a renewable energy source."]
MAX_TOKENS = 48
# NOTE: the floor for the peer's "other" bucket: its float32 top-N logprobs may sum to a
# hair over 1, and log(0) has no value.
REST_FLOOR = 1e-12


class _Sequence:
    """What the runner reads of a request that wants every prompt position's logits."""

    def __init__(self, ids: list[int]) -> None:
        self.all_token_ids = self.prompt_token_ids = list(ids)
        self.skip_prefix_cache = True


def logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits at every position, through the serving path.

    The sequence is computed in one chunk with every position's logits (the path of
    prompt_logprobs: kernel attention over the paged KV cache in its serving dtype, fused
    ops). Both modes are batch- and chunk-invariant, so these are the logits each position
    gets when decoded one token at a time. Uses blocks 1.. of an idle engine's pool.
    """
    runner = llm.engine.runner
    llm.engine.scheduler.kv.reset_prefix_cache()
    bs = runner.block_size
    table = list(range(1, (len(ids) + bs - 1) // bs + 2))
    result = runner.execute_step([DirectWork(_Sequence(ids), len(ids), table, 0)])
    rows = [chunk for _, chunk in result.prompt_logits[0].logits()] if result.prompt_logits else []
    return torch.cat([*rows, result.logits[:1]])


def bucketed_kl(exact_logprobs: torch.Tensor, top_ids: list[int], top_logprobs: list[float]) -> float:
    """KL(exact || peer) over the peer's top-N tokens plus one bucket for every other token.

    exact_logprobs: exact's full log-distribution at one position; top_ids/top_logprobs: the
    peer's N most probable tokens and their (full-softmax) log-probabilities. Exact's mass
    outside those tokens is computed from its own logprobs (no cancellation); the peer's is
    1 - the sum of its top N, floored at REST_FLOOR.
    """
    p_log = exact_logprobs.double()
    ids = torch.tensor(top_ids, dtype=torch.long)
    q_log = torch.tensor(top_logprobs, dtype=torch.float64)
    p_top_log = p_log[ids]
    kl = (p_top_log.exp() * (p_top_log - q_log)).sum().item()
    outside = torch.ones_like(p_log, dtype=torch.bool)
    outside[ids] = False
    p_rest_log = torch.logsumexp(p_log[outside], 0).item() if outside.any() else -math.inf
    q_rest = max(1.0 - q_log.exp().sum().item(), REST_FLOOR)
    if p_rest_log > -math.inf:
        kl += math.exp(p_rest_log) * (p_rest_log - math.log(q_rest))
    return kl


def top_n(logits_row: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """A full-logit column's top N in the shape llama.cpp returns it (full-softmax logprobs)."""
    values, ids = logits_row.float().log_softmax(-1).topk(n)
    return ids.tolist(), values.tolist()


@dataclass
class Column:
    """One model's agreement with exact mode, summed over teacher-forced positions."""

    positions: int = 0
    top1: int = 0
    kl_full: float = 0.0          # only for columns with full logits
    kl_bucketed: float = 0.0
    nll: float = 0.0
    full_logits: bool = True
    per_position_kl: list[float] = field(default_factory=list)   # the bucketed KL, in order

    def add(self, exact: torch.Tensor, targets: list[int], *, full: torch.Tensor | None = None,
            tops: list[tuple[list[int], list[float]]] | None = None, n_probs: int) -> None:
        """Adds one sequence: exact's logits [T, V] and the peer's full logits or top-N lists."""
        exact_lp = exact.float().log_softmax(-1)
        if full is not None:
            full_lp = full.float().log_softmax(-1)
            kl = (exact_lp.exp() * (exact_lp - full_lp)).sum(-1)
            self.kl_full += kl.sum().item()
            self.nll -= full_lp.gather(1, torch.tensor(targets)[:, None]).sum().item()
            tops = [top_n(row, n_probs) for row in full]
        else:
            self.full_logits = False
            self.nll = math.nan
        assert tops is not None and len(tops) == len(targets) == len(exact)
        exact_top1 = exact_lp.argmax(-1).tolist()
        for row, (ids, lps), want in zip(exact_lp, tops, exact_top1):
            self.top1 += ids[max(range(len(ids)), key=lps.__getitem__)] == want
            self.per_position_kl.append(bucketed_kl(row, ids, lps))
            self.kl_bucketed += self.per_position_kl[-1]
        self.positions += len(targets)


class LlamaCpp:
    """The few llama-server /completion calls this benchmark needs, on token ids."""

    def __init__(self, url: str, n_probs: int, prefill: bool = False) -> None:
        self.url = url.rstrip("/")
        self.n_probs = n_probs
        self.prefill = prefill

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False,
                                        "parse_special": True})["tokens"]

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        body = {"prompt": prompt_ids, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True}
        out = self._post("/completion", body)
        return out["tokens"], out.get("stop_type", "")

    def teacher_forced(self, ids: list[int], start: int) -> list[tuple[list[int], list[float]]]:
        """Top-N (ids, logprobs) predicting ids[k] from ids[:k], for k in start..len(ids)-1.

        By default each prefix reuses the previous one's KV cache in one slot, so the prompt
        ids[:start] is prefilled in one batch and every later position is one decode step: the
        way llama.cpp computes the answer it generates (and ~10x faster than re-prefilling).
        llama.cpp is not batch-invariant (a position's log-probabilities differ by a few
        hundredths between its prefill and decode paths), so with prefill=True every prefix is
        prefilled afresh instead: each position as the last of a prompt.
        """
        tops = []
        for k in range(start, len(ids)):
            body = {"prompt": ids[:k], "n_predict": 1, "n_probs": self.n_probs, "temperature": 0,
                    "top_k": 1, "cache_prompt": not self.prefill, "id_slot": 0,
                    "post_sampling_probs": False}
            probs = self._post("/completion", body)["completion_probabilities"][0]["top_logprobs"]
            tops.append(([p["id"] for p in probs], [p["logprob"] for p in probs]))
        return tops


def strip_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """An answer's tokens without the end-of-sequence token(s) it stopped on: shoal keeps the
    EOS in its token ids, llama.cpp does not."""
    while tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="packed,int8",
                        help="fast-mode weight recipes to compare; RECIPE:DTYPE also sets the KV cache "
                             "dtype (e.g. packed:float32; default bfloat16)")
    parser.add_argument("--llamacpp", metavar="URL", default=None,
                        help="also measure a llama-server on the same GGUF (e.g. http://127.0.0.1:8081)")
    parser.add_argument("--llamacpp-prefill", action="store_true",
                        help="teacher-force llama.cpp by prefilling every prefix afresh (its prefill "
                             "path; slow) instead of decoding one position at a time (its decode path)")
    parser.add_argument("--n-probs", type=int, default=20,
                        help="top-N of the bucketed KL (and llama.cpp's n_probs)")
    args = parser.parse_args()
    exact = LLM(compute="exact")
    fasts = {}
    for spec in filter(None, args.recipes.split(",")):
        recipe, _, kv = spec.partition(":")       # e.g. packed:float32 = a float32 KV cache
        fasts[spec] = LLM(compute="fast", fast_weights=recipe, kv_cache_dtype=kv or "auto")
    peer = LlamaCpp(args.llamacpp, args.n_probs, args.llamacpp_prefill) if args.llamacpp else None
    names = [*fasts, *(["llama.cpp"] if peer else [])]
    eos = exact.tokenizer.eos_token_ids

    ids = exact.tokenizer.encode(TEXT)
    exact_text = logits(exact, ids)[:-1]
    text_cols = {name: Column() for name in names}
    for name, fast in fasts.items():
        text_cols[name].add(exact_text, ids[1:], full=logits(fast, ids)[:-1], n_probs=args.n_probs)
    if peer:
        if peer.tokenize(TEXT) != ids:
            print("note: llama.cpp tokenizes the fixed text differently; it is sent shoal's ids")
        text_cols["llama.cpp"].add(exact_text, ids[1:], tops=peer.teacher_forced(ids, 1),
                                   n_probs=args.n_probs)
    nll_exact = -exact_text.float().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    for name, col in text_cols.items():
        ppl = f"perplexity exact {math.exp(nll_exact):.2f}, {name} {math.exp(col.nll / col.positions):.2f}; " \
            if col.full_logits else ""
        full = f"KL {col.kl_full / col.positions:.4f}; " if col.full_logits else ""
        print(f"[{name}] fixed text ({len(ids)} tokens): {ppl}top-1 agreement {col.top1 / col.positions:.1%}; "
              f"{full}top-{args.n_probs}-bucketed KL {col.kl_bucketed / col.positions:.4f}")

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    chats = [[{"role": "user", "content": question}] for question in QUESTIONS]
    # NOTE: all questions in one batch per model: both modes are batch-invariant, so each
    # answer is the one the question gets alone.
    exact_answers = exact.chat(chats, params)
    fast_answers = {name: fast.chat(chats, params) for name, fast in fasts.items()}
    same = dict.fromkeys(names, 0)
    chat_cols = {name: Column() for name in names}
    same_tokenization = 0
    for i, question in enumerate(QUESTIONS):
        e = exact_answers[i]
        seq = e.prompt_token_ids + e.outputs[0].token_ids
        n = len(e.prompt_token_ids)
        exact_logits = logits(exact, seq)[n - 1:-1]
        want = strip_eos(e.outputs[0].token_ids, eos)
        line = [f"  {question!r}: exact {e.text[:50]!r}"]
        for name, fast in fasts.items():
            f = fast_answers[name][i]
            identical = strip_eos(f.outputs[0].token_ids, eos) == want
            same[name] += identical
            chat_cols[name].add(exact_logits, seq[n:], full=logits(fast, seq)[n - 1:-1], n_probs=args.n_probs)
            line.append(f"{name} {'=' if identical else repr(f.text[:50])}")
        if peer:
            same_tokenization += peer.tokenize(e.prompt) == e.prompt_token_ids
            tokens, _ = peer.greedy(e.prompt_token_ids, MAX_TOKENS)
            identical = strip_eos(tokens, eos) == want
            same["llama.cpp"] += identical
            chat_cols["llama.cpp"].add(exact_logits, seq[n:], tops=peer.teacher_forced(seq, n),
                                       n_probs=args.n_probs)
            line.append(f"llama.cpp {'=' if identical else repr(exact.tokenizer.decode(tokens)[:50])}")
        print(" | ".join(line), flush=True)
    if peer:
        print(f"llama.cpp's tokenizer gives shoal's prompt ids for {same_tokenization}/{len(QUESTIONS)} "
              f"chat prompts (it is sent shoal's ids either way)")

    print(f"\n| {len(QUESTIONS)} chat questions, {MAX_TOKENS} tokens | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rows = [
        ("greedy answers identical to exact", lambda c, n: f"{same[n]} / {len(QUESTIONS)}"),
        ("top-1 agreement, teacher-forced on exact's answers", lambda c, n: f"{c.top1 / c.positions:.1%}"),
        ("mean KL(exact ‖ ·) per position, full vocabulary",
         lambda c, n: f"{c.kl_full / c.positions:.4f}" if c.full_logits else "n/a"),
        (f"mean KL per position, top-{args.n_probs} + one bucket",
         lambda c, n: f"{c.kl_bucketed / c.positions:.4f}"),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(chat_cols[n], n) for n in names) + " |")
    # Is a column's bucketed KL really above or below the last one's? The mean per-position
    # difference with its standard error (positions taken as independent, which flatters it).
    last = names[-1]
    diffs = {n: [a - b for a, b in zip(chat_cols[n].per_position_kl, chat_cols[last].per_position_kl)]
             for n in names[:-1]}
    if diffs:
        print(f"| bucketed KL minus {last}'s, mean ± standard error | " + " | ".join(
            f"{statistics.fmean(d):+.4f} ± {statistics.stdev(d) / math.sqrt(len(d)):.4f}"
            for d in diffs.values()) + " | — |")
    t = text_cols
    print(f"| fixed {len(ids)}-token text: top-1 / top-{args.n_probs}-bucketed KL | "
          + " | ".join(f"{t[n].top1 / t[n].positions:.1%} / {t[n].kl_bucketed / t[n].positions:.4f}"
                       for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
