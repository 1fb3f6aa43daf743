"""The house's rules (DESIGN.md §5): imports run downward, later stages read earlier stages' contracts only,
and the package and its serving half import without the heavy stacks."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports with the repo's contracts, run in `cwd` (which it puts first on sys.path, so that the
    `dilatequant/` there is the one checked)."""
    return subprocess.run([LINT_IMPORTS, str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd, capture_output=True, text=True)


def test_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward, contract", [
    ("core/zoo.py", "from dilatequant.calibrate.flow import calibrate", "Imports run downward"),
    ("export/flow.py", "from dilatequant.calibrate.quant_model import QuantLayer", "export reads calibrate only through"),
    ("engines/engine.py", "from dilatequant.export.flow import export", "engines read export only through"),
])  # fmt: skip
def test_an_upward_or_internal_import_breaks_a_contract(tmp_path, module, upward, contract):
    shutil.copytree(REPO / "dilatequant", tmp_path / "dilatequant", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    path = tmp_path / "dilatequant" / module
    path.write_text(path.read_text() + f"\n{upward}  # deliberately against the rules\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "BROKEN" in result.stdout and contract in result.stdout, result.stdout


def loaded_modules(code: str) -> set[str]:
    """Modules loaded by running `code` in a fresh interpreter."""
    script = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_engines_load_no_calibrate_and_only_the_export_contract():
    modules = loaded_modules("import pkgutil, importlib, dilatequant.engines as e\n"
                             "for m in pkgutil.iter_modules(e.__path__): importlib.import_module('dilatequant.engines.' + m.name)")  # fmt: skip
    assert "dilatequant.engines.engine" in modules and "dilatequant.engines.tensorrt_backend" in modules
    assert not {m for m in modules if m.startswith("dilatequant.calibrate")}
    assert {m for m in modules if m.startswith("dilatequant.export")} == {"dilatequant.export", "dilatequant.export.contract"}


def test_import_dilatequant_is_light_and_its_verbs_resolve_lazily():
    modules = loaded_modules("import dilatequant")
    assert not modules & {"torch", "onnx", "onnxruntime", "tensorrt", "diffusers", "matplotlib"}
    assert not {m for m in modules if m.startswith("dilatequant.")}
    import dilatequant

    assert set(dilatequant.__all__) >= {"calibrate", "export", "build", "load", "profile", "load_variant", "recipe"}
    assert dilatequant.build.__module__ == "dilatequant.engines.engine"
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        dilatequant.quantise  # noqa: B018


def test_export_contract_and_bucket_table_need_no_torch():
    modules = loaded_modules("from dilatequant.export.contract import BucketTable, read_export_manifest\n"
                             "BucketTable((10, 20, 30), (0, 2)).buckets_of([0, 14, 16, 999])")  # fmt: skip
    assert "torch" not in modules and "onnx" not in modules


def test_optional_dependency_error_names_feature_package_and_extra():
    from dilatequant.core.errors import MissingDependencyError
    from dilatequant.core.optional import require

    assert require("json", "JSON", "none").dumps([]) == "[]"
    with pytest.raises(MissingDependencyError, match=r"Charts needs the package 'no_such_pkg'.*dilatequant\[report\]"):
        require("no_such_pkg.pyplot", "Charts", "report")
