"""calibfuse.plan against hand calculations: Llama-2-7B's parameters, stage 1's 3-layer cut, the embedded
default's stage-1 compute, stage 1's host RAM, the total, the devices it priced and whose figures they are, and
refusals that name the stage, the figure, the card and what would fit."""

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from calibfuse.models.footprint import model_config, size_of
from calibfuse.plan import hardware_lines, plan_run, refusal, render, total

# Llama-2-7B by hand: vocab 32,000, width 4,096, MLP 11,008, 32 layers, untied head, RMSNorm weights only
V, D, F, L = 32_000, 4_096, 11_008, 32
LAYER = 4 * D * D + 3 * D * F + 2 * D  # q, k, v, o; gate, up, down; two norms
LLAMA2_7B = 2 * V * D + L * LAYER + D  # embeddings, head, layers, final norm


GiB = 2**30
LLAMA2_13B, CUT, BERT = 13_015_864_320, 869_298_176, 109_486_854  # the 13B and BERT as test_the_paper_plan_... counts them


def planned(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return plan_run(compose("plan", overrides=list(overrides)))


def plan_config(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("plan", overrides=list(overrides)).plan


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
    stages = {s["stage"]: s for s in planned("experiment=paper_table", "plan.cpu.memory_gib=512")}
    evaluate = stages["evaluate llama2-7b-chat"]
    need = evaluate["memory"][0] / GiB
    # bf16 target and calibration model, fp16 13B reference, fp32 BERT: 2 x (6.74 + 0.87) + 2 x 13.02 + 4 x 0.11 GiB of weights
    weights = (2 * (LLAMA2_7B + CUT) + 2 * LLAMA2_13B + 4 * BERT) / GiB
    assert weights < need < weights + 2 and need < 80
    # 3 epochs of 259,380 rows (262,000 less 1 % held out) in batches of 7 x 8 GPUs; a held-out pass after each
    assert stages["pretrain"]["work"] == "13896 steps x 56 rows x <= 256 tokens, 3 held-out passes x 2620 rows"
    assert stages["pretrain"]["device"] == "8 x NVIDIA H100 80GB (ddp)" and evaluate["device"] == "1 x NVIDIA H100 80GB"
    assert refusal(list(stages.values())) is None
    small = {s["stage"]: s for s in planned("experiment=paper_table", "plan.cpu.memory_gib=512", "plan.gpu.memory_gib=24")}
    assert small["evaluate llama2-7b-chat"]["memory"][0] > small["evaluate llama2-7b-chat"]["memory"][1]


def test_a_24_gib_card_is_named_as_given_and_told_what_would_fit():
    stages = planned("experiment=paper_table", "plan.cpu.memory_gib=512", "plan.gpu.memory_gib=24")
    assert {s["device"] for s in stages if s["stage"].startswith("evaluate")} == {"1 x 24 GiB GPU"}  # not "NVIDIA H100 80GB"
    refused = refusal(stages)
    assert refused.startswith("refused: stage evaluate llama2-7b-chat-uncensored needs 39.6 GiB per device and 1 x 24 GiB GPU has 24 GiB; ")
    assert "so do evaluate llama2-7b-chat, evaluate medicine-chat, evaluate finance-chat" in refused and refused.count("The cause") == 1
    # The 13B in fp16: 13,015,864,320 x 2 bytes = 24.2 GiB; the rest (target, calibration model, BERT, working memory) 39.6 - 24.2
    need = stages[-1]["memory"][0]
    assert f"{LLAMA2_13B * 2 / GiB:.1f}" == "24.2" and f"{(need - LLAMA2_13B * 2) / GiB:.1f}" == "15.3"
    assert "The cause is meta-llama/Llama-2-13b-hf for perplexity (24.2 GiB in float16) beside the 12.6 GiB target" in refused
    assert "without it the stage needs 15.3 GiB" in refused
    # 8-bit: a byte a parameter, 12.1 GiB; beside the target 15.3 + 12.1 = 27.4 GiB
    assert "on a second GPU like it, 24.2 GiB (too big)" in refused and "in 8-bit beside the target, about 27.4 GiB (too big)" in refused
    assert "scored in a second pass after the target is unloaded, 24.2 GiB (too big), or in 8-bit about 12.1 GiB (fits)" in refused
    assert "calibfuse does none of these yet" in refused and "a GPU with 39.6 GiB or more" in refused and "reference_lm=gemma3-270m" in refused
    named = planned("experiment=paper_table", "plan.cpu.memory_gib=512", "plan.gpu.name=RTX 4090", "plan.gpu.memory_gib=24", "plan.gpu.peak_tflops=165")
    assert "1 x RTX 4090 has 24 GiB" in refusal(named)
    lines = hardware_lines(plan_config("plan.gpu.memory_gib=24"))
    assert lines[0].startswith("GPU: 24 GiB GPU: 24 GiB, 989 TFLOPS peak (given: plan.gpu.memory_gib; peak_tflops: NVIDIA H100 80GB's)")


def test_the_a100_in_plan_yaml_fits_and_is_named():
    a100 = planned("experiment=paper_table", "plan.cpu.memory_gib=512", "plan.gpu.name=A100-40GB", "plan.gpu.memory_gib=40", "plan.gpu.peak_tflops=312")
    assert refusal(a100) is None and a100[-1]["device"] == "1 x A100-40GB"


def test_stage_1_counts_every_rank_loading_the_whole_base_on_the_host():
    pretrain = planned("experiment=paper_table", "plan.cpu.memory_gib=64")[0]
    # 8 ranks, each the whole Llama-2-7B in bfloat16 (conf/base_model/llama2-7b-chat.yaml) before the cut: 8 x 12.55 GiB
    assert pretrain["host"][:2] == (8 * LLAMA2_7B * 2, 64 * GiB)
    assert f"{8 * LLAMA2_7B * 2 / GiB:.1f}" == "100.4"
    refused = refusal([pretrain])
    assert refused.startswith(
        "refused: stage pretrain needs 100.4 GiB of host RAM (8 ranks x 12.6 GiB: each loads the whole meta-llama/Llama-2-7b-chat-hf "
        "in bfloat16 before cutting it to 3 layers) and the node has 64 GiB (plan.cpu.memory_gib)"
    )
    assert "hydra.launcher.mem_gb above 100" in refused
    assert "| 100.4 of 64 GiB | NO |" in render([pretrain])
    one = planned("experiment=paper_table", "plan.cpu.memory_gib=64", "pretrain_overrides=['experiment=paper_pretrain']")[0]
    assert one["device"] == "1 x NVIDIA H100 80GB" and one["host"][0] == LLAMA2_7B * 2 and refusal([one]) is None
    # planned from another machine (this one), a GPU node's RAM is not known: said, never checked against this machine's
    unknown = planned("experiment=paper_table")[0]
    assert not unknown["host"][3] and refusal([unknown]) is None and "| 100.4 GiB (node's RAM not given) | yes |" in render([unknown])


def test_the_total_and_the_cpu_priced_at_a_stated_reference():
    stages = planned("experiment=paper_table", "plan.cpu.memory_gib=512")
    align = [s for s in stages if s["stage"].startswith("align")]
    # A is 4,096 x 4,096; 5 epochs x 32,000 shared tokens x 11 candidates; 6 FLOPs a parameter a token; the reference CPU's
    # 1 TFLOPS peak (8 cores x 2 GHz x 64) at 40 %
    assert align[0]["seconds"] == pytest.approx(6 * 4096 * 4096 * 5 * 32_000 * 11 / (1.0e12 * 0.4))
    whole = sum(s["seconds"] for s in stages)
    on_cpu = sum(s["seconds"] for s in align)
    lines = total(stages)
    assert lines[0].startswith(f"total, one stage after another: {whole:.0f} s ({whole / 3600:.2f} h): pretrain ")
    assert lines[0].endswith(f"; {on_cpu / whole:.0%} of it on the CPU") and 0.6 < on_cpu / whole < 0.7
    per_target = align[0]["seconds"] + stages[-1]["seconds"]
    assert lines[1] == f"total with one job per target after stage 1 (hydra/launcher=slurm): {stages[0]['seconds'] + per_target:.0f} s"
    cpu = hardware_lines(plan_config())[1]
    assert cpu.startswith("CPU: 8 cores of a GPU node's CPU: 1 TFLOPS peak (the reference, plan.cpu.reference;")
    assert "RAM" in cpu and "this machine's" in cpu
    mine = planned("experiment=paper_table", "plan.cpu.memory_gib=512", "plan.cpu.peak_tflops=0.2")
    assert mine[1]["seconds"] == pytest.approx(5 * align[0]["seconds"])  # this 2-core machine's 0.2 TFLOPS: 2,215 s a target
    assert hardware_lines(plan_config("plan.cpu.peak_tflops=0.2"))[1].startswith("CPU: your CPU: 0.2 TFLOPS peak (plan.cpu.peak_tflops)")


def test_memory_is_labelled_gib():
    table = render(planned("experiment=paper_table", "plan.cpu.memory_gib=512"))
    assert "| 14.2 of 80 GiB |" in table and "| 39.6 of 80 GiB |" in table and " GB " not in table.replace("80GB", "")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct"])  # reading a GGUF takes 10-20 s: the smallest stands for the four
def test_shipped_configs_of_the_embedded_models_match_their_gguf(name):
    from transformers import AutoConfig

    from calibfuse.models.loading import ModelSpec, resolve

    source, gguf_file = resolve(ModelSpec(name))
    assert size_of(AutoConfig.from_pretrained(source, gguf_file=gguf_file)) == size_of(model_config(name))


def documented_plan_commands() -> list[tuple[str, list[str]]]:
    """(where, overrides) of every `python -m calibfuse.plan ...` in the docs and conf/plan.yaml (placeholders left out)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in [root / "README.md", *root.glob("docs/*.md"), root / "conf" / "plan.yaml"]:
        for line in path.read_text().splitlines():
            match = re.search(r"python -m calibfuse\.plan\b([^`]*)", re.sub(r"^\s*#", "", line))
            words = shlex.split(match.group(1), comments=True) if match and not re.search(r"<|\$|NAME", match.group(1)) else None
            if words is not None and words not in [w for _, w in found]:  # each distinct command once: a plan takes ~10 s
                found.append((f"{path.name}: {line.strip()[:90]}", words))
    return found


@pytest.mark.parametrize("where,overrides", documented_plan_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_documented_plan_command_plans_the_devices_it_names(where, overrides):
    stages = planned(*overrides)
    given = dict(o.split("=", 1) for o in overrides)
    gpu_stages = [s for s in stages if "CPU" not in s["device"]]
    if "plan.gpu.name" in given:
        assert all(given["plan.gpu.name"] in s["device"] for s in gpu_stages), where
    if "plan.gpu.memory_gib" in given:
        assert all(s["memory"][1] == float(given["plan.gpu.memory_gib"]) * GiB for s in gpu_stages), where
    assert render(stages).count("GiB |") >= len(stages) and total(stages), where
