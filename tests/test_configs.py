"""Every config option composes, and instantiates where this machine can run it."""

from pathlib import Path

import lightning as L
import pytest
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf, open_dict

from calibfuse.utils.run import instantiate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def stage_of(experiment: str) -> str:
    """Stage experiments end in the entry point they configure (paper_pretrain, paper_align); the
    others configure the pipeline."""
    stage = experiment.rsplit("_", 1)[-1]
    return stage if stage in ("pretrain", "align", "evaluate") else "pipeline"


def test_every_group_has_options():
    for group in ["base_model", "target", "data", "module", "alignment", "trainer", "logger", "callbacks", "debug", "experiment"]:
        assert options(group), group


# What each preset must build: (strategy class, devices it asks for, precision); GPU presets are built with
# the accelerator forced to CPU, which changes nothing else in them.
TRAINERS = {
    "cpu": ("SingleDeviceStrategy", 1, "32-true"),
    "default": ("SingleDeviceStrategy", 1, "32-true"),
    "ddp_sim": ("DDPStrategy", 2, "32-true"),
    "gpu": ("SingleDeviceStrategy", 1, "bf16-mixed"),
    "ddp": ("DDPStrategy", 2, "bf16-mixed"),
    "fsdp": ("FSDPStrategy", 2, "bf16-mixed"),
}


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_presets(trainer, tmp_path):
    assert trainer in TRAINERS, f"a new trainer preset: say what it builds in TRAINERS ({trainer})"
    strategy, devices, precision = TRAINERS[trainer]
    cfg = compose_config("pretrain", [f"trainer={trainer}"], tmp_path)
    assert str(cfg.trainer.get("precision", "32-true")) == precision
    if cfg.trainer.accelerator == "gpu":  # forced to CPU, with as many devices as the table says (-1: all GPUs)
        with open_dict(cfg):
            cfg.trainer.accelerator, cfg.trainer.devices = "cpu", devices
    if trainer == "fsdp":  # Lightning builds FSDP for CUDA only: check the strategy object it would get
        built = instantiate(cfg.trainer.strategy)
        assert type(built).__name__ == strategy and built.sharding_strategy.name == "FULL_SHARD"
        return
    trainer_obj = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer_obj, L.Trainer)
    assert (type(trainer_obj.strategy).__name__, trainer_obj.num_devices) == (strategy, devices)
    assert trainer_obj.precision == precision


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options(logger, tmp_path):
    from lightning.pytorch.loggers import Logger

    cfg = compose_config("pretrain", [f"logger={logger}"], tmp_path)
    for name, conf in cfg.logger.items():
        built = instantiate(conf)  # a W&B logger starts no run until it logs
        assert isinstance(built, Logger)
        if name == "wandb":
            assert conf.offline is True  # offline unless the user turns it off
            assert "anonymous" not in built._wandb_init  # wandb warns on every run when Lightning passes it


@pytest.mark.parametrize("base_model", options("base_model"))
def test_base_model_options(base_model, tmp_path):
    spec = instantiate(compose_config("pretrain", [f"base_model={base_model}"], tmp_path).base_model)
    assert spec.trust_remote_code is False


@pytest.mark.parametrize("data", options("data"))
def test_data_options_compose(data, tmp_path):
    cfg = compose_config("pretrain", [f"data={data}"], tmp_path)
    assert cfg.data._target_ == "calibfuse.data.datamodule.PromptCompletionDataModule"


DEBUG = {  # what each debug option must set on the Trainer
    "fast_dev_run": {"fast_dev_run": 1},
    "limit": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2},
    "overfit": {"max_epochs": 20, "overfit_batches": 2},
}


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_options(debug, tmp_path):
    cfg = compose_config("pretrain", [f"debug={debug}"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    for attribute, value in DEBUG[debug].items():
        assert getattr(trainer, attribute) == value, (debug, attribute)


@pytest.mark.parametrize("target", options("target"))
def test_target_options(target, tmp_path):
    cfg = compose_config("align", [f"target={target}", "calibration_model.name_or_path=x"], tmp_path)
    spec = instantiate(cfg.target)
    assert spec.trust_remote_code is False and spec.device == "cpu"


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if stage_of(e) == "align"])
def test_align_experiments_instantiate_against_local_stand_ins(experiment, tiny_model_dirs, tiny_target_dir, tmp_path):
    from calibfuse.align import align

    cfg = compose_config(
        "align",
        [
            f"experiment={experiment}",
            f"calibration_model.name_or_path={tiny_model_dirs['llama']}",
            f"target.name_or_path={tiny_target_dir}",
            "trainer.max_epochs=1",
            "logger=csv",
        ],
        tmp_path,
    )
    align(cfg)
    assert (tmp_path / "alignment" / "alignment.safetensors").is_file()


def test_paper_align_matches_the_reference(tmp_path):
    cfg = compose_config("align", ["experiment=paper_align", "calibration_model.name_or_path=x"], tmp_path)
    assert cfg.target.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    a = cfg.alignment
    assert (a.matching, a.embedding_source, a.num_negatives, a.batch_size, a.optimizer.lr) == ("exact", "input", 10, 32, 1e-3)
    assert a.optimizer._target_ == "torch.optim.Adam" and cfg.trainer.max_epochs == 5 and cfg.seed == 42


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if stage_of(e) == "pretrain"])
def test_experiments_instantiate_against_local_stand_ins(experiment, tiny_model_dirs, tmp_path):
    """Paper settings need GPUs and the hub; swap in a tiny local model, a local TSV and the CPU."""
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "vanilla\tadversarial\tcompletion\tdata_type\n" + "".join(f"Question {i}?\t\tA calm, helpful answer number {i}.\tvanilla_benign\n" for i in range(20))
    )
    cfg = compose_config("pretrain", [f"experiment={experiment}"], tmp_path)
    lr = OmegaConf.select(cfg, "module.optimizer.lr")
    assert isinstance(lr, float) and 0 < lr < 1e-2, lr  # an experiment's learning rate, set and sane
    stand_ins = [
        f"experiment={experiment}",
        f"base_model.name_or_path={tiny_model_dirs['llama']}",
        "base_model.dtype=float32",
        f"data.path={tsv}",
        "data.hf_name=null",
        "data.load_kwargs={}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "++trainer.strategy=auto",
        "trainer.precision=32-true",
        "module.num_layers=2",
    ]
    cfg = compose_config("pretrain", stand_ins, tmp_path)
    spec = instantiate(cfg.base_model)
    from calibfuse.models.loading import load_tokenizer

    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(spec))
    datamodule.setup("fit")
    assert len(datamodule.train_examples) + len(datamodule.val_examples) == 20 and datamodule.val_examples  # every row of the TSV, split once
    module = instantiate(cfg.module, base_model=spec)
    assert module.model.config.num_hidden_layers == 2
    assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


def test_paper_pretrain_matches_the_paper(tmp_path):
    cfg = compose_config("pretrain", ["experiment=paper_pretrain"], tmp_path)
    assert cfg.base_model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert cfg.data.path == "allenai/wildjailbreak" and cfg.data.load_kwargs.delimiter == "\t"
    assert cfg.module.num_layers == 3 and cfg.module.optimizer.lr == 1e-5
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.precision == "bf16-mixed"
    effective = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches
    assert effective == 56


@pytest.mark.parametrize("group", ["prompts", "protocol", "scorer", "reference_lm", "methods"])
def test_evaluation_groups_compose(group, tmp_path):
    for option in options(group):
        cfg = compose_config("evaluate", [f"{group}={option}"], tmp_path)
        if group == "protocol":
            settings = instantiate(cfg.protocol.generation)
            assert settings.num_samples == (25 if option == "rtp" else 1)
        if group == "methods":
            assert list(cfg.methods) == [option] and cfg.methods[option]._target_.startswith("calibfuse.methods")
        if group == "reference_lm":
            spec = instantiate(cfg.reference_lm.model)
            assert spec.trust_remote_code is False
        if group == "scorer":
            assert cfg.scorer._target_.startswith(("calibfuse.scoring.toxicity.", "calibfuse.scoring.toxblock."))
            assert not any("key" in k and k != "api_key_env" for k in cfg.scorer)  # keys come from the environment only


def test_paper_protocol_is_the_papers(tmp_path):
    cfg = compose_config("evaluate", [], tmp_path)
    g = cfg.protocol.generation
    assert (g.max_new_tokens, g.do_sample, g.num_samples, g.seed) == (10, False, 1, 2025) and cfg.prompt_format == "raw"
    rtp = compose_config("evaluate", ["protocol=rtp"], tmp_path).protocol.generation
    assert (rtp.max_new_tokens, rtp.do_sample, rtp.top_p, rtp.num_samples) == (20, True, 0.9, 25)


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if stage_of(e) == "pipeline"])
def test_pipeline_experiments_compose_down_to_every_stage(experiment, tmp_path):
    """Each pipeline experiment, and every stage config it leads to (one per sweep setting), composes."""
    from hydra import compose, initialize_config_dir

    from calibfuse.utils.composing import evaluate_overrides, stage_overrides

    cfg = compose_config("pipeline", [f"experiment={experiment}"], tmp_path)
    sweep = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    settings = [[]] + [[f"{knob}={value}"] for knob, values in sweep.items() for value in str(values).split(",")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for setting in settings:
            job = compose("pipeline", overrides=[f"experiment={experiment}", *setting])
            overrides = stage_overrides(job)
            compose("pretrain", overrides=overrides["pretrain"])
            targets = list(job.targets)
            for target in targets:
                aligned = compose("align", overrides=[f"target={target}", "calibration_model.name_or_path=x", *overrides["align"]])
                assert aligned.target.name_or_path == compose("align", overrides=[f"target={target}", "calibration_model.name_or_path=x"]).target.name_or_path
            alignments = {t: "/x/alignment" for t in targets} if job.alignment == "learned" else {}
            evaluation = compose("evaluate", overrides=evaluate_overrides(targets, alignments, Path("/x"), job, overrides["evaluate"]))
            assert set(evaluation.target_names) == set(targets) and set(targets) <= set(evaluation.targets)
            assert list(evaluation.alphas) == list(job.alphas)


def test_paper_table_instantiates_against_local_stand_ins(tiny_model_dirs, tiny_target_dir, tmp_path):
    """The paper's setting needs GPUs and the hub: its stage configs, with tiny local models, a local
    RTP copy and the CPU swapped in, instantiate to real objects."""
    import json

    from hydra import compose, initialize_config_dir

    from calibfuse.data.prompts import load_prompts
    from calibfuse.models.loading import load_tokenizer
    from calibfuse.utils.composing import evaluate_overrides, stage_overrides

    cfg = compose_config("pipeline", ["experiment=paper_table"], tmp_path)
    assert list(cfg.targets) == ["llama2-7b-chat-uncensored", "llama2-7b-chat", "medicine-chat", "finance-chat"]
    assert list(cfg.alphas) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    rtp = tmp_path / "rtp"
    rtp.mkdir()
    (rtp / "data.jsonl").write_text(
        "".join(json.dumps({"filename": f"f{i}", "begin": 0, "end": 5, "challenging": i < 3, "prompt": {"text": f"Prompt {i}"}}) + "\n" for i in range(6))
    )
    overrides = stage_overrides(cfg)
    cpu = ["trainer=cpu"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        pre = compose("pretrain", overrides=overrides["pretrain"])
        assert (pre.base_model.name_or_path, pre.data.path, pre.module.num_layers) == ("meta-llama/Llama-2-7b-chat-hf", "allenai/wildjailbreak", 3)
        aligned = compose("align", overrides=["target=finance-chat", "calibration_model.name_or_path=x", *overrides["align"]])
        assert aligned.target.name_or_path == "AdaptLLM/finance-chat" and aligned.alignment.matching == "exact"
        targets = list(cfg.targets)
        evaluation = compose("evaluate", overrides=evaluate_overrides(targets, {t: "/x" for t in targets}, Path("/x"), cfg, overrides["evaluate"]))
        assert (evaluation.prompts.source, evaluation.prompts.challenging_only) == ("allenai/real-toxicity-prompts", True)
        assert (evaluation.scorer._target_, evaluation.reference_lm.model.name_or_path) == (
            "calibfuse.scoring.toxicity.DetoxifyScorer",
            "meta-llama/Llama-2-13b-hf",
        )
        assert {n: evaluation.targets[n].name_or_path for n in targets}["llama2-7b-chat-uncensored"] == "georgesung/llama2_7b_chat_uncensored"
        stand_ins = compose(
            "evaluate",
            overrides=[
                *evaluate_overrides(targets, {t: "/x" for t in targets}, Path("/x"), cfg, overrides["evaluate"]),
                f"prompts.source={rtp}",
                f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
                "reference_lm.model.device=cpu",
                *[f"targets.{t}.name_or_path={tiny_target_dir}" for t in targets],
                *[f"targets.{t}.device=cpu" for t in targets],
                *cpu,
            ],
        )
    with open_dict(stand_ins):
        stand_ins.paths.output_dir = str(tmp_path)
    prompts = load_prompts(**OmegaConf.to_container(stand_ins.prompts))
    assert [p.text for p in prompts] == ["Prompt 0", "Prompt 1", "Prompt 2"]  # the challenging subset
    for target in targets:
        spec = instantiate(stand_ins.targets[target])
        tokenizer = load_tokenizer(spec)
        assert tokenizer.decode(tokenizer("Prompt 0", add_special_tokens=False)["input_ids"]) == "Prompt 0" and spec.trust_remote_code is False
        assert tokenizer.pad_token_id is not None  # set by the loader where the tokenizer has none: batches need it
    assert instantiate(stand_ins.reference_lm.model).dtype == "float16"
    assert isinstance(instantiate(stand_ins.trainer, logger=False), L.Trainer)
    assert instantiate(stand_ins.protocol.generation).max_new_tokens == 10  # the paper protocol's continuation length


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("local_parallel", "JoblibLauncher")])
def test_launcher_presets_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("pipeline", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1


def documented_stage_overrides() -> list[tuple[str, str]]:
    """Every `<stage>_overrides=[...]` written in the README, docs, configs and experiment scripts (a
    list inside an item, `['prompts.exclude=[...]']`, included), with shell variables (`${DETOXIFY_CKPT:?...}`) replaced by a path."""
    import re

    root = Path(CONF_DIR).parent
    files = [root / "README.md", *root.glob("docs/*.md"), *root.glob("conf/**/*.yaml"), *(p for p in root.glob("experiments/*") if p.is_file())]
    found = []
    for path in files:
        text = re.sub(r"\$\{[A-Z_]+(:\?[^}]*)?\}", "/x", path.read_text())
        found += [(path.name, m) for m in re.findall(r"\b(?:pretrain|align|fusion_head|evaluate)_overrides=\[(?:[^\[\]\n]|\[[^\[\]\n]*\])*\]", text)]
    return found


def test_documented_stage_overrides_parse_and_compose():
    """A list of overrides inside one override needs each item quoted (`['a=b']`): Hydra's grammar
    refuses `[a=b]`. Every such command the project documents parses, and composes into its stage."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    documented = documented_stage_overrides()
    assert {name for name, _ in documented} >= {"README.md", "pipeline.yaml", "pretrain_long.yaml", "paper_table.sh"}
    parser = OverridesParser.create()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name, text in documented:
            override = parser.parse_override(text)  # raises on `[a=b]`
            stage = override.key_or_group.removesuffix("_overrides")
            items = override.value()
            assert items and all(isinstance(item, str) and "=" in item for item in items), (name, text)
            if stage in ("pretrain", "align", "evaluate"):  # composes (paths are not opened here)
                compose(stage, overrides=["target=gemma3-270m", "calibration_model.name_or_path=x", *items] if stage == "align" else items)
