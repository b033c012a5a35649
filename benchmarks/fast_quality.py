#!/usr/bin/env python3
"""How closely fast mode (int8) follows exact mode (float32) on the same model.

Teacher-forced on a fixed text and on exact mode's own chat answers, through each mode's
serving path (fast: int8 fused ops and a bfloat16 KV cache; exact: float32 throughout):
perplexity of each mode, top-1 agreement, and mean KL(exact || fast) per position; plus
greedy chat answers that come out identical.

    python benchmarks/fast_quality.py
"""
from __future__ import annotations

import torch

from shoal import LLM, SamplingParams
from shoal.engine.model_runner import DirectWork, TokenSequence

TEXT = ("The harbour had been busy since dawn. Fishing boats came in low in the water, and "
        "the gulls followed them, calling over the noise of the market. By noon the prices "
        "had fallen, and the traders began to pack their stalls. A child sat on the sea wall "
        "counting the boats that were still out, and the old harbourmaster watched the sky "
        "for the storm that the radio had promised. def mean(values):\n    return "
        "sum(values) / len(values)\n\nThe river runs south for two hundred kilometres before "
        "it reaches the coast, where it spreads into a wide delta of reeds and sandbanks.")
QUESTIONS = ["What is the capital of France?", "Name three rivers.", "Write a haiku about snow.",
             "Explain photosynthesis in one sentence.", "How do I reverse a list in Python?",
             "What is 12 times 12?", "Describe a cat.", "Why is the sky blue?"]


def logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits at every position, through the serving path.

    The prompt is prefilled in one chunk, then each following token is fed as a decode
    step, exactly as the engine runs a request (kernel attention, paged KV cache in its
    serving dtype, fused ops). Uses blocks 1.. of an idle engine's pool.
    """
    runner = llm.engine.runner
    llm.engine.scheduler.kv.reset_prefix_cache()
    bs = runner.block_size
    table = list(range(1, (len(ids) + bs - 1) // bs + 2))
    seq = TokenSequence(list(ids[:1]))
    rows = []
    for pos in range(len(ids)):
        seq.all_token_ids = list(ids[: pos + 1])
        out, _ = runner.execute([DirectWork(seq, 1, table, pos)])
        rows.append(out[0])
    return torch.stack(rows)


def compare(exact: torch.Tensor, fast: torch.Tensor, targets: list[int]) -> dict[str, float]:
    tgt = torch.tensor(targets)
    nll = {name: -l.log_softmax(-1).gather(1, tgt[:, None]).mean().item()
           for name, l in (("exact", exact), ("fast", fast))}
    kl = (exact.softmax(-1) * (exact.log_softmax(-1) - fast.log_softmax(-1))).sum(-1).mean().item()
    agree = (exact.argmax(-1) == fast.argmax(-1)).float().mean().item()
    return {"ppl_exact": float(torch.tensor(nll["exact"]).exp()),
            "ppl_fast": float(torch.tensor(nll["fast"]).exp()), "top1": agree, "kl": kl}


def main() -> int:
    exact = LLM(compute="exact")
    fast = LLM(compute="fast")
    ids = exact.tokenizer.encode(TEXT)
    text = compare(logits(exact, ids)[:-1], logits(fast, ids)[:-1], ids[1:])
    print(f"fixed text ({len(ids)} tokens): perplexity exact {text['ppl_exact']:.2f}, fast "
          f"{text['ppl_fast']:.2f}; top-1 agreement {text['top1']:.1%}; KL {text['kl']:.4f}")
    params = SamplingParams(temperature=0, max_tokens=48)
    same = agree_n = total = 0
    kls = []
    for question in QUESTIONS:
        chat = [{"role": "user", "content": question}]
        e = exact.chat(chat, params)[0]
        f = fast.chat(chat, params)[0]
        same += e.outputs[0].token_ids == f.outputs[0].token_ids
        seq = e.prompt_token_ids + e.outputs[0].token_ids
        n = len(e.prompt_token_ids)
        stats = compare(logits(exact, seq)[n - 1:-1], logits(fast, seq)[n - 1:-1], seq[n:])
        agree_n += stats["top1"] * (len(seq) - n)
        total += len(seq) - n
        kls.append(stats["kl"])
        print(f"  {question!r}: exact {e.text[:60]!r} | fast {f.text[:60]!r}")
    print(f"chat answers: {same}/{len(QUESTIONS)} greedy answers identical; teacher-forced on "
          f"exact's answers: top-1 agreement {agree_n / total:.1%}, mean KL {sum(kls) / len(kls):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
