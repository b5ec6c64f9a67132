"""Stage 1 end to end on tiny models: the artifact, the manifest, resuming, logging and bad input."""

import csv
import json
import math

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibfuse.pretrain import pretrain
from calibfuse.utils.checks import check_wandb_credentials
from calibfuse.utils.run import redact_secrets


def read_manifest(run_dir):
    return json.loads((run_dir / "calibration_model" / "manifest.json").read_text())


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_pretrain_writes_a_loadable_calibration_model(family, tiny_pretrain_cfg, tiny_model_dirs, tmp_path):
    metrics = pretrain(tiny_pretrain_cfg(family=family))

    out = tmp_path / "calibration_model"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    text = "The calibration model reads text as its base did."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dirs[family])(text)["input_ids"]
    manifest = read_manifest(tmp_path)
    assert manifest["num_layers"] == 2 and manifest["base_num_layers"] == 4
    assert manifest["data"]["train_examples"] + manifest["data"]["val_examples"] == 48
    assert manifest["training"]["global_step"] == 6 == metrics["global_step"]
    assert manifest["val_loss"] < manifest["val_loss_before_training"]
    assert manifest["versions"]["torch"] == torch.__version__


def test_the_manifest_s_held_out_loss_is_the_saved_model_s(tiny_pretrain_cfg, tmp_path):
    """Recomputed from the written model one row at a time (no padding, no Lightning metric): a mean
    of batch means, the weights before the last step or a dropout-on pass would all differ."""
    cfg = tiny_pretrain_cfg("data.max_examples=40", "data.val_fraction=0.25")
    pretrain(cfg)
    manifest = read_manifest(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "calibration_model").eval()
    datamodule = instantiate(cfg.data, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "calibration_model"))
    datamodule.setup("fit")
    total, count = 0.0, 0
    with torch.no_grad():
        for example in datamodule.val_examples:
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(example["labels"][1:])
            scored = labels != -100
            total += -logits.log_softmax(-1)[scored, labels[scored]].sum().item()
            count += int(scored.sum())
    assert len(datamodule.val_examples) == manifest["held_out_rows"] == 10
    assert count == manifest["held_out_tokens"]
    assert manifest["val_loss"] == pytest.approx(total / count, rel=1e-4)
    assert manifest["held_out_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_resume_continues_the_step_count(tiny_pretrain_cfg, tmp_path):
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    pretrain(tiny_pretrain_cfg("trainer.max_steps=3", "trainer.max_epochs=10", output_dir=first_dir))
    checkpoint = first_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    before = read_manifest(first_dir)["val_loss_before_training"]

    pretrain(tiny_pretrain_cfg("trainer.max_steps=5", "trainer.max_epochs=10", f"ckpt_path={checkpoint}", output_dir=second_dir))

    manifest = read_manifest(second_dir)
    assert manifest["training"]["global_step"] == 5
    assert manifest["training"]["resumed_from"] == str(checkpoint)
    assert manifest["val_loss_before_training"] == before  # carried in the checkpoint, not re-measured
    with open(next(second_dir.glob("csv/**/metrics.csv"))) as f:
        trained_steps = {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert trained_steps == {3, 4}  # only the two new steps ran


@pytest.mark.parametrize(
    "stop, total, family",
    [(3, 5, "llama"), (6, 8, "llama"), (8, 10, "llama"), (8, 10, "gpt2")],
    ids=["mid-epoch-0", "end-of-epoch-0", "mid-epoch-1", "mid-epoch-1-dropout"],
)
def test_a_run_killed_and_resumed_trains_on_the_rows_an_uninterrupted_run_does(stop, total, family, tiny_pretrain_cfg, tmp_path):
    """A `total`-step run keeps its checkpoint at step `stop` (an epoch is 6 batches), as a run killed
    after it would have; resumed from there, it ends with the uninterrupted run's weights: the epoch
    went on with the same shuffle's next rows, the next epoch drew the same shuffle, and GPT-2's dropout
    drew the same masks (before, the resumed epoch read its rows again; Lightning #20550 hid the saved place)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run = (f"trainer.max_steps={total}", "trainer.max_epochs=10", f"callbacks.model_checkpoint.every_n_train_steps={stop}")
    pretrain(tiny_pretrain_cfg(*run, "callbacks.model_checkpoint.save_top_k=-1", family=family, output_dir=whole))
    (checkpoint,) = (whole / "checkpoints").glob(f"*-step={stop}.ckpt")
    pretrain(tiny_pretrain_cfg(*run, f"ckpt_path='{checkpoint}'", family=family, output_dir=resumed))

    with open(next(resumed.glob("csv/**/metrics.csv"))) as f:
        trained_steps = sorted(int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss"))
    assert trained_steps == list(range(stop, total))
    assert read_manifest(whole)["data"]["train_examples"] == 43
    weights = [load_file(run_dir / "calibration_model" / "model.safetensors") for run_dir in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_wandb_offline_run_is_written_and_finished(tiny_pretrain_cfg, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "secret-from-env-0123456789012345678901234")
    pretrain(tiny_pretrain_cfg("logger=wandb", "trainer.max_steps=2"))
    assert wandb.run is None  # finished: the next Hydra job gets its own run
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    written = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())  # the .wandb record file included
    assert b"trust_remote_code" in written and b"val/loss" in written  # the resolved config and metrics were logged ...
    assert b"secret-from-env" not in written  # ... and no secret with them


def test_each_job_gets_its_own_wandb_run(tiny_pretrain_cfg, tmp_path):
    for name in ("a", "b"):
        pretrain(tiny_pretrain_cfg("logger=wandb", "trainer.max_steps=1", output_dir=tmp_path / name))
    ids = {next((tmp_path / n / "wandb").glob("offline-run-*")).name for n in ("a", "b")}
    assert len(ids) == 2


def test_secrets_are_redacted():
    config = {"scorer": {"perspective_api_key": "abc", "qps": 1}, "hub": [{"hf_token": "t"}], "tokenizer": "x", "pad_token": "<pad>", "wandb_api_key": None}
    assert redact_secrets(config) == {
        "scorer": {"perspective_api_key": "***", "qps": 1},
        "hub": [{"hf_token": "***"}],
        "tokenizer": "x",
        "pad_token": "<pad>",
        "wandb_api_key": None,
    }


def test_online_wandb_without_a_key_stops_early(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.wandb.WandbLogger", "offline": False}})
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        check_wandb_credentials(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    verified = []
    monkeypatch.setattr("calibfuse.utils.checks.verify_wandb_key", lambda key, where: verified.append((key, where)))  # no network in tests
    check_wandb_credentials(cfg)
    assert verified == [("0123456789abcdef0123456789abcdef01234567", "WANDB_API_KEY")]


# Bad input stops before any training, with the value and what was expected.


def test_num_layers_larger_than_base(tiny_pretrain_cfg):
    with pytest.raises(ValueError, match=r"num_layers=9 but .* has 4 decoder layers"):
        pretrain(tiny_pretrain_cfg("module.num_layers=9"))


def test_unknown_embedded_model(tiny_pretrain_cfg):
    with pytest.raises(ValueError, match=r"unknown embedded model name 'smollm-9000'"):
        pretrain(tiny_pretrain_cfg("base_model.name_or_path=smollm-9000"))


def test_missing_data_file(tiny_pretrain_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv"):
        pretrain(tiny_pretrain_cfg(f"data.path={tmp_path}/missing.tsv"))


def test_data_file_without_expected_columns(tiny_pretrain_cfg, tmp_path):
    (tmp_path / "qa.tsv").write_text("question\tanswer\nHi\tHello\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\)"):
        pretrain(tiny_pretrain_cfg(f"data.path={tmp_path}/qa.tsv"))


def test_empty_corpus(tiny_pretrain_cfg, tmp_path):
    (tmp_path / "empty.tsv").write_text("vanilla\tadversarial\tcompletion\tdata_type\n")
    with pytest.raises(ValueError, match=r"empty\.tsv.* is empty"):
        pretrain(tiny_pretrain_cfg(f"data.path={tmp_path}/empty.tsv"))


def test_instantiated_module_uses_the_partial_optimizer(tiny_pretrain_cfg):
    cfg = tiny_pretrain_cfg("module.optimizer.lr=7e-4", "module.optimizer.weight_decay=0.05")  # values of this test's own
    module = instantiate(cfg.module, base_model=instantiate(cfg.base_model))
    optimizer = module.optimizer_factory(params=module.model.parameters())
    assert type(optimizer).__name__ == "AdamW" and (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (7e-4, 0.05)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_the_head_on_scored_positions_only_gives_the_loss_and_gradients_of_the_whole_head(family, tiny_pretrain_cfg):
    """head_on_scored_only skips the LM head on prompt and padding positions: the loss is the mean
    -log p(label) over completion tokens, computed here from the full logits by hand."""
    cfg = tiny_pretrain_cfg(family=family)
    module = instantiate(cfg.module, base_model=instantiate(cfg.base_model)).eval()  # GPT-2's dropout off: one forward = another
    datamodule = instantiate(cfg.data, tokenizer=AutoTokenizer.from_pretrained(cfg.base_model.name_or_path))
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()  # prompts and padding to skip

    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    by_hand = -logits.log_softmax(-1)[scored].gather(-1, labels[scored, None]).mean()

    gradients = []
    for head_on_scored_only in (False, True):
        module.head_on_scored_only = head_on_scored_only
        module.zero_grad()
        loss = module.loss(batch)
        loss.backward()
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
        gradients.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6)


def test_a_run_moved_and_resumed_keeps_writing_the_last_checkpoint_it_resumes_from(tiny_pretrain_cfg, tmp_path):
    """Lightning versions a last.ckpt it did not write in this directory (last-v1.ckpt), so a run resumed
    after its directory moved would leave last.ckpt stale, and the next resume would go back to it."""
    pretrain(tiny_pretrain_cfg("trainer.max_steps=3", "trainer.max_epochs=10", output_dir=tmp_path / "before"))
    (tmp_path / "before").rename(tmp_path / "moved")
    checkpoint = tmp_path / "moved" / "checkpoints" / "last.ckpt"
    pretrain(tiny_pretrain_cfg("trainer.max_steps=5", "trainer.max_epochs=10", f"ckpt_path={checkpoint}", output_dir=tmp_path / "moved"))
    assert [p.name for p in (tmp_path / "moved" / "checkpoints").iterdir()] == ["last.ckpt"]
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 5
