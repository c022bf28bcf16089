"""Check a device the user names (``--device``) before any model is loaded on it."""

from __future__ import annotations

from kdistill.errors import ConfigError


def check_device(text: str | None, option: str = "--device") -> str | None:
    """``text`` when torch parses it as a device this machine has (cpu, cuda, cuda:N, mps); None passes.

    Raises a one-line :class:`ConfigError` naming ``option`` otherwise."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"{option} {text!r}: expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{option} {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {text!r}: MPS is not available here")
    return text
