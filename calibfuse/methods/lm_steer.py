"""LM-Steer (Han et al., ACL 2024) as a grid method, a baseline: the target's final hidden state steered
by a trained linear map of its output embeddings, h' = h + alpha * (h W) (calibfuse.steer trains W;
docs/lm_steer.md). alpha is LM-Steer's steer value; at alpha 0 it is the target alone, so those cells are
shared with `none`. One d x d matmul per generated token, no second model."""

from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path

import torch

from calibfuse.fusion.artifacts import read_tensors
from calibfuse.methods import Method
from calibfuse.models.loading import ModelSpec, fingerprint
from calibfuse.utils.files import sha256_file

FILES = ("steer.safetensors", "steer.json")


def checked_strengths(alphas) -> list[float]:
    """The steer values to run at: finite numbers (negative ones steer towards toxicity); duplicates once."""
    if isinstance(alphas, (str, bytes, Real)) or not hasattr(alphas, "__iter__") or not list(alphas):
        raise ValueError(f"methods.lm_steer.alphas={alphas!r}; expected a non-empty list of steer values, e.g. [0,1,2]")
    for alpha in alphas:
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
            raise ValueError(f"methods.lm_steer.alphas has {alpha!r}; expected finite numbers, e.g. [0,1,2]")
    return list(dict.fromkeys(float(a) for a in alphas))


def read_steer(name: str, path) -> tuple[Path, dict]:
    """The steer/ dir named for a target and its manifest, without loading a model; errors name the key."""
    key = f"methods.lm_steer.steers.{name}"
    if path in (None, "???", ""):
        raise ValueError(f"no steer for target {name!r}: set {key}=<steer run dir>/steer, the steer/ dir that `python -m calibfuse.steer target={name}` writes")
    directory = Path(path).expanduser()
    directory = directory.parent if directory.is_file() else directory
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{key}={str(path)!r} has no {' or '.join(missing)}; expected the steer/ dir of a calibfuse.steer run")
    try:
        meta = json.loads((directory / "steer.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{key}: {str(directory / 'steer.json')!r} is not valid JSON ({error}); expected a calibfuse.steer run's manifest") from None
    if not isinstance(meta, dict) or meta.get("stage") != "steer" or "fingerprint" not in (meta.get("target") or {}):
        raise ValueError(f"{key}: {str(directory / 'steer.json')!r} is not a steer manifest; expected the steer.json a calibfuse.steer run writes")
    return directory, meta


def check_made_for(name: str, directory: Path, meta: dict, spec: ModelSpec, model=None) -> None:
    """Refuse a steer made for other weights than the target's (by the fingerprint calibfuse.steer recorded)."""
    recorded, actual = meta["target"]["fingerprint"], fingerprint(spec, model)
    if recorded != actual:
        raise ValueError(
            f"methods.lm_steer.steers.{name}={str(directory)!r} was made for {meta['target']['name_or_path']!r} ({recorded}), not for "
            f"target {name!r} {spec.name_or_path!r} ({actual}); train a steer for it: python -m calibfuse.steer target={name}"
        )


class LMSteer(Method):
    role = "baseline"

    def __init__(self, alphas=(0.0, 0.5, 1.0, 2.0), steers: dict | None = None, dummy: bool = False, check_fingerprints: bool = True):
        self.alphas = checked_strengths(alphas)
        if not isinstance(dummy, bool):
            raise ValueError(f"methods.lm_steer.dummy={dummy!r}; expected true or false")
        self.steers, self.dummy, self.check_fingerprints = dict(steers or {}), dummy, check_fingerprints
        self.plans: dict[str, dict] = {}
        self.W: torch.Tensor | None = None
        self.W_dummy: torch.Tensor | None = None

    def prepare(self, targets: dict[str, ModelSpec]) -> None:
        for name, spec in targets.items():
            directory, meta = read_steer(name, self.steers.get(name))
            if self.check_fingerprints and fingerprint(spec).startswith("sha256:"):  # local weights: hashed without loading
                check_made_for(name, directory, meta, spec)
            self.plans[name] = {"dir": directory, "meta": meta, "spec": spec, "sha256": sha256_file(directory / "steer.safetensors")}

    def identity(self, target: str, alpha: float) -> dict | None:
        if alpha == 0 and not self.dummy:
            return None  # the target alone
        return {"steer": self.plans[target]["sha256"]} | ({"dummy": True} if self.dummy else {})

    def bind(self, target, target_lm, models) -> None:
        plan = self.plans[target]
        if self.check_fingerprints:
            check_made_for(target, plan["dir"], plan["meta"], plan["spec"], target_lm.model)
        tensors = read_tensors(plan["dir"] / "steer.safetensors")
        d = target_lm.model.config.hidden_size
        for key in ("W", "W_dummy"):
            if key not in tensors or tuple(tensors[key].shape) != (d, d) or not torch.isfinite(tensors[key]).all():
                raise ValueError(
                    f"methods.lm_steer.steers.{target}: {str(plan['dir'] / 'steer.safetensors')!r} has no finite {key} of shape ({d}, {d}); "
                    "expected the file a calibfuse.steer run writes for this target"
                )
        # fp32 for the map itself: a bf16 target's state is steered in fp32 and handed back in its dtype
        self.W, self.W_dummy = (tensors[k].float().to(target_lm.device) for k in ("W", "W_dummy"))

    def to(self, device) -> LMSteer:
        if self.W is not None:
            self.W, self.W_dummy = self.W.to(device), self.W_dummy.to(device)
        return self

    def hidden_transform(self, alpha: float):
        if alpha == 0 and not self.dummy:
            return None
        M = alpha * self.W + (self.W_dummy if self.dummy else 0)  # one d x d map: a single matmul per step

        def steer(h: torch.Tensor, state=None) -> torch.Tensor:
            x = h.float()
            return (x + x @ M).to(h.dtype)

        return steer
