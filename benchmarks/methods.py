"""Every method side by side on the embedded models, measured in one run: generation time relative
to the target alone, peak memory, and toxicity and perplexity at each method's default strength.

    python benchmarks/methods.py                          # SmolLM2 target, shipped challenge set, paper protocol
    python benchmarks/methods.py --target gemma3-270m --alpha 0.3
    python benchmarks/methods.py --smoke --out /tmp/methods_smoke   # CI: 1-layer stage 1 and stage 2 of 2 steps, 2 prompts x 2 tokens

Runs calibfuse.pipeline (stages 1-2 are built once and reused from outputs/pipeline/stages/; the
grid's cells are all generated afresh, in this run) with
methods none, fusion (alpha = --alpha), word_filter, prompting and the peer methods LM-Steer (its steer
trained by the pipeline's steer stage, at steer value --steer) and ProFS (at edit strength 1); DExperts needs an expert and an
anti-expert LM that share the target's tokenizer, which the embedded default does not have (pass
--expert and --anti-expert to include it). Prints a Markdown table (the README quotes it).
Peak memory is the process's resident set while the method's cell ran (all loaded models included),
so differences between rows are what a method adds. The peers' cost goals, printed with the ratios
measured in this run: LM-Steer <= 1.05x the target alone per token (one d x d matmul), ProFS 1.00x
(after its edit the model is the target's shape); their one-off costs (the steer's training, ProFS's
fit) are not in the generation time.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from calibfuse.utils.run import quiet_libraries

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]


def listed(items: list[str]) -> str:
    """Overrides as one override's value (a pipeline's `<stage>_overrides`)."""
    return "[" + ",".join(f"'{item}'" for item in items) + "]"


def main():
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--alpha", type=float, default=0.3, help="fusion's alpha")
    parser.add_argument("--steer", type=float, default=1.0, help="LM-Steer's steer value")
    parser.add_argument("--expert", default=None, help="DExperts expert (a model sharing the target's tokenizer)")
    parser.add_argument("--anti-expert", default=None)
    parser.add_argument("--out", default="outputs/benchmarks/methods")
    parser.add_argument("--smoke", action="store_true", help="tiny stages and grid in --out: checks the script runs, not the methods")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from calibfuse.pipeline import pipeline

    methods = ["none", "fusion", "word_filter", "prompting", "lm_steer", "profs"] + (["dexperts"] if args.expert else [])
    peers = [f"methods.lm_steer.alphas=[{args.steer}]", "methods.profs.alphas=[1.0]"]  # one strength each: the cost is per token
    experts = [f"methods.dexperts.expert.name_or_path={args.expert}", f"methods.dexperts.anti_expert.name_or_path={args.anti_expert}"]
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # every method's cell is generated in this run, none reused from earlier ones
    smoke = []
    if args.smoke:  # its own stage store: the main job's stages are never replaced by these
        tiny = ["logger=csv", "trainer.max_steps=2"]
        pretrain = ["data=embedded_nontoxic", "data.max_examples=16", "data.batch_size=4", *tiny]
        evaluate = ["prompts.limit=2", "protocol.generation.max_new_tokens=2"]
        smoke = [
            f"stage_store={out / 'stages'}",
            "calibration_layers=1",
            f"pretrain_overrides={listed(pretrain)}",
            f"align_overrides={listed([*tiny, '++trainer.val_check_interval=2', '++trainer.limit_val_batches=2'])}",
            f"steer_overrides={listed([*tiny, 'data=embedded_nontoxic', 'train_rows=8', 'val_rows=4', 'batch_size=4', 'trainer.val_check_interval=2'])}",
        ]
        peers += ["methods.profs.nontoxic.path=embedded:nontoxic", "methods.profs.sentences=8", "methods.profs.rank=2", "methods.profs.batch_size=8"]
    started = time.time()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # Warm-up: the first pass over the prompts pays CPU kernel set-up for every new shape (~20 s
        # here); a throwaway run of the target alone keeps that out of the measured cells.
        runs = ((out / "warmup_cells", ["none"], out / "warmup"), (out / "cells", methods, out))
        for store, run_methods, run_dir in runs[1:] if args.smoke else runs:
            extra = (
                [f"cell_store={store}", *(peers if "profs" in run_methods else [])]
                + (experts if "dexperts" in run_methods else [])
                + (["logger=csv", *evaluate] if args.smoke else [])
            )
            cfg = compose(
                "pipeline",
                overrides=[
                    f"targets=[{args.target}]",
                    f"alphas=[0,{args.alpha}]",
                    f"report.alpha={args.alpha}",
                    f"method_names=[{','.join(run_methods)}]",
                    f"steer={'lm_steer' in run_methods}",
                    f"evaluate_overrides={listed(extra)}",
                    *smoke,
                ],
            )
            cfg.paths.output_dir = str(run_dir)
            pipeline(cfg)
    grid = json.loads((out / "evaluate" / "grid.json").read_text())
    cells = [c for c in grid["cells"] if not (c["target_alone"] and c["method"] != "none")]  # fusion at alpha 0: the same cell as `none`
    base = next(c for c in cells if c["method"] == "none")
    metrics = [m for m in grid["metrics"] if m != "perplexity"][:1] + ["perplexity"]
    print(f"\n{args.target}, {grid['prompts']} prompts, {grid['protocol']} protocol, scorer {grid['scorer']} (whole run {time.time() - started:.0f} s)\n")
    print(f"| method | alpha | generation time vs target alone | tok/s | peak memory (MB) | {' | '.join(metrics)} |")
    print("|---|---|---|---|---|" + "---|" * len(metrics))
    for c in cells:
        alpha = f"α={c['alpha']:g}" if c["alpha"] else "–"  # the grid's alpha column, whatever the method
        values = " | ".join(f"{c[m]:.2f} [{c[m + '_lo']:.2f}, {c[m + '_hi']:.2f}]" for m in metrics)
        print(
            f"| {c['method']} | {alpha} | {c['generation_seconds'] / base['generation_seconds']:.2f}× | {c['tokens_per_second']:.1f} | "
            f"{c['peak_memory_mb']} | {values} |"
        )
    ratio = {c["method"]: c["generation_seconds"] / base["generation_seconds"] for c in cells}
    print(
        f"\nPeers' cost per token against the target alone, this run: lm_steer {ratio['lm_steer']:.2f}× (goal ≤ 1.05×), "
        f"profs {ratio['profs']:.2f}× (goal 1.00×)"
    )
    if not args.expert:
        print("| dexperts | – | not run: needs --expert and --anti-expert sharing the target's tokenizer (none ships offline) | | | |")
    if grid.get("scorer_note"):
        print(f"\nNote: {grid['scorer_note']}. word_filter bans the words that this scorer's model weighs most, which flatters it under this scorer.")


if __name__ == "__main__":
    main()
