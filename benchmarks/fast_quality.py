#!/usr/bin/env python3
"""How closely fast mode follows exact mode (float32) on the same model, per weight recipe.

Teacher-forced on a fixed text and on exact mode's own chat answers, through each mode's
serving path (fast: fused int8 ops and a bfloat16 KV cache; exact: float32 throughout):
perplexity of each mode, top-1 agreement, and mean KL(exact || fast) per position; plus
greedy 48-token chat answers that come out identical to exact mode's. Fast mode runs once
per weight recipe (SHOAL_FAST_WEIGHTS): `packed` (the GGUF's 4/8-bit blocks, int8
activations per 32-value block) and `int8` (SmoothQuant-calibrated int8 x int8).

    python benchmarks/fast_quality.py --recipes packed,int8
"""
from __future__ import annotations

import argparse

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


def compare(exact: torch.Tensor, fast: torch.Tensor, targets: list[int]) -> dict[str, float]:
    tgt = torch.tensor(targets)
    nll = {name: -l.log_softmax(-1).gather(1, tgt[:, None]).mean().item()
           for name, l in (("exact", exact), ("fast", fast))}
    kl = (exact.softmax(-1) * (exact.log_softmax(-1) - fast.log_softmax(-1))).sum(-1).mean().item()
    agree = (exact.argmax(-1) == fast.argmax(-1)).float().mean().item()
    return {"ppl_exact": float(torch.tensor(nll["exact"]).exp()),
            "ppl_fast": float(torch.tensor(nll["fast"]).exp()), "top1": agree, "kl": kl}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="packed,int8", help="fast-mode weight recipes to compare")
    args = parser.parse_args()
    exact = LLM(compute="exact")
    fasts = {r: LLM(compute="fast", fast_weights=r) for r in args.recipes.split(",") if r}
    ids = exact.tokenizer.encode(TEXT)
    exact_text = logits(exact, ids)[:-1]
    for name, fast in fasts.items():
        text = compare(exact_text, logits(fast, ids)[:-1], ids[1:])
        print(f"[{name}] fixed text ({len(ids)} tokens): perplexity exact {text['ppl_exact']:.2f}, "
              f"fast {text['ppl_fast']:.2f}; top-1 agreement {text['top1']:.1%}; KL {text['kl']:.4f}")
    params = SamplingParams(temperature=0, max_tokens=48)
    chats = [[{"role": "user", "content": question}] for question in QUESTIONS]
    # NOTE: all questions in one batch per model: both modes are batch-invariant, so each
    # answer is the one the question gets alone.
    exact_answers = exact.chat(chats, params)
    fast_answers = {name: fast.chat(chats, params) for name, fast in fasts.items()}
    same = dict.fromkeys(fasts, 0)
    agree_n = dict.fromkeys(fasts, 0.0)
    kls: dict[str, list[float]] = {name: [] for name in fasts}
    total = 0
    for i, question in enumerate(QUESTIONS):
        e = exact_answers[i]
        seq = e.prompt_token_ids + e.outputs[0].token_ids
        n = len(e.prompt_token_ids)
        total += len(seq) - n
        exact_logits = logits(exact, seq)[n - 1:-1]
        line = [f"  {question!r}: exact {e.text[:50]!r}"]
        for name, fast in fasts.items():
            f = fast_answers[name][i]
            identical = e.outputs[0].token_ids == f.outputs[0].token_ids
            same[name] += identical
            stats = compare(exact_logits, logits(fast, seq)[n - 1:-1], seq[n:])
            agree_n[name] += stats["top1"] * (len(seq) - n)
            kls[name].append(stats["kl"])
            line.append(f"{name} {'=' if identical else repr(f.text[:50])}")
        print(" | ".join(line), flush=True)
    for name in fasts:
        print(f"[{name}] chat answers: {same[name]}/{len(QUESTIONS)} greedy 48-token answers identical "
              f"to exact mode's; teacher-forced on exact's answers: top-1 agreement "
              f"{agree_n[name] / total:.1%}, mean KL {sum(kls[name]) / len(kls[name]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
