"""No import runs back up: every module of scep/ sits in one layer and imports only from its own layer or below.

The layers, lowest first, are the ones docs/architecture.md draws ("The layer rule"). Module-level and
function-level imports count alike: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "scep"

# (layer, module patterns): a pattern is a module name, or a package name ending in ".*" for all below it.
# The most specific pattern decides a module's layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "primitives",
        ("scep", "scep.appsettings", "scep.findings", "scep.logs", "scep.core", "scep.core.protocol", "scep.core.der"),
    ),
    ("interfaces", ("scep.keys", "scep.store", "scep.challenge")),
    ("core", ("scep.core.*",)),
    ("local backends", ("scep.keys.*", "scep.store.*", "scep.challenge.static", "scep.challenge.composite")),
    ("azure backends", ("scep.azure", "scep.azure.*")),
    ("boundaries", ("scep.http.web", "scep.http.status", "scep.http.revocation", "scep.challenge.webhook")),
    ("composition", ("scep.config",)),
    ("adapters", ("scep.http", "scep.http.*")),
    ("tools", ("scep.tools", "scep.tools.*")),
)
BACKEND_LAYERS = ("local backends", "azure backends")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for layer, patterns in LAYERS:
        for pattern in patterns:
            exact = pattern == module
            below = pattern.endswith(".*") and module.startswith(pattern[:-1])
            if (exact or below) and (best is None or len(pattern) > best[0]):
                best = (len(pattern) + (1 if exact else 0), layer)
    return best[1] if best else None


RANK = {layer: rank for rank, (layer, _) in enumerate(LAYERS)}


def imported_modules(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every scep module imported anywhere in the file, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "scep")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.split(".")[0] != "scep":
                continue
            for alias in node.names:  # `from scep import config` imports the module scep.config
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if submodule in MODULES else base


def test_every_module_has_a_layer() -> None:
    unplaced = [module for module in MODULES if layer_of(module) is None]
    assert not unplaced, f"place these modules in a layer (tests/test_layers.py and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_back_up(module: str) -> None:
    layer = layer_of(module)
    upward = [
        f"line {line}: {target} ({layer_of(target)})"
        for line, target in imported_modules(module, MODULES[module])
        if target in MODULES and RANK[layer_of(target)] > RANK[layer]
    ]
    assert not upward, f"{module} ({layer}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) in BACKEND_LAYERS))
def test_backends_see_the_core_only_through_its_primitives(module: str) -> None:
    """Custody, store and validator backends need the interfaces and the primitives, never the codec, the
    certificate profile or the state machine (which would make the core and its backends depend on each other)."""
    reaching = [
        f"line {line}: {target}"
        for line, target in imported_modules(module, MODULES[module])
        if target.startswith("scep.core.") and layer_of(target) == "core"
    ]
    assert not reaching, f"{module} reaches into the core: {reaching}"


def test_the_scan_sees_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    """The scan itself: an import inside a function, a relative import and `from package import module` count."""
    source = (
        "from . import der\n"
        "def late():\n"
        "    from scep import config\n"
        "    import scep.http.web\n"
        "    from ..store import Store\n"
    )
    path = PACKAGE_ROOT / "core" / "probe.py"
    fake = tmp_path / "probe.py"
    fake.write_text(source, encoding="utf-8")
    found = {target for _, target in imported_modules("scep.core.probe", fake)}
    assert path.parent.name == "core"
    assert found == {"scep.core.der", "scep.config", "scep.http.web", "scep.store"}
    assert layer_of("scep.core.probe") == "core" and RANK["composition"] > RANK["core"]
