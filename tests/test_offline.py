"""An offline node's set-up: the CLI the docs name is the one the venv installs, and the Detoxify checkpoint has
one path everywhere."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("conf/**/*.yaml"), *ROOT.glob("experiments/*.sh"), *ROOT.rglob("calibfuse/**/*.py")]
DETOXIFY_CHECKPOINT, DETOXIFY_CONFIG = "/models/toxic_original-c1212f89.ckpt", "/models/bert-base-uncased"  # the one path each


def test_the_download_cli_the_docs_name_is_in_the_venv():
    named = {m for path in TEXTS for m in re.findall(r"\b(huggingface-cli|hf) download\b", path.read_text())}
    assert "hf" in named, named
    for cli in named:  # beside this interpreter: the venv's bin/ (its python is a link there, not resolved)
        assert (Path(sys.executable).parent / cli).is_file(), f"the docs name `{cli} download`; the venv has no {cli} ({Path(sys.executable).parent})"


def test_the_detoxify_checkpoint_has_one_path_everywhere():
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "docs" / "guide.md", ROOT / "conf" / "scorer" / "detoxify.yaml"]}
    texts |= {p: p.read_text() for p in [ROOT / "conf" / "experiment" / "paper_table.yaml", ROOT / "experiments" / "paper_table.sh"]}
    for name, text in texts.items():
        checkpoints = set(re.findall(r"(?<![\w/:])/[\w/.-]*toxic_original[\w.-]*\.ckpt", text))  # paths, not the release URL
        assert checkpoints == {DETOXIFY_CHECKPOINT}, f"{name.relative_to(ROOT)}: {checkpoints}"
        configs = set(re.findall(r"(?<![\w/])/[\w/.-]*/bert-base-uncased\b", text))
        assert configs <= {DETOXIFY_CONFIG}, f"{name.relative_to(ROOT)}: {configs}"
