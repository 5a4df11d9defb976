"""Running on Slurm through hydra-submitit-launcher (``hydra/launcher=submitit_slurm``).

Preemption and time limits are handled by one mechanism, submitit's: Slurm sends
``SIGUSR2`` (``signal_delay_s`` before the time limit, or ``scancel --signal=USR2``),
:class:`~reptile_gen.utils.callbacks.LastCheckpoint` saves ``last.ckpt`` at the end of the
current meta-step, submitit asks the launcher for its checkpoint (the same job, to be run
again) and requeues it, and the requeued job resumes from that ``last.ckpt`` in its own run
dir (``auto_resume``). Lightning's own SLURM auto-requeue (a ``SIGUSR1`` handler that saves
an ``hpc_ckpt`` and calls ``scontrol requeue`` itself) is turned off here, so that the two
never both requeue a job (:func:`cluster_plugins`).

This module also registers the OmegaConf resolvers that the launcher configs
(``conf/hydra/launcher/*.yaml``) use to size a job from ``trainer.accelerator`` and
``trainer.devices``; it is imported by the package, so they exist before Hydra resolves
the launcher config.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

__all__ = ["cluster_plugins", "gpus_per_node", "tasks_per_node", "register_resolvers"]

log = logging.getLogger(__name__)

_GPU_ACCELERATORS = ("gpu", "cuda")


def _device_count(devices) -> int | None:
    """``trainer.devices`` as a number of devices: an int, a list of ids or a digit
    string; None for ``auto`` / ``-1`` (unknown until the job sees its node)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() and int(text) > 0 else None


def gpus_per_node(accelerator, devices) -> int | None:
    """GPUs to ask Slurm for on each node: ``trainer.devices`` when the trainer runs on
    GPUs, else None (no GPU request at all: a CPU job on a CPU partition)."""
    if str(accelerator).lower() not in _GPU_ACCELERATORS:
        return None
    return _device_count(devices)


def tasks_per_node(accelerator, devices) -> int:
    """Slurm tasks per node: one per GPU on a GPU run (Lightning's SLURM environment gives
    each task its rank; this is what ``trainer=ddp`` needs), else one (a CPU run, where
    ``trainer=ddp_cpu`` spawns its ranks itself)."""
    if str(accelerator).lower() not in _GPU_ACCELERATORS:
        return 1
    return _device_count(devices) or 1


def register_resolvers() -> None:
    """``${reptile_gen.gpus_per_node:<accelerator>,<devices>}`` and
    ``${reptile_gen.tasks_per_node:<accelerator>,<devices>}`` for the launcher configs."""
    OmegaConf.register_new_resolver("reptile_gen.gpus_per_node", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("reptile_gen.tasks_per_node", tasks_per_node, replace=True)


def cluster_plugins() -> list:
    """Trainer plugins for the cluster the process runs on: inside a Slurm job step,
    Lightning's SLURM environment with its auto-requeue off (submitit requeues; see the
    module docstring); elsewhere none."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    log.info("running under Slurm: Lightning's auto-requeue off (submitit handles requeues)")
    return [SLURMEnvironment(auto_requeue=False)]
