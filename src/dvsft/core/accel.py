"""Process-wide settings about the accelerator that must be in place before other libraries import."""

from __future__ import annotations

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
