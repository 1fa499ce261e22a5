"""Builds and loads the project's hand-written CPU kernels (``ignite_trainer/model/kernels/*.cpp``), once per process.

Why hand-written kernels at all: on a two-core CPU much of the default model's cost is not its arithmetic but
passes over memory (BatchNorm, GELU and max-pooling each read and write the full-resolution map, forward and
backward). PyTorch has no fused operator for that chain and ``torch.compile``'s generated code for it was slower
than the separate operators on this machine, so `ignite_trainer.model.fused_block` calls the kernel built here.

They are compiled on first use with the C++ compiler PyTorch uses for extensions (`torch.utils.cpp_extension`,
with the pinned ``ninja``), which takes tens of seconds once and is then cached per machine
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Where they cannot be built (no compiler, a
read-only cache) or are switched off (``IGNITE_TRAINER_FUSED_KERNELS=0``), every caller runs the ordinary
PyTorch modules, which compute the same function; `kernel_status` says which happened, and each run records it
in ``environment.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["ENV_SWITCH", "load_kernel", "kernel_status"]

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("kernels") / name
            for name in ("bindings.cpp", "bn_gelu_pool.cpp")]
#: Set to 0 to never build or use the kernels (the ordinary modules compute the same function).
ENV_SWITCH = "IGNITE_TRAINER_FUSED_KERNELS"

_lock = threading.Lock()
_kernel: Any = None
_status = _NOT_LOADED = "not used in this process"


def _compile_flags() -> list[str]:
    """Vector flags only where the running CPU has them (the build is cached per flag set, so per machine kind)."""
    flags = ["-O3", "-fno-math-errno"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _put_ninja_on_path() -> None:
    """torch builds extensions with ``ninja`` from PATH; the pip-installed one lives beside this interpreter."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pinned dependency; its binary is not on PATH when .venv is not activated
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_kernel() -> Any:
    """The compiled kernel module, built on first call (tens of seconds, then cached); None where unavailable."""
    global _kernel, _status
    with _lock:
        if _kernel is not None or _status != _NOT_LOADED:
            return _kernel
        if os.environ.get(ENV_SWITCH, "1") == "0":
            _status = f"off ({ENV_SWITCH}=0)"
            return None
        try:
            # deferred: the compiler front-end is needed only when the kernel is built
            from torch.utils.cpp_extension import load as build_extension

            _put_ninja_on_path()
            flags = _compile_flags()
            name = "ignite_trainer_cpu_kernels_" + ("avx2" if "-mavx2" in flags else "generic")
            _kernel = build_extension(name=name, sources=[str(s) for s in _SOURCES], extra_cflags=flags, verbose=False)
            _status = "fused kernels in use"
        except Exception as e:  # no compiler, no ninja, a read-only cache: the ordinary modules still work
            _status = f"unfused (the CPU kernels could not be built: {type(e).__name__}: {str(e).splitlines()[0]})"
            log.warning("the conv blocks run on the ordinary modules: %s", _status)
        return _kernel


def kernel_status() -> str:
    """One line: whether the kernels are in use in this process, or why not."""
    return _status


def usable_here(x: torch.Tensor) -> bool:
    """The conditions every kernel shares: a float32 CPU tensor, outside autocast and torch.compile tracing
    (autocast changes the dtype; torch.compile fuses the plain modules itself), and the kernels built."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return load_kernel() is not None
