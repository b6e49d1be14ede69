"""Build of prosa's optional C++ kernels (``prosa._qlinear``, from ``prosa/csrc/qlinear.cpp``).

Everything else is in pyproject.toml. The extension is compiled against the torch found in the build environment,
so build with ``pip install --no-build-isolation .`` after installing torch (the Makefile does). Without torch in
the build environment, or without a working C++ compiler, the package installs without it and prosa falls back
to PyTorch's own kernels (``prosa.quant.kernels()`` can still compile it at run time).

No ``-march``/``-mtune``: the AVX-512 VNNI code is compiled per function (target attributes) and chosen at run
time, so the binary runs on any x86-64 CPU.
"""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PROSA_NO_KERNELS") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("prosa: torch is not importable in this build environment; building without the C++ kernels "
              "(install torch first and use `pip install --no-build-isolation`)", file=sys.stderr)
    else:
        class OptionalBuild(BuildExtension):
            """A compiler failure leaves the package usable (PyTorch fallback) instead of failing the install."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as e:  # noqa: BLE001 - any toolchain failure
                    print(f"prosa: the C++ kernels did not build ({e}); prosa will use PyTorch's kernels",
                          file=sys.stderr)

        ext_modules = [CppExtension("prosa._qlinear", ["prosa/csrc/qlinear.cpp"],
                                    extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": OptionalBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
