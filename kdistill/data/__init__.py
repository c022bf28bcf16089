"""Data layer: load rows, tokenize them for a task, batch them.

``load_rows`` (local jsonl/json/csv/tsv/parquet/txt files or a ``datasets`` name) gives
``list[dict]``; a format's ``encode`` turns rows into tokenized examples (Python lists, each
with ``example_id``); :class:`Collator` pads a list of examples into tensors and, for masked LM,
masks dynamically from a ``torch.Generator``. Padded label positions are ``-100``.
"""

from kdistill.data.collate import TASKS, Collator
from kdistill.data.formats import (
    CausalLMFormat,
    ClassificationFormat,
    MaskedLMFormat,
    infer_labels,
)
from kdistill.data.sources import FORMATS, load_rows, split_rows

__all__ = [
    "FORMATS",
    "TASKS",
    "CausalLMFormat",
    "ClassificationFormat",
    "Collator",
    "MaskedLMFormat",
    "infer_labels",
    "load_rows",
    "split_rows",
]
