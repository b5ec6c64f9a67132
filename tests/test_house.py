"""The package's house, drawn from its imports: packages in the method's order, no circles, few floors.

A module may import from its own package or from a package below it in LAYERS; the top level holds the
entry points (`python -m calibfuse.<name>`), which may import anything.
"""

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "calibfuse"
LAYERS = ["utils", "models", "scoring", "data", "fusion", "methods", "stages", "evaluation", "reporting", ""]
MAX_FLOORS = 8


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The calibfuse modules `name` imports, lazily or not (a `from package import module` counts the module)."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):  # imports for annotations only never run: not part of the house
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in MODULES and candidate not in (name, "calibfuse"):
                found.add(candidate)
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    sub = parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""
    return LAYERS.index(sub)


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), f"packages without a layer in LAYERS: {sorted(packages - set(LAYERS))}"


def test_no_import_runs_back_up():
    upward = [f"{m} -> {i}" for m in MODULES for i in imports_of(m) if layer(i) > layer(m)]
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)


def test_no_circles_and_at_most_eight_floors():
    @cache
    def floor(name: str, path: tuple = ()) -> int:
        assert name not in path, "import circle: " + " -> ".join(path + (name,))
        return 1 + max((floor(i, path + (name,)) for i in imports_of(name)), default=0)

    floors = {m: floor(m) for m in MODULES}
    top = max(floors.values())
    assert top <= MAX_FLOORS, f"{top} floors: " + ", ".join(m for m, f in floors.items() if f == top)


def test_package_inits_import_nothing_of_their_own_package():
    # an __init__ that imports its submodules runs them on every `from calibfuse.x.y import ...`
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "calibfuse.methods":
            assert not imports_of(name), f"{path.relative_to(ROOT)} imports {sorted(imports_of(name))}"
