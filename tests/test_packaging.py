"""What an installed ktinject needs: every package in the wheel (pyproject lists them one by one),
and operators that import where Triton does not."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_for_the_wheel() -> None:
    """A package missing from `[tool.setuptools] packages` works from a checkout and fails
    after `pip install` (it happened to `ktinject.bench`)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("ktinject", "operators")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to pyproject.toml's packages"


def test_every_data_file_is_listed_for_the_wheel() -> None:
    """Files beside the modules that read them (the C kernels' source) are left out of a wheel
    unless `[tool.setuptools.package-data]` names them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = setuptools["package-data"]
    for init in (ROOT / "operators").rglob("__init__.py"):
        package = ".".join(init.parent.relative_to(ROOT).parts)
        for path in init.parent.iterdir():
            if path.is_file() and path.suffix not in (".py", ".pyc"):
                assert any(path.match(glob) for glob in data.get(package, [])), (
                    f"add {path.name!r} to pyproject.toml's package-data for {package}"
                )


def test_operators_import_without_triton() -> None:
    """Triton is optional (the torch references serve CPUs, e.g. macOS): every operator module
    imports in a process where `import triton` fails."""
    blocker = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is blocked')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import operators.attention, operators.experts, operators.layer, operators.mla\n"
        "import operators.mlp, operators.norm, operators.rope, ktinject.engine\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
