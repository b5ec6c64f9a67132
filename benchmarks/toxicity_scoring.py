"""Offline toxicity scoring speed: 10,000 texts through the default scorer (alt-profanity-check).

    python benchmarks/toxicity_scoring.py [--texts 10000]
    python benchmarks/toxicity_scoring.py --smoke              # CI: 100 texts

Texts: the shipped corpus' completions and the challenge set's prompts, cycled to the count.
"""

import argparse
import itertools
import time
from importlib import resources

from calibfuse.data.datamodule import read_prompt_completions
from calibfuse.data.rows import EMBEDDED_CORPUS
from calibfuse.generate import read_prompts
from calibfuse.scoring.toxicity import build_scorer
from calibfuse.utils.run import quiet_libraries


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true", help="100 texts: checks the script runs")
    args = parser.parse_args()
    args.texts = 100 if args.smoke else args.texts
    challenge = str(resources.files("calibfuse") / "resources" / "challenge" / "prompts.jsonl")
    pool = [p.completion for p in read_prompt_completions(EMBEDDED_CORPUS)] + read_prompts(challenge)
    texts = list(itertools.islice(itertools.cycle(pool), args.texts))
    scorer = build_scorer("profanity_check")
    scorer.score(texts[:10])  # warm-up
    started = time.perf_counter()
    scores = scorer.score(texts)
    seconds = time.perf_counter() - started
    print(f"{len(scores)} texts scored by {scorer.name} in {seconds:.3f} s ({len(scores) / seconds:,.0f} texts/s)")


if __name__ == "__main__":
    main()
