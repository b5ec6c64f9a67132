"""The paper's table rehearsed end to end on CPU stand-ins of the same shapes (experiments/rehearsal.sh):
stage 1 under strategy=ddp with a process per rank, the SLURM path through submitit's local executor, a
killed job that resumes, and the four-target report."""

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
    # 1-2. stage 1 twice: strategy=ddp with a process per rank (torchrun), and the rehearsal's own ddp_spawn job
    configs = [json.loads(p.read_text())["config"] for p in (tmp_path / "stages").glob("pretrain-*/calibration_model/manifest.json")]
    assert sorted((c["trainer"]["strategy"], c["trainer"]["devices"], c["module"]["num_layers"]) for c in configs) == [("ddp", 2, 3), ("ddp_spawn", 2, 3)]
    assert all(c["data"]["load_kwargs"]["delimiter"] == "\t" for c in configs)  # read through `datasets` as the hub copy is
    # 3. the killed attempt failed, the rerun reused the stages and the finished cells
    assert "UncompletedJobError" in (tmp_path / "first_attempt.log").read_text()
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").glob("*/pipeline.log"))
    assert "stage pretrain: reusing" in logs and "stage align: reusing" in logs and "reused from" in logs
    # 4. the paper-style table: four targets, the target alone and fusion at alpha 0.3
    table = (tmp_path / "report" / "table.md").read_text()
    for target in TARGETS:
        assert f"| rehearsal-{target} | fusion α=0.3 |" in table
