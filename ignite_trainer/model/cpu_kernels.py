"""The project's hand-written CPU kernels (``ignite_trainer/model/kernels/*.cpp``): an opt-in, built once per
machine before training, loaded by later processes, never built or waited on inside a forward pass.

Why hand-written kernels at all: on a two-core CPU much of the default model's cost is not its arithmetic but
passes over memory (BatchNorm, GELU and max-pooling each read and write the full-resolution map, forward and
backward). PyTorch has no fused operator for that chain and ``torch.compile``'s generated code for it was slower
than the separate operators on this machine, so `ignite_trainer.model.fused_block` calls the kernel built here.

Why opt-in (``cpu_kernel: true`` in the config, ``--cpu-kernel`` on the command line): it needs a C++ compiler
with GCC vector extensions (GCC or Clang, not MSVC), its first build takes about half a minute, and its results
equal the ordinary modules' only up to float rounding. The default path imports, builds and waits on nothing.

How it stays out of the way when switched on:

- `prepare` is called once, before training starts: it loads a binary already built for this key, or builds
  it with one log line. Nothing else builds. `load_built` (what ``predict``, ``evaluate`` and the Predictor
  use) only loads what is there.
- The build folder is keyed (`kernel_key`) by everything the binary depends on: torch's version, the Python
  ABI, the compiler and its flags, and the sources' bytes. Two environments never share or rebuild one binary.
- The build is serialised by an OS lock (``fcntl.flock`` on ``build.lock``), which the kernel drops when its
  holder dies, however it dies; torch's own lock file, which a killed build leaves behind and which made every
  later build wait forever, is removed by whoever holds the OS lock before it builds. A wait for another
  process's build longer than `WAIT_ENV` seconds (default `DEFAULT_WAIT_S`) gives up: the ordinary modules
  run, with a warning.
- A failed build is remembered (``failed.txt`` in the key's folder, with the compiler's message), so later
  processes do not retry it; the warning says how to retry.

`kernel_status` says, in one line, whether the kernel is in use in this process or why not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import torch

try:  # POSIX; on other platforms the kernel is not offered (its sources need GCC vector extensions anyway)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["DIR_ENV", "WAIT_ENV", "DEFAULT_WAIT_S", "KERNEL_IN_USE", "kernel_key", "kernel_dir", "prepare", "load_built",
           "loaded", "kernel_status", "usable_here"]

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("kernels") / name
            for name in ("bindings.cpp", "bn_gelu_pool.cpp", "kernels.h")]
#: The folder that holds one sub-folder per kernel key; default ``$XDG_CACHE_HOME/ignite_trainer/cpu_kernel``.
DIR_ENV = "IGNITE_TRAINER_KERNEL_DIR"
#: Seconds to wait for another process that is building the kernel before running the ordinary modules.
WAIT_ENV = "IGNITE_TRAINER_KERNEL_WAIT"
DEFAULT_WAIT_S = 300.0
#: How `kernel_status` begins while the kernel computes the conv blocks (what a run records per session).
KERNEL_IN_USE = "fused kernel in use"
_BUILT, _FAILED, _LOCK, _TORCH_LOCK = "built.json", "failed.txt", "build.lock", "lock"
_POLL_S = 0.2

_lock = threading.Lock()
_kernel: ModuleType | None = None
_status = "not used in this process"


# ---------------------------------------------------------------------------------------------- the key
def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compile_flags() -> list[str]:
    """Vector flags only where the running CPU has them (they are part of the key, so per machine kind)."""
    flags = ["-O3", "-fno-math-errno"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def kernel_key() -> str:
    """A digest of everything the binary depends on: torch's version, the Python ABI, the platform, the
    compiler command and flags, and the sources' bytes. A binary is built and loaded only under its own key.

    Example::

        print(kernel_dir())   # ~/.cache/ignite_trainer/cpu_kernel/3f9a0c...
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([torch.__version__, sys.implementation.cache_tag, sys.platform, os.uname().machine
                         if hasattr(os, "uname") else "", _compiler(), _compile_flags()]).encode())
    for source in _SOURCES:
        h.update(source.read_bytes())
    return h.hexdigest()


def kernel_dir() -> Path:
    """The folder of this key's build: ``$IGNITE_TRAINER_KERNEL_DIR/<key>``."""
    root = os.environ.get(DIR_ENV)
    base = Path(root).expanduser() if root else \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ignite_trainer" / "cpu_kernel"
    return base / kernel_key()


def _module_name() -> str:
    return "ignite_trainer_cpu_kernel_" + kernel_key()


def _library(folder: Path) -> Path:
    return folder / (_module_name() + (".pyd" if sys.platform == "win32" else ".so"))


# ---------------------------------------------------------------------------------------------- loading
def loaded() -> bool:
    """Whether the kernel is loaded in this process (models built with the kernel switched on then use it)."""
    return _kernel is not None


def kernel_status() -> str:
    """One line: whether the kernel is in use in this process, or why not."""
    return _status


def load_built() -> bool:
    """Load the kernel if it was already built for this key; never builds and never waits. Returns `loaded`."""
    global _status
    with _lock:
        if _kernel is None and _available("") and not _load(kernel_dir()):
            _status = f"not built on this machine ({kernel_dir()}); a training run with --cpu-kernel builds it"
        return _kernel is not None


def _load(folder: Path) -> bool:
    """Import the built library of ``folder`` (only once its build finished: ``built.json`` is written last)."""
    global _kernel, _status
    library = _library(folder)
    if not (folder / _BUILT).is_file() or not library.is_file():
        return False
    try:
        spec = importlib.util.spec_from_file_location(_module_name(), library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # a binary that does not load here is as good as none
        _status = f"unfused (the built kernel {library} does not load: {type(e).__name__}: {_first_line(e)})"
        return False
    _kernel, _status = module, f"{KERNEL_IN_USE} ({folder})"
    return True


def _available(why_prefix: str) -> bool:
    global _status
    if fcntl is None or sys.platform == "win32":
        _status = why_prefix + "unavailable on this platform (the kernel needs GCC or Clang and POSIX file locks)"
        return False
    return True


# ---------------------------------------------------------------------------------------------- building
def prepare(wait_s: float | None = None) -> bool:
    """Make the kernel usable in this process: load this key's build, or build it first (about 30 s, once per
    machine and key, announced by one log line). Never raises: where it cannot be had (no compiler, a failed
    build remembered, another process building for longer than ``wait_s``), it logs one warning saying why
    and returns False, and the ordinary modules run.

    Example::

        model = build_model("attention_cnn", n_mels=64)
        use_cpu_kernel(model, prepare())   # its blocks use the kernel if it could be had
    """
    global _status
    with _lock:
        if _kernel is not None:
            return True
        if not _available("unfused: "):
            log.warning("the CPU kernel is %s", _status.removeprefix("unfused: "))
            return False
        folder = kernel_dir()
        if _load(folder):
            return True
        if wait_s is None:
            wait_s = _wait_from_env()
        reason = _build_under_lock(folder, wait_s)
        if reason is None:
            if _load(folder):
                return True
        else:
            _status = f"unfused ({reason})"
        log.warning("the conv blocks run on the ordinary modules: %s", _status)
        return False


def _build_under_lock(folder: Path, wait_s: float) -> str | None:
    """Build this key's kernel holding ``build.lock``; None when built (by us or by the process we waited
    for), else why not."""
    failed = folder / _FAILED
    if failed.is_file():
        return _failed_reason(failed)
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler: {_compiler()!r} is not on PATH (set CXX or install g++ or clang++)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / _LOCK, "a+")
    except OSError as e:
        return f"cannot write the build folder {folder} ({e.strerror or e})"
    with handle:
        holder = _wait_for_lock(handle, wait_s)
        if holder is not None:
            return (f"another process ({holder}) has been building the kernel in {folder} for over {wait_s:g} s; "
                    f"it will be used once built (the wait is {WAIT_ENV} seconds)")
        try:
            if (folder / _BUILT).is_file():
                return None  # the process we waited for built it
            if failed.is_file():
                return _failed_reason(failed)
            handle.seek(0), handle.truncate(), handle.write(f"pid {os.getpid()}\n"), handle.flush()
            return _build(folder)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        log.warning("%s=%r is not a number of seconds; waiting %g s", WAIT_ENV, os.environ[WAIT_ENV], DEFAULT_WAIT_S)
        return DEFAULT_WAIT_S


def _wait_for_lock(handle: IO[str], wait_s: float) -> str | None:
    """Take the OS lock within ``wait_s`` (polling, so a signal is handled meanwhile): None when taken, else
    who holds it. A dead holder's lock is already free: the OS drops it with the process."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                return handle.read().strip() or "unknown pid"
            time.sleep(_POLL_S)


def _build(folder: Path) -> str | None:
    """Compile into ``folder`` (holding its lock); None on success, else why not (then remembered)."""
    log.warning("building the CPU kernel once (about 30 s) in %s; later runs load it", folder)
    # torch's own build lock: a build killed before it released it left it behind, and torch waits for it to
    # vanish, forever. Only the holder of build.lock builds here, so a file found now is always stale.
    (folder / _TORCH_LOCK).unlink(missing_ok=True)
    try:
        # deferred: the compiler front-end is needed only when the kernel is built
        from torch.utils.cpp_extension import load as build_extension

        _put_ninja_on_path()
        build_extension(name=_module_name(), sources=[str(s) for s in _SOURCES if s.suffix == ".cpp"],
                        extra_cflags=_compile_flags(), build_directory=str(folder), verbose=False)
    except Exception as e:  # a compiler error, a missing ninja, a full disk: remembered, not retried by each run
        reason = f"the build failed: {type(e).__name__}: {_first_line(e)}"
        try:
            (folder / _FAILED).write_text(f"{reason}\n\n{e}\n")
        except OSError:
            pass
        return reason + f"; details in {folder / _FAILED}, delete it to try again"
    tmp = folder / (_BUILT + ".tmp")
    tmp.write_text(json.dumps({"torch": torch.__version__, "compiler": _compiler(), "flags": _compile_flags(),
                               "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    os.replace(tmp, folder / _BUILT)
    return None


def _failed_reason(failed: Path) -> str:
    try:
        first = failed.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        first = "the build failed"
    return f"{first} (an earlier build on this machine; delete {failed} to try again)"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _put_ninja_on_path() -> None:
    """torch builds extensions with ``ninja`` from PATH; the pip-installed one lives beside this interpreter."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pinned dependency; its binary is not on PATH when .venv is not activated
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


# ---------------------------------------------------------------------------------------------- use
def kernel() -> Any:
    """The loaded kernel module (only after `prepare` or `load_built` returned True)."""
    assert _kernel is not None, "the CPU kernel is not loaded in this process"
    return _kernel


def usable_here(x: torch.Tensor) -> bool:
    """The conditions every kernel shares: a float32 CPU tensor, outside autocast and torch.compile tracing
    (autocast changes the dtype; torch.compile fuses the plain modules itself), and the kernel loaded in this
    process. Never loads or builds anything."""
    if _kernel is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return not (torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling())
