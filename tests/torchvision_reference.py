"""torchvision's own ROIAlign, the reference for :func:`dvsft.objectives.lsd.roi_align`.

With torchvision installed, ``torchvision.ops.roi_align`` (its compiled kernel) is the reference. Where no
torchvision build fits the installed torch (this project's CPU setup), the reference is torchvision's
pure-PyTorch ``_roi_align`` (``torchvision/ops/roi_align.py``, "transcribed directly off of the roi_align CUDA
kernel") read from the pinned wheel below: ``pip download`` fetches it once from the package registry into
``$DVSFT_CACHE/torchvision-<version>/`` (default ``~/.cache/dvsft``), and only that file's
``_bilinear_interpolate``, ``maybe_cast`` and ``_roi_align`` are loaded, without their ``torch.compile``
decorator. The wheel is platform-specific but the file is pure Python, so one pinned wheel serves all hosts.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

TORCHVISION_VERSION = "0.29.1"
WHEEL_PLATFORM = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:")
SOURCE_IN_WHEEL = "torchvision/ops/roi_align.py"
FUNCTIONS = ("_bilinear_interpolate", "maybe_cast", "_roi_align")


def cache_dir() -> Path:
    root = os.environ.get("DVSFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvsft"
    return Path(root) / f"torchvision-{TORCHVISION_VERSION}"


def fetch_source() -> Path:
    """``roi_align.py`` of the pinned torchvision wheel, downloaded once; raises RuntimeError when it cannot be."""
    target = cache_dir() / "roi_align.py"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *WHEEL_PLATFORM, "-d", tmp]
        try:
            done = subprocess.run(
                [*cmd, f"torchvision=={TORCHVISION_VERSION}"], capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f"pip download torchvision=={TORCHVISION_VERSION} failed: {err}") from err
        wheels = list(Path(tmp).glob("torchvision-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = " ".join((done.stderr or done.stdout).split()[-40:])
            raise RuntimeError(f"pip download torchvision=={TORCHVISION_VERSION} failed: {tail}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            source = wheel.read(SOURCE_IN_WHEEL)
        part = Path(tmp) / "roi_align.py"
        part.write_bytes(source)
        os.replace(part, target)  # atomic: parallel test workers never read half a file
    return target


def load_reference(path: Path) -> Callable:
    """torchvision's ``_roi_align(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned)`` from ``path``."""
    import torch

    tree = ast.parse(path.read_text())
    picked = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in FUNCTIONS]
    missing = set(FUNCTIONS) - {n.name for n in picked}
    if missing:
        raise RuntimeError(f"{path} has no {', '.join(sorted(missing))}: torchvision changed its reference")
    for node in picked:
        node.decorator_list = []  # drop @lazy_compile: the reference runs eagerly
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=picked, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_roi_align"]


def torchvision_roi_align() -> tuple[Callable, str]:
    """(``f(input [N,C,H,W], rois [K,5], spatial_scale, ph, pw, sampling_ratio, aligned)``, what it is)."""
    try:
        from torchvision.ops import roi_align as tv_roi_align
    except ImportError:
        path = fetch_source()
        return load_reference(path), f"torchvision {TORCHVISION_VERSION} _roi_align ({path})"

    def compiled(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned):
        return tv_roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)

    return compiled, "torchvision.ops.roi_align (installed)"
