"""Every config option composes, and instantiates where this machine can run it."""

from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from calibfuse.utils import instantiate
from conftest import CONF_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ["base_model", "data", "calibration_model", "trainer", "logger", "callbacks", "debug", "experiment"]:
        assert options(group), group


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_presets(trainer, tmp_path):
    cfg = compose_config("pretrain", [f"trainer={trainer}"], tmp_path)
    if cfg.trainer.accelerator == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
        if "strategy" in cfg.trainer and not isinstance(cfg.trainer.strategy, str):
            strategy = instantiate(cfg.trainer.strategy)  # FSDP: the wrap policy resolves to real classes
            assert type(strategy).__name__ == "FSDPStrategy"
        return  # needs a GPU to build the Trainer
    trainer_obj = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer_obj, L.Trainer)
    if trainer == "ddp_sim":
        assert trainer_obj.num_devices == 2 and type(trainer_obj.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options(logger, tmp_path):
    cfg = compose_config("pretrain", [f"logger={logger}"], tmp_path)
    for name, conf in cfg.logger.items():
        assert conf._target_.startswith("lightning.pytorch.loggers")
        if name == "wandb":
            assert conf.offline is True  # offline unless the user turns it off


@pytest.mark.parametrize("base_model", options("base_model"))
def test_base_model_options(base_model, tmp_path):
    spec = instantiate(compose_config("pretrain", [f"base_model={base_model}"], tmp_path).base_model)
    assert spec.trust_remote_code is False


@pytest.mark.parametrize("data", options("data"))
def test_data_options_compose(data, tmp_path):
    cfg = compose_config("pretrain", [f"data={data}"], tmp_path)
    assert cfg.data._target_ == "calibfuse.data.PromptCompletionDataModule"


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_options(debug, tmp_path):
    cfg = compose_config("pretrain", [f"debug={debug}"], tmp_path)
    instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_instantiate_against_local_stand_ins(experiment, tiny_model_dirs, tmp_path):
    """Paper settings need GPUs and the hub; swap in a tiny local model, a local TSV and the CPU."""
    tsv = tmp_path / "train.tsv"
    tsv.write_text("vanilla\tadversarial\tcompletion\tdata_type\n" + "".join(
        f"Question {i}?\t\tA calm, helpful answer number {i}.\tvanilla_benign\n" for i in range(20)))
    cfg = compose_config("pretrain", [f"experiment={experiment}"], tmp_path)
    assert OmegaConf.select(cfg, "calibration_model.optimizer.lr") is not None
    stand_ins = [
        f"experiment={experiment}",
        f"base_model.name_or_path={tiny_model_dirs['llama']}",
        "base_model.dtype=float32",
        f"data.path={tsv}", "data.hf_name=null", "data.load_kwargs={}", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
        "calibration_model.num_layers=2",
    ]
    cfg = compose_config("pretrain", stand_ins, tmp_path)
    spec = instantiate(cfg.base_model)
    from calibfuse.models import load_tokenizer

    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(spec))
    datamodule.setup("fit")
    module = instantiate(cfg.calibration_model, base_model=spec)
    assert module.model.config.num_hidden_layers == 2
    assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


def test_paper_pretrain_matches_the_paper(tmp_path):
    cfg = compose_config("pretrain", ["experiment=paper_pretrain"], tmp_path)
    assert cfg.base_model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert cfg.data.path == "allenai/wildjailbreak" and cfg.data.load_kwargs.delimiter == "\t"
    assert cfg.calibration_model.num_layers == 3 and cfg.calibration_model.optimizer.lr == 1e-5
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.precision == "bf16-mixed"
    effective = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches
    assert effective == 56
