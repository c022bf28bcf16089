"""The demo recipes: the packaged ``demo.yaml`` (Gemma 3 270M) and its ``--tiny`` variant for CI.

``--tiny`` builds a tiny random GPT-2 teacher (with a small BPE tokenizer trained on the built-in
seed tasks) in ``<run>/models/`` and replays the full demo's recorded Gemma calls for the
Self-Instruct stage (``tiny_teacher_calls.sqlite``, made by ``kdistill demo``; every stage still
runs for real, the black-box teacher's answers come from the recording), so the whole pipeline
runs end to end in well under a minute with no model download.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from kdistill.recipe import Recipe, parse_recipe

RECORDING = "tiny_teacher_calls.sqlite"


def _packaged(name: str) -> Path:
    return Path(str(files("kdistill.demo").joinpath(name)))


def demo_recipe(tiny: bool = False, output_dir: str | None = None) -> Recipe:
    """The demo recipe, its run directory moved to ``output_dir`` if given. Writes nothing: the
    ``--tiny`` teacher and recording it names are made by :func:`prepare_tiny_demo`."""
    text = _packaged("demo.yaml").read_text()
    out = output_dir or ("runs/demo-tiny" if tiny else "runs/demo")
    text = text.replace("runs/demo", out)
    if not tiny:
        return parse_recipe(text, "demo.yaml")
    teacher_dir, recording = _tiny_assets(Path(out))
    text = text.replace("name: demo\n", "name: demo-tiny\n")
    text = text.replace("teacher: gemma-3-270m\n", f"teacher: {teacher_dir}\n")
    text = text.replace("  teacher: {backend: local, model: gemma-3-270m, batch_size: 8, dtype: bfloat16}",
                        f"  teacher: {{backend: replay, model: local:gemma-3-270m, replay_file: {recording}}}")
    text = text.replace("    num_layers: 6\n", "    num_layers: 2\n")
    text = text.replace("signal: {source: cache, k: 64, batch_size: 4}", "signal: {source: cache, k: 16, batch_size: 4}")
    text = text.replace("  max_steps: 150\n", "  max_steps: 8\n").replace("  eval_steps: 50\n", "  eval_steps: 4\n")
    text = text.replace("  save_steps: 50\n", "  save_steps: 4\n")
    return parse_recipe(text, "demo.yaml (--tiny)")


def _tiny_assets(run_dir: Path) -> tuple[Path, Path]:
    """Where the ``--tiny`` demo keeps its teacher and its copy of the recorded teacher calls."""
    return run_dir / "models" / "teacher", run_dir / "models" / RECORDING


def prepare_tiny_demo(recipe: Recipe, report: Callable[[str], None] = lambda line: None) -> None:
    """Build the ``--tiny`` demo's teacher and copy its recording into the run directory (once).

    Call it after the run directory is claimed (:func:`kdistill.stages.claim_run_dir`), so that a
    directory holding another run gets nothing written into it."""
    teacher_dir, recording = _tiny_assets(recipe.run_dir)
    build_tiny_teacher(teacher_dir, report)
    if not recording.exists():  # a copy: replay never writes into the installed package
        shutil.copyfile(_packaged(RECORDING), recording)


def build_tiny_teacher(path: Path, report: Callable[[str], None]) -> Path:
    """A 4-layer GPT-2 of width 64 with random weights and a 1,000-token BPE trained on the seed tasks."""
    if (path / "config.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from kdistill.blackbox.self_instruct import default_seed_path
    from kdistill.data.instruction import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    report(f"building a tiny random teacher in {path}")
    corpus = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT]
    for line in default_seed_path().read_text().splitlines():
        task = json.loads(line)
        corpus.append(task["instruction"])
        corpus += [f"{i['input']} {i['output']}" for i in task["instances"]]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=1000, show_progress=False, special_tokens=["<pad>", "<unk>", "<eos>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=4, n_head=4,
                                       bos_token_id=2, eos_token_id=2, pad_token_id=0, initializer_range=0.1))
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path
