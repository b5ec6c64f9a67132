"""Detoxification methods, one small object each, chosen by config: `conf/methods/<name>.yaml`
holds `<name>: {_target_: <class>, ...options}`, and `methods=[fusion,none,...]` runs them side by
side in the evaluation grid. Adding a method is one module and one config file.

A method may change three things, each optional: the prompt (`prompt`), the target's final hidden
state (`hidden_transform`: fusion), the logits (`logits_processors`: the word filter, DExperts).
The decode loop itself (calibfuse.fusion.decoding) is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the base class stays on a low floor, below the grid that reads its role
    from calibfuse.fusion.target import TargetLM
    from calibfuse.models.loading import ModelCache, ModelSpec

# The built-in methods' roles (each class says its own; tests/test_methods.py checks the two agree), for
# grids written before cells recorded a role. A method not listed is a "method", as the class default.
BUILT_IN_ROLES = {
    "fusion": "method",
    "calibration_alone": "diagnostic",
    "null_calibration": "diagnostic",
    "word_filter": "baseline",
    "prompting": "baseline",
    "dexperts": "baseline",
    "profs": "baseline",
    "lm_steer": "baseline",
}


def role_of(row: dict) -> str:
    """A grid row's method role: the one it recorded, else the built-in method's, else "method"."""
    return row.get("role") or BUILT_IN_ROLES.get(row["method"], "method")


class Method:
    """The target alone: the base every method extends, and the `none` method itself."""

    name = "none"  # the key of its config under `methods`
    # What it is to the report and the verdict: "method" (judged: the goal is asked of it), "baseline" (what
    # a judged method must beat), "diagnostic" (a row shown, never judged). Written into every grid cell.
    role = "method"
    # The values of its strength α it runs at, one cell each: fusion's α, DExperts' α; [0.0] for a method without one.
    alphas: Sequence[float] = (0.0,)  # a tuple: a class default no instance can change

    def prepare(self, targets: dict[str, ModelSpec]) -> None:
        """Check settings and read what is cheap, no models: bad input fails here, before any model loads."""

    def identity(self, target: str, alpha: float) -> dict | None:
        """What decides its generations beyond the target, the prompts and the decoding: its part of the
        cell key. None means the target alone, a cell shared by every method that says so (`none`,
        fusion at alpha 0)."""
        return None

    def bind(self, target: str, target_lm: TargetLM, models: ModelCache) -> None:
        """Load what it needs next to this target (called once per target, before its cells)."""

    def generator(self, target_lm: TargetLM, alpha: float = 0.0) -> TargetLM:
        """The LM that generates at strength `alpha`: the target (the default), another LM with its own
        tokenizer (the calibration model alone), or an edited copy of the target (ProFS). Diagnostics
        against the target need the target generating."""
        return target_lm

    def modules(self) -> list:
        """The models it runs besides the target (placed on the predict loop's device)."""
        return []

    def to(self, device) -> Method:
        for module in self.modules():
            module.to(device)
        return self

    def prompt(self, texts: list[str], target_lm: TargetLM) -> tuple[list[str], str | None]:
        """The prompts as the target reads them, and the prompt format (None: the target's)."""
        return texts, None

    def hidden_transform(self, alpha: float):
        return None

    def logits_processors(self, alpha: float) -> list:
        return []


def build_methods(configs: dict) -> list[Method]:
    """Instantiate every selected method config (in selection order); each learns its name from its key."""
    from calibfuse.utils.run import instantiate

    if not configs:
        raise ValueError("no methods selected; expected e.g. methods=[fusion] or methods=[fusion,none,word_filter]")
    methods = []
    for name, config in configs.items():
        if config is None or "_target_" not in config:
            raise ValueError(f"methods.{name} has no _target_; expected conf/methods/{name}.yaml to hold {name}: {{_target_: <class>, ...}}")
        method = instantiate(config)
        method.name = name
        methods.append(method)
    return methods
