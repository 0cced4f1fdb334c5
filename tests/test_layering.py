"""DESIGN.md's layering, checked on the source: who may import whom, and what the approved app bundle holds.

* ``client`` and ``server`` never import each other (a hospital runs no consortium code, and the other way round);
* ``models`` and ``privacy`` import neither; ``contract`` imports only Flower and the standard library;
* nothing below the top imports the CLI/demo layer (``atoll``) or the console;
* the app bundle (FAB) that every site hashes and approves is exactly the ServerApp, the ClientApp and what they
  import — never the CLI, the demo, the docs — so a README or demo edit does not change the hash sites approve.

An AST walk rather than import-linter: it needs no extra dependency and it also sees imports inside functions
(lazy imports), which a runtime import trace would miss.
"""

from __future__ import annotations

import ast
import io
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "client", "server", "models", "privacy", "atoll", "console")
FORBIDDEN = {
    "client": {"server", "atoll", "console"},
    "server": {"client", "atoll", "console"},
    "models": {"client", "server", "atoll", "console"},
    "privacy": {"client", "server", "atoll", "console"},
    "contract": {"client", "server", "models", "privacy", "atoll", "console"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, function bodies included; relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # `from pkg import module`
    return out


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_inwards(package: str) -> None:
    bad = []
    for path in _sources(package):
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "layering broken (DESIGN.md, Layout):\n" + "\n".join(bad)


def test_the_contract_imports_only_flower_and_the_standard_library() -> None:
    bad = []
    for path in _sources("contract"):
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top and top not in sys.stdlib_module_names and top not in ("flwr", "contract", "__future__"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def _module_file(mod: str) -> Path | None:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def app_closure() -> set[str]:
    """Every project file the ServerApp and ClientApp can import (package __init__ files included)."""
    todo = [ROOT / "server" / "app.py", ROOT / "client" / "app.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        rel = path.relative_to(ROOT)
        for i in range(1, len(rel.parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            init = ROOT.joinpath(*rel.parts[:i], "__init__.py")
            if init.is_file():
                todo.append(init)
        for _, mod in _imports(path):
            if mod.split(".")[0] in PACKAGES:
                target = _module_file(mod)
                if target is not None:
                    todo.append(target)
    return {str(p.relative_to(ROOT)) for p in seen}


def _fab_files(root: Path) -> set[str]:
    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(root))).namelist()
    return {n for n in names if not n.startswith(".info/") and n != "pyproject.toml"}


def test_the_app_bundle_holds_exactly_the_apps_and_what_they_import() -> None:
    fab, closure = _fab_files(ROOT), app_closure()
    assert not closure - fab, f"the apps import files the bundle lacks (a site would fail): {sorted(closure - fab)}"
    assert not fab - closure, (f"the bundle holds files the apps never import (extend fab-exclude in pyproject.toml): "
                               f"{sorted(fab - closure)}")
    assert not {f for f in fab if f.split("/")[0] in ("atoll", "console", "tests", "bench", "docs")}


def test_docs_and_demo_edits_do_not_change_the_approved_hash(tmp_path: Path) -> None:
    from client.approval import app_bundle_hash

    copy = tmp_path / "app"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                              "atoll-demo", "bench", "*.npz", ".pytest_cache"))
    before = app_bundle_hash(copy)
    (copy / "README.md").write_text((copy / "README.md").read_text() + "\nan edit\n")
    (copy / "atoll" / "demo.py").write_text((copy / "atoll" / "demo.py").read_text() + "\n# an edit\n")
    (copy / "docs" / "site-data.md").write_text("rewritten\n")
    for cli in ("server/run_cli.py", "privacy/report.py"):
        (copy / cli).write_text((copy / cli).read_text() + "\n# an edit\n")
    assert app_bundle_hash(copy) == before
    (copy / "client" / "app.py").write_text((copy / "client" / "app.py").read_text() + "\n# app code\n")
    assert app_bundle_hash(copy) != before, "an edit of the ClientApp must need a new approval"


def test_an_installed_bundle_hashes_as_the_fab_it_came_from(tmp_path: Path, monkeypatch) -> None:
    """A SuperNode's ClientApp hashes the folder Flower unpacked the FAB into; with `fab-exclude` the excluded
    files are absent there, and the hash must still be the FAB's (else every site refuses every round)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    from client.approval import app_bundle_hash, app_bundle_hash_from_fab, is_installed_bundle

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    fab = build_fab_from_disk(ROOT)
    installed = install_from_fab(fab, skip_prompt=True)
    assert installed is not None and is_installed_bundle(installed) and not is_installed_bundle(ROOT)
    assert not (Path(installed) / "client" / "launcher.py").exists()  # excluded from the bundle
    assert app_bundle_hash(installed) == app_bundle_hash_from_fab(fab) == app_bundle_hash(ROOT)
