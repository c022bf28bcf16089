"""Self-Instruct / Alpaca pipeline: seeds, prompts, parsing, resume, budget, filtering errors.

The teacher here is a scripted, deterministic text generator: its completion is a function of the
prompt alone (seeded by the prompt's hash), so a resumed run must reproduce an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from kdistill.blackbox.backends import BlackBoxError, BudgetExhausted, Completion, SamplingParams
from kdistill.blackbox.self_instruct import (
    CLASSIFICATIONS_FILE,
    INSTANCES_FILE,
    INSTRUCTIONS_FILE,
    GenerationIncomplete,
    GroupLog,
    SelfInstructConfig,
    alpaca_prompt,
    call_seed,
    classification_prompt,
    default_seed_path,
    filter_examples,
    instance_prompt,
    instruction_prompt,
    load_seeds,
    parse_alpaca,
    parse_classification,
    parse_instances,
    parse_instructions,
    run_self_instruct,
    sample_in_context,
)
from kdistill.errors import ConfigError, DataError

ORIGINAL_SEEDS = Path(__file__).resolve().parents[3] / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"

VERBS = "Describe Explain List Summarize Compare Rewrite Suggest Outline Evaluate Classify Predict Critique Plan".split()
ASPECTS = "history costs risks benefits origins rules future ethics design habits".split()
TOPICS = ("beekeeping volcanoes chess tides banking knitting sailing glaciers bridges coffee radio vaccines "
          "puppetry orchards lighthouses taxes comets yoga pottery tunnels deserts ballet robots cheese").split()
AUDIENCES = "children tourists nurses farmers engineers students pilots chefs".split()
WORDS = ("amber brisk cedar dune ember fjord grove harbor iris jade kelp lumen maple north opal pine quartz "
         "reed slate thyme umber vale willow yarrow zephyr").split()


class ScriptedTeacher:
    """A deterministic text generator speaking the prompt formats (not a stand-in for our code).

    ``kill_at``: global call numbers (shared ``clock``) at which it raises, as a killed process;
    ``budget``: prompts it answers before raising ``BudgetExhausted`` with the partial results;
    ``style``: ``"ok"``, ``"blocked"`` (every instruction mentions a diagram) or ``"empty"`` (no outputs).
    """

    name = "scripted-teacher-v1"

    def __init__(self, *, kill_at: set[int] = frozenset(), clock: list[int] | None = None,
                 budget: int | None = None, style: str = "ok") -> None:
        self.kill_at = kill_at
        self.clock = clock if clock is not None else [0]
        self.budget = budget
        self.style = style
        self.prompts = 0
        self.calls = 0

    def complete(self, prompts: list[str], params: SamplingParams, n: int = 1,
                 logprobs: int | None = None) -> list[list[Completion]]:
        assert isinstance(params, SamplingParams) and n == 1
        self.clock[0] += 1
        if self.clock[0] in self.kill_at:
            raise RuntimeError(f"killed at call {self.clock[0]}")
        self.calls += 1
        results: list[list[Completion] | None] = []
        for i, prompt in enumerate(prompts):
            if self.budget is not None and self.prompts >= self.budget:
                partial = results + [None] * (len(prompts) - i)
                raise BudgetExhausted(f"request budget exhausted: {self.prompts} prompts", partial=partial)
            self.prompts += 1
            text, finish = self._text(prompt, random.Random(hashlib.sha256(prompt.encode()).hexdigest()))
            for s in params.stop:  # a real backend cuts at stop strings
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            results.append([Completion(text=text, finish_reason=finish)])
        return results  # type: ignore[return-value]

    def _sentence(self, rng: random.Random, k: int = 9) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    def _instruction(self, rng: random.Random) -> str:
        verb = rng.choice(VERBS)
        extra = " in a diagram" if self.style == "blocked" else ""
        return f"{verb} the {rng.choice(ASPECTS)} of {rng.choice(TOPICS)} for {rng.choice(AUDIENCES)}{extra}."

    def _text(self, prompt: str, rng: random.Random) -> tuple[str, str]:
        if prompt.startswith("Come up with a series of tasks"):
            first = int(prompt.rsplit("\n", 1)[1].rstrip("."))
            items = [self._instruction(rng) for _ in range(6)]
            lines = [f" {items[0]}"] + [f"{first + i}. {it}" for i, it in enumerate(items[1:], start=1)]
            if rng.random() < 0.5:  # a malformed item: empty
                lines.insert(1, f"{first + 1}.")
                lines[2:] = [re.sub(r"^\d+", lambda m: str(int(m.group()) + 1), ln) for ln in lines[2:]]
            if rng.random() < 0.5:  # a malformed item: the list restarts at 1
                lines.append(f"1. {self._instruction(rng)}")
            finish = "stop"
            if rng.random() < 0.5:  # cut by max_tokens in the middle of an item
                lines.append(f"{first + 6}. {rng.choice(VERBS)} the")
                finish = "length"
            return "\n".join(lines) + ("" if finish == "length" else "\n\n"), finish
        if prompt.rstrip().endswith("Is it classification?"):
            task = prompt.rsplit("Task: ", 1)[1]
            if rng.random() < 0.15:
                return " Maybe", "stop"
            return (" Yes" if task.startswith("Classify") else " No"), "stop"
        if "Class label:" in prompt or prompt.startswith("Write examples"):
            if self.style == "empty":
                return "Output:", "stop"
            if rng.random() < 0.2:
                return "I cannot help with that.", "stop"
            if prompt.startswith("Given a classification task"):
                return "\n".join(f"Class label: {lab}\nText: {self._sentence(rng)}" for lab in ("Alpha", "Beta")), "stop"
            blocks = [f"Example {k}\nInput: {self._sentence(rng)}\nOutput: {self._sentence(rng, 12)}" for k in (1, 2)]
            return "\n".join(blocks), "stop"
        if "List of" in prompt:  # Alpaca
            first = int(re.findall(r"(\d+)\. Instruction:$", prompt)[0])
            chunks = [f" {self._instruction(rng)}\n{first}. Input:\n<noinput>\n{first}. Output:\n{self._sentence(rng)}"]
            for k in range(first + 1, first + 5):
                chunks.append(f"\n{k}. Instruction: {self._instruction(rng)}\n{k}. Input:\n{self._sentence(rng)}\n"
                              f"{k}. Output:\n{self._sentence(rng, 12)}")
            return "\n###".join(chunks), "stop"
        raise AssertionError(f"unexpected prompt: {prompt[:80]!r}")


def small_config(**kw) -> SelfInstructConfig:
    return SelfInstructConfig(**{"num_instructions": 12, "prompts_per_call": 2, **kw})


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_self_instruct(ScriptedTeacher(), out, small_config())
    return out


# ------------------------------------------------------------------------------------------ seeds


def test_packaged_seeds_load():
    seeds = load_seeds(default_seed_path())
    assert 25 <= len(seeds) <= 40
    assert len({s.instruction for s in seeds}) == len(seeds)
    assert any(s.is_classification for s in seeds) and not all(s.is_classification for s in seeds)
    assert all(s.instances and all(i.output for i in s.instances) for s in seeds)


def test_packaged_seeds_are_not_the_original_ones():
    if not ORIGINAL_SEEDS.exists():
        pytest.skip(f"{ORIGINAL_SEEDS} not present")
    original = load_seeds(ORIGINAL_SEEDS)
    assert len(original) == 175 and original[0].id == "seed_task_0"
    ours = {s.instruction.lower() for s in load_seeds(default_seed_path())}
    assert not ours & {s.instruction.lower() for s in original}


def test_alpaca_json_seeds(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Blue"},
                                {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}], indent=1))
    seeds = load_seeds(path)
    assert [s.instruction for s in seeds] == ["Name a colour.", "Add the numbers."]
    assert seeds[1].instances[0].input == "2 3" and not seeds[1].is_classification


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a b c d", "instances": [{"input": "", "output": "x"}]}'] * 6
         + ['{"name": "x", "instances": [{"input": "", "output": "x"}]}'],
         "seeds.jsonl line 7: missing field 'instruction'"),
        (['{"instruction": "a b c d", "instances": [{"input": "", "output": "x"}]}', "", '{"instruction": '],
         "seeds.jsonl line 3: invalid JSON"),
        (['{"instruction": "a b c d"}'], "seeds.jsonl line 1: missing field 'instances'"),
        (['{"instruction": "a b c d", "instances": [{"input": ""}]}'],
         "seeds.jsonl line 1: instances[0]: missing field 'output'"),
        (['{"instruction": 3, "instances": []}'], "seeds.jsonl line 1: field 'instruction' must be a string"),
        (['{"instruction": "a", "instances": [{"output": "x"}], "is_classification": "yes"}'],
         "seeds.jsonl line 1: field 'is_classification' must be true or false"),
        (["", "  "], "seeds.jsonl: no seed tasks"),
        (["{", '  "instruction": "a b c d",', '  "instances": [{"input": "", "output": "x"}]', "}"],
         "seeds.jsonl: one JSON object spread over lines; seed files are JSONL"),
        (['[{"instruction": "a", "output": "b"}]', "trailing {"],
         "seeds.jsonl line 2: invalid JSON: text after the list ('trailing {')"),
    ],
)
def test_seed_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_seeds(path)
    assert "\n" not in str(info.value)


def test_alpaca_json_error_names_the_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=re.escape("alpaca.json line 3: missing field 'instances' (or Alpaca's 'output')")):
        load_seeds(path)
    with pytest.raises(DataError, match="seed file not found"):
        load_seeds(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_has_six_seed_and_two_machine_instructions():
    seeds = [f"Seed task number {i} here." for i in range(20)]
    machine = [f"Machine task number {i} here." for i in range(5)]
    chosen = sample_in_context(seeds, machine, random.Random(1))
    assert len(chosen) == 8
    assert sum(c in machine for c in chosen) == 2 and sum(c in seeds for c in chosen) == 6
    prompt = instruction_prompt(chosen)
    lines = prompt.split("\n")
    assert lines[0] == "Come up with a series of tasks:"
    assert [ln.split(". ", 1)[0] for ln in lines[1:9]] == [str(i) for i in range(1, 9)]
    assert [ln.split(". ", 1)[1] for ln in lines[1:9]] == chosen
    assert lines[9] == "9."
    # no machine instruction yet: 8 seeds; one: 1 + 7
    assert all(c in seeds for c in sample_in_context(seeds, [], random.Random(2)))
    one = sample_in_context(seeds, machine[:1], random.Random(3))
    assert len(one) == 8 and sum(c in machine for c in one) == 1


def test_prompt_cleans_in_context_instructions():
    prompt = instruction_prompt(["Answer the question:\n  below", "Two"])
    assert "1. Answer the question: below\n2. Two\n3." in prompt


def test_other_prompts():
    assert classification_prompt("Classify the tweet.").endswith("Task: Classify the tweet.\nIs it classification?")
    assert instance_prompt("Say hi.", False).startswith("Write examples")
    assert instance_prompt("Label it.", True).startswith("Given a classification task")
    assert instance_prompt("Label it.", True).endswith("Task: Label it.\n")
    p = alpaca_prompt([("Do a.", "", "A"), ("Do b.", "in", "B"), ("Do c.", "", "C")])
    assert p.endswith("###\n4. Instruction:") and "1. Input:\n<noinput>\n" in p and "List of 20 tasks" in p


# ------------------------------------------------------------------------------------------ parsing


def test_parse_numbered_instructions():
    text = (" Write a poem about rain.\n10. Explain how tides   work\n  in two sentences.\n11. Convert 2.5 litres\n"
            "2.5 litres to cups.\n12.Name three rivers in Asia.\n\n")
    parsed = parse_instructions(text, 9)
    assert parsed.items == ["Write a poem about rain.", "Explain how tides work in two sentences.",
                            "Convert 2.5 litres 2.5 litres to cups.", "Name three rivers in Asia."]
    assert parsed.malformed == parsed.truncated == 0


def test_parse_instructions_drops_and_counts_malformed_and_truncated():
    text = " first task is fine\n10.\n11. third one\n1. restarted list\n13. cut in the mid"
    parsed = parse_instructions(text, 9, finish_reason="length")
    assert parsed.items == ["First task is fine", "Third one"]
    assert parsed.malformed == 2  # empty item 10, out-of-sequence 1
    assert parsed.truncated == 1
    assert parse_instructions("", 9).malformed == 1


def test_parse_alpaca():
    text = (" Name a fruit.\n4. Input:\n<noinput>\n4. Output:\nApple\n###\n5. Instruction: Reverse the word.\n"
            "5. Input:\nstar\n5. Output:\nrats\n###\n5. Instruction: wrong number\n5. Input:\nx\n5. Output:\ny\n"
            "###\n7. Instruction: Cut off here")
    parsed = parse_alpaca(text, 4, finish_reason="length")
    assert parsed.items == [("Name a fruit.", "", "Apple"), ("Reverse the word.", "star", "rats")]
    assert parsed.malformed == 1 and parsed.truncated == 1


@pytest.mark.parametrize("text, label", [(" Yes", True), ("no.", False), (" YES\n", True), (" Maybe", None), ("", None)])
def test_parse_classification(text, label):
    assert parse_classification(text) is label


def test_parse_generation_instances():
    text = ("Example 1\nInput: 3 + 4\nOutput: 7\nExample 2\nSum: 10 + 1\nOutput: 11\nExample 3\nno output marker\n"
            "Example 4\nInput: 3 + 4\nOutput: 8")
    parsed = parse_instances(text, False)
    assert parsed.items == [("Sum: 10 + 1", "11", "stop")]
    assert parsed.malformed == 1 and parsed.conflicting == 2  # "3 + 4" given 7 and 8
    single = parse_instances("Output: A short answer.\nInput: run-on second pair", False)
    assert single.items == [("", "A short answer.", "stop")]
    assert parse_instances("just some text", False).malformed == 1
    # "Example" inside a sentence is not a block marker
    assert parse_instances("Input: For Example 2 things\nOutput: ok", False).items == [("For Example 2 things", "ok", "stop")]


def test_parse_instances_marks_the_cut_block():
    text = "Example 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOutput: d is cu"
    parsed = parse_instances(text, False, finish_reason="length")
    assert parsed.items == [("a", "b", "stop"), ("c", "d is cu", "length")]
    cut_early = parse_instances("Example 1\nInput: a\nOutput: b\nExample 2\nInput: c", False, finish_reason="length")
    assert cut_early.items == [("a", "b", "stop")] and cut_early.truncated == 1 and cut_early.malformed == 0


def test_parse_classification_instances():
    text = "Class label: Positive\nReview: Great food.\nClass label: Negative\nReview: Cold soup.\nClass label:\n"
    parsed = parse_instances(text, True)
    assert parsed.items == [("Review: Great food.", "Positive", "stop"), ("Review: Cold soup.", "Negative", "stop")]
    assert parsed.malformed == 1
    assert parse_instances("Positive, Negative", True).malformed == 1
    assert parse_instances("Class label: A\nx\nClass label: B\nx", True).conflicting == 2


# ------------------------------------------------------------------------------------------ pipeline


def test_pipeline_outputs(reference_run):
    out = reference_run
    rows = json.loads(read(out / "data.json"))
    assert rows and all(set(r) == {"instruction", "input", "output"} for r in rows)
    jsonl = [json.loads(line) for line in read(out / "data.jsonl").splitlines()]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in jsonl] == rows
    assert len({r["id"] for r in jsonl}) == len(jsonl)
    card = json.loads(read(out / "data_card.json"))
    assert card["status"] == "complete" and card["teacher"]["name"] == "scripted-teacher-v1"
    assert "licence" in card["warning"] and card["teacher"]["licence"] in card["warning"]
    assert card["seed_file_sha256"] == hashlib.sha256(default_seed_path().read_bytes()).hexdigest()
    counts = card["counts"]
    assert counts["instructions_kept"] >= 12 and counts["examples_kept"] == len(rows)
    assert counts["malformed"]["instruction_items"] > 0 and counts["truncated"]["instruction_items"] > 0
    assert counts["malformed"]["classifications"] > 0 and counts["malformed"]["instance_blocks"] > 0
    assert counts["classified"]["classification"] > 0 and counts["classified"]["generation"] > 0
    assert sum(counts["instructions_dropped"].values()) + counts["instructions_kept"] == counts["instructions_parsed"]
    assert counts["examples_generated"] == counts["examples_kept"] + sum(counts["examples_dropped"].values())
    assert card["sampling_params"]["classify"]["max_tokens"] == 3
    md = read(out / "data_card.md")
    assert "Licence warning" in md and "scripted-teacher-v1" in md and "instructions_kept" in md
    # classification tasks got output-first instances: the label is the output
    assert {r["output"] for r in rows if r["instruction"].startswith("Classify")} <= {"Alpha", "Beta"}


def test_export_loads_with_datasets(reference_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    for name in ("data.json", "data.jsonl"):
        ds = datasets.load_dataset("json", data_files=str(reference_run / name), split="train",
                                   cache_dir=str(tmp_path / "cache"))
        assert len(ds) == len(json.loads(read(reference_run / "data.json")))
        assert {"instruction", "input", "output"} <= set(ds.column_names)


def test_decontamination_in_the_filter_stage(reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    rows = json.loads(read(out / "data.json"))
    leaked = next(r for r in rows if len((r["instruction"] + " " + r["input"]).split()) >= 13)
    report = filter_examples(out, small_config(), eval_sets={"heldout": [leaked["instruction"] + " " + leaked["input"]]})
    assert report.counts["contaminated"] >= 1 and report.contaminated_by == {"heldout": report.counts["contaminated"]}
    assert len(report.kept) == len(rows) - report.counts["contaminated"]
    rejected = [json.loads(line) for line in read(out / "rejected.jsonl").splitlines()]
    assert any(r["reason"] == "contaminated" and r["input"] == leaked["input"] for r in rejected)


def test_resume_after_kills_gives_the_same_data(reference_run, tmp_path):
    out = tmp_path / "killed"
    clock = [0]
    kills = {2, 5, 6, 11, 15, 19}  # stage 1, 2 and 3 calls
    for _ in range(len(kills) + 1):
        try:
            run_self_instruct(ScriptedTeacher(kill_at=kills, clock=clock), out, small_config())
            break
        except RuntimeError as exc:
            assert "killed" in str(exc)
    else:
        pytest.fail("never finished")
    for name in ("data.jsonl", INSTRUCTIONS_FILE, CLASSIFICATIONS_FILE, INSTANCES_FILE):
        assert read(out / name) == read(reference_run / name), name
    ids = [r["id"] for _, rs in GroupLog(out / INSTRUCTIONS_FILE).load() for r in rs]
    assert len(ids) == len(set(ids))


def test_resume_after_a_group_cut_mid_write(reference_run, tmp_path):
    out = tmp_path / "cut"
    clock = [0]
    with pytest.raises(RuntimeError):  # dies in classify_tasks, after some of its groups are written
        run_self_instruct(ScriptedTeacher(kill_at={11}, clock=clock), out, small_config())
    path = out / CLASSIFICATIONS_FILE
    data = path.read_bytes()
    assert data.count(b'"_group"') >= 2
    path.write_bytes(data[: len(data) - 25])  # the last group loses its last record and a half line
    run_self_instruct(ScriptedTeacher(), out, small_config())
    assert read(out / "data.jsonl") == read(reference_run / "data.jsonl")
    assert read(path) == read(reference_run / CLASSIFICATIONS_FILE)


def test_a_target_raised_later_continues(reference_run, tmp_path):
    out = tmp_path / "grow"
    run_self_instruct(ScriptedTeacher(), out, small_config(num_instructions=4))
    result = run_self_instruct(ScriptedTeacher(), out, small_config(num_instructions=12))
    assert result.counts["instructions_kept"] >= 12
    ids = [json.loads(line)["id"] for line in read(out / "data.jsonl").splitlines()]
    assert len(ids) == len(set(ids))


def test_budget_exhaustion_keeps_partial_data_and_writes_the_card(tmp_path):
    out = tmp_path / "budget"
    teacher = ScriptedTeacher(budget=9)  # 2 prompts a call: the 5th call gets 1 of 2 answered
    with pytest.raises(GenerationIncomplete, match=r"teacher budget exhausted during generate_instructions "
                                                   r"\(.*budget.*\): \d+ instructions, 0 examples generated") as info:
        run_self_instruct(teacher, out, small_config(num_instructions=40))
    assert "\n" not in str(info.value)
    groups = GroupLog(out / INSTRUCTIONS_FILE).load()
    assert [h["prompts"] for h, _ in groups] == [2, 2, 2, 2, 1]  # the half-answered call is kept
    card = json.loads(read(out / "data_card.json"))
    assert card["status"].startswith("incomplete: budget exhausted during generate_instructions")
    assert card["budget"]["prompts_sent"] == 9 and "budget" in card["budget"]["stopped"]
    # more budget: the run continues without duplicates
    result = run_self_instruct(ScriptedTeacher(), out, small_config(num_instructions=40))
    ids = [r["id"] for _, rs in GroupLog(out / INSTRUCTIONS_FILE).load() for r in rs]
    assert len(ids) == len(set(ids)) and result.counts["examples_kept"] > 0


def test_budget_exhaustion_in_a_later_stage_exports_what_there_is(tmp_path):
    out = tmp_path / "budget2"
    with pytest.raises(GenerationIncomplete, match="during generate_instances"):
        run_self_instruct(ScriptedTeacher(), out, small_config(max_prompts=30))
    rows = json.loads(read(out / "data.json"))
    assert rows  # partial data is filtered and exported
    assert json.loads(read(out / "data_card.json"))["budget"]["max_prompts"] == 30


def test_all_filtered_is_an_error(tmp_path):
    out = tmp_path / "blocked"
    with pytest.raises(BlackBoxError, match=r"no examples left: .*keywords \d+") as info:
        run_self_instruct(ScriptedTeacher(style="blocked"), out, small_config(patience=2))
    assert "\n" not in str(info.value)
    assert (out / "data_card.json").exists() and (out / INSTRUCTIONS_FILE).stat().st_size > 0
    out2 = tmp_path / "empty"
    with pytest.raises(BlackBoxError, match=r"no examples left: .*empty_output"):
        run_self_instruct(ScriptedTeacher(style="empty"), out2, small_config(num_instructions=3))
    assert json.loads(read(out2 / "data_card.json"))["counts"]["examples_dropped"]["empty_output"] > 0


def test_a_directory_of_another_run_is_refused(reference_run):
    with pytest.raises(ConfigError, match=r"holds a run with another 'config.seed' \(0, now 1\)"):
        run_self_instruct(ScriptedTeacher(), reference_run, small_config(seed=1))


def test_alpaca_mode(tmp_path):
    out = tmp_path / "alpaca"
    events = []
    result = run_self_instruct(ScriptedTeacher(), out, small_config(mode="alpaca", num_instructions=10),
                               progress=lambda stage, done, total: events.append((stage, done, total)))
    assert events and all(stage == "generate_instructions" and total == 10 for stage, _, total in events)
    assert events[-1][1] >= 10
    rows = json.loads(read(out / "data.json"))
    assert len(rows) == result.counts["examples_kept"] >= 8
    assert any(r["input"] == "" for r in rows) and any(r["input"] for r in rows)
    assert not (out / CLASSIFICATIONS_FILE).exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="mode"):
        SelfInstructConfig(mode="gpt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_instructions"):
        SelfInstructConfig(num_instructions=0)


def test_instruction_calls_are_seeded_per_call_so_a_run_is_reproducible(tmp_path):
    """Sampled instructions used the process's random state (seed None): two runs of the demo wrote
    different data. Call k now samples with call_seed(seed, k); an explicit seed is kept."""
    from dataclasses import replace

    class SeedRecorder(ScriptedTeacher):
        def __init__(self):
            super().__init__()
            self.seeds = []

        def complete(self, prompts, params, n=1, logprobs=None):
            if params.temperature > 0:
                self.seeds.append(params.seed)
            return super().complete(prompts, params, n=n, logprobs=logprobs)

    teacher = SeedRecorder()
    run_self_instruct(teacher, tmp_path / "a", small_config(seed=5))
    calls = len(teacher.seeds)
    assert calls >= 2 and teacher.seeds == [call_seed(5, k) for k in range(calls)]
    assert len(set(teacher.seeds)) == calls and call_seed(6, 0) != call_seed(5, 0)
    assert all(0 <= s < 2**31 for s in teacher.seeds)
    fixed = SeedRecorder()
    config = small_config(seed=5)
    config = replace(config, instruction_params=replace(config.instruction_sampling(), seed=11))
    run_self_instruct(fixed, tmp_path / "b", config)
    assert set(fixed.seeds) == {11}
