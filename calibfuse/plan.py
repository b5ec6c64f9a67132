"""Plan a pipeline run before it runs: per stage, the models and their parameters (built on the meta device
from configs, no weights, no network), peak memory per device at the configured dtype, batch sizes and
strategy, the compute (6 N per trained token, 2 N per generated, scored or held-out token) and the time at a stated
utilisation, and whether it fits the configured devices. A plan that cannot fit is refused.

    python -m calibfuse.plan                             # the main job (embedded default, CPU)
    python -m calibfuse.plan experiment=paper_table      # the paper's table (GPU)
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from calibfuse.methods import Method, role_of
from calibfuse.models.footprint import GB, activation_bytes, dtype_bytes, kv_cache_bytes, model_config, size_of, training_bytes
from calibfuse.utils.composing import compose_stage, evaluate_overrides, stage_overrides
from calibfuse.utils.run import device_count  # its module registers the configs' resolvers (paper_pretrain's accumulation)


def machine_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def device_of(trainer: DictConfig, plan: DictConfig, work: str) -> tuple[str, float, float, int]:
    """(name, memory GB per device, TFLOPS per device at its utilisation for `work`, devices) of a stage's trainer."""
    if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto"):
        effective = plan.gpu.peak_tflops * plan.gpu.utilization[work]
        return plan.gpu.name, plan.gpu.memory_gb, effective, device_count(trainer.get("devices", 1)) or 8
    return "CPU", plan.cpu.memory_gb or machine_memory_gb(), plan.cpu.peak_tflops * plan.cpu.utilization[work], 1


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
    per_device = training_bytes(cut.total, 0, trainer.get("strategy"), devices) + activation_bytes(cut, data.batch_size * data.max_length)
    work = f"{steps} steps x {per_step} rows x <= {data.max_length} tokens" + (
        f", {passes} held-out pass{'es' * (passes > 1)} x {held_out} rows" if passes else ""
    )
    return {
        "stage": "pretrain",
        "models": [(f"{p.base_model.name_or_path} (base)", full.total), (f"its first {p.module.num_layers} layers (trained)", cut.total)],
        "device": f"{devices} x {name}" + (f" ({trainer.strategy})" if trainer.get("strategy") else ""),
        "memory": (per_device, memory * GB),
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
        "memory": (weights + 16 * trained, memory * GB),
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
    weight_bytes = size.total * dtype_bytes(spec.get("dtype"), spec.get("device", "cuda"))
    weight_bytes += calibration.total * dtype_bytes(spec.get("dtype"), spec.get("device", "cuda"))
    weight_bytes += ref.total * dtype_bytes(reference.get("dtype"), reference.get("device", "cuda"))
    weight_bytes += scorer.total * 4 if scorer else 0
    batch_tokens = generation.batch_size * (plan.prompt_tokens + generation.max_new_tokens)
    working = kv_cache_bytes(size, batch_tokens) + kv_cache_bytes(calibration, batch_tokens) + 4 * 4 * generation.batch_size * size.vocab
    models = [(spec.name_or_path, size.total), ("calibration model", calibration.total), (f"{reference.name_or_path} (perplexity)", ref.total)]
    return {
        "stage": f"evaluate {target}",
        "models": models + ([(f"{scorer_model} (toxicity)", scorer.total)] if scorer else []),
        "device": f"{devices} x {name}",
        "memory": (weight_bytes + working, memory * GB),
        "flops": flops,
        "work": f"{1 + fused + others} cells x {rows:,} rows x {generation.max_new_tokens} new tokens (+ ~{plan.prompt_tokens} prompt tokens)",
        "seconds": flops / (peak * 1e12 * devices),
    }


def plan_run(cfg: DictConfig) -> list[dict]:
    pretrain = pretrain_stage(cfg, cfg.plan)
    calibration = pretrain.pop("calibration")
    stages = [pretrain] + [align_stage(cfg, cfg.plan, t, calibration) for t in cfg.targets]
    return stages + [evaluate_stage(cfg, cfg.plan, t, calibration) for t in cfg.targets]


def render(stages: list[dict]) -> str:
    lines = ["| stage | models (parameters) | devices | peak memory per device | fits | compute | time | work |", "|" + "---|" * 8]
    for s in stages:
        models = "; ".join(f"{m} {n / 1e9:.3f}B" if n >= 1e8 else f"{m} {n / 1e6:.2f}M" for m, n in s["models"])
        need, have = s["memory"]
        time = f"{s['seconds'] / 3600:.2f} h" if s["seconds"] and s["seconds"] >= 3600 else f"{s['seconds']:.0f} s" if s["seconds"] else "–"
        flops = f"{s['flops']:.2e} FLOPs" if s["flops"] else "–"
        fits = "yes" if need <= have else "NO"
        lines.append(f"| {s['stage']} | {models} | {s['device']} | {need / GB:.1f} of {have / GB:.0f} GB | {fits} | {flops} | {time} | {s['work']} |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    stages = plan_run(cfg)
    print(render(stages))
    for device in ("gpu", "cpu"):
        u = cfg.plan[device].utilization
        print(f"{'' if device == 'cpu' else chr(10)}time on {device}: {u.train:.0%} of its peak when training, {u.generate:.0%} when generating")
    print("memory: weights, Adam state, activations, KV cache, logits (calibfuse/models/footprint.py)")
    too_big = [s for s in stages if s["memory"][0] > s["memory"][1]]
    if too_big:
        s = too_big[0]
        raise SystemExit(
            f"refused: stage {s['stage']} needs {s['memory'][0] / GB:.1f} GB per device and {s['device']} has {s['memory'][1] / GB:.0f} GB; "
            "expected a plan that fits: a device with more memory (plan.gpu.memory_gb, plan.cpu.memory_gb say what you have), "
            "FSDP over more devices (trainer=fsdp), a smaller batch, or a smaller dtype"
        )


if __name__ == "__main__":
    main()
