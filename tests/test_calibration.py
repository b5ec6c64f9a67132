"""Calibration-model construction for every family: first num_layers layers, pretrained weights kept."""

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from calibfuse.fusion.calibration import build_calibration_model, find_decoder_layers
from calibfuse.models.loading import ModelSpec, load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_keeps_first_layers_with_their_weights_and_round_trips(family, tiny_model_dirs, tmp_path):
    spec = ModelSpec(str(tiny_model_dirs[family]), dtype="float32")
    base_state = {k: v.clone() for k, v in load_model(spec).state_dict().items()}
    calibration = build_calibration_model(load_model(spec), num_layers=2)

    assert calibration.config.num_hidden_layers == 2
    assert len(find_decoder_layers(calibration)[2]) == 2
    state = calibration.state_dict()
    assert set(state) < set(base_state)  # only layers were dropped: embeddings, norm, head stay
    assert all(torch.equal(state[k], base_state[k]) for k in state)
    assert any(".2." in k or ".3." in k for k in set(base_state) - set(state))

    calibration.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(calibration) and reloaded.config.num_hidden_layers == 2
    input_ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, calibration.eval()(input_ids).logits)


def test_gemma3_layer_types_follow_the_cut(tiny_model_dirs):
    base = load_model(ModelSpec(str(tiny_model_dirs["gemma3"])))
    base.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]  # a pattern to follow
    calibration = build_calibration_model(base, num_layers=3)
    assert calibration.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]  # the first three, in order


@pytest.mark.parametrize("num_layers", [0, 5])
def test_num_layers_out_of_range_names_both_numbers(num_layers, tiny_model_dirs):
    model = load_model(ModelSpec(str(tiny_model_dirs["llama"])))
    with pytest.raises(ValueError, match=rf"num_layers={num_layers} but .* has 4 decoder layers"):
        build_calibration_model(model, num_layers=num_layers)


def test_reinit_changes_kept_layers_but_not_embeddings(tiny_model_dirs):
    spec = ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32")
    kept = build_calibration_model(load_model(spec), num_layers=2)
    reinit = build_calibration_model(load_model(spec), num_layers=2, reinit_non_embedding=True)
    a, b = kept.state_dict(), reinit.state_dict()
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
