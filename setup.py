"""Packaging.  A pure-Python install by default; the C++/CUDA extension when asked for.

``EMA_FUSED_BUILD_EXT=1 pip install --no-build-isolation -e .`` (or ``pip wheel``)
compiles csrc/ into ``ema_fused._C`` against the installed torch (hence no build
isolation): the CPU kernels always, the CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found (``CUDA_HOME``; ``EMA_FUSED_BUILD_CUDA=0`` turns them off).
Honoured: ``TORCH_CUDA_ARCH_LIST`` (default 8.0, 9.0 and the newest arch the toolkit
knows, with PTX), ``MAX_JOBS`` (parallel compile jobs) and ``NVCC_THREADS``.

The Triton kernels in triton_kernels/ install as the subpackage
``ema_fused.triton_kernels`` (a top-level ``triton_kernels`` module already exists
elsewhere: the Triton project ships one).  csrc/ ships as ``ema_fused/csrc`` so that
an install without the AOT extension can still build it just in time.
"""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip() not in ("", "0")


def _build_flags():
    """ema_fused/backends/build_flags.py alone (importing the package would need it installed)."""
    path = os.path.join(HERE, "ema_fused", "backends", "build_flags.py")
    spec = importlib.util.spec_from_file_location("_ema_fused_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_args() -> dict:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit("EMA_FUSED_BUILD_EXT=1 needs torch installed first, and pip's "
                         f"--no-build-isolation so the build uses it ({exc})")
    flags = _build_flags()
    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, f) for f in flags.CPU_SOURCES]
    nvcc = flags.nvcc_path(cpp_extension.CUDA_HOME)
    problem = ("EMA_FUSED_BUILD_CUDA=0" if not _flag("EMA_FUSED_BUILD_CUDA", "1") else
               flags.cuda_problem(torch.version.cuda, torch.__version__, cpp_extension.CUDA_HOME))
    args = dict(name="ema_fused._C", include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": flags.cxx_flags(), "nvcc": flags.nvcc_flags()})
    if problem is None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = flags.default_arch_list(nvcc)
        print(f"ema_fused: building ema_fused._C with CUDA kernels for "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} (nvcc: {nvcc})")
        ext = cpp_extension.CUDAExtension(
            sources=sources + [os.path.join(csrc, f) for f in flags.CUDA_SOURCES], **args)
    else:
        print(f"ema_fused: building ema_fused._C with CPU kernels only ({problem})")
        ext = cpp_extension.CppExtension(sources=sources, **args)
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


#: every subpackage of ema_fused/ (ema, posthoc, averaging, backends, integrations, ...), found
#: rather than listed so that a new one is never left out of a wheel
PACKAGES = (["ema_fused"] + [f"ema_fused.{p}" for p in find_packages("ema_fused")]
            + ["ema_fused.triton_kernels", "ema_fused.csrc"])

setup(
    packages=PACKAGES,
    package_dir={"ema_fused": "ema_fused", "ema_fused.triton_kernels": "triton_kernels",
                 "ema_fused.csrc": "csrc"},
    package_data={"ema_fused.csrc": ["*.cpp", "*.cu", "*.h", "README.md"]},
    **(_extension_args() if _flag("EMA_FUSED_BUILD_EXT", "0") else {}),
)
