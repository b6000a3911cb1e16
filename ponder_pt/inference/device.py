"""`--device auto|cpu|cuda|cuda:N` of `ponder-pt generate`, `eval`, `finetune` and `sft` (and
the Python APIs behind them): "auto" (the default) is cuda when torch sees a GPU, else cpu;
training takes only the device DeepSpeed will train on (`training_device`)."""

from __future__ import annotations

from typing import Optional

DEVICE_HELP = ("auto (default: cuda when torch.cuda.is_available(), else cpu), cpu, cuda or "
               "cuda:N")


def resolve_device(device: Optional[str] = "auto") -> str:
    """The torch device string for `device` ("auto"/None, "cpu", "cuda", "cuda:N", ...).

    An explicit CUDA device on a machine without one (or past its device count) is a
    ValueError (the CLI prints it as an error), not a crash deep inside model loading."""
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: not a device ({DEVICE_HELP})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here "
                             f"(use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) visible")
    return str(dev)


def training_device(device: Optional[str]) -> str:
    """`--device` of `ponder-pt finetune` and `sft`: DeepSpeed trains on its accelerator (CUDA,
    the process's LOCAL_RANK GPU, whenever torch sees one), so only a device that agrees with it
    is accepted; returns the resolved device."""
    import torch

    dev = resolve_device(device)
    if dev == "cpu" and torch.cuda.is_available():
        raise ValueError(f"--device {device}: fine-tuning trains on the GPU whenever one is "
                         f"visible; to train on the CPU hide the GPUs "
                         f"(CUDA_VISIBLE_DEVICES= ponder-pt finetune ...)")
    if dev.startswith("cuda:") and dev != "cuda:0":
        raise ValueError(f"--device {device}: training uses the process's LOCAL_RANK GPU; "
                         f"pick the GPU with CUDA_VISIBLE_DEVICES={dev[5:]} instead")
    return dev
