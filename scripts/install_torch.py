"""Install PyTorch into the interpreter running this script, never pulling CUDA by accident.

- torch already importable: keep it (GPU users bring their own CUDA build).
- otherwise, no CUDA device here: the CPU build, ``torch==2.13.0`` (a plain ``torch`` from the
  index would pull several GB of CUDA libraries onto a machine that cannot use them).
- otherwise, a CUDA device is present: the index's default (CUDA) build.

``JIN_TORCH_SPEC`` overrides the requirement and ``JIN_TORCH_INDEX_URL`` the index, e.g.
``JIN_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`` where the CPU wheel is not the default.
Used by ``scripts/setup.sh`` and by every session of the root ``noxfile.py``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

CPU_SPEC = "torch==2.13.0"


def has_cuda_device() -> bool:
    """True when ``nvidia-smi`` exists and lists at least one GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    return listed.returncode == 0 and "GPU" in listed.stdout


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        print("install_torch: torch is already installed here; keeping it")
        return 0
    spec = os.environ.get("JIN_TORCH_SPEC") or ("torch" if has_cuda_device() else CPU_SPEC)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", spec]
    if index := os.environ.get("JIN_TORCH_INDEX_URL"):
        cmd += ["--index-url", index]
    print(f"install_torch: {' '.join(cmd[3:])}")
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
