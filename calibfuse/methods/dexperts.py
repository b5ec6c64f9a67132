"""DExperts (Liu et al., 2021): logits z_target + alpha (z_expert - z_antiexpert), with an expert and
an anti-expert LM that share the target's tokenizer; each keeps its own KV cache. Three forward
passes per token."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from calibfuse.fusion.decoding import DecodeState, forward_step
from calibfuse.methods import Method
from calibfuse.models.lm import check_head, lm_head_logits, same_tokenizer
from calibfuse.models.loading import as_spec, fingerprint

ROLES = ("expert", "anti_expert")


class DExpertsProcessor(LogitsProcessor):
    """Steers the target's logits with the expert/anti-expert difference, step by step."""

    def __init__(self, expert, anti_expert, alpha: float):
        self.experts, self.alpha = (expert.eval(), anti_expert.eval()), alpha
        self.caches, self.state = [None, None], None

    def start(self, state: DecodeState) -> None:
        self.caches, self.state = [None, None], state

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.alpha == 0:
            return scores  # the target alone, exactly
        logits = []
        for i, model in enumerate(self.experts):  # the same step inputs as the target's
            hidden, self.caches[i] = forward_step(model, self.state, self.caches[i])
            logits.append(lm_head_logits(model, hidden).float())
        width = min(scores.shape[-1], logits[0].shape[-1], logits[1].shape[-1])  # padded vocab rows
        steered = scores.clone()
        steered[:, :width] += self.alpha * (logits[0][:, :width] - logits[1][:, :width])
        return steered


class DExperts(Method):
    role = "baseline"

    def __init__(self, alphas: list[float] = (2.0,), expert: dict | None = None, anti_expert: dict | None = None):
        if not alphas:
            raise ValueError("methods.dexperts.alphas=[]; expected at least one alpha, e.g. [2.0]")
        self.alphas = [float(a) for a in alphas]
        self.configs = {"expert": expert, "anti_expert": anti_expert}
        self.specs, self.fingerprints, self.models = {}, {}, {}

    def prepare(self, targets) -> None:
        for role in ROLES:
            config = self.configs[role]
            if config is None or config.get("name_or_path") in (None, "???"):
                raise ValueError(
                    f"method 'dexperts' needs methods.dexperts.{role}.name_or_path: an LM that shares the target's "
                    "tokenizer (expert: fine-tuned on non-toxic text; anti_expert: on toxic text)"
                )
            self.specs[role] = as_spec(config)
            self.fingerprints[role] = fingerprint(self.specs[role])

    def identity(self, target: str, alpha: float) -> dict:
        return dict(self.fingerprints)

    def bind(self, target, target_lm, models) -> None:
        for role in ROLES:
            model, tokenizer = models.get(self.specs[role])
            if not same_tokenizer(target_lm.tokenizer, tokenizer):
                raise ValueError(
                    f"dexperts: the {role}'s tokenizer ({len(tokenizer)} tokens) differs from the target's "
                    f"({len(target_lm.tokenizer)} tokens); expected experts that share the target's tokenizer"
                )
            check_head(model, tokenizer)
            self.models[role] = model

    def modules(self) -> list:
        return list(self.models.values())

    def logits_processors(self, alpha: float) -> list:
        return [DExpertsProcessor(self.models["expert"], self.models["anti_expert"], alpha)]
