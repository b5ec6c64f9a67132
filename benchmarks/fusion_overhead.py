"""Cost of fusion at inference, measured in one run on the embedded models (CPU).

    python benchmarks/fusion_overhead.py                       # both targets
    python benchmarks/fusion_overhead.py --targets smollm2-135m-instruct --dtype bfloat16
    python benchmarks/fusion_overhead.py --smoke                # CI: SmolLM2 only, 2 prompts x 3 tokens (seconds; ratios meaningless)

Greedy, 16 prompts, 32 new tokens each (no early stop at EOS, so every run does the same work).
Calibration model: the first 3 layers of SmolLM2-135M-Instruct (weights do not change the cost;
A is random). For each target it prints the time of plain `transformers` generation of the
target, of calibfuse's loop at alpha=0 (the target alone), of fused generation at alpha=0.3 with
batch 16, and of fused generation one prompt at a time, of fused generation with the grid's KL diagnostic, and the ratios:
  fused / calibfuse alpha=0   (goals: <= 1.08 with SmolLM2, same tokenizer; <= 1.15 with Gemma-3, other tokenizer)
  grid cell: fused + KL / alone   (goal: <= 1.30)
  fused / plain target
  batch-16 / batch-1 throughput
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from calibfuse.data.datamodule import read_prompt_completions
from calibfuse.data.rows import EMBEDDED_CORPUS
from calibfuse.fusion.calibration import build_calibration_model
from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.generator import FusedGenerator
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer
from calibfuse.utils.run import quiet_libraries

NEW_TOKENS, BATCH = 32, 16


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def diagnosed(generator, prompts, settings):
    """Fused generation as a grid cell runs it: with the KL and top-1 agreement diagnostic."""
    return generator.target_lm.generate(prompts, settings, alpha=0.3, hidden_transform=generator.fusion.transform(0.3), diagnostics=True)


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has native bf16, else fp32")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, not the cost")
    args = parser.parse_args()
    global NEW_TOKENS, BATCH
    if args.smoke:
        NEW_TOKENS, BATCH, args.targets = 3, 2, ["smollm2-135m-instruct"]

    prompts = [p.prompt for p in read_prompt_completions(EMBEDDED_CORPUS, data_types=["vanilla_benign"])][:BATCH]
    calibration_spec = ModelSpec("smollm2-135m-instruct", dtype=args.dtype)
    calibration = build_calibration_model(load_model(calibration_spec), 3)
    calibration_tokenizer = load_tokenizer(calibration_spec)
    print(f"{BATCH} prompts x {NEW_TOKENS} new tokens, greedy, {next(calibration.parameters()).dtype}, {torch.get_num_threads()} threads")
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, batch_size=BATCH)
    for name in args.targets:
        spec = ModelSpec(name, dtype=args.dtype)
        target, tokenizer = load_model(spec), load_tokenizer(spec)
        A = torch.randn(calibration.config.hidden_size, target.config.hidden_size) / 30
        generator = FusedGenerator(target, tokenizer, calibration, calibration_tokenizer, A)
        generator.target_lm.eos_ids = generator.eos_ids[:0]  # never stop early: equal work in every run
        batch = tokenizer(prompts[:BATCH], return_tensors="pt", padding=True, padding_side="left")

        def plain():
            target.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        with torch.no_grad():
            generator.generate(prompts[:2], 0.3, GenerationSettings(max_new_tokens=4))  # warm-up
            plain()
            times = {
                "transformers generate (target)": timed(plain),
                "calibfuse alpha=0 (target)": timed(lambda: generator.generate(prompts, 0.0, settings)),
                "calibfuse fused alpha=0.3": timed(lambda: generator.generate(prompts, 0.3, settings)),
                "fused, KL diagnostic on": timed(lambda: diagnosed(generator, prompts, settings)),
                "fused, batch 1": timed(lambda: generator.generate(prompts, 0.3, GenerationSettings(max_new_tokens=NEW_TOKENS, batch_size=1))),
            }
        tokens = BATCH * NEW_TOKENS
        print(f"\ntarget {name} ({'same' if generator.shared_tokenizer else 'other'} tokenizer as the calibration model)")
        for label, seconds in times.items():
            print(f"  {label:>32}: {seconds:6.2f} s  {tokens / seconds:6.1f} tok/s")
        goal = 1.08 if generator.shared_tokenizer else 1.15
        own = times["calibfuse fused alpha=0.3"] / times["calibfuse alpha=0 (target)"]
        print(f"  {'fused / calibfuse alpha=0':>32}: {own:6.2f}x   (goal <= {goal:.2f}x: {'met' if own <= goal else 'not met'})")
        cell = times["fused, KL diagnostic on"] / times["calibfuse alpha=0 (target)"]
        print(f"  {'grid cell: fused + KL / alone':>32}: {cell:6.2f}x   (goal <= 1.30x: {'met' if cell <= 1.3 else 'not met'})")
        print(f"  {'fused / plain target':>32}: {times['calibfuse fused alpha=0.3'] / times['transformers generate (target)']:6.2f}x")
        print(f"  {'batch-16 / batch-1 throughput':>32}: {times['fused, batch 1'] / times['calibfuse fused alpha=0.3']:6.2f}x")


if __name__ == "__main__":
    main()
