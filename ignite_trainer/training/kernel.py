"""Whether a run computes its conv blocks with the fused CPU kernel: decided once, before anything is written.

The kernel (`ignite_trainer.model.cpu_kernels`) and the ordinary modules compute the same function but round
differently, so a run must take one path for its whole life to stay exact across resumes:

- ``cpu_kernel: false`` (the default): the ordinary modules; nothing is built, loaded or waited on.
- ``cpu_kernel: true``, new run: the kernel is loaded or built now (one log line), before the first forward
  pass; where it cannot be had, one warning says why and the run uses the modules, and records that.
- ``cpu_kernel: true``, resume: the path the run's sessions recorded (``environment.json``). A run that used the
  kernel is refused where it cannot be had now, with the reason, rather than continued on other arithmetic; a
  run that fell back to the modules continues on them.

The switch itself is a config field, so changing it on resume is refused like any other field that changes
the result (`ignite_trainer.core.config.config_conflicts`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.model import cpu_kernels
from ignite_trainer.runs.record import recorded_kernel_use

__all__ = ["kernel_for_run", "kernel_line"]

log = logging.getLogger(__name__)


def kernel_for_run(config: TrainConfig, run_dir: Path | None = None) -> bool:
    """Whether this session computes the conv blocks with the kernel (loaded, or built, by now). ``run_dir`` is
    the run being resumed (None for a new run). A resume that cannot take its recorded path is a
    `CheckpointError` naming why.

    Example::

        fused = kernel_for_run(config)        # False unless config.cpu_kernel, and then built or loaded
    """
    used_before = recorded_kernel_use(run_dir) if run_dir is not None else None
    if not config.cpu_kernel:
        if used_before:
            log.warning("%s: an older version computed this run with the fused CPU kernel, which runs are now "
                        "without unless asked; it resumes on the ordinary modules, equal up to float rounding, "
                        "not bit for bit", run_dir)
        return False
    if used_before is False:
        log.info("the run's earlier sessions used the ordinary modules (the CPU kernel could not be had); "
                 "it continues on them")
        return False
    if cpu_kernels.prepare():
        return True
    if used_before:
        raise CheckpointError(
            f"{run_dir}: resume refused: the run computed its conv blocks with the fused CPU kernel, which cannot "
            f"be had here ({cpu_kernels.kernel_status()}); the ordinary modules round differently, so the results "
            "would differ bitwise. Resume where the kernel builds, or start a new run")
    return False


def kernel_line(config: TrainConfig, in_use: bool) -> str:
    """What a session records about the kernel (`recorded_kernel_use` reads it back): the kernel's status line,
    why it is not in use, or that the config leaves it off."""
    if in_use:
        return cpu_kernels.kernel_status()
    if not config.cpu_kernel:
        return "off (cpu_kernel: false)"
    status = cpu_kernels.kernel_status()
    return status if status.startswith("unfused") else "unfused (the run's earlier sessions used the ordinary modules)"
