"""Build fastattn's C++ CPU kernels.

The same sources in csrc/ are compiled into one extension module per instruction set:

    fastattn._C_portable   baseline x86-64 / any architecture
    fastattn._C_avx2       AVX2 + FMA + F16C
    fastattn._C_avx512     AVX-512 F/BW/VL/DQ (+ AVX512-BF16 when the compiler has it)

and a small dispatcher module, fastattn._C, which reports what the running CPU supports.
fastattn picks the best module at run time (override with FASTATTN_ISA=portable|avx2|avx512).
Separate shared objects keep inline/template code compiled with wide-vector flags from being
merged by the linker into the portable path (the ODR hazard of per-file flags in one library).
No torch headers are used: pointers and strides come from Python.
"""
import os
import platform
import subprocess
import tempfile

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

# Compile the sources on every core (FASTATTN_BUILD_JOBS=N to limit): 19 translation units, several minutes serially.
ParallelCompile("FASTATTN_BUILD_JOBS", default=0).install()

CSRC = "csrc"
KERNEL_SOURCES = [os.path.join(CSRC, f) for f in (
    "bindings.cpp", "forward.cpp", "backward.cpp", "additive.cpp", "hard.cpp", "eager.cpp", "decode.cpp")]
SANITIZE = os.environ.get("FASTATTN_SANITIZE", "0") == "1"
# Development only: FASTATTN_BUILD_ISAS=avx512 (comma list) builds just those kernel modules (faster rebuilds).
BUILD_ISAS = [s.strip() for s in os.environ.get("FASTATTN_BUILD_ISAS", "").split(",") if s.strip()]


def _compiler_accepts(flags: list[str]) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main(){return 0;}\n")
        try:
            r = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(d, "t.o")],
                               capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


def _common_flags() -> list[str]:
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden"]
    if SANITIZE:
        flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                 "-fno-sanitize-recover=undefined"]
    return flags


def _link_flags() -> list[str]:
    return ["-fsanitize=address,undefined"] if SANITIZE else []


def _extensions():
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    variants = [("portable", [], [])]
    if is_x86:
        variants.append(("avx2", ["-mavx2", "-mfma", "-mf16c"], ["FASTATTN_HAVE_AVX2"]))
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
        defs = ["FASTATTN_HAVE_AVX2", "FASTATTN_HAVE_AVX512"]
        if _compiler_accepts(avx512 + ["-mavx512bf16"]):
            avx512 = avx512 + ["-mavx512bf16"]
            defs.append("FASTATTN_HAVE_AVX512BF16")
        variants.append(("avx512", avx512, defs))
    exts = [
        Pybind11Extension(
            "fastattn._C",
            [os.path.join(CSRC, "dispatch.cpp")],
            cxx_std=17,
            extra_compile_args=_common_flags(),
            extra_link_args=_link_flags(),
        )
    ]
    # OpenMP: the kernels run on torch's OpenMP threads (csrc/parallel.h parallel_for); without it, our own pool.
    omp = ["-fopenmp"] if _compiler_accepts(["-fopenmp"]) else []
    for name, isa_flags, defs in variants:
        if BUILD_ISAS and name not in BUILD_ISAS:
            continue
        exts.append(
            Pybind11Extension(
                f"fastattn._C_{name}",
                KERNEL_SOURCES,
                cxx_std=17,
                define_macros=[("FASTATTN_ISA_NAME", f'"{name}"'), ("FASTATTN_MODULE", f"_C_{name}")]
                + [(d, "1") for d in defs],
                extra_compile_args=_common_flags() + isa_flags + omp,
                extra_link_args=_link_flags() + ["-pthread"] + omp,
                depends=[os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".h")],
            )
        )
    return exts


setup(
    # fastattn.kernels is the top-level kernels/ folder, reached through the fastattn/kernels symlink. It has no
    # __init__.py, so that `import kernels` from the repository root still finds an installed package of that
    # name (transformers depends on one) instead of this folder.
    packages=find_packages(include=["fastattn", "fastattn.*"]) + ["fastattn.kernels"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
