"""Packaging with an optional native extension built by CMake.

`kernels/` is installed as `fastitm.kernels` (the top-level name `kernels` belongs to another PyPI
package, which transformers imports; the folder has no __init__.py so that it never shadows that
package, and fastitm/__init__.py maps it in a source checkout). The CMake build of `fastitm._C` is optional: without cmake, a compiler or pybind11 the
install warns and goes on, and fastitm runs on its pure-PyTorch paths. Set FASTITM_NO_NATIVE=1 to
skip the build.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_namespace_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("FASTITM_NO_NATIVE") == "1":
            warnings.warn("FASTITM_NO_NATIVE=1: skipping the native extension", stacklevel=2)
            return
        try:
            super().run()
        except Exception as e:  # a failed optional build must not fail the install
            warnings.warn(f"fastitm: native extension not built ({e}); the CPU path falls back to PyTorch",
                          stacklevel=2)

    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            try:
                import cmake as cmake_pkg  # the PyPI cmake package

                cmake = str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
            except ImportError:
                raise RuntimeError("cmake not found (install cmake or `pip install cmake`)") from None
        try:
            import pybind11
        except ImportError:
            raise RuntimeError("pybind11 not installed (`pip install pybind11`)") from None
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # One CMake tree per interpreter in the source's build/, whatever the build's temporary folder:
        # an editable install and a wheel built from the same checkout (`make wheel-check` does both)
        # then compile the sources once, and the second only links into its own output folder.
        tag = hashlib.sha1(sys.executable.encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DFASTITM_OUTPUT_DIR={out_dir}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        subprocess.run(cfg, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)
        # CMake names the file with Python's extension suffix; setuptools expects get_ext_fullpath.
        built = sorted(out_dir.glob("_C*.so")) + sorted(out_dir.glob("_C*.pyd"))
        if not built:
            raise RuntimeError(f"CMake finished but no _C library appeared in {out_dir}")


def _packages() -> list[str]:
    """Every folder under fastitm/ (the code packages and the folders of the embedded model's files,
    which setuptools treats as data packages), plus kernels/ as fastitm.kernels."""
    found = find_namespace_packages(include=["fastitm", "fastitm.*"], exclude=["*.__pycache__"])
    return sorted(set(found) | {"fastitm.kernels"})


setup(
    packages=_packages(),
    package_dir={"fastitm": "fastitm", "fastitm.kernels": "kernels"},
    package_data={"fastitm.assets": ["**/*"]},
    include_package_data=True,
    ext_modules=[CMakeExtension("fastitm._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
