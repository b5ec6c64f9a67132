"""lm-evaluation-harness on any method at any strength: an lm_eval `LM` whose `loglikelihood` is
calibfuse.evaluation.forced.continuation_logprobs, and the grid's capability items written as a local
lm-eval task (`dataset_path: json`), so lm-eval's own acc / acc_norm can be set beside the grid's.

lm-eval is the optional extra `calibfuse[capability]` (lm-eval==0.4.9) and lives in a venv of its own:
it pins python-dateutil<3 (through pytablewriter -> typepy[datetime]), which would downgrade the project
env's, and 0.4.9 needs two shims to import under transformers 5 (`import_lm_eval`). The grid itself never
imports it (docs/quality.md, "Capability retention").
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def import_lm_eval():
    """lm_eval 0.4.9 under transformers 5: HF `evaluate` re-imports transformers (a new module object), and
    lm_eval's VLM wrapper reads `AutoModelForVision2Seq`, which transformers 5 calls AutoModelForImageTextToText."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local tasks only: no hub access
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import evaluate  # noqa: F401  (first, so the shim below lands on the transformers module lm_eval sees)
    import transformers

    if not hasattr(transformers, "AutoModelForVision2Seq"):
        transformers.AutoModelForVision2Seq = transformers.AutoModelForImageTextToText
    import lm_eval

    return lm_eval


def method_lm(target_lm, method, alpha: float, batch_size: int = 16):
    """An lm_eval LM that scores through `method` at `alpha` (loglikelihood only: multiple-choice tasks)."""
    import_lm_eval()
    from lm_eval.api.model import LM

    from calibfuse.evaluation.forced import continuation_logprobs

    class MethodLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            contexts, continuations = zip(*(request.args for request in requests), strict=True) if requests else ((), ())
            scored = continuation_logprobs(target_lm, method, alpha, list(contexts), list(continuations), batch_size=batch_size)
            return [(logprob, greedy) for logprob, _, greedy in scored]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("MethodLM scores multiple-choice tasks only (loglikelihood); use the grid's neutral perplexity")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("MethodLM scores multiple-choice tasks only (loglikelihood); generation is the grid's")

    method.to(target_lm.device)
    return MethodLM()


def write_task(name: str, items: list, norm: bool, out_dir: Path) -> Path:
    """The items (calibfuse.evaluation.capability.Item) as a local lm-eval task dir: <name>.jsonl and <name>.yaml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "context": i.context, "choices": i.choices, "gold": i.gold}) + "\n" for i in items), encoding="utf-8")
    metrics = "  - metric: acc\n" + ("  - metric: acc_norm\n" if norm else "")
    (out_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n"
        f"output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n{metrics}",
        encoding="utf-8",
    )
    return out_dir


def lm_eval_accuracy(target_lm, method, alpha: float, name: str, items: list, norm: bool, work_dir: Path, batch_size: int = 16) -> dict:
    """lm-eval's own zero-shot result on the items: {"acc", "acc_norm" (if norm), "per_item": [{"id", "acc", ...}]}."""
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager

    task_dir = write_task(f"calibfuse_{name}", items, norm, Path(work_dir))
    manager = TaskManager(include_path=str(task_dir))
    model = method_lm(target_lm, method, alpha, batch_size)
    found = lm_eval.simple_evaluate(model=model, tasks=[f"calibfuse_{name}"], task_manager=manager, num_fewshot=0, log_samples=True, bootstrap_iters=0)
    metrics = ("acc", "acc_norm") if norm else ("acc",)
    result = found["results"][f"calibfuse_{name}"]
    samples = sorted(found["samples"][f"calibfuse_{name}"], key=lambda s: s["doc_id"])
    return {m: result[f"{m},none"] for m in metrics} | {"per_item": [{"id": s["doc"]["id"]} | {m: s[m] for m in metrics} for s in samples]}
