"""Plan a pipeline run before it runs: per stage, the models and their parameters (built on the meta device
from configs, no weights, no network), peak memory per device at the configured dtype, the host RAM stage 1's
ranks take to load the base model, batch sizes and strategy, the compute (6 N per trained token, 2 N per generated,
scored or held-out token), the time at a stated utilisation of a stated device (the reference's unless plan.gpu /
plan.cpu say yours), and the total. A plan that cannot fit is refused, naming the stage, the figure and what would fit.
Memory is in GiB (2^30 bytes).

    python -m calibfuse.plan                             # the main job (embedded default, CPU)
    python -m calibfuse.plan experiment=paper_table      # the paper's table (GPU)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig

from calibfuse.methods import Method, role_of
from calibfuse.models.footprint import GiB, activation_bytes, dtype_bytes, kv_cache_bytes, model_config, size_of, training_bytes
from calibfuse.utils.composing import compose_stage, evaluate_overrides, stage_overrides
from calibfuse.utils.run import device_count  # its module registers the configs' resolvers (paper_pretrain's accumulation)


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


@dataclass
class Hardware:
    name: str
    memory_gib: float
    peak_tflops: float
    note: str  # which figures are the reference's and which the user gave
    ram_note: str = ""  # the CPU's: whose RAM


def hardware(plan: DictConfig, kind: str) -> Hardware:
    """plan.gpu or plan.cpu with its null keys taken from its reference (the CPU's memory: this machine's RAM).
    A GPU whose memory or peak the user gave is never named after the reference card."""
    spec, reference = plan[kind], plan[kind].reference
    peak = spec.peak_tflops if spec.peak_tflops is not None else reference.peak_tflops
    if kind == "cpu":
        memory = spec.memory_gib if spec.memory_gib is not None else machine_memory_gib()
        name = spec.name or (reference.name if spec.peak_tflops is None else "your CPU")
        note = "plan.cpu.peak_tflops" if spec.peak_tflops is not None else "the reference, plan.cpu.reference; plan.cpu.peak_tflops=<TFLOPS> prices yours"
        ram = "plan.cpu.memory_gib" if spec.memory_gib is not None else "this machine's; plan.cpu.memory_gib=<GiB> says the node's"
        return Hardware(name, memory, peak, note, ram)
    memory = spec.memory_gib if spec.memory_gib is not None else reference.memory_gib
    given = [key for key in ("name", "memory_gib", "peak_tflops") if spec[key] is not None]
    name = spec.name or (reference.name if not given else f"{memory:g} GiB GPU")
    if not given:
        return Hardware(name, memory, peak, "the reference card, plan.gpu.reference; plan.gpu.name, memory_gib and peak_tflops say yours")
    missing = [key for key in ("memory_gib", "peak_tflops") if key not in given]
    note = "given: " + ", ".join(f"plan.gpu.{key}" for key in given) + (f"; {' and '.join(missing)}: {reference.name}'s" if missing else "")
    return Hardware(name, memory, peak, note)


def device_of(trainer: DictConfig, plan: DictConfig, work: str) -> tuple[str, float, float, int]:
    """(name, memory GiB per device, TFLOPS per device at its utilisation for `work`, devices) of a stage's trainer."""
    if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto"):
        gpu = hardware(plan, "gpu")
        return gpu.name, gpu.memory_gib, gpu.peak_tflops * plan.gpu.utilization[work], device_count(trainer.get("devices", 1)) or 8
    cpu = hardware(plan, "cpu")
    return "CPU", cpu.memory_gib, cpu.peak_tflops * plan.cpu.utilization[work], 1


def strategy_name(trainer: DictConfig) -> str | None:
    strategy = trainer.get("strategy")
    if strategy is None or isinstance(strategy, str):
        return strategy
    return "fsdp" if "fsdp" in str(strategy.get("_target_", "")) else str(strategy.get("_target_", "custom"))


def model_size(spec: DictConfig, num_layers: int | None = None):
    return size_of(model_config(spec.name_or_path, spec.get("gguf_file"), spec.get("cache_dir") or "~/.cache/calibfuse"), num_layers)


def steps_and_held_out_passes(trainer: DictConfig, epoch: int | None) -> tuple[int | None, int]:
    """Steps and held-out passes as Lightning counts them: it stops at max_steps or max_epochs, whichever
    comes first, and validates every val_check_interval batches of an epoch, else at each epoch's end
    (early stopping can only end it sooner). `epoch`: steps an epoch, None if the data's size is unknown."""
    limits = [n for n in (trainer.get("max_steps", -1), (trainer.get("max_epochs") or -1) * (epoch or 0)) if n > 0]
    if not limits:
        return None, 0
    steps = min(limits)
    if not epoch:
        return steps, 0
    whole, part = divmod(steps, epoch)
    interval = trainer.get("val_check_interval")
    return steps, (whole * (epoch // interval) + part // interval) if isinstance(interval, int) else whole + (part > 0)


def pretrain_stage(cfg: DictConfig, plan: DictConfig) -> dict:
    p = compose_stage("pretrain", stage_overrides(cfg)["pretrain"])
    full, cut = model_size(p.base_model), model_size(p.base_model, p.module.num_layers)
    name, memory, peak, devices = device_of(p.trainer, plan, "train")
    data, trainer = p.data, p.trainer
    rows = data.max_examples or plan.rows.get(str(data.path))
    held_out = round(rows * data.val_fraction) if rows else 0
    per_step = data.batch_size * devices * trainer.get("accumulate_grad_batches", 1)
    steps, passes = steps_and_held_out_passes(trainer, -(-(rows - held_out) // per_step) if rows else None)
    # per position: the layers everywhere; the LM head (vocab x width) only where a completion token is scored if the module says so
    head = cut.vocab * cut.hidden
    scored = plan.scored_share.get(str(data.path), 1.0) if p.module.get("head_on_scored_only") else 1.0
    per_token = cut.compute - head + scored * head
    tokens = steps * per_step * data.max_length if steps else None
    flops = (6 * per_token * tokens + 2 * per_token * passes * held_out * data.max_length) if tokens else None
    per_device = training_bytes(cut.total, 0, strategy_name(trainer), devices) + activation_bytes(cut, data.batch_size * data.max_length)
    # every rank of a node loads the whole base on the host, in its dtype, before cutting it to num_layers
    loaded = full.total * dtype_bytes(p.base_model.get("dtype"), "cpu")
    work = f"{steps} steps x {per_step} rows x <= {data.max_length} tokens" + (
        f", {passes} held-out pass{'es' * (passes > 1)} x {held_out} rows" if passes else ""
    )
    return {
        "stage": "pretrain",
        "models": [(f"{p.base_model.name_or_path} (base)", full.total), (f"its first {p.module.num_layers} layers (trained)", cut.total)],
        "device": f"{devices} x {name}" + (f" ({strategy_name(trainer)})" if trainer.get("strategy") else ""),
        "memory": (per_device, memory * GiB),
        # checked against this machine's RAM only when the stage runs here (on its CPU); a GPU node's RAM only when given
        "host": (devices * loaded, hardware(plan, "cpu").memory_gib * GiB, hardware(plan, "cpu").ram_note, name == "CPU" or plan.cpu.memory_gib is not None),
        "host_why": f"{devices} rank{'s' * (devices > 1)} x {loaded / GiB:.1f} GiB: each loads the whole {p.base_model.name_or_path} "
        f"in {p.base_model.get('dtype')} before cutting it to {p.module.num_layers} layers",
        "flops": flops,
        "work": work if steps else "steps unknown: set plan.rows for the data",
        "seconds": flops / (peak * 1e12 * devices) if flops else None,
        "calibration": cut,
    }


def align_stage(cfg: DictConfig, plan: DictConfig, target: str, calibration) -> dict:
    a = compose_stage("align", [f"target={target}", *stage_overrides(cfg)["align"]])
    size = model_size(a.target)
    name, memory, peak, _ = device_of(a.trainer if a.target.get("device", "cpu") != "cpu" else {}, plan, "train")
    weights = size.total * dtype_bytes(a.target.get("dtype"), a.target.get("device", "cpu")) + calibration.total * 4
    trained = calibration.hidden * size.hidden
    vocabulary = min(calibration.vocab, size.vocab)
    tokens = a.trainer.get("max_epochs", 1) * vocabulary * (a.alignment.num_negatives + 1)
    return {
        "stage": f"align {target}",
        "models": [(a.target.name_or_path, size.total), ("A (trained)", trained)],
        "device": f"1 x {name} (embedding rows only)",
        "memory": (weights + 16 * trained, memory * GiB),
        "flops": 6 * trained * tokens,
        "work": f"{a.trainer.get('max_epochs', 1)} epochs x <= {vocabulary:,} shared tokens x {a.alignment.num_negatives + 1} candidates",
        "seconds": 6 * trained * tokens / (peak * 1e12),
    }


def evaluate_stage(cfg: DictConfig, plan: DictConfig, target: str, calibration) -> dict:
    targets = list(cfg.targets)
    extra = stage_overrides(cfg)["evaluate"]
    e = compose_stage("evaluate", evaluate_overrides(targets, dict.fromkeys(targets, "/planned/alignment"), "/planned/calibration_model", cfg, extra))
    spec, reference = e.targets[target], e.reference_lm.model
    size, ref = model_size(spec), model_size(reference)
    scorer_model = plan.scorer_models.get(e.scorer._target_.rsplit(".", 1)[-1].removesuffix("Scorer").lower())
    scorer = size_of(model_config(scorer_model)) if scorer_model else None
    name, memory, peak, devices = device_of(e.trainer, plan, "generate")
    generation = e.protocol.generation
    prompts = cfg.get("prompt_sample") or e.prompts.get("limit") or plan.prompts.get(str(cfg.prompt_set))
    seeds = len(cfg.seeds) if cfg.get("seeds") else 1
    judged = [m for m in cfg.method_names if role_of({"method": m}) == "method"]  # fusion: a cell per alpha > 0
    fused = sum(a > 0 for a in cfg.alphas) * len(judged)
    others = len([m for m in cfg.method_names if m not in judged and m != Method.name])
    rows = prompts * generation.num_samples * seeds
    new, context = rows * generation.max_new_tokens, rows * plan.prompt_tokens
    per_cell = 2 * size.compute * (new + context) + 2 * ref.compute * (new + context) + (2 * scorer.compute * new if scorer else 0)
    flops = (1 + fused + others) * per_cell + fused * 2 * calibration.compute * (new + context)
    batch_tokens = generation.batch_size * (plan.prompt_tokens + generation.max_new_tokens)
    parts = {  # bytes on the grid's device: the reference LM sits beside the target (calibfuse/evaluation/runner.py)
        "target": size.total * dtype_bytes(spec.get("dtype"), spec.get("device", "cuda")),
        "calibration model": calibration.total * dtype_bytes(spec.get("dtype"), spec.get("device", "cuda")),
        "reference": ref.total * dtype_bytes(reference.get("dtype"), reference.get("device", "cuda")),
        "scorer": scorer.total * 4 if scorer else 0,
        "working": kv_cache_bytes(size, batch_tokens) + kv_cache_bytes(calibration, batch_tokens) + 4 * 4 * generation.batch_size * size.vocab,
    }
    models = [(spec.name_or_path, size.total), ("calibration model", calibration.total), (f"{reference.name_or_path} (perplexity)", ref.total)]
    return {
        "stage": f"evaluate {target}",
        "models": models + ([(f"{scorer_model} (toxicity)", scorer.total)] if scorer else []),
        "device": f"{devices} x {name}",
        "memory": (sum(parts.values()), memory * GiB),
        "parts": parts,
        "reference": (reference.name_or_path, ref.total, str(reference.get("dtype"))),
        "flops": flops,
        "work": f"{1 + fused + others} cells x {rows:,} rows x {generation.max_new_tokens} new tokens (+ ~{plan.prompt_tokens} prompt tokens)",
        "seconds": flops / (peak * 1e12 * devices),
    }


def plan_run(cfg: DictConfig) -> list[dict]:
    pretrain = pretrain_stage(cfg, cfg.plan)
    calibration = pretrain.pop("calibration")
    stages = [pretrain] + [align_stage(cfg, cfg.plan, t, calibration) for t in cfg.targets]
    return stages + [evaluate_stage(cfg, cfg.plan, t, calibration) for t in cfg.targets]


def seconds_text(seconds: float | None) -> str:
    return "–" if not seconds else f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def render(stages: list[dict]) -> str:
    lines = ["| stage | models (parameters) | devices | peak memory per device | host RAM | fits | compute | time | work |", "|" + "---|" * 9]
    for s in stages:
        models = "; ".join(f"{m} {n / 1e9:.3f}B" if n >= 1e8 else f"{m} {n / 1e6:.2f}M" for m, n in s["models"])
        (need, have), host = s["memory"], s.get("host")
        ram = "–" if not host else f"{host[0] / GiB:.1f} of {host[1] / GiB:.0f} GiB" if host[3] else f"{host[0] / GiB:.1f} GiB (node's RAM not given)"
        fits = "yes" if not problems_of(s) else "NO"
        flops = f"{s['flops']:.2e} FLOPs" if s["flops"] else "–"
        lines.append(
            f"| {s['stage']} | {models} | {s['device']} | {need / GiB:.1f} of {have / GiB:.0f} GiB | {ram} | {fits} | {flops} | "
            f"{seconds_text(s['seconds'])} | {s['work']} |"
        )
    return "\n".join(lines)


def total(stages: list[dict]) -> list[str]:
    """The time of the whole run, one stage after another, and with one job per target after stage 1 (SLURM)."""
    known = [s["seconds"] or 0 for s in stages]
    whole = sum(known)
    if not whole:
        return []
    kinds = {kind: sum(s["seconds"] or 0 for s in stages if s["stage"].split()[0] == kind) for kind in ("pretrain", "align", "evaluate")}
    on_cpu = sum(s["seconds"] or 0 for s in stages if "CPU" in s["device"].split(" (")[0])
    lower = "at least " if not all(known) else ""
    lines = [
        f"total, one stage after another: {lower}{whole:.0f} s ({whole / 3600:.2f} h): "
        + ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in kinds.items())
        + f"; {on_cpu / whole:.0%} of it on the CPU"
    ]
    targets = [s["stage"].split(" ", 1)[1] for s in stages if s["stage"].startswith("align ")]
    if len(targets) > 1:
        per_target = [sum(s["seconds"] or 0 for s in stages if s["stage"].split(" ", 1)[-1] == t) for t in targets]
        lines.append(f"total with one job per target after stage 1 (hydra/launcher=slurm): {lower}{kinds['pretrain'] + max(per_target):.0f} s")
    return lines


def problems_of(stage: dict) -> list[tuple[str, str]]:
    """Why a stage cannot run as planned, each as (what, what would fit): its device's memory, or stage 1's host RAM."""
    found = []
    need, have = stage["memory"]
    if need > have:
        found.append((f"stage {stage['stage']} needs {need / GiB:.1f} GiB per device and {stage['device']} has {have / GiB:.0f} GiB", memory_advice(stage)))
    if stage.get("host") and stage["host"][3] and stage["host"][0] > stage["host"][1]:
        (host, ram, whose, _), why = stage["host"], stage["host_why"]
        found.append(
            (
                f"stage {stage['stage']} needs {host / GiB:.1f} GiB of host RAM ({why}) and the node has {ram / GiB:.0f} GiB ({whose})",
                "expected a node with more RAM (plan.cpu.memory_gib=<GiB> says what it has), fewer ranks per node (trainer.devices), "
                f"and under SLURM hydra.launcher.mem_gb above {host / GiB:.0f} (calibfuse's SLURM jobs ask 64 unless told)",
            )
        )
    return found


def refusal(stages: list[dict]) -> str | None:
    """Every stage that cannot run, the advice once for the stages it fits (four targets' grids share theirs)."""
    by_advice: dict[str, list[str]] = {}
    for stage in stages:
        for what, advice in problems_of(stage):
            by_advice.setdefault(advice, []).append(what)
    lines = []
    for advice, whats in by_advice.items():
        others = ", ".join(w.split(" needs ")[0].removeprefix("stage ") for w in whats[1:])
        lines.append(f"refused: {whats[0]}" + (f"; so do {others}" if others else "") + f"\n  {advice}")
    return "\n".join(lines) or None


def memory_advice(stage: dict) -> str:
    """What would fit: for a grid that one GPU cannot hold because of the reference LM beside the target, each
    way out with its figure; otherwise the general ones."""
    general = "expected a device with more memory (plan.gpu.memory_gib, plan.cpu.memory_gib say what you have), FSDP over more devices "
    general += "(trainer=fsdp), a smaller batch, or a smaller dtype"
    parts, (need, have) = stage.get("parts"), stage["memory"]
    if not parts or need - parts["reference"] > have:
        return general
    name, int8, dtype = stage["reference"]  # 8-bit: about a byte a parameter
    ref, rest = parts["reference"], need - parts["reference"]

    def fit(n):
        return f"{n / GiB:.1f} GiB ({'fits' if n <= have else 'too big'})"

    return (
        f"expected a plan that fits one {have / GiB:g} GiB GPU. The cause is {name} for perplexity ({ref / GiB:.1f} GiB in {dtype}) beside the "
        f"{parts['target'] / GiB:.1f} GiB target; without it the stage needs {rest / GiB:.1f} GiB. Ways out, with what each would need: "
        f"the reference LM on a second GPU like it, {fit(ref)}; in 8-bit beside the target, about {fit(rest + int8)}; scored in a second pass "
        f"after the target is unloaded, {fit(ref)}, or in 8-bit about {fit(int8)}. calibfuse does none of these yet (the grid holds the "
        f"reference LM on the target's device). What runs today: a GPU with {need / GiB:.1f} GiB or more (plan.gpu.memory_gib=<GiB>), or "
        f"reference_lm=gemma3-270m in evaluate_overrides (perplexity under Gemma-3-270M, not the paper's {name})"
    )


def hardware_lines(plan: DictConfig) -> list[str]:
    """The devices the plan priced, each figure's source said: the reference's or the user's."""
    lines = []
    for kind in ("gpu", "cpu"):
        h, u = hardware(plan, kind), plan[kind].utilization
        usage = f"{u.train:.0%} of its peak when training, {u.generate:.0%} when generating"
        memory = f"{h.memory_gib:g} GiB, " if kind == "gpu" else ""
        ram = f"; RAM {h.memory_gib:.0f} GiB ({h.ram_note})" if kind == "cpu" else ""
        lines.append(f"{kind.upper()}: {h.name}: {memory}{h.peak_tflops:g} TFLOPS peak ({h.note}){ram}; {usage}")
    return lines


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    stages = plan_run(cfg)
    print(render(stages), "", *hardware_lines(cfg.plan), sep="\n")
    print("memory: weights, Adam state, activations, KV cache, logits (calibfuse/models/footprint.py); GiB = 2^30 bytes")
    print(*total(stages), sep="\n")
    unchecked = [s for s in stages if s.get("host") and not s["host"][3]]
    for stage in unchecked:  # a GPU node's RAM is not this machine's: said, not guessed
        print(f"host RAM of stage {stage['stage']}: {stage['host'][0] / GiB:.1f} GiB per node ({stage['host_why']}); plan.cpu.memory_gib=<GiB> checks it")
    refused = refusal(stages)
    if refused:
        raise SystemExit(refused)


if __name__ == "__main__":
    main()
