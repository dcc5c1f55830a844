"""ema_fused's C++/CUDA extension: the AOT build (``ema_fused._C``) or a JIT build.

``import ema_fused`` neither loads nor builds it.  The ``cpu`` and ``cuda`` backends
call :func:`load` when first considered: ``auto`` only loads an AOT build (never a
surprise compile); a backend asked for by name builds it just in time when no AOT
build exists (:func:`build`, also ``python -m ema_fused build``).  Every failure is
kept as a reason string, raised only where a backend was asked for by name.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
import torch._appdirs  # torch.utils.cpp_extension finds its build root with it

from . import build_flags as _build_flags

_lock = threading.RLock()
_how: Optional[str] = None  # "aot (path)" or "jit (path)" once loaded
_module = None  # the extension's Python module (host-path helpers), once loaded
_aot_error: Optional[str] = None
_jit_error: Optional[str] = None
BUILD_HINT = ("build it with `python -m ema_fused build` (just in time, cached) or "
              "`EMA_FUSED_BUILD_EXT=1 pip install --no-build-isolation -e .`")


def loaded() -> Optional[str]:
    """How the extension was loaded (``"aot (...)"`` / ``"jit (...)"``), or None."""
    return _how


def module():
    """The loaded extension's Python module (``Snapshot``, ``PairSet``), or None."""
    return _module


def _loaded(how: str, mod) -> bool:
    global _how, _module
    _how, _module = how, mod
    _register_fakes()
    return True


def load(build: bool = False) -> bool:
    """Load the AOT build; failing that, build just in time if ``build``.  True if loaded."""
    global _aot_error, _jit_error
    with _lock:
        if _how is not None:
            return True
        if _aot_error is None:
            try:
                from .. import _C
                return _loaded(f"aot ({_C.__file__})", _C)
            except (ImportError, OSError) as exc:  # absent, or built for another torch
                _aot_error = f"no AOT build ({exc})"
            cached = _cached_jit_library()
            if cached is not None:
                return _loaded(f"jit, cached ({cached})", _import_library(cached))
        if build and _jit_error is None:
            try:
                where, mod = _build_now()
                return _loaded(f"jit ({where})", mod)
            except Exception as exc:  # any compiler/toolkit failure: keep it as the reason
                _jit_error = f"the just-in-time build failed: {type(exc).__name__}: {_tail(exc)}"
        return False


def error() -> str:
    """Why the extension is not loaded (empty if it is)."""
    if _how is not None:
        return ""
    parts = [f"the C++ extension is not loaded: {_aot_error or 'not tried yet'}"]
    parts.append(_jit_error or BUILD_HINT)
    return "; ".join(parts)


def has_kernels(dispatch_key: str) -> bool:
    """Whether the loaded build registered kernels for ``"CPU"`` or ``"CUDA"``."""
    return _how is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ema_fused::kernel_update_", dispatch_key)


def source_dir() -> Path:
    """csrc/: inside an installed wheel (``ema_fused/csrc``) or beside the package in a
    source checkout (editable installs)."""
    package = Path(__file__).resolve().parent.parent  # ema_fused/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / _build_flags.CPU_SOURCES[0]).exists():
            return candidate
    raise FileNotFoundError(f"ema_fused's C++ sources (csrc/) are not beside {package}")


def jit_build_dir(with_cuda: bool) -> Path:
    """Where JIT builds go: torch's extension cache (``TORCH_EXTENSIONS_DIR``), one folder
    per Python and torch version, so a library built for another torch is never loaded.

    The default root is torch's (``cpp_extension.get_default_build_root``), computed
    here the same way without importing ``torch.utils.cpp_extension``: that import
    prints "No CUDA runtime is found" on CPU-only machines with a CUDA build of torch,
    and loading a cached build needs nothing else from it."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    root = (os.environ.get("TORCH_EXTENSIONS_DIR")
            or os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions")))
    return Path(root) / "ema_fused" / tag / _jit_name(with_cuda)


def _jit_name(with_cuda: bool) -> str:
    return "ema_fused_ext_" + ("cuda" if with_cuda else "cpu")


def _import_library(path: Path):
    """Import a JIT-built library as the Python module it is (its name is the file's)."""
    import importlib.machinery
    import importlib.util
    name = path.name.split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _cached_jit_library() -> Optional[Path]:
    """A JIT build made earlier (``python -m ema_fused build``) that is newer than every
    source, so loading it compiles nothing; None if there is none."""
    try:
        newest = max(p.stat().st_mtime for p in source_dir().iterdir() if p.is_file())
    except (FileNotFoundError, ValueError):
        return None
    for with_cuda in (True, False):
        lib = jit_build_dir(with_cuda) / (_jit_name(with_cuda) + ".so")
        if lib.exists() and lib.stat().st_mtime >= newest:
            return lib
    return None


def cuda_build_possible() -> tuple[bool, str]:
    """(True, "") if a CUDA build can be made here, else (False, why not)."""
    from torch.utils.cpp_extension import CUDA_HOME
    problem = _build_flags.cuda_problem(torch.version.cuda, torch.__version__, CUDA_HOME)
    return problem is None, problem or ""


def _build_now(with_cuda: Optional[bool] = None, verbose: bool = False):
    """Compile and load; returns (the build folder, the extension's Python module)."""
    from torch.utils import cpp_extension
    if with_cuda is None:
        with_cuda = cuda_build_possible()[0]
    elif with_cuda and not cuda_build_possible()[0]:
        raise RuntimeError(cuda_build_possible()[1])
    src = source_dir()
    names = _build_flags.CPU_SOURCES + (_build_flags.CUDA_SOURCES if with_cuda else ())
    name = _jit_name(with_cuda)
    where = jit_build_dir(with_cuda)
    where.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # the venv's ninja (pip's) even when the venv is not activated
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if with_cuda and not torch.cuda.is_available() and not env.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = _build_flags.default_arch_list(
            _build_flags.nvcc_path(cpp_extension.CUDA_HOME))
    try:
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        print(f"ema_fused: building the C++{'/CUDA' if with_cuda else ''} extension just in "
              f"time (a minute or two the first time; cached in {where})", file=sys.stderr,
              flush=True)
        mod = cpp_extension.load(name=name, sources=[str(src / n) for n in names],
                                 extra_cflags=_build_flags.cxx_flags(),
                                 extra_cuda_cflags=_build_flags.nvcc_flags(),
                                 extra_include_paths=[str(src)], build_directory=str(where),
                                 is_python_module=True, verbose=verbose)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return str(where), mod


def build(with_cuda: Optional[bool] = None, verbose: bool = False) -> str:
    """Build the extension just in time (unless an AOT build loads) and load it.

    ``with_cuda``: None builds the CUDA kernels when a CUDA toolkit and a CUDA build
    of torch are present.  Returns how it was loaded; raises with the reason on failure.
    """
    with _lock:
        if load(build=False):
            return _how
        where, mod = _build_now(with_cuda, verbose)
        _loaded(f"jit ({where})", mod)
        return _how


def _tail(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _register_fakes() -> None:
    """Fake (meta) kernels, so ``torch.compile`` and ``opcheck`` can trace the ops."""
    def nothing(*args):
        return None

    for op in ("kernel_update_", "kernel_update_graph_safe_", "kernel_copy_", "kernel_swap_",
               "kernel_weighted_sum_", "kernel_multi_update_"):
        if hasattr(torch.ops.ema_fused, op):  # an AOT build older than the op lacks it
            torch.library.register_fake(f"ema_fused::{op}")(nothing)
