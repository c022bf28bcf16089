"""Size of a model: parameter counts, bytes of its weight files on disk, and fp32-equivalent bytes.

* ``parameters``: :func:`kdistill.models.student.count_parameters` (``total``, ``embedding`` =
  input + output embeddings counted once when tied, ``non_embedding``).
* ``file_bytes``: Σ sizes of the weight files in the model directory (``*.safetensors``,
  ``*.bin``, ``*.pt``/``*.pth``, ``*.gguf``, ``*.h5``, ``*.msgpack``; not training state such
  as ``optimizer.pt``), i.e. what a download or a deployment moves. ``None`` without a directory.
* ``memory_bytes``: Σ numel · element size of the loaded parameters and buffers (in their dtype).
* ``fp32_bytes``: 4 B · total parameters: the size compared across models stored in different
  dtypes.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdistill.errors import ModelError
from kdistill.models.student import count_parameters

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng.pt", "rng_state.pth")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files directly inside ``model_dir`` (sorted), following symlinks (HF cache)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelError(f"model directory {str(root)!r} does not exist")
    return sorted(p for p in root.iterdir()
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name not in NOT_WEIGHTS)


def file_size_bytes(model_dir: str | Path) -> int:
    """Σ bytes of :func:`weight_files` (sharded checkpoints: every shard)."""
    return sum(p.stat().st_size for p in weight_files(model_dir))


def model_size(model: nn.Module, model_dir: str | Path | None = None) -> dict:
    """``{"parameters": {...}, "file_bytes": int | None, "memory_bytes": int, "fp32_bytes": int}``."""
    params = count_parameters(model)
    memory = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "parameters": params,
        "file_bytes": file_size_bytes(model_dir) if model_dir is not None else None,
        "memory_bytes": memory,
        "fp32_bytes": 4 * params["total"],
    }
