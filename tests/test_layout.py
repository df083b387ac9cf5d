"""The layout's rules, checked on the source: what each package may import, and that every
package folder is installed under its ``vqtok.`` name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"tokenizer": "vqtok.tokenizer", "storage": "vqtok.storage", "flows": "vqtok.flows",
           "files": "vqtok.files"}


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Absolute module names each file under ``folder`` imports (relative ones resolved)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        package = ".".join(["vqtok", *path.relative_to(ROOT).parent.parts])
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    names.add(f"{base}.{node.module}" if node.module else base)
                else:
                    names.add(node.module or "")
        found[path.relative_to(ROOT).as_posix()] = names
    return found


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("tokenizer", ("prefect", "prefect_dask", "vqtok.flows", "vqtok.storage", "flows",
                   "storage")),
    ("storage", ("prefect", "prefect_dask", "vqtok.flows", "vqtok.tokenizer", "flows",
                 "tokenizer")),
])
def test_tokenizer_and_storage_never_import_prefect_flows_or_each_other(folder, forbidden):
    bad = {file: sorted(n for n in names if n.split(".")[0] in forbidden
                        or any(n == f or n.startswith(f + ".") for f in forbidden))
           for file, names in imported_modules(ROOT / folder).items()}
    assert {file: names for file, names in bad.items() if names} == {}


def test_files_imports_only_the_standard_library():
    """vqtok.files is what tokenizer, storage and flows all import: it must import none of
    them (nor anything outside the standard library)."""
    import sys

    bad = {file: sorted(n for n in names if n.split(".")[0] not in sys.stdlib_module_names
                        and n != "__future__")
           for file, names in imported_modules(ROOT / "files").items()}
    assert {file: names for file, names in bad.items() if names} == {}


# Benchmarks measure tokenizer and storage; these three measure the flows themselves (the CLI
# next to its bare work, the encode flow next to a bare loop, an incremental update next to a
# full encode) and may import them.
MEASURE_FLOWS = {"benchmarks/cli_latency.py", "benchmarks/encode_throughput.py",
                 "benchmarks/incremental.py"}


def test_benchmarks_import_only_tokenizer_and_storage():
    bad = {file: sorted(n for n in names if n.startswith("vqtok.flows"))
           for file, names in imported_modules(ROOT / "benchmarks").items()
           if file not in MEASURE_FLOWS}
    assert {file: names for file, names in bad.items() if names} == {}


def test_the_public_names_of_tokenizer_resolve_lazily_and_all_exist():
    import vqtok.tokenizer as tokenizer

    assert sorted(tokenizer.__all__) == sorted(tokenizer._PUBLIC)
    for name in tokenizer.__all__:
        assert getattr(tokenizer, name).__name__ == name


def test_no_module_imports_the_old_top_level_names():
    """`tokenizer`, `storage` and `flows` are folders, not import names (issue 17)."""
    old = {"tokenizer", "storage", "flows"}
    bad = {}
    for folder in (*FOLDERS, "tests", "benchmarks"):
        for file, names in imported_modules(ROOT / folder).items():
            hits = sorted(n for n in names if n.split(".")[0] in old)
            if hits:
                bad[file] = hits
    assert bad == {}


def test_every_package_folder_is_installed_under_its_vqtok_name():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    expected = sorted(
        ".".join([FOLDERS[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py"))
    assert sorted(config["packages"]) == expected
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script == {"tokenize-dataset": "vqtok.flows.cli:main"}
