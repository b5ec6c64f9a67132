"""calibfuse.plan against hand calculations: Llama-2-7B's parameters, stage 1's 3-layer cut, the embedded
default's stage-1 compute, and refusals that name the stage and the figure."""

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from calibfuse.models.footprint import model_config, size_of
from calibfuse.plan import plan_run

# Llama-2-7B by hand: vocab 32,000, width 4,096, MLP 11,008, 32 layers, untied head, RMSNorm weights only
V, D, F, L = 32_000, 4_096, 11_008, 32
LAYER = 4 * D * D + 3 * D * F + 2 * D  # q, k, v, o; gate, up, down; two norms
LLAMA2_7B = 2 * V * D + L * LAYER + D  # embeddings, head, layers, final norm


def planned(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return plan_run(compose("plan", overrides=list(overrides)))


def test_llama2_7b_and_its_three_layer_cut_by_hand():
    config = model_config("meta-llama/Llama-2-7b-chat-hf")
    assert LLAMA2_7B == 6_738_415_616  # the published 6.74B
    assert size_of(config).total == LLAMA2_7B
    cut = size_of(config, num_layers=3)
    assert cut.total == 2 * V * D + 3 * LAYER + D  # embeddings and head kept
    assert cut.compute == cut.total - V * D  # the embedding lookup does no multiply-adds
    with pytest.raises(ValueError, match="num_layers=40; the model has 32 layers"):
        size_of(config, num_layers=40)


def test_the_embedded_default_plan():
    stages = {s["stage"]: s for s in planned()}
    pretrain = stages["pretrain"]
    cut = dict(pretrain["models"])["its first 3 layers (trained)"]
    # By hand, SmolLM2-135M: d 576, MLP 1536, 9 query and 3 key-value heads of 64, vocabulary 49,152, tied head.
    # A layer: q and o 576², k and v 576·192, MLP 3·576·1536, two norms: 3,540,096. All 30 layers: 134,515,008.
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert layer == 3_540_096 and size_of(model_config("smollm2-135m-instruct")).total == 30 * layer + 49_152 * 576 + 576 == 134_515_008
    assert cut == 3 * layer + 49_152 * 576 + 576 == 38_932_416  # tied: the table is the head, so all of it computes
    # 150 steps x 8 rows x 128 tokens (conf/pretrain.yaml), then one forward pass over 2 % of 20,025 rows held out
    assert pretrain["flops"] == 6 * cut * 150 * 8 * 128 + 2 * cut * 400 * 128
    assert set(stages) == {"pretrain", *(f"{s} {t}" for s in ("align", "evaluate") for t in ("smollm2-135m-instruct", "gemma3-270m"))}
    assert all(s["memory"][0] < s["memory"][1] for s in stages.values())


def test_recipe_a_plans_its_held_out_passes_and_a_head_on_scored_positions_only():
    pretrain = {s["stage"]: s for s in planned("experiment=calibration_plateau")}["pretrain"]
    head, layers = 49_152 * 576, 3 * 3_540_096 + 576  # SmolLM2's tied table as the head; three layers and the final norm
    per_token = layers + 0.824 * head  # the head only on completion tokens, 82.4 % of the corpus's (conf/plan.yaml)
    # 2 epochs of 2,454 steps (19,625 rows in 8s) come before max_steps=6000; a held-out pass over 400 rows every
    # 250 batches of an epoch: 9 an epoch (the run: 4,906 steps, 18 passes; 8 rows were dropped as too long)
    assert pretrain["flops"] == pytest.approx(6 * per_token * 4908 * 8 * 128 + 2 * per_token * 18 * 400 * 128)
    assert pretrain["work"] == "4908 steps x 8 rows x <= 128 tokens, 18 held-out passes x 400 rows"


def test_the_paper_plan_fits_an_h100_not_a_24_gb_card():
    stages = {s["stage"]: s for s in planned("experiment=paper_table", "plan.cpu.memory_gb=512")}
    evaluate = stages["evaluate llama2-7b-chat"]
    need = evaluate["memory"][0] / 2**30
    # bf16 target and calibration model, fp16 13B reference, fp32 BERT: 2 x (6.74 + 0.87) + 2 x 13.02 + 4 x 0.11 GB of weights
    weights = (2 * (LLAMA2_7B + 869_298_176) + 2 * 13_015_864_320 + 4 * 109_486_854) / 2**30
    assert weights < need < weights + 2 and need < 80
    # 3 epochs of 259,380 rows (262,000 less 1 % held out) in batches of 7 x 8 GPUs; a held-out pass after each
    assert stages["pretrain"]["work"] == "13896 steps x 56 rows x <= 256 tokens, 3 held-out passes x 2620 rows"
    small = {s["stage"]: s for s in planned("experiment=paper_table", "plan.cpu.memory_gb=512", "plan.gpu.memory_gb=24")}
    assert small["evaluate llama2-7b-chat"]["memory"][0] > small["evaluate llama2-7b-chat"]["memory"][1]


@pytest.mark.slow
def test_the_entry_point_refuses_a_plan_that_cannot_fit(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "calibfuse.plan", "experiment=paper_table", "plan.cpu.memory_gb=512", "plan.gpu.memory_gb=24", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "refused: stage evaluate llama2-7b-chat-uncensored needs 39.6 GB per device and 1 x NVIDIA H100 80GB has 24 GB" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct"])  # reading a GGUF takes 10-20 s: the smallest stands for the four
def test_shipped_configs_of_the_embedded_models_match_their_gguf(name):
    from transformers import AutoConfig

    from calibfuse.models.loading import ModelSpec, resolve

    source, gguf_file = resolve(ModelSpec(name))
    assert size_of(AutoConfig.from_pretrained(source, gguf_file=gguf_file)) == size_of(model_config(name))
