"""A GPU check, ready to run: fused generation on CUDA in bf16 gives the CPU's fp32 tokens wherever the
CPU's top two logits are not near-tied, and what fusion costs there (throughput, peak memory).

    python benchmarks/gpu_check.py                           # Gemma-3-270M target, SmolLM2 3-layer calibration model
    python benchmarks/gpu_check.py --target smollm2-135m-instruct --prompts 64 --tokens 32
    python benchmarks/gpu_check.py --smoke                   # CI: without a GPU it says so and exits 0

A is random (seeded): the check is of the arithmetic, not of detoxification. Greedy, alpha 0.3. For each
prompt the CUDA bf16 tokens are compared with the CPU fp32 tokens up to their first difference; a
difference is accepted where the CPU's top two logits at that step are within --tie (bf16 keeps about
3 significant digits, so logits of 10-30 move by ~0.1). Exits 1 if a difference falls elsewhere.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from calibfuse.data.prompts import load_prompts  # noqa: E402
from calibfuse.fusion.calibration import build_calibration_model  # noqa: E402
from calibfuse.fusion.decoding import GenerationSettings  # noqa: E402
from calibfuse.fusion.generator import FusedGenerator  # noqa: E402
from calibfuse.models.footprint import model_config, size_of  # noqa: E402
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer  # noqa: E402
from calibfuse.utils.run import quiet_libraries  # noqa: E402

ALPHA = 0.3


def generator_on(device: str, dtype: str, target: str, A: torch.Tensor) -> FusedGenerator:
    calibration = ModelSpec("smollm2-135m-instruct", dtype=dtype, device=device)
    spec = ModelSpec(target, dtype=dtype, device=device)
    model = build_calibration_model(load_model(calibration), 3)
    return FusedGenerator(load_model(spec), load_tokenizer(spec), model, load_tokenizer(calibration), A)


def first_differences(cpu: FusedGenerator, gpu: FusedGenerator, prompts: list[str], settings: GenerationSettings, tie: float) -> dict:
    """Per prompt: identical, a difference at a near-tie of the CPU's logits, or a real difference."""
    steps = cpu.trace(prompts, ALPHA, settings)  # per step: the batch's logits (fp32, CPU)
    cpu_rows = cpu.generate(prompts, ALPHA, settings)
    gpu_rows = gpu.generate(prompts, ALPHA, settings)
    counts = {"identical": 0, "near_tie": 0, "real": 0}
    for row, (c, g) in enumerate(zip(cpu_rows, gpu_rows, strict=True)):
        step = next((i for i, (a, b) in enumerate(zip(c.token_ids, g.token_ids, strict=False)) if a != b), None)
        if step is None and len(c.token_ids) == len(g.token_ids):
            counts["identical"] += 1
            continue
        step = step if step is not None else min(len(c.token_ids), len(g.token_ids))
        top2 = steps[step]["logits"][row].topk(2).values if step < len(steps) else torch.tensor([0.0, 0.0])
        margin = float(top2[0] - top2[1])
        counts["near_tie" if margin <= tie else "real"] += 1
        if margin > tie:
            print(f"  prompt {row}: differs at step {step}, CPU top-2 margin {margin:.3f} > {tie}: {c.continuation!r} vs {g.continuation!r}")
    return counts


def throughput(generator: FusedGenerator, prompts: list[str], settings: GenerationSettings, cuda: bool) -> dict:
    """Tokens per second and peak accelerator memory (MiB; 0 on a CPU), target alone and fused."""
    generator.target_lm.eos_ids = generator.eos_ids[:0]  # every run does the same work
    result = {}
    for label, alpha in (("target alone", 0.0), ("fused", ALPHA)):
        generator.generate(prompts[:2], alpha, GenerationSettings(max_new_tokens=2))  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        generator.generate(prompts, alpha, settings)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result[label] = (len(prompts) * settings.max_new_tokens / seconds, torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0)
    return result


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--tie", type=float, default=0.5, help="a CPU top-2 logit margin at or below which bf16 may pick the other")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the same comparison in bf16 on the CPU (to test this script)")
    parser.add_argument("--smoke", action="store_true", help="few prompts and tokens (without a GPU: only the message)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (run this on a machine with one); exiting 0")
        return 0
    if args.smoke:
        args.prompts, args.tokens = 4, 4
    prompts = [p.text for p in load_prompts()][: args.prompts]  # the shipped challenge set
    settings = GenerationSettings(max_new_tokens=args.tokens, batch_size=len(prompts))
    widths = size_of(model_config("smollm2-135m-instruct")).hidden, size_of(model_config(args.target)).hidden
    A = torch.randn(*widths, generator=torch.Generator().manual_seed(0)) / 30
    with torch.no_grad():
        cpu = generator_on("cpu", "float32", args.target, A)
        gpu = generator_on(args.device, "bfloat16", args.target, A)
        counts = first_differences(cpu, gpu, prompts, settings, args.tie)
        speed = throughput(gpu, prompts, settings, cuda)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}: {args.target}, {len(prompts)} prompts x {args.tokens} tokens, greedy, alpha {ALPHA}")
    print(
        f"  {args.device} bf16 vs CPU fp32: {counts['identical']} identical, {counts['near_tie']} differ first at a near-tie, {counts['real']} differ elsewhere"
    )
    for label, (tokens_per_second, peak_mb) in speed.items():
        print(f"  {label:>12}: {tokens_per_second:8.1f} tok/s, peak {peak_mb:7.0f} MiB")
    print(f"  fused / target alone time: {speed['target alone'][0] / speed['fused'][0]:.2f}x")
    return 1 if counts["real"] else 0


if __name__ == "__main__":
    sys.exit(main())
