"""Speculative decoding: one greedy stream with a draft against the same model alone, in one process, as Markdown.

    .venv/bin/python bench/bench_speculative.py --draft HEAD_OR_MODEL [--model smollm2] [--draft-tokens 1 2]
        [--new-tokens 128] [--rounds 3] [--repetition-penalty 1.1]

Every round decodes each prompt alone and then with the draft at each --draft-tokens, interleaved, so the machine's
drift (large on shared 2-core machines) falls on both sides of a ratio alike. Decode tokens/s: completion tokens
after the first over decode time (the prompt is the same work either way), summed over the prompts of a round; the
speedup is the median over rounds of the round's ratio. Each draft's text must equal the plain text (greedy: the
target's own choice decides every token), or the run stops. The prompts are none of the training data's.
"""

from __future__ import annotations

import argparse
import statistics
import sys

PROMPTS = [
    "Give three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "What are the benefits of regular exercise?",
    "Describe how a bicycle works to a child.",
    "Write an email asking my manager for a day off next Friday.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "List five ways to save money on groceries.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", required=True, help="a draft head (pocketlm train-draft) or a smaller model")
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="the generation default (1 = off)")
    ap.add_argument("--quant", default="auto")
    args = ap.parse_args()

    import torch

    from pocketlm.engine.generate import encode_chat, generate
    from pocketlm.engine.params import SamplingParams
    from pocketlm.load import load, load_draft

    torch.set_num_threads(torch.get_num_threads())
    lm = load(args.model, quant=args.quant)
    draft = load_draft(args.draft, lm, quant=args.quant)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, repetition_penalty=args.repetition_penalty)
    prompts = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]

    def one_round(k: int | None) -> tuple[float, list[str], int, int, int]:
        """-> (decode tokens/s over the prompts, texts, tokens proposed, tokens kept, verify passes)"""
        tokens, seconds, texts, proposed, kept, checks = 0, 0.0, [], 0, 0, 0
        for ids in prompts:
            g = generate(lm, ids, params, draft=draft if k else None, draft_tokens=k or 1)
            texts.append(g.text())
            tokens += g.stats.completion_tokens - 1
            seconds += g.stats.decode_s
            proposed, kept, checks = proposed + g.stats.draft_tokens, kept + g.stats.draft_accepted, checks + g.stats.draft_checks
        return tokens / seconds, texts, proposed, kept, checks

    one_round(None)  # warm-up: kernels, caches, the draft's first pass
    ratios = {k: [] for k in args.draft_tokens}
    speeds = {k: [] for k in [None, *args.draft_tokens]}
    accepted = {}
    for r in range(args.rounds):
        plain, reference, *_ = one_round(None)
        speeds[None].append(plain)
        for k in args.draft_tokens:
            speed, texts, proposed, kept, checks = one_round(k)
            if texts != reference:
                bad = next(i for i, (a, b) in enumerate(zip(texts, reference)) if a != b)
                print(f"draft_tokens {k}: the text of prompt {bad} differs from the model's own", file=sys.stderr)
                return 1
            speeds[k].append(speed)
            ratios[k].append(speed / plain)
            accepted[k] = (proposed, kept, checks)
        print(f"round {r + 1}: plain {plain:.1f} tok/s, " + ", ".join(f"k={k} {ratios[k][-1]:.2f}x" for k in args.draft_tokens), file=sys.stderr)

    print(f"{lm.name} ({lm.meta.get('weights')}), draft {args.draft} ({draft.meta.get('weights')}), {len(PROMPTS)} prompts x "
          f"{args.new_tokens} tokens, greedy, repetition penalty {args.repetition_penalty}, {args.rounds} rounds\n")
    print("| draft tokens per check (at most) | decode tok/s (median) | accepted | tokens per target pass | speedup (median of rounds) |")
    print("|---|---|---|---|---|")
    print(f"| none | {statistics.median(speeds[None]):.1f} | | 1.00 | 1.00x |")
    for k in args.draft_tokens:
        proposed, kept, passes = accepted[k]
        print(f"| {k} | {statistics.median(speeds[k]):.1f} | {kept / proposed:.1%} | {(kept + passes) / passes:.2f} | "
              f"{statistics.median(ratios[k]):.2f}x |")
    print("\nEvery draft's text equal to the model's own: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
