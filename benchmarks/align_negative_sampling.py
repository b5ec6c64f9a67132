"""Stage 2's negative sampling: drawn in bulk on the device vs one token at a time in Python.

    python benchmarks/align_negative_sampling.py                     # SmolLM2 -> Gemma-3-270M vocabularies
    python benchmarks/align_negative_sampling.py --target smollm2-135m-instruct
    python benchmarks/align_negative_sampling.py --smoke            # CI: SmolLM2 with itself, 256 tokens, one repeat (seconds)

Runs one epoch over the whole shared vocabulary (K=10 negatives, batch 32) both ways, in one
process, and prints both times and their ratio: first the sampling alone (the part that differs;
fastest of 5 epochs each way), then whole training epochs (the same InfoNCE step and Adam update after either sampler). The
reference's way: for every token of a batch, a Python loop draws K negatives different from it,
and the batch is assembled from per-token tensors. calibfuse's way: one torch.randint for the
whole epoch, shifted past each anchor (calibfuse.stages.align.sample_negatives), as AlignmentModule does.
"""

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer
from calibfuse.models.vocabulary import shared_vocabulary
from calibfuse.stages.align import AlignmentModule, embedding_rows, sample_negatives
from calibfuse.utils.run import quiet_libraries


def batches_bulk(module, batch_size, num_negatives, seed):
    pool = len(module.train_tokens)
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
    negatives = module.train_tokens[sample_negatives(torch.arange(pool), pool, num_negatives)]  # the whole epoch in one call
    for start in range(0, pool, batch_size):
        positions = order[start : start + batch_size]
        yield module.train_tokens[positions], negatives[positions]  # as AlignmentModule.training_step


def batches_per_token(module, batch_size, num_negatives, seed):
    rng = random.Random(seed)
    tokens = module.train_tokens.tolist()
    order = tokens[:]
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        anchors, negative_rows = [], []
        for t in order[start : start + batch_size]:  # one token at a time, as the reference does
            negatives = []
            while len(negatives) < num_negatives:
                u = tokens[rng.randrange(len(tokens))]
                if u != t:
                    negatives.append(u)
            anchors.append(torch.tensor(t))
            negative_rows.append(torch.tensor(negatives))
        yield torch.stack(anchors), torch.stack(negative_rows)


def sampling_epoch(module, optimizer, batches):
    for _ in batches:
        pass


def training_epoch(module, optimizer, batches):
    for anchors, negatives in batches:
        loss = module.info_nce(anchors, negatives)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", default="smollm2-135m-instruct")
    parser.add_argument("--target", default="gemma3-270m")
    parser.add_argument("--num-negatives", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=None, help="use only the first N shared tokens (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, not the speed-up")
    args = parser.parse_args()
    if args.smoke:
        args.target, args.tokens = args.calibration, 256

    calibration_spec, target_spec = ModelSpec(args.calibration, dtype="float32"), ModelSpec(args.target, dtype="float32")
    vocabulary = shared_vocabulary(load_tokenizer(calibration_spec), load_tokenizer(target_spec))
    x = embedding_rows(load_model(calibration_spec), vocabulary.calibration_ids)
    y = embedding_rows(load_model(target_spec), vocabulary.target_ids)
    print(
        f"shared vocabulary {args.calibration} -> {args.target}: {len(vocabulary)} tokens, "
        f"K={args.num_negatives}, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )

    for what, epoch, repeats in [("sampling only", sampling_epoch, 1 if args.smoke else 5), ("training epoch", training_epoch, 1)]:
        times = {}
        for name, batches in [("bulk", batches_bulk), ("per token", batches_per_token)]:
            best = float("inf")
            for repeat in range(repeats):  # the fastest of a few: this machine is noisy
                torch.manual_seed(repeat)
                module = AlignmentModule(x, y, torch.arange(len(vocabulary))[: args.tokens], args.num_negatives)
                optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
                started = time.perf_counter()
                epoch(module, optimizer, batches(module, args.batch_size, args.num_negatives, seed=repeat))
                best = min(best, time.perf_counter() - started)
            times[name] = best
        print(
            f"{what:>15}: bulk {times['bulk']:6.2f} s | per token {times['per token']:6.2f} s | per token / bulk = {times['per token'] / times['bulk']:5.1f}x"
        )


if __name__ == "__main__":
    main()
