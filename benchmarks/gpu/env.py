"""Environment: GPU, driver, library versions, the peak TFLOP/s used for MFU."""

from __future__ import annotations

import os
import platform
import subprocess

from .common import device_name, has_vocab_chunk, peak_for


def collect_env(smoke: bool) -> dict:
    import importlib
    import importlib.metadata as md

    import torch

    def version(dist_name, module):
        try:
            return md.version(dist_name)
        except md.PackageNotFoundError:
            try:
                return getattr(importlib.import_module(module), "__version__", "?")
            except Exception as exc:  # noqa: BLE001
                return f"not importable ({type(exc).__name__})"

    dev = device_name(smoke)
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "device": dev,
           "transformers": version("transformers", "transformers"),
           "deepspeed": version("deepspeed", "deepspeed"),
           "megatron_core": version("megatron-core", "megatron.core"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = None
    peak, src = peak_for(dev)
    env.update(peak_tflops=peak, peak_tflops_source=src)
    try:
        env["vocab_chunk_available"] = has_vocab_chunk()
    except Exception as exc:  # noqa: BLE001
        env["vocab_chunk_available"] = f"error: {exc}"
    return env
