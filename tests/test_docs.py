"""The front door and the docs point at things that exist: the README stays short and links only inside
the repository, and every `calibfuse.<module>[.<name>]` the docs, configs and recipes name resolves."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "experiments" / "README.md"]
TEXTS = DOCS + [*ROOT.glob("conf/**/*.yaml"), *ROOT.glob("experiments/*.sh"), *ROOT.glob("benchmarks/*.py")]


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for heading in ("## Layout", "docs/results.md", "docs/new_method.md", "docs/operations.md"):
        assert heading in readme, heading


def test_links_stay_inside_the_repository_and_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            assert not target.startswith(("http://", "https://", "../../")), f"{doc.name} links outside: {target}"
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_named_module_and_object_exists():
    missing = []
    for path in TEXTS:
        for dotted in set(re.findall(r"(?<![\w/.-])calibfuse(?:\.\w+)+", path.read_text())):
            if not resolves(dotted.rstrip(".")):
                missing.append(f"{path.relative_to(ROOT)}: {dotted}")
    assert missing == [], "names that do not resolve:\n" + "\n".join(sorted(missing))


# Entry points without a Hydra config, and the test that runs each as the docs print it.
NOT_HYDRA = {"sync": "tests/test_evaluate.py::test_an_ablation_multirun_keeps_its_arms_apart_in_the_report_and_wandb"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, config name, overrides) of every single-run `python -m calibfuse.<entry>` line in the docs'
    code blocks, continuation lines joined; lines with placeholders (<...>, $VAR, ...) are left out."""
    import shlex

    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.match(r"\s*(?:\S+=\S+\s+)*(?:\S*python) -m calibfuse\.([\w.]+)(.*)", line)
                if not match or re.search(r"<|\$|\.\.\.|hydra.searchpath", line):  # placeholders; a folder of the reader's
                    continue
                words = shlex.split(match.group(2), comments=True)
                if "-m" in words or "--multirun" in words:
                    continue  # a sweep's values are not one config
                if not (ROOT / "conf" / f"{match.group(1).rsplit('.', 1)[-1]}.yaml").is_file():
                    assert match.group(1) in NOT_HYDRA, f"{doc.name}: {line.strip()} runs an entry point with no config"
                    continue
                overrides = [w for w in words if not w.startswith("hydra.")]
                found.append((f"{doc.relative_to(ROOT)}: {line.strip()[:80]}", match.group(1).rsplit(".", 1)[-1], overrides))
    return found


def test_every_documented_command_composes(tmp_path):
    """A command copied from the docs must at least compose: a renamed key or option fails here, not on
    a reader's machine (as `pipeline prompts=...` did: Hydra reads `prompts` as the config group)."""
    from hydra import compose, initialize_config_dir

    commands = documented_commands()
    assert len(commands) > 20, commands
    failures = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for where, entry, overrides in commands:
            try:
                compose(config_name=entry, overrides=overrides)
            except Exception as error:  # noqa: BLE001 - every failure is listed, with its line
                failures.append(f"{where}\n    {type(error).__name__}: {str(error).splitlines()[0]}")
    assert failures == [], "documented commands that do not compose:\n" + "\n".join(failures)
