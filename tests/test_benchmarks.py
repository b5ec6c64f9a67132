"""Every script in benchmarks/ runs in its smoke mode (tiny sizes, seconds), so none can rot unseen.
Their figures are the full runs' (docs/results.md); here only that each runs and prints what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# script -> a line its output must have (the figure it exists to print)
EXPECTED = {
    "toxicity_scoring.py": "texts scored by profanity_check",
    "scorer_validity.py": "verdict:",
    "align_negative_sampling.py": "per token / bulk =",
    "fusion_overhead.py": "fused / calibfuse alpha=0:",
    "methods.py": "Peers' cost per token against the target alone, this run: lm_steer",
    "positions.py": "rows split differently 0 of 200",
    "pretrain_step.py": "every position / scored only =",
    "gpu_check.py": "no CUDA GPU here",  # CI has none; on a GPU: "CUDA bf16 vs CPU fp32"
}


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_runs_in_smoke_mode(script, tmp_path):
    extra = ["--out", str(tmp_path / "out")] if script == "methods.py" else []
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert EXPECTED[script] in result.stdout, result.stdout[-3000:]
