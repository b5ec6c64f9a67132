"""Stage 3: output-layer fusion at inference (METHOD.md, stage 3).

At every generated position the target's final hidden state h_T (after its final norm) is replaced by

    h = alpha * LN(h_c A) + (1 - alpha) * h_T,        logits = lm_head_T(h)

where h_c is the calibration model's last hidden state for the same text, A the stage-2 alignment
and LN a parameter-free layer norm over d_T. Fusing in hidden space needs no second vocabulary
projection and stays right for heads with soft-capping.

Unlike the reference code, the calibration state covers the whole text so far (its own KV cache),
also when the two models tokenize differently: the calibration model then reads the text the
target has consumed through its own tokenizer. `calibration_context="last_token"` keeps the
reference's behaviour (newest token only, position 0, no cache) for the ablation.

    from calibfuse.fusion import FusedGenerator, GenerationSettings
    generator = FusedGenerator.from_artifacts(target="smollm2-135m-instruct",
                                              calibration="<pretrain run>/calibration_model",
                                              alignment="<align run>/alignment")
    rows = generator.generate(["You are such a"], alphas=[0.0, 0.3], settings=GenerationSettings(max_new_tokens=20))
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from calibfuse.models import ModelSpec, as_spec, fingerprint, load_model, load_tokenizer

log = logging.getLogger(__name__)

CALIBRATION_CONTEXTS = ("full", "last_token")
LAYER_NORMS = ("parameter_free", "none")
PROMPT_FORMATS = ("raw", "chat")


@dataclass
class GenerationSettings:
    """Every decoding choice, explicit: a checkpoint's generation_config never changes them."""

    max_new_tokens: int = 20
    do_sample: bool = False  # greedy unless True
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    num_samples: int = 1  # continuations per prompt (with do_sample)
    seed: int = 2025
    batch_size: int = 16  # prompts x samples per forward pass

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected at least 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}; expected 0 < top_p <= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}; expected > 0 (use do_sample=false for greedy)")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError(f"num_samples={self.num_samples} with greedy decoding gives identical samples; set do_sample=true")


@dataclass
class Generation:
    prompt: str
    alpha: float
    sample: int
    continuation: str
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int] = field(repr=False)


def check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha}; expected a weight in [0, 1] (0 = the target alone)")
    return float(alpha)


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own LM head on final hidden states, with its logit soft-capping if it has one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model, use_cache: bool, past_key_values=None, **inputs):
    """The last hidden state after the final norm (HF's hidden_states[-1]) and, if asked, the KV cache."""
    base = model.base_model
    # transformers renamed the cache argument (past_key_values -> cache) during 5.x; speak both.
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    if past_key_values is not None:
        inputs[cache_arg] = past_key_values
    out = base(**inputs, use_cache=use_cache)
    if not use_cache:
        return out.last_hidden_state, None
    cache = getattr(out, "cache", None)
    return out.last_hidden_state, cache if cache is not None else out.past_key_values


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding and masked-out slots: what a left-padded sequence would have alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def same_tokenizer(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id)


def load_alignment(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A (d_c x d_T) and the alignment.json written by calibfuse.align."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    weights, meta = directory / "alignment.safetensors", directory / "alignment.json"
    for file in (weights, meta):
        if not file.is_file():
            raise FileNotFoundError(f"alignment file {str(file)!r} does not exist; expected the alignment/ dir of a calibfuse.align run")
    return load_file(weights)["A"], json.loads(meta.read_text())


def check_alignment_made_for(alignment, meta: dict, **models: tuple[ModelSpec, object]) -> None:
    """Refuse an alignment whose recorded weight fingerprints differ from the models at hand
    (keyword: role in alignment.json -> (spec, loaded model))."""
    role_names = {"calibration": "calibration_model", "target": "target"}
    for role, (spec, model) in models.items():
        record = meta[role_names.get(role, role)]
        recorded, actual = record["fingerprint"], fingerprint(spec, model)
        if recorded != actual:
            raise ValueError(
                f"alignment {str(alignment)!r} was made for {role_names.get(role, role)} {record['name_or_path']!r} ({recorded}), "
                f"not for {spec.name_or_path!r} ({actual}); align these models first, or pass check_fingerprints=False"
            )


class CalibrationStream:
    """The calibration model's state kept in step with the text the target has consumed, when the
    two tokenizers differ.

    Every step the consumed text is tokenized afresh by the calibration tokenizer; tokens that no
    longer match (a word the target has extended) are masked out of the cache, the new ones are
    appended, and the state is read at the last token, so it covers exactly the consumed characters.
    Masked slots stay in the cache but are invisible, and positions count valid tokens only.
    """

    def __init__(self, model, tokenizer, batch_size: int, device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.valid_ids: list[list[int]] = [[] for _ in range(batch_size)]  # what each row's cache holds, in order
        self.slots: list[list[int]] = [[] for _ in range(batch_size)]  # cache slot of each valid id
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.cache = None
        self.state: torch.Tensor | None = None

    def advance(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        additions = []
        for row, ids in enumerate(encoded):
            keep = 0
            old = self.valid_ids[row]
            while keep < min(len(old), len(ids)) and old[keep] == ids[keep]:
                keep += 1
            for slot in self.slots[row][keep:]:
                self.mask[row, slot] = 0  # retokenized: these tokens no longer describe the text
            self.valid_ids[row], self.slots[row] = old[:keep], self.slots[row][:keep]
            additions.append(ids[keep:])
        width = max(len(a) for a in additions)
        if width == 0:
            return self.state
        pad = self.tokenizer.pad_token_id
        block = torch.full((len(texts), width), pad, dtype=torch.long, device=self.device)
        block_mask = torch.zeros((len(texts), width), dtype=torch.long, device=self.device)
        start = self.mask.shape[1]
        for row, added in enumerate(additions):  # right-aligned, so every row's newest token is last
            if added:
                block[row, width - len(added):] = torch.tensor(added, device=self.device)
                block_mask[row, width - len(added):] = 1
                self.valid_ids[row] += added
                self.slots[row] += list(range(start + width - len(added), start + width))
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        hidden, self.cache = final_hidden(
            self.model, input_ids=block, attention_mask=self.mask,
            position_ids=positions_from_mask(self.mask)[:, -width:], past_key_values=self.cache, use_cache=True,
        )
        new_state = hidden[:, -1]
        changed = torch.tensor([bool(a) for a in additions], device=self.device)[:, None]
        self.state = new_state if self.state is None else torch.where(changed, new_state, self.state)
        return self.state


class FusedGenerator:
    """A target LM fused with an aligned calibration model; batched, left-padded generation."""

    def __init__(
        self,
        target,
        target_tokenizer,
        calibration,
        calibration_tokenizer,
        alignment: torch.Tensor | None,  # (d_c, d_T); None = identity (needs d_c == d_T)
        calibration_context: str = "full",
        layer_norm: str = "parameter_free",
        prompt_format: str = "raw",
        layer_norm_eps: float = 1e-5,
    ):
        if calibration_context not in CALIBRATION_CONTEXTS:
            raise ValueError(f"calibration_context={calibration_context!r}; expected one of {list(CALIBRATION_CONTEXTS)}")
        if layer_norm not in LAYER_NORMS:
            raise ValueError(f"layer_norm={layer_norm!r}; expected one of {list(LAYER_NORMS)}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r}; expected one of {list(PROMPT_FORMATS)}")
        d_c, d_t = calibration.config.hidden_size, target.config.hidden_size
        if alignment is None:
            if d_c != d_t:
                raise ValueError(f"an identity alignment needs equal widths; calibration model is {d_c} wide, target {d_t}")
            alignment = torch.eye(d_c)
        if tuple(alignment.shape) != (d_c, d_t):
            raise ValueError(
                f"alignment A has shape {tuple(alignment.shape)} but the calibration model is {d_c} wide and the "
                f"target {d_t} wide; expected A of shape ({d_c}, {d_t})"
            )
        self.target, self.calibration = target.eval(), calibration.eval()
        self.target_tokenizer, self.calibration_tokenizer = target_tokenizer, calibration_tokenizer
        self.device = next(target.parameters()).device
        self.A = alignment.float().to(self.device)
        self.calibration_context, self.layer_norm, self.prompt_format = calibration_context, layer_norm, prompt_format
        self.layer_norm_eps = layer_norm_eps
        # Baselines that edit the logits at every step (calibfuse.baselines: word filter, DExperts):
        # each has reset(ids, mask) for a new batch and __call__(logits, step_ids, mask, generated) -> logits.
        self.logits_adjusters: list = []
        self.shared_tokenizer = same_tokenizer(target_tokenizer, calibration_tokenizer)
        eos = {target_tokenizer.eos_token_id}
        configured = getattr(getattr(target, "generation_config", None), "eos_token_id", None)  # stop tokens only
        eos |= set(configured if isinstance(configured, list) else [configured])
        self.eos_ids = torch.tensor(sorted(i for i in eos if i is not None), device=self.device)
        if prompt_format == "chat" and not getattr(target_tokenizer, "chat_template", None):
            raise ValueError("prompt_format='chat' but the target's tokenizer has no chat template; use prompt_format='raw'")

    @classmethod
    def from_artifacts(
        cls,
        target: ModelSpec | dict | str,
        calibration: ModelSpec | dict | str,
        alignment: str | Path | None,
        check_fingerprints: bool = True,
        **options,
    ) -> "FusedGenerator":
        """Load target, calibration model and alignment; refuse an alignment made for other models."""
        target_spec, calibration_spec = as_spec(target), as_spec(calibration)
        target_model, calibration_model = load_model(target_spec), load_model(calibration_spec)
        A = None
        if alignment is not None:
            A, meta = load_alignment(alignment)
            if check_fingerprints:
                check_alignment_made_for(alignment, meta, calibration=(calibration_spec, calibration_model), target=(target_spec, target_model))
        return cls(target_model, load_tokenizer(target_spec), calibration_model, load_tokenizer(calibration_spec), A, **options)

    def to(self, device) -> "FusedGenerator":
        """Move both models and A (e.g. to the GPU a DDP rank owns)."""
        self.target.to(device)
        self.calibration.to(device)
        self.device = torch.device(device)
        self.A, self.eos_ids = self.A.to(self.device), self.eos_ids.to(self.device)
        return self

    # --- the fusion itself -------------------------------------------------------------------

    def fuse(self, h_target: torch.Tensor, h_calibration: torch.Tensor, alpha: float) -> torch.Tensor:
        """alpha * LN(h_c A) + (1 - alpha) * h_T, in fp32, returned in the target's dtype."""
        mapped = h_calibration.float() @ self.A
        if self.layer_norm == "parameter_free":  # the reference's fresh nn.LayerNorm: weight 1, bias 0, never trained
            mapped = F.layer_norm(mapped, (mapped.shape[-1],), eps=self.layer_norm_eps)
        return (alpha * mapped + (1.0 - alpha) * h_target.float()).to(h_target.dtype)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        if self.prompt_format == "chat":
            texts = [self.target_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
            return self.target_tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.target_tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def _consumed_texts(self, sequences: list[list[int]]) -> list[str]:
        """The text each row's target tokens spell, without special tokens or a dangling partial character."""
        texts = self.target_tokenizer.batch_decode(sequences, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [t.rstrip("\ufffd") for t in texts]

    def _calibration_ids_for_last_token(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's calibration input: only the newest token (re-spelled if tokenizers differ)."""
        if self.shared_tokenizer:
            return tokens[:, None], torch.ones_like(tokens[:, None])
        pieces = self.target_tokenizer.batch_decode(tokens[:, None].tolist(), skip_special_tokens=True)
        encoded = self.calibration_tokenizer(pieces, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        empty = mask.sum(-1) == 0  # a token that spells nothing: feed the pad token, unmasked
        mask[empty, -1] = 1
        return ids, mask

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[list[int]], alpha: float, settings: GenerationSettings, generator, use_cache: bool = True, trace: list | None = None) -> list[list[int]]:
        batch = len(prompt_ids)
        pad = self.target_tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((batch, width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        for row, p in enumerate(prompt_ids):  # left padding: every row's newest token is last
            ids[row, width - len(p):] = torch.tensor(p, device=self.device)
            mask[row, width - len(p):] = 1
        sequences = [list(p) for p in prompt_ids]
        fuse_needed = alpha > 0 or trace is not None
        stream = None
        if fuse_needed and not self.shared_tokenizer and self.calibration_context == "full" and use_cache:
            stream = CalibrationStream(self.calibration, self.calibration_tokenizer, batch, self.device)
        target_cache = calibration_cache = None
        for adjuster in self.logits_adjusters:
            adjuster.reset(ids, mask)
        step_ids = ids
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        generated = torch.zeros((batch, 0), dtype=torch.long, device=self.device)
        for step in range(settings.max_new_tokens):
            if use_cache:
                h_t, target_cache = final_hidden(self.target, input_ids=step_ids, attention_mask=mask,
                                                 position_ids=positions_from_mask(mask)[:, -step_ids.shape[1]:],
                                                 past_key_values=target_cache, use_cache=True)
            else:  # recompute everything: the reference point for the cache tests
                full = torch.cat([ids, generated], dim=1)
                h_t, _ = final_hidden(self.target, input_ids=full, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
            h_t = h_t[:, -1]
            if fuse_needed:
                h_c, calibration_cache = self._calibration_state(step, step_ids, ids, generated, mask, sequences, stream, calibration_cache, use_cache)
                hidden = self.fuse(h_t, h_c, alpha)
            else:  # alpha = 0: the target alone, exactly
                hidden = h_t
            logits = lm_head_logits(self.target, hidden).float()
            for adjuster in self.logits_adjusters:
                logits = adjuster(logits, step_ids, mask, [seq[len(p):] for seq, p in zip(sequences, prompt_ids)])
            if trace is not None:
                trace.append({"logits": logits.cpu(), "h_target": h_t.float().cpu(), "h_calibration": h_c.float().cpu()})
            was_finished = finished
            next_tokens = torch.where(was_finished, torch.full_like(finished, pad, dtype=torch.long), self._choose(logits, settings, generator))
            generated = torch.cat([generated, next_tokens[:, None]], dim=1)
            for row in range(batch):
                if not was_finished[row]:
                    sequences[row].append(int(next_tokens[row]))
            finished = was_finished | torch.isin(next_tokens, self.eos_ids)
            if finished.all():
                break
            step_ids = next_tokens[:, None]
            mask = torch.cat([mask, (~was_finished).long()[:, None]], dim=1)  # rows that ended only feed padding
        return [seq[len(p):] for seq, p in zip(sequences, prompt_ids)]

    def _calibration_state(self, step, step_ids, ids, generated, mask, sequences, stream, cache, use_cache):
        """h_c for the newest position of every row, by the configured context rule."""
        if self.calibration_context == "last_token" and step > 0:
            last_ids, last_mask = self._calibration_ids_for_last_token(step_ids[:, -1])
            h_c, _ = final_hidden(self.calibration, input_ids=last_ids, attention_mask=last_mask,
                                  position_ids=positions_from_mask(last_mask), use_cache=False)
            return h_c[:, -1], None
        if self.shared_tokenizer:  # one to one: the same ids, mask and positions as the target
            if use_cache:
                h_c, cache = final_hidden(self.calibration, input_ids=step_ids, attention_mask=mask,
                                          position_ids=positions_from_mask(mask)[:, -step_ids.shape[1]:],
                                          past_key_values=cache, use_cache=True)
            else:
                h_c, _ = final_hidden(self.calibration, input_ids=torch.cat([ids, generated], dim=1), attention_mask=mask,
                                      position_ids=positions_from_mask(mask), use_cache=False)
            return h_c[:, -1], cache
        texts = self._consumed_texts(sequences)
        if stream is not None:
            return stream.advance(texts), None
        return self.calibration_state_of_texts(texts), None

    def calibration_state_of_texts(self, texts: list[str]) -> torch.Tensor:
        """The calibration model run from scratch on each text: its last hidden state (after its final norm)."""
        encoded = self.calibration_tokenizer(texts, add_special_tokens=True, padding=True, padding_side="left", return_tensors="pt")
        mask = encoded["attention_mask"].to(self.device)
        h_c, _ = final_hidden(self.calibration, input_ids=encoded["input_ids"].to(self.device), attention_mask=mask,
                              position_ids=positions_from_mask(mask), use_cache=False)
        return h_c[:, -1]

    @staticmethod
    def _choose(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:
        if not settings.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / settings.temperature
        if settings.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
            sorted_logits = sorted_logits.masked_fill(mass_before >= settings.top_p, float("-inf"))  # the top token always stays
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)

    # --- public API -------------------------------------------------------------------------

    def generate(self, prompts: list[str], alphas: float | list[float] = 0.0, settings: GenerationSettings | None = None, use_cache: bool = True) -> list[Generation]:
        """Continuations of every prompt at every alpha: one Generation per (alpha, prompt, sample)."""
        settings = settings or GenerationSettings()
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
        alphas = [check_alpha(a) for a in ([alphas] if isinstance(alphas, (int, float)) else alphas)]
        prompt_ids = self._prompt_ids(list(prompts))
        jobs = [(i, s) for i in range(len(prompts)) for s in range(settings.num_samples)]
        rows = []
        for alpha in alphas:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)  # same draws for every alpha
            for start in range(0, len(jobs), settings.batch_size):
                chunk = jobs[start:start + settings.batch_size]
                outputs = self._generate_batch([prompt_ids[i] for i, _ in chunk], alpha, settings, generator, use_cache)
                for (i, s), new in zip(chunk, outputs):
                    rows.append(Generation(
                        prompt=prompts[i], alpha=alpha, sample=s,
                        continuation=self.target_tokenizer.decode(new, skip_special_tokens=True),
                        prompt_tokens=len(prompt_ids[i]), new_tokens=len(new), token_ids=new,
                    ))
        return rows

    def trace(self, prompts: list[str], alpha: float, settings: GenerationSettings, use_cache: bool = True) -> list[dict]:
        """Per-step logits and both hidden states for one batch (what the tests check by hand)."""
        steps: list[dict] = []
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        self._generate_batch(self._prompt_ids(prompts), check_alpha(alpha), settings, generator, use_cache, trace=steps)
        return steps
