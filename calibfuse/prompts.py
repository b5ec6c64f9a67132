"""Evaluation prompts in RealToxicityPrompts' schema: `{"prompt": {"text": ...}, "challenging": ...}`.

Sources (one `source` string, as in the `prompts` config group):
- `embedded:challenge`: the challenge set shipped in calibfuse/resources/challenge/ (200 prompts);
- a local .jsonl file in RTP's schema (`prompt` may also be a plain string), or a .txt file, one per line;
- a Hugging Face dataset id or local dataset dir, through `datasets.load_dataset`
  (`allenai/real-toxicity-prompts`), optionally its `challenging` subset or a seeded sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from calibfuse.data import read_rows

EMBEDDED_CHALLENGE = "embedded:challenge"


@dataclass(frozen=True)
class Prompt:
    id: str  # the source's id (RTP: filename + span) or the row number
    text: str
    challenging: bool | None = None


def embedded_challenge_path() -> Path:
    return Path(str(resources.files("calibfuse") / "resources" / "challenge" / "prompts.jsonl"))


def _prompt_of(row: dict, where: str) -> Prompt:
    prompt = row.get("prompt")
    text = prompt.get("text") if isinstance(prompt, dict) else prompt
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no non-empty 'prompt' string or {{'text': ...}}; expected RealToxicityPrompts' schema")
    ident = row.get("id") or (f"{row['filename']}:{row.get('begin')}-{row.get('end')}" if row.get("filename") else None)
    challenging = row.get("challenging")
    return Prompt(id=str(ident) if ident is not None else where, text=text, challenging=None if challenging is None else bool(challenging))


def load_prompts(source: str = EMBEDDED_CHALLENGE, *, split: str = "train", challenging_only: bool = False,
                 sample: int | None = None, seed: int = 0, limit: int | None = None, load_kwargs: dict | None = None) -> list[Prompt]:
    """The prompt set: filtered to the challenging subset if asked, then a seeded sample, then the first `limit`."""
    if source == EMBEDDED_CHALLENGE:
        source = str(embedded_challenge_path())
    local = Path(source).expanduser()
    if local.is_file() and local.suffix == ".txt":
        lines = [line for line in local.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [Prompt(id=f"{local.name}:{i}", text=line) for i, line in enumerate(lines, start=1)]
    elif local.is_file():
        prompts = [_prompt_of(row, f"{source}: row {i}") for i, row in enumerate(read_rows(local), start=1)]
    elif local.suffix in (".jsonl", ".json", ".txt") or source.startswith((".", "/", "~")) and not local.is_dir():
        raise FileNotFoundError(f"prompt file {source!r} does not exist; expected a .jsonl (RTP schema) or .txt file, or a dataset id")
    else:
        import datasets

        dataset = datasets.load_dataset(source, split=split, **dict(load_kwargs or {}))
        if "prompt" not in dataset.column_names:
            raise ValueError(f"dataset {source!r} ({split}) has no 'prompt' column; found {dataset.column_names}, expected RTP's schema")
        prompts = [_prompt_of(row, f"{source} ({split}): row {i}") for i, row in enumerate(dataset, start=1)]
    if challenging_only:
        if all(p.challenging is None for p in prompts):
            raise ValueError(f"challenging_only=true but {source!r} has no 'challenging' field; expected RTP's schema")
        prompts = [p for p in prompts if p.challenging]
    if sample is not None and sample < len(prompts):
        prompts = random.Random(seed).sample(prompts, sample)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"no prompts from {source!r} (challenging_only={challenging_only}, sample={sample}, limit={limit}); expected at least one")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):  # ids key resumed rows: make them unique by position
        prompts = [Prompt(id=f"{p.id}#{i}", text=p.text, challenging=p.challenging) for i, p in enumerate(prompts)]
    return prompts
