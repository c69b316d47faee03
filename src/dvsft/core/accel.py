"""Process-wide settings about the accelerator that must be in place before other libraries import."""

from __future__ import annotations

import atexit
import os

GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA, AMD ROCm


def name_deepspeed_cpu() -> None:
    """Where no GPU driver is present, tell DeepSpeed its accelerator is the CPU (``DS_ACCELERATOR=cpu``).

    accelerate imports DeepSpeed wherever it is installed, and DeepSpeed's own detection then prints a
    warning on stdout ("unable to detect" an accelerator), which breaks ``--json`` output. The CPU is what
    it would pick; a user's own ``DS_ACCELERATOR`` is kept.
    """
    if "DS_ACCELERATOR" not in os.environ and not any(os.path.exists(p) for p in GPU_DRIVER_FILES):
        os.environ["DS_ACCELERATOR"] = "cpu"


_END_REGISTERED = False


def end_process_group_at_exit() -> None:
    """Destroy the launcher's process group (torchrun, accelerate) when the interpreter exits, while it is still
    whole: a gloo group left to finalization aborts a rank now and then after the run has finished ("terminate
    called without an active exception"). Nothing changes before exit; a group already destroyed is left alone."""
    global _END_REGISTERED
    import torch

    if not _END_REGISTERED and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_end_process_group)
        _END_REGISTERED = True


def _end_process_group() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
