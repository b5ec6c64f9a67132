"""Cells and the cell store. A cell is one (target, method, strength, seed); its rows are stored under
`<cell_store>/<name>/` and keyed by a hash of everything that decides them, so an interrupted or
extended grid reuses finished cells and the finished batches of a cut one.

Layout of a cell dir: `generated.rank<r>.jsonl` (continuations, appended before they are scored, so a
scorer that fails loses none), `partial.rank<r>.jsonl` (scored batches appended as they finish, per DDP rank), then,
once every prompt x sample is there, `rows.jsonl` and `cell.json` (the marker of a finished cell)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from calibfuse.methods import Method
from calibfuse.utils.files import sha256_json, write_hint, write_json, write_text

log = logging.getLogger(__name__)

CELL_FORMAT = 2  # bump when the stored rows change meaning: old cells are then recomputed


@dataclass(frozen=True)
class Cell:
    target: str
    method: str
    alpha: float  # the method's strength: fusion's alpha, DExperts' alpha; 0 for the others
    seed: int
    key: str  # sha256 of everything that decides the cell's rows
    target_alone: bool = False  # the method leaves the target as it is (`none`, fusion at alpha 0)
    role: str = "method"  # what the method says it is to the report (calibfuse.methods.Method.role)
    setting: str = ""  # its setting's key (setting_key): the cell key without the seed, shared by the setting's seeds

    @property
    def name(self) -> str:
        """Its dir in the cell store; cells of the target alone are one cell, whichever method asks."""
        label = Method.name if self.target_alone else self.method
        return f"{self.target}_{label}_a{self.alpha:g}_s{self.seed}_{self.key[:12]}"


def setting_content(target: dict, method: str, identity: dict | None, alpha: float, context: dict) -> dict:
    """What decides a setting's cells, the seed aside: the target (weights, resolved dtype, device), the
    method's identity (None: the target alone, shared by every method), strength, and the `context` every
    cell of the grid shares (decoding, prompts, prompt format, scorer, reference LM, accelerator and precision)."""
    alone = identity is None
    return {"format": CELL_FORMAT, "target": target, "method": Method.name if alone else method, "identity": identity, "alpha": alpha, **context}


def cell_key(target: dict, method: str, identity: dict | None, alpha: float, seed: int, context: dict) -> str:
    """The hash of a cell: its setting's content and its seed."""
    return sha256_json(setting_content(target, method, identity, alpha, context) | {"seed": seed})


def setting_key(target: dict, method: str, identity: dict | None, alpha: float, context: dict) -> str:
    """The hash of a setting: everything in `cell_key` but the seed. Cells that share it are seeds of one
    setting, the only cells a report may pool; cells that differ in it are different settings."""
    return sha256_json(setting_content(target, method, identity, alpha, context))


def flat(value, prefix: str = "") -> dict:
    """A nested mapping as flat dotted keys (`decoding.max_new_tokens`), long hashes cut to 12 characters:
    how a report labels a setting by what varies, and how W&B gets an arm's knobs as config keys."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(value, str) and (value.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{64}", value)):
        value = value.removeprefix("sha256:")[:12]
    return {prefix: value}


def read_partial_rows(cell_dir: Path, kind: str = "partial") -> list[dict]:
    """The rows of every rank's `partial` (scored) or `generated` (not yet scored) file."""
    rows = []
    for path in sorted(cell_dir.glob(f"{kind}.rank*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line a kill cut short: its prompt is generated again
                log.warning("%s:%d: incomplete row from an interrupted run; its prompt is redone", path, number)
    return rows


def finished_prompt_ids(rows: list[dict], num_samples: int) -> set[str]:
    samples: dict[str, set[int]] = {}
    for row in rows:
        samples.setdefault(row["prompt_id"], set()).add(row["sample"])
    return {pid for pid, s in samples.items() if len(s) == num_samples}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a partial file; a line a kill cut short must not swallow the next row. A failed
    write (a full disk) names the file: the rows before it are kept, and the rerun redoes the rest."""
    try:
        with path.open("ab") as f:
            if f.tell() > 0:
                with path.open("rb") as tail:
                    tail.seek(-1, 2)
                    if tail.read(1) != b"\n":
                        f.write(b"\n")
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    except OSError as error:
        raise OSError(error.errno, f"cannot append to {path} ({error.strerror or error}){write_hint(error)}") from error


def finish_cell(cell: Cell, cell_dir: Path, prompt_ids: list[str], num_samples: int, description: dict) -> list[dict]:
    """Merge the ranks' partial rows (last write wins, so a redone prompt is not duplicated), check
    that every prompt x sample is there, and store the cell: rows.jsonl, then cell.json (the marker)."""
    latest = {(r["prompt_id"], r["sample"]): r for r in read_partial_rows(cell_dir)}
    missing = [(p, s) for p in prompt_ids for s in range(num_samples) if (p, s) not in latest]
    if missing:
        raise RuntimeError(f"cell {cell.name}: {len(missing)} generations missing after the predict loop (first: {missing[0]})")
    rows = [latest[(p, s)] for p in prompt_ids for s in range(num_samples)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    checksum = hashlib.sha256(text.encode("utf-8")).hexdigest()  # a cell is reused only while its rows are whole
    try:
        write_text(cell_dir / "rows.jsonl", text)
        write_json(cell_dir / "cell.json", {"format": CELL_FORMAT, **asdict(cell), "rows": len(rows), "sha256": checksum, **description})
    except OSError as error:  # a full disk: the cell's rows stay in its partial files, and the rerun stores it
        kept = f"its rows are kept in {cell_dir}, and a rerun stores it"
        raise OSError(error.errno, f"cell {cell.name} could not be stored: {error.strerror}; {kept}") from error
    for path in [*cell_dir.glob("partial.rank*.jsonl"), *cell_dir.glob("generated.rank*.jsonl")]:
        path.unlink()
    return rows


def stored_rows(cell_dir: Path) -> list[dict] | None:
    """A finished cell's rows; None if the cell is not finished, or is damaged: then its files are set
    aside (renamed, not deleted) with a warning that names them, and the cell is computed again."""
    marker, path = cell_dir / "cell.json", cell_dir / "rows.jsonl"
    if not marker.is_file():
        return None
    try:
        description = json.loads(marker.read_text(encoding="utf-8"))
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return set_aside(cell_dir, f"{error.__class__.__name__}: {error}")
    if not isinstance(description, dict) or description.get("format") != CELL_FORMAT:
        return None
    if "sha256" in description and hashlib.sha256(text.encode("utf-8")).hexdigest() != description["sha256"]:
        return set_aside(cell_dir, f"{path} does not match the sha256 that cell.json recorded when the cell finished")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            return set_aside(cell_dir, f"{path}:{number} is not a JSON row ({error.msg})")
    if len(rows) != description.get("rows"):
        return set_aside(cell_dir, f"{path} holds {len(rows)} rows; cell.json recorded {description.get('rows')}")
    return rows


def set_aside(cell_dir: Path, why: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("cell.json", "rows.jsonl"):
        if (cell_dir / name).exists():
            (cell_dir / name).rename(cell_dir / f"{name}.broken-{stamp}")
    log.warning("cell %s is damaged (%s): its files are kept as *.broken-%s and the cell is computed again", cell_dir, why, stamp)
    return None


def stored_description(cell_dir: Path) -> dict:
    return json.loads((cell_dir / "cell.json").read_text())
