"""Only scep/config.py reads the environment: every other module gets typed settings from it.

An AST scan of scep/ and function_app.py for the process environment (os.environ, os.getenv, ...) and for
settings read by name from a raw mapping (`anything.get("SCEP_...")`, `anything["KEY_VAULT_URL"]`): an `environ`
parameter or a `Settings.values`-style mapping used as a settings source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from scep.config import SETTINGS

REPO = Path(__file__).resolve().parents[1]
COMPOSITION_ROOT = REPO / "scep" / "config.py"
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
SETTING_NAMES = {setting.name for setting in SETTINGS}


def environment_reads(source: str) -> list[str]:
    """Where source reads the environment or a setting by name: 'line: what' for each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        what = _environment_read(node)
        if what:
            found.append(f"{node.lineno}: {what}")
    return found


def _environment_read(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES and _is_os(node.value):
        return f"os.{node.attr}"
    if isinstance(node, ast.ImportFrom) and node.module == "os":
        names = {alias.name for alias in node.names} & ENVIRONMENT_NAMES
        if names:
            return f"from os import {', '.join(sorted(names))}"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop"):
        name = _setting_name(node.args[0]) if node.args else None
        if name:
            return f".{node.func.attr}({name!r}) on a raw mapping"
    if isinstance(node, ast.Subscript):
        name = _setting_name(node.slice)
        if name:
            return f"[{name!r}] on a raw mapping"
    return None


def _is_os(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "os"


def _setting_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and node.value in SETTING_NAMES:
        return node.value
    return None


def _modules() -> list[Path]:
    modules = sorted((REPO / "scep").rglob("*.py")) + [REPO / "function_app.py"]
    return [path for path in modules if path != COMPOSITION_ROOT]


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_module_but_config_reads_the_environment(path: Path) -> None:
    reads = environment_reads(path.read_text())
    assert not reads, f"{path.relative_to(REPO)} reads settings itself (take them from scep.config): {reads}"


@pytest.mark.parametrize(
    "source",
    [
        "import os\nlevel = os.environ.get('LEVEL')",
        "import os\nos.environ['SCEP_DATA_DIR'] = '/tmp'",
        "import os\nurl = os.getenv('KEY_VAULT_URL')",
        "from os import environ",
        "def build(environ):\n    return environ.get('KEY_VAULT_VERIFY_CHALLENGE_RESOURCE')",
        "def build(settings):\n    return settings.values['INTUNE_TENANT_ID']",
    ],
)
def test_the_scan_finds_every_kind_of_read(source: str) -> None:
    assert environment_reads(source)


def test_the_scan_leaves_other_mappings_alone() -> None:
    wsgi = "def app(environ, start_response):\n    return environ.get('QUERY_STRING', '')"
    assert not environment_reads(wsgi)


def test_the_composition_root_is_where_the_environment_is_read() -> None:
    assert any(read.endswith("os.environ") for read in environment_reads(COMPOSITION_ROOT.read_text()))
