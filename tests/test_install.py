"""README's "Installing into your own environment": `pip install --no-build-isolation .` from a checkout.

A wheel built with this interpreter's torch holds the compiled kernels (``prosa/_qlinear*.so``) and prosa, installed
from it into a folder of its own, loads them; built with no working C++ compiler, the build still succeeds, ends
with one line saying what happened, what it costs and the fix, and prosa runs on PyTorch's kernels. Builds run in
a copy of the tree (no build artefacts in the checkout) and pip never reaches an index (``--no-index``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOT_BUILT = "prosa: WARNING: the C++ kernels were not built"

# Run in the installed copy: which prosa was imported, whether its kernels load, and a quantized layer's output
# against the pure-PyTorch reference. Prints "kernels: <path of the loaded .so or None> backend: <backend>".
CHECK = r"""
import sys
from pathlib import Path

import torch

# this checkout's own `pip install -e .` (the Makefile's) maps every prosa.* name to the checkout, whatever
# prosa.__path__ says: drop its finder so that prosa and its submodules (prosa._qlinear) come from the target only
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import prosa
import prosa.quant as quant

target = Path(sys.argv[1]).resolve()
assert Path(prosa.__file__).resolve().parent == target / "prosa", f"imported {prosa.__file__}, not from {target}"
ext = quant.kernels(build=False)
stray = [m.__file__ for name, m in sys.modules.items()
         if name.split(".")[0] == "prosa" and getattr(m, "__file__", None)
         and not Path(m.__file__).resolve().is_relative_to(target)]
assert not stray, f"prosa modules from outside {target}: {stray}"
torch.manual_seed(0)
lin = torch.nn.Linear(64, 32)
x = torch.randn(3, 64)                                   # (batch 3, in_features 64) -> (3, 32)
q = quant.QuantizedLinear.from_linear(lin, bits=4, backend="prosa" if ext is not None else "auto")
with torch.no_grad():
    # prosa's kernels keep float32 activations (summation order only); aten's go through bfloat16
    tol = 1e-4 if q.backend == "prosa" else 5e-2
    torch.testing.assert_close(q(x), q.forward_reference(x), rtol=tol, atol=tol)
print("kernels:", None if ext is None else Path(ext.__file__).resolve(), "backend:", q.backend)
"""


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without prosa's kernel switches, pip kept offline, kernel cache in an empty folder."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROSA_KERNELS", "PROSA_BUILD_KERNELS", "PROSA_NO_KERNELS", "PYTHONPATH")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PROSA_KERNEL_DIR=str(tmp / "kernel-cache"))   # no run-time build cached by other runs
    env.update(extra)
    return env


def _source_copy(dest: Path) -> Path:
    """What the build reads (setup.py, pyproject.toml, README.md, prosa/), without the checkout's .so and caches."""
    dest.mkdir()
    for path in [ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / "README.md", *ROOT.glob("LICEN[CS]E*")]:
        shutil.copy2(path, dest / path.name)
    shutil.copytree(ROOT / "prosa", dest / "prosa",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    return dest


def _pip(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run pip with this interpreter; returns its output (stdout and stderr merged, in order)."""
    r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-4000:]}"
    return r.stdout


def _build_and_install(tmp: Path, env: dict[str, str]) -> tuple[Path, str, Path]:
    """Build a wheel from a copy of the checkout and install it with --target; (wheel, build output, target)."""
    src = _source_copy(tmp / "src")
    out = tmp / "wheels"
    # -v: pip shows the build's own output (it hides it otherwise), where the not-built line is
    log = _pip(["wheel", "-v", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(src), "-w", str(out)],
               cwd=tmp, env=env)
    wheels = list(out.glob("prosa-*.whl"))
    assert len(wheels) == 1, f"expected one prosa wheel in {out}: {wheels}"
    target = tmp / "site"
    _pip(["install", "--no-deps", "--no-cache-dir", "--target", str(target), str(wheels[0])], cwd=tmp, env=env)
    return wheels[0], log, target


def _check(tmp: Path, target: Path) -> str:
    """Import prosa from ``target`` in a fresh interpreter, with the working directory outside the checkout."""
    r = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=tmp, env=_env(tmp, PYTHONPATH=str(target)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


def _kernel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if n.startswith("prosa/_qlinear") and n.endswith(".so")]


def test_wheel_holds_and_loads_the_kernels(tmp_path):
    wheel, log, target = _build_and_install(tmp_path, _env(tmp_path))
    assert len(_kernel_files(wheel)) == 1, f"no prosa/_qlinear*.so in {wheel.name}"
    with zipfile.ZipFile(wheel) as z:
        assert "prosa/csrc/qlinear.cpp" in z.namelist()       # package data: kernels() can rebuild at run time
    assert NOT_BUILT not in log
    line = _check(tmp_path, target)
    so = Path(line.split()[1])
    assert so.parent == (target / "prosa").resolve() and so.name.startswith("_qlinear"), line
    assert line.endswith("backend: prosa"), line


@pytest.mark.parametrize("compiler, cause", [
    ("/bin/false", "the C++ compiler `/bin/false` failed"),              # fails torch's compiler check
    ("prosa-no-such-compiler", "no C++ compiler: `prosa-no-such-compiler` is not on PATH"),   # none installed
], ids=["broken-compiler", "no-compiler"])
def test_no_compiler_builds_without_kernels_and_says_so(tmp_path, compiler, cause):
    wheel, log, target = _build_and_install(tmp_path, _env(tmp_path, CC=compiler, CXX=compiler))
    assert _kernel_files(wheel) == []
    said = [i for i, line in enumerate(log.splitlines()) if NOT_BUILT in line]
    assert len(said) == 1, log[-4000:]
    line = log.splitlines()[said[0]]
    for part in (cause, "several times slower", "install a C++ compiler", "--no-build-isolation"):
        assert part in line, line
    # the last line of the build's own output: after setuptools has written the wheel
    added = [i for i, line in enumerate(log.splitlines()) if line.strip().startswith("adding 'prosa")]
    assert added and said[0] > max(added), log[-4000:]
    out = _check(tmp_path, target)
    assert out.startswith("kernels: None") and not out.endswith("backend: prosa"), out
