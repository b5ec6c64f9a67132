"""The paper's table rehearsed end to end on CPU stand-ins of the same shapes (experiments/rehearsal.sh):
stage 1 under strategy=ddp with a process per rank, the SLURM path through submitit's local executor
reusing it, a job stopped by SIGTERM mid-grid that resumes to the uninterrupted grid, and the four-target report."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["llama2-7b-chat-uncensored", "llama2-7b-chat", "medicine-chat", "finance-chat"]


@pytest.mark.slow
def test_the_paper_table_rehearsal(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "OUT": str(tmp_path), "ALPHAS": "[0.0,0.3]", "PY": str(Path(os.sys.executable))}
    result = subprocess.run([str(ROOT / "experiments" / "rehearsal.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # 1-2. stage 1 trained once, under strategy=ddp with a process per rank (torchrun); the SLURM path's stage-1 job reused it
    configs = [json.loads(p.read_text())["config"] for p in (tmp_path / "stages").glob("pretrain-*/calibration_model/manifest.json")]
    assert [(c["trainer"]["strategy"], c["trainer"]["devices"], c["module"]["num_layers"]) for c in configs] == [("ddp", 2, 3)]
    assert configs[0]["data"]["load_kwargs"]["delimiter"] == "\t"  # read through `datasets` as the hub copy is
    assert "stage pretrain: reusing" in (tmp_path / "stage1" / "0" / "pipeline.log").read_text()
    # 3. the first target's job stopped by SIGTERM after 1 of its 2 cells; rerun, it reused the stages and that cell and
    # computed the other, and its grid equals the uninterrupted run's
    assert "UncompletedJobError" in (tmp_path / "first_attempt.log").read_text()
    stopped, _, resumed = (tmp_path / "sweep" / "0" / "pipeline.log").read_text().partition("SIGTERM: stopping")
    assert stopped.count(": toxicity ") == 1 and "grid (paper protocol" not in stopped
    assert "stage pretrain: reusing" in resumed and "stage align: reusing" in resumed
    assert resumed.count(": reused from ") == 1 and resumed.count(": generating") == 1
    assert "resumed = uninterrupted: grid.csv's 2 cells" in result.stdout
    # 4. the paper-style table: four targets, the target alone and fusion at alpha 0.3
    table = (tmp_path / "report" / "table.md").read_text()
    for target in TARGETS:
        assert f"| rehearsal-{target} | fusion α=0.3 |" in table
