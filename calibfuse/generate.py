"""Fused generation from the command line: prompts in, generations.jsonl out.

    python -m calibfuse.generate alignment_dir=<align run>/alignment "alphas=[0,0.3,0.5]"
    python -m calibfuse.generate ... prompts.path=my_prompts.jsonl generation.do_sample=true generation.num_samples=5
    python -m calibfuse.generate ... target=gemma3-270m alignment_dir=<align run to gemma>/alignment

Prompts: `prompts.texts` (a list in the config), or `prompts.path`: a .txt file (one prompt per
line) or a .jsonl file whose `prompt` is a string or, as in RealToxicityPrompts, {"text": ...}.
The calibration model is the one the alignment records (calibration_model.name_or_path=... names
another). The continuations are printed, and the run dir receives generations.jsonl: one row per
(alpha, prompt, sample) with the prompt, the continuation and token counts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from calibfuse.data.prompts import load_prompts
from calibfuse.fusion.artifacts import alignment_extras, load_alignment, recorded_model
from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.generator import FusedGenerator
from calibfuse.utils.checks import check_ints, check_required
from calibfuse.utils.files import write_json
from calibfuse.utils.run import instantiate, resolved_config, task_wrapper, versions

log = logging.getLogger(__name__)


def read_prompts(path: str | None = None, texts: list[str] | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a .txt/.jsonl file (calibfuse.data.prompts.load_prompts) or a list; an empty set is an error."""
    if path is not None:
        return [p.text for p in load_prompts(path, limit=limit)]
    prompts = list(texts or [])[:limit]
    if not prompts:
        raise ValueError(f"no prompts (path={path!r}, texts={texts!r}); expected at least one")
    return prompts


@task_wrapper
def generate(cfg: DictConfig) -> dict:
    check_required(cfg)  # calibration_model.name_or_path and alignment_dir: named before anything loads
    check_ints(
        cfg,
        {
            "prompts.limit": (1, True),
            "generation.batch_size": (1, False),
            "generation.num_samples": (1, False),
            "generation.max_new_tokens": (1, False),
            "generation.seed": (None, False),
        },
    )
    fusion = instantiate(cfg.fusion)  # FusionConfig: a bad option is named here, before any model loads
    calibration = instantiate(cfg.calibration_model)
    if cfg.alignment_dir is not None:
        _, meta = load_alignment(cfg.alignment_dir)  # a missing or non-finite A fails here, before the models load
        if calibration.name_or_path is None:  # the calibration model the alignment was made with
            calibration = replace(calibration, name_or_path=recorded_model(meta["calibration_model"], Path(cfg.alignment_dir).expanduser()))
        alignment_extras(cfg.alignment_dir, fusion)  # as does a missing gain or LayerNorm weight the config needs
    if calibration.name_or_path is None:
        raise ValueError("calibration_model.name_or_path=null with alignment_dir=null; expected the calibration model's dir (no alignment records one)")
    output_dir = Path(cfg.paths.output_dir)
    prompts = read_prompts(cfg.prompts.path, cfg.prompts.texts, cfg.prompts.limit)
    settings: GenerationSettings = instantiate(cfg.generation)
    generator = FusedGenerator.from_artifacts(instantiate(cfg.target), calibration, cfg.alignment_dir, fusion, cfg.prompt_format)
    started = time.time()
    rows = generator.generate(prompts, list(cfg.alphas), settings)
    seconds = time.time() - started
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "generations.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in asdict(row).items() if k not in ("token_ids", "kl", "agreement")}, ensure_ascii=False) + "\n")
    new_tokens = sum(r.new_tokens for r in rows)
    summary = {
        "rows": len(rows),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(new_tokens / seconds, 1),
        "versions": versions(),
        "config": resolved_config(cfg),
    }
    write_json(output_dir / "generate.json", summary)
    for row in rows:
        print(f"α={row.alpha:g} | {row.prompt!r} -> {row.continuation!r}")
    log.info("%d generations, %d new tokens in %.1f s -> %s", len(rows), new_tokens, seconds, output_dir / "generations.jsonl")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
