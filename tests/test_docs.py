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
