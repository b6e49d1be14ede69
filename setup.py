"""Build of prosa's optional C++ kernels (``prosa._qlinear``, from ``prosa/csrc/qlinear.cpp`` and ``repack.cpp``).

Everything else is in pyproject.toml. The extension is compiled against the torch found in the build environment,
so build with ``pip install --no-build-isolation .`` after installing torch (the Makefile does). Without torch in
the build environment, or without a working C++ compiler, the package still installs, without the kernels: prosa
then falls back to PyTorch's own kernels (``prosa.quant.kernels()`` can still compile them at run time), and this
build says so in one line, the last of its output (``pip install -v`` shows it; pip hides build output otherwise).
``PROSA_NO_KERNELS=1`` skips the kernels on purpose, silently.

No ``-march``/``-mtune``: the AVX-512 VNNI code is compiled per function (target attributes) and chosen at run
time, so the binary runs on any x86-64 CPU.
"""
import atexit
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

REINSTALL = "`pip install --no-build-isolation .` (or `-e .`)"
_said = False


def _not_built(cause: str, fix: str) -> None:
    """Say once, as the build's last line (at exit: after setuptools' copying), that the kernels are missing.

    Args:
        cause: what went wrong, one line.
        fix: what the user does about it.
    """
    global _said
    if _said:
        return
    _said = True
    line = (f"prosa: WARNING: the C++ kernels were not built ({cause}); prosa works, but int4/int8 decoding falls "
            f"back to PyTorch's kernels and is several times slower. Fix: {fix}")
    atexit.register(lambda: print(line, file=sys.stderr, flush=True))


ext_modules, cmdclass = [], {}
if os.environ.get("PROSA_NO_KERNELS") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        class NoTorchBuildPy(build_py):
            """Runs in every wheel build (plain and editable) but not in metadata-only calls, so said once."""

            def run(self) -> None:
                super().run()
                _not_built("torch is not importable in the build environment: pip builds in an isolated one "
                           "unless told --no-build-isolation",
                           f"install torch first, then reinstall with {REINSTALL}")

        cmdclass = {"build_py": NoTorchBuildPy}
    else:
        class OptionalBuild(BuildExtension):
            """A failed build leaves the package usable (PyTorch fallback) instead of failing the install.

            Failures come from two places: ``build_extensions`` (torch's compiler check, which raises on its own
            for some broken compilers, e.g. ``CXX=/bin/false``) and ``build_extension`` (the compile and link)."""

            def build_extension(self, ext) -> None:
                try:
                    super().build_extension(ext)
                except Exception as e:  # noqa: BLE001 - any toolchain failure
                    self.failure = e

            def build_extensions(self) -> None:
                self.failure = None
                try:
                    super().build_extensions()
                except Exception as e:  # noqa: BLE001 - any toolchain failure
                    self.failure = e
                if self.failure is not None:
                    # the compiler setuptools and torch use: $CXX, else Python's own build's (c++/g++)
                    cxx = getattr(self.compiler, "compiler_cxx", None) or ["c++"]
                    cxx = cxx.split() if isinstance(cxx, str) else cxx
                    if shutil.which(cxx[0]) is None:
                        cause = f"no C++ compiler: `{cxx[0]}` is not on PATH"
                    else:
                        e = self.failure
                        first = (str(e).strip().splitlines() or [""])[0][:200]
                        cause = f"the C++ compiler `{cxx[0]}` failed: {type(e).__name__}: {first}"
                    _not_built(cause, f"install a C++ compiler (g++ or clang++, e.g. `apt install g++`), then "
                                      f"reinstall with {REINSTALL}")

        # optional=True: setuptools then skips the missing .so when it copies outputs (editable installs)
        ext_modules = [CppExtension("prosa._qlinear", ["prosa/csrc/qlinear.cpp", "prosa/csrc/repack.cpp", "prosa/csrc/bf16.cpp"], optional=True,
                                    extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": OptionalBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
