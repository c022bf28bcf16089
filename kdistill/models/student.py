"""Students built from a teacher by keeping a subset of its layers (DistilBERT-style init)."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from kdistill.errors import ModelError
from kdistill.models.layers import LAYER_COUNT_FIELDS, find_layer_stack, select_layers, text_config

if TYPE_CHECKING:
    from kdistill.models.vocab import VocabPlan

logger = logging.getLogger(__name__)

PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type", "attention_window",
                    "indexer_types")
"""Config lists with one entry per layer: subset to the kept layers."""

LAYER_INDEX_FIELDS = ("mlp_only_layers",)
"""Config lists of layer indices: kept entries renumbered to the student's positions."""

LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id")
"""Module attributes holding a block's position (KV-cache slot): renumbered 0..N-1."""


def student_from_teacher(
    teacher: PreTrainedModel,
    layer_indices: list[int],
    *,
    trainable: bool = True,
    vocab_plan: VocabPlan | None = None,
) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only the layers ``layer_indices`` (weights copied).

    Embeddings, final norms and heads are copied as they are. The config's layer count, per-layer
    lists (``layer_types``, ...) and the blocks' ``layer_idx`` are updated, so the student saves
    and reloads to identical outputs and its KV cache works. The teacher is not modified.
    ``trainable`` makes every student parameter require gradients (the teacher is often frozen).

    vocab_plan: a :class:`~kdistill.models.vocab.VocabPlan` to keep only its tokens in the
    student's embeddings and head, as :func:`~kdistill.models.vocab.trim_model` after the copy
    would, but the full-vocabulary weights are never copied: the deep copy shares the teacher's,
    and trimming replaces them by copies of the kept rows (Gemma 3: 262,144 × 640 fp32 rows,
    0.63 GiB, of which a corpus keeps a few percent).
    """
    path, stack = find_layer_stack(teacher)
    n = len(stack)
    kept = select_layers(n, "explicit", layers=list(layer_indices))
    if getattr(text_config(teacher), "is_heterogeneous", False):
        raise ModelError(f"{type(teacher).__name__} has a heterogeneous per-layer config: not supported")

    # Deep copy without the dropped blocks: they map to a placeholder, so their weights are never copied.
    placeholder = nn.Identity()
    memo = {id(stack[i]): placeholder for i in range(n) if i not in kept}
    if vocab_plan is not None:  # shared until trim_model below replaces them by their kept rows
        from kdistill.models.vocab import vocabulary_parameters

        memo.update({id(p): p for p in vocabulary_parameters(teacher)})
    student = copy.deepcopy(teacher, memo)
    parent_path, _, attr = path.rpartition(".")
    parent = student.get_submodule(parent_path)
    student_stack = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([student_stack[i] for i in kept]))

    for new, block in enumerate(getattr(parent, attr)):
        _renumber(block, new)
    _update_config(text_config(student), kept, n)
    if vocab_plan is not None:
        from kdistill.models.vocab import trim_model

        trim_model(student, vocab_plan)  # checks that the student reloads from its config
    else:
        _check_reloadable(student)
    if trainable:
        student.requires_grad_(True)
    logger.info("student of %s: layers %s of %d at %s", type(teacher).__name__, kept, n, path)
    return student


def _renumber(block: nn.Module, new: int) -> None:
    for module in block.modules():
        for name in LAYER_INDEX_ATTRIBUTES:
            old = getattr(module, name, None)
            if isinstance(old, int) and not isinstance(old, bool):
                setattr(module, name, new)
                # GPT-2 with scale_attn_by_inverse_layer_idx bakes 1/(layer_idx+1) into its scaling at init.
                if getattr(module, "scale_attn_by_inverse_layer_idx", False) and hasattr(module, "scaling"):
                    module.scaling = module.scaling * (old + 1) / (new + 1)


def _update_config(config, kept: list[int], n: int) -> None:
    for field in PER_LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                logger.warning("config.%s has %d entries for %d layers: left as is", field, len(value), n)
                continue
            setattr(config, field, type(value)(value[i] for i in kept))
    for field in LAYER_INDEX_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)):
            old = set(value)
            setattr(config, field, type(value)(new for new, i in enumerate(kept) if i in old))
    count_fields = [f for f in LAYER_COUNT_FIELDS if isinstance(getattr(config, f, None), int)]
    if not count_fields:
        raise ModelError(f"{type(config).__name__} has no layer count field ({', '.join(LAYER_COUNT_FIELDS)})")
    for field in count_fields:  # aliases (attribute_map) set the same value twice: harmless
        if getattr(config, field) == n:
            setattr(config, field, len(kept))


def _check_reloadable(student: PreTrainedModel) -> None:
    """Build the student's class from its new config on the meta device; its weights must match."""
    try:
        with torch.device("meta"):
            fresh = type(student)(copy.deepcopy(student.config))
    except Exception as exc:  # some classes cannot be built this way: skip the check
        logger.debug("reload check of %s skipped: %s", type(student).__name__, exc)
        return
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise ModelError(
            f"student of {type(student).__name__} would not reload from its config: "
            f"weights differ at {', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}"
        )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``embedding`` (input + output embeddings, once if tied), ``non_embedding``."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    seen: set[int] = set()
    embedding = 0
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, nn.Module):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    embedding += p.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
