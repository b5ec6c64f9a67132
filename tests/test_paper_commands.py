"""Every documented command that runs the paper's stage 1 (`calibfuse.pretrain experiment=paper_pretrain`, or
`calibfuse.pipeline experiment=paper_table`, whose stage 1 is paper_pretrain) trains with the paper's effective
batch: devices x per-device batch x accumulate_grad_batches = 56, composed as the command composes it."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import calibfuse.utils.run  # noqa: F401 - registers the config resolvers (accumulation)
from calibfuse.utils.composing import stage_overrides
from calibfuse.utils.run import device_count

ROOT = Path(__file__).resolve().parents[1]
WHERE = [
    ROOT / "README.md",
    *ROOT.glob("docs/*.md"),
    *ROOT.glob("experiments/*.md"),
    *(p for p in ROOT.glob("experiments/*.sh") if p.name != "rehearsal.sh"),  # the rehearsal: CPU stand-ins, 2 ranks, not the paper's setting
    *ROOT.glob("conf/**/*.yaml"),
    *ROOT.glob("calibfuse/*.py"),
]
PAPER = re.compile(r"experiment=paper_(pretrain|table)\b(?!_)")
COMMAND = re.compile(r"-m calibfuse\.(pretrain|pipeline)\b(.*)")


def logical_lines(text: str) -> list[str]:
    """Lines with a comment's leading '#' dropped and backslash continuations joined."""
    lines = [re.sub(r"^\s*#", "", line) for line in text.splitlines()]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()


def stage1_commands() -> list[tuple[str, str, list[str], dict[str, str]]]:
    """(where, entry point, overrides, hydra launcher settings) of every documented paper stage-1 command.
    Shell variables ("$SCORER", "$@") and hydra.* settings are left out of the overrides; a sweep's first value stands for it."""
    found = []
    for path in WHERE:
        for line in logical_lines(path.read_text()):
            match = COMMAND.search(line)
            if not match or not PAPER.search(match.group(2)):
                continue
            words = shlex.split(match.group(2).split("`")[0], comments=True)  # inline code in prose ends at its backtick
            sweep = "-m" in words or "--multirun" in words
            overrides, launcher = [], {}
            for word in words:
                if word.startswith("-") or "$" in word or "=" not in word:
                    continue
                key, value = word.split("=", 1)
                if key.startswith(("hydra.", "hydra/")):
                    launcher[key.removeprefix("hydra.launcher.")] = value
                    continue
                if sweep and "," in value and not value.startswith(("[", "'", '"')):
                    value = value.split(",")[0]
                overrides.append(f"{key}={value}")
            found.append((f"{path.relative_to(ROOT)}: {line.strip()[:100]}", match.group(1), overrides, launcher))
    return found


COMMANDS = stage1_commands()


def test_the_documented_commands_are_found():
    places = {where.split(":")[0] for where, *_ in COMMANDS}
    assert {"docs/guide.md", "conf/experiment/paper_pretrain.yaml", "experiments/paper_table.sh", "calibfuse/pretrain.py"} <= places, places
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize("where,entry,overrides,launcher", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_every_documented_stage1_command_trains_with_an_effective_batch_of_56(where, entry, overrides, launcher):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(entry, overrides=overrides)
        if entry == "pipeline":
            cfg = compose("pretrain", overrides=stage_overrides(cfg)["pretrain"])
    trainer = cfg.trainer
    devices = device_count(trainer.devices) * trainer.get("num_nodes", 1)
    assert devices * cfg.data.batch_size * trainer.accumulate_grad_batches == 56, (where, OmegaConf.to_container(trainer))
    assert cfg.data.batch_size == 7 and cfg.base_model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    one_gpu = trainer.get("strategy") is None
    assert (devices == 1) == one_gpu, f"{where}: {devices} devices without a distributed strategy, or one with it"
    if launcher.get("launcher") == "slurm" and "until=pretrain" in overrides:  # stage 1 as its own SLURM job: one task per GPU
        assert int(launcher["gpus_per_node"]) == int(launcher["tasks_per_node"]) == device_count(trainer.devices), where
        # and RAM for every rank to load the whole 7B base in bf16 on the host before the cut (calibfuse.plan: 100.4 GiB for 8)
        host = device_count(trainer.devices) * 6_738_415_616 * 2 / 2**30
        assert float(launcher.get("mem_gb", 64)) > host, f"{where}: hydra.launcher.mem_gb={launcher.get('mem_gb', 64)}; expected above {host:.0f}"


def test_the_one_gpu_command_is_one_device_and_the_old_one_still_adds_up():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        one = compose("pretrain", overrides=["experiment=paper_pretrain"]).trainer
        old = compose("pretrain", overrides=["experiment=paper_pretrain", "trainer=gpu", "trainer.accumulate_grad_batches=8"]).trainer
        four = compose("pretrain", overrides=["experiment=paper_pretrain", "trainer=ddp", "trainer.devices=4"]).trainer
        three = compose("pretrain", overrides=["experiment=paper_pretrain", "trainer=ddp", "trainer.devices=3"]).trainer
        every = compose("pretrain", overrides=["experiment=paper_pretrain", "trainer=ddp"]).trainer
    assert (one.accelerator, one.devices, one.accumulate_grad_batches) == ("gpu", 1, 8)
    assert (old.devices, old.accumulate_grad_batches) == (1, 8)
    assert (four.devices, four.accumulate_grad_batches) == (4, 2)
    uneven = r"effective_batch=56 is not a multiple of data.batch_size=7 x trainer.devices=3 .* expected devices x nodes in \[1, 2, 4, 8\]"
    with pytest.raises(Exception, match=uneven):
        three.accumulate_grad_batches  # noqa: B018 - resolving it is the test
    with pytest.raises(Exception, match=r"trainer.devices=-1 does not say how many devices.*expected trainer.devices=<GPUs per node>"):
        every.accumulate_grad_batches  # noqa: B018
