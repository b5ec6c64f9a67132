"""Reliability (issue 12) at the edges: W&B keys checked by shape before any work, secrets refused on
the command line before Hydra writes them, Perspective network failures retried then named, and
remote checkpoints never unpickled beyond tensors."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from calibfuse.scoring.toxicity import build_scorer
from calibfuse.utils.checks import check_wandb_credentials, secret_keys

ROOT = Path(__file__).resolve().parents[1]
ONLINE = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.wandb.WandbLogger", "offline": False}})


# Case 7: an online W&B logger with a key that cannot be one fails before any work, without printing the key.


@pytest.fixture
def online_wandb(monkeypatch, tmp_path):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setattr(wandb, "login", lambda **kwargs: True)  # W&B's verdict on a well-formed key; tests never touch the network
    monkeypatch.setattr("socket.getaddrinfo", lambda host, port, *a, **k: [(2, 1, 6, "", ("127.0.0.1", port))])  # W&B's host resolves
    return tmp_path / "netrc"


def test_no_network_is_told_apart_from_a_refused_key(online_wandb, monkeypatch):
    import socket

    import wandb

    def no_dns(host, port, *args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(wandb, "login", lambda **kwargs: pytest.fail("login needs the network"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(RuntimeError, match=r"W&B's host api\.wandb\.ai does not resolve .* keep offline mode"):
        check_wandb_credentials(ONLINE)


@pytest.mark.parametrize(
    "error, message",
    [("AuthenticationError", "W&B refused the API key in WANDB_API_KEY"), ("CommError", "W&B is unreachable")],
)
def test_a_revoked_key_or_an_unreachable_server_stops_before_any_work(error, message, online_wandb, monkeypatch):
    import wandb

    def login(**kwargs):
        assert kwargs["verify"] and kwargs["key"] == "0123456789abcdef0123456789abcdef01234567"
        raise getattr(wandb.errors, error)("nope")

    monkeypatch.setattr(wandb, "login", login)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(RuntimeError, match=message) as refused:
        check_wandb_credentials(ONLINE)
    assert "0123456789abcdef0123456789abcdef01234567" not in str(refused.value)


@pytest.mark.parametrize(
    "key, problem",
    [
        ("0123456789abcdef", "it has 16 characters after any prefix, not 40 or more"),
        ("local-0123456789abcdef0123456789", "it has 26 characters after any prefix"),
        ("0123456789abcdef0123456789abcdef01234567 ", "it starts or ends with whitespace"),
        ("0123456789abcdef0123456789abcdef0123456!", "it holds characters other than letters, digits, underscores and dashes"),
    ],
)
def test_a_malformed_wandb_key_is_refused(key, problem, online_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", key)
    with pytest.raises(RuntimeError, match=rf"W&B API key in WANDB_API_KEY is malformed: {problem}") as refused:
        check_wandb_credentials(ONLINE)
    assert key.strip() not in str(refused.value)


def test_wellformed_wandb_keys_pass(online_wandb, monkeypatch):
    import wandb

    checked = []  # what W&B is asked to verify: the key itself, once each
    monkeypatch.setattr(wandb, "login", lambda **kwargs: checked.append((kwargs["key"], kwargs["verify"])) or True)
    keys = ["0123456789abcdef0123456789abcdef01234567", "local-0123456789abcdef0123456789abcdef01234567"]
    for key in keys:
        monkeypatch.setenv("WANDB_API_KEY", key)
        assert check_wandb_credentials(ONLINE) is None  # passes without a word
    assert checked == [(key, True) for key in keys]


def test_a_malformed_netrc_key_is_refused(online_wandb, monkeypatch):
    online_wandb.write_text("machine api.wandb.ai\n  login user\n  password tooshort\n")
    online_wandb.chmod(0o600)
    with pytest.raises(RuntimeError, match=rf"key in the api.wandb.ai entry of {online_wandb} is malformed: it has 8 characters"):
        check_wandb_credentials(ONLINE)
    online_wandb.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    import wandb

    checked = []
    monkeypatch.setattr(wandb, "login", lambda **kwargs: checked.append(kwargs["key"]) or True)
    check_wandb_credentials(ONLINE)
    assert checked == ["a" * 40]  # the netrc's key is the one W&B verifies


def test_evaluate_refuses_a_malformed_key_before_any_model_loads(online_wandb, monkeypatch, tmp_path):
    from calibfuse.evaluate import evaluate
    from calibfuse.models import loading as models

    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RuntimeError, match="W&B API key in WANDB_API_KEY is malformed"):
        evaluate(compose_config("evaluate", ["logger=wandb", "logger.wandb.offline=false"], tmp_path))


# Case 9: a secret on the command line is refused before Hydra writes .hydra/ or W&B records argv.


def test_secret_keys_in_overrides_and_configs():
    assert secret_keys(["logger.wandb.api_key=XYZ", "+scorer.api_key=k", "seed=1", "prompts.source=/data/x.jsonl"]) == [
        "logger.wandb.api_key",
        "scorer.api_key",
    ]
    assert secret_keys(["logger.wandb={api_key:XYZ,offline:false}", 'evaluate_overrides=["scorer.api_key=k"]']) == ["api_key", "scorer.api_key"]
    assert secret_keys(["+hydra.job.env_set.WANDB_API_KEY=k", "+hf_token=t", "protocol.generation.max_new_tokens=5"]) == [
        "hydra.job.env_set.WANDB_API_KEY",
        "hf_token",
    ]
    assert secret_keys(["+logger.wandb.api_key=${oc.env:WANDB_API_KEY}", "scorer.api_key_env=MY_KEY"]) == []  # names, not secrets
    config = OmegaConf.create({"logger": {"wandb": {"api_key": "XYZ"}}, "scorer": {"api_key": "${oc.env:K}", "token": None}})
    assert secret_keys(["logger.wandb={api_key:XYZ}"], config) == ["logger.wandb.api_key"]


def run_entry_point(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def written_text(root: Path) -> str:
    return "".join(p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "overrides, key, home",
    [
        (["+logger.wandb.api_key=SECRET0123456789"], "logger.wandb.api_key", "WANDB_API_KEY"),
        (["-m", "+scorer.api_key=SECRET0123456789,SECRET9876543210"], "scorer.api_key", "PERSPECTIVE_API_KEY"),
        (["+hydra.job.env_set.HF_TOKEN=SECRET0123456789"], "hydra.job.env_set.HF_TOKEN", "HF_TOKEN"),
    ],
)
def test_a_secret_on_the_command_line_is_refused_before_anything_is_written(overrides, key, home, tmp_path):
    done = run_entry_point("calibfuse.report", *overrides, "runs=[nowhere]", cwd=tmp_path)
    assert done.returncode == 1
    assert f"refusing to run: {key} would be saved verbatim" in done.stderr and f"set {home}" in done.stderr
    assert "SECRET" not in done.stderr + done.stdout
    assert not (tmp_path / "outputs").exists()  # no run dir, no .hydra/overrides.yaml


def test_an_environment_interpolation_passes_and_only_its_name_is_saved(tmp_path):
    done = run_entry_point("calibfuse.report", "runs=[nowhere]", "+logger.wandb.api_key=${oc.env:WANDB_API_KEY,none}", cwd=tmp_path)
    assert "does not exist" in done.stderr  # the report ran, and failed on its input as it should
    (overrides,) = (tmp_path / "outputs" / "report" / "runs").glob("*/.hydra/overrides.yaml")
    assert "${oc.env:WANDB_API_KEY,none}" in overrides.read_text()


def test_a_multirun_shares_one_sweep_dir_and_parallel_runs_get_their_own(tmp_path):
    run_entry_point("calibfuse.report", "-m", "runs=[a],[b]", cwd=tmp_path)
    (sweep,) = (tmp_path / "outputs" / "report" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = [
        subprocess.Popen([sys.executable, "-m", "calibfuse.report", "runs=[a]"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3)
    ]
    for job in jobs:
        job.wait(timeout=120)
    runs = list((tmp_path / "outputs" / "report" / "runs").iterdir())
    assert len(runs) == 3 and all((r / ".hydra" / "overrides.yaml").is_file() for r in runs)


@pytest.mark.slow
def test_wandb_records_the_command_line_verbatim(tiny_model_dirs, tiny_target_dir, tmp_path):
    """Why secrets must never be overrides: a W&B run keeps argv as typed (its metadata record's `args`,
    in the offline run's .wandb file; online it is wandb-metadata.json)."""
    overrides = [
        f"calibration_model.name_or_path={tiny_model_dirs['llama']}",
        f"target.name_or_path={tiny_target_dir}",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tags=[argv-probe]",
    ]
    done = run_entry_point("calibfuse.align", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert all(override.encode() in record.read_bytes() for override in overrides)


# Case 8: Perspective network failures are retried with backoff, then named with the endpoint, never the key.


class Flaky(BaseHTTPRequestHandler):
    """Answers the scripted way, one entry per request: an HTTP status, "drop" (close without an
    answer) or "slow" (no answer before the client's timeout); 200 once the script is used up."""

    script: list = []
    arrived = threading.Event()  # set by every request: a "slow" answer waits for the client's retry

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        step = Flaky.script.pop(0) if Flaky.script else 200
        Flaky.arrived.set()
        if step == "slow":  # no answer until the client has timed out and retried (not a sleep that a loaded machine can outlast)
            Flaky.arrived.clear()
            Flaky.arrived.wait(timeout=30)
        if step in ("drop", "slow"):
            self.close_connection = True
            return
        self.send_response(step)
        self.end_headers()
        if step == 200:
            self.wfile.write(json.dumps({"attributeScores": {"TOXICITY": {"summaryScore": {"value": 0.25}}}}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "KEY-never-in-a-message")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)  # a retry is answered while the slow answer still sleeps
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1alpha1/comments:analyze"
    server.shutdown()


def perspective(endpoint: str, **options):
    return build_scorer("perspective", endpoint=endpoint, qps=1000, backoff_seconds=0.01, cache_path=None, **options)


def test_perspective_retries_5xx_dropped_connections_and_timeouts(flaky_server):
    Flaky.script = [503, 500, "drop", "slow"]
    scorer = perspective(flaky_server, timeout=1.0)  # every prompt answer comes well within it, even on a loaded machine
    assert scorer.score(["some text"]) == [0.25]
    assert scorer.requests == 5


def test_perspective_does_not_retry_a_client_error(flaky_server):
    Flaky.script = [400]
    scorer = perspective(flaky_server)
    with pytest.raises(RuntimeError, match=rf"Perspective API at {flaky_server} answered HTTP 400 .*is the key in PERSPECTIVE_API_KEY valid"):
        scorer.score(["text"])
    assert scorer.requests == 1


def test_perspective_unreachable_names_the_endpoint_and_the_attempts(monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "KEY-never-in-a-message")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}/v1alpha1/comments:analyze"
    scorer = perspective(endpoint, max_retries=2)
    with pytest.raises(RuntimeError, match=rf"Perspective API at {endpoint} failed 3 attempts .* the last with URLError: .*refused") as failed:
        scorer.score(["text"])
    assert "KEY-never" not in str(failed.value) and scorer.requests == 3


# Case 10: a remote ckpt_path is loaded with weights_only=True: nothing but tensors and containers is unpickled.


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what an attacker's checkpoint would run on load


def test_a_remote_checkpoint_is_never_unpickled_beyond_tensors(tiny_model_dirs, tiny_target_dir, tmp_path, monkeypatch):
    import torch

    from calibfuse.align import align

    served, marker = tmp_path / "served", tmp_path / "code-ran"
    served.mkdir()
    torch.save({"state_dict": {}, "payload": Payload(marker)}, served / "evil.ckpt")

    class Files(BaseHTTPRequestHandler):
        def do_GET(self):
            data = (served / Path(self.path).name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's download dir
    cfg = compose_config(
        "align",
        [
            f"calibration_model.name_or_path={tiny_model_dirs['llama']}",
            f"target.name_or_path={tiny_target_dir}",
            "trainer.max_epochs=1",
            "logger=csv",
            f"ckpt_path=http://127.0.0.1:{server.server_port}/evil.ckpt",
        ],
        tmp_path,
    )
    try:
        with pytest.raises(Exception, match="Weights only load failed"):
            align(cfg)
    finally:
        server.shutdown()
    assert not marker.exists()
