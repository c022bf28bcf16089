"""`kdistill self-instruct` end to end with a real (tiny, random) local teacher."""

from __future__ import annotations

import json

from kdistill.cli import main


def test_self_instruct_command_with_a_local_teacher_keeps_what_it_made(tmp_path, tiny_assets, capsys) -> None:
    recipe = tmp_path / "si.yaml"
    recipe.write_text(f"""
name: si
task: causal
output_dir: {tmp_path / 'si'}
student: {{model: {tiny_assets['gpt2']}}}
data:
  train: {{source: {tmp_path / 'si' / 'data' / 'data.jsonl'}}}
  format: instruction
objective: [{{kind: ce}}]
generate:
  teacher: {{backend: local, model: {tiny_assets['gpt2']}, batch_size: 4}}
  num_instructions: 2
  max_prompts: 3
  max_new_tokens: 16
""")
    code = main(["self-instruct", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    # a random model writes no usable instruction: the run stops on its prompt budget, says so in one
    # line, and keeps the card and the raw stage files
    assert code == 2 and len(err) == 1 and err[0].startswith("kdistill: error: ")
    card = json.loads((tmp_path / "si" / "data" / "data_card.json").read_text())
    assert card["teacher"]["name"].startswith("local:") and "warning" in card
    assert (tmp_path / "si" / "data" / "teacher_calls.sqlite").exists()
    # a rerun replays the recorded calls and reaches the same verdict
    assert main(["self-instruct", str(recipe)]) == 2
