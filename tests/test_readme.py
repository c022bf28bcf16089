"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        scope: dict = {}
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
        loss = scope["loss"]
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
        assert scope["student_logits"].grad is not None
