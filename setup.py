"""Build the compiled kernels in src/ into extension modules inside the fastconv package.

Environment switches (read at build time):
  FASTCONV_DEBUG=1   Cython bounds checks on and -fsanitize=address,undefined (see README)
  FASTCONV_NATIVE=1  -march=native (a wheel built this way only runs on CPUs like the builder's)
  FASTCONV_NO_OPENMP=1  build single-threaded even if the compiler has OpenMP
On Windows the build uses MSVC (as CPython's own builds do) with /O2 and /openmp; the debug and
native switches are gcc/clang only there.
"""

import glob
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = ["_conv", "_pool", "_norm", "_pointwise"]  # src/<name>.pyx -> fastconv.<name>
# Hand-written C compiled into a kernel module beside its .pyx.
C_SOURCES = {
    "_conv": [
        "src/winograd.c", "src/winograd_f4.c", "src/microkernels.c", "src/pool_2x2.c",
        "src/im2col.c",
    ],
    "_pool": ["src/pool_2x2.c"],
    "_pointwise": ["src/pointwise.c"],
}
# Every kernel rebuilds when a shared declaration or C header changes.
DEPENDS = sorted(glob.glob("src/*.pxd") + glob.glob("src/*.h"))
MSVC = sys.platform == "win32"


def compiler_has_openmp() -> bool:
    """Compile a tiny OpenMP program: the only reliable test of the toolchain at hand."""
    if os.environ.get("FASTCONV_NO_OPENMP") == "1":
        return False
    if MSVC:
        return True  # every MSVC has /openmp (OpenMP 2.0, all that Cython's prange needs)
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.c")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        result = subprocess.run(
            [cc, "-fopenmp", source, "-o", os.path.join(tmp, "omp")],
            capture_output=True,
        )
    return result.returncode == 0


def compiler_accepts(flag: str) -> bool:
    """Whether gcc/clang (CC) compiles with `flag` (False for MSVC or no compiler found)."""
    if MSVC:
        return False
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "empty.c")
        with open(source, "w") as f:
            f.write("int main(void){return 0;}\n")
        try:
            result = subprocess.run(
                [cc, flag, "-c", source, "-o", os.path.join(tmp, "empty.o")], capture_output=True
            )
        except OSError:
            return False
    return result.returncode == 0


debug = os.environ.get("FASTCONV_DEBUG") == "1"
openmp = compiler_has_openmp()
if not openmp:
    warnings.warn("fastconv: no OpenMP in this compiler; kernels will run single-threaded")

compile_args = ["-O1", "-g", "-fno-omit-frame-pointer"] if debug else ["-O3"]
# Lets the compiler turn float compare-and-select into branch-free code (max pooling).
compile_args.append("-fno-trapping-math")
# GCC: finish short vectorised loops (a 14-wide row) with one masked AVX-512 step, not scalars.
if compiler_accepts("--param=vect-partial-vector-usage=2"):
    compile_args.append("--param=vect-partial-vector-usage=2")
link_args = []
if debug:
    compile_args += ["-fsanitize=address,undefined"]
    link_args += ["-fsanitize=address,undefined"]
if os.environ.get("FASTCONV_NATIVE") == "1":
    compile_args.append("-march=native")
if openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if MSVC:  # the flags above are gcc/clang's; MSVC's default floating point does not trap already
    compile_args = ["/O2", "/openmp"] if openmp else ["/O2"]
    link_args = []

extensions = [
    Extension(
        f"fastconv.{name}",
        [f"src/{name}.pyx", *C_SOURCES.get(name, [])],
        depends=DEPENDS,
        include_dirs=[np.get_include(), "src"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[
            ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            # Recorded so `fastconv info` can say how the kernels were built.
            ("FASTCONV_CFLAGS", '"%s"' % " ".join(compile_args)),
        ],
    )
    for name in KERNELS
]

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": False,
    "initializedcheck": debug,
    "cdivision": True,
}

setup(
    ext_modules=cythonize(
        extensions, include_path=["src"], compiler_directives=directives, quiet=True
    ),
)
