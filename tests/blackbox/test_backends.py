"""LocalTeacher against direct forward passes, SamplingParams checks, and ReplayTeacher record/replay."""

from __future__ import annotations

import threading

import pytest
import torch

from kdistill.blackbox import (
    BlackBoxError,
    BudgetExhausted,
    Completion,
    LocalTeacher,
    ReplayTeacher,
    SamplingParams,
    TextTeacher,
)
from kdistill.errors import ConfigError, DataError

GREEDY = SamplingParams(max_tokens=6, temperature=0)


def _direct_logprobs(teacher: LocalTeacher, prompt: str, tokens: list[str], temperature: float = 1.0) -> torch.Tensor:
    """(L, V) log_softmax(logits / T) at the generated positions, from one unpadded forward pass."""
    tok = teacher.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    gen_ids = tok.convert_tokens_to_ids([t.strip() for t in tokens])
    with torch.no_grad():
        logits = teacher.model(torch.tensor([prompt_ids + gen_ids])).logits[0]
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(gen_ids)]
    return torch.log_softmax(rows / temperature, -1), torch.tensor(gen_ids)


def test_token_logprobs_and_top_k_match_a_forward_pass(prompts, local_teacher):
    results = local_teacher.complete(prompts, GREEDY, n=2, logprobs=4)
    assert isinstance(local_teacher, TextTeacher)
    assert len(results) == len(prompts) and all(len(samples) == 2 for samples in results)
    for prompt, samples in zip(prompts, results):
        c = samples[0]
        assert c.text == "".join(c.tokens) and len(c.tokens) == len(c.token_logprobs) == len(c.top_logprobs)
        logp, ids = _direct_logprobs(local_teacher, prompt, c.tokens)
        torch.testing.assert_close(torch.tensor(c.token_logprobs), logp[torch.arange(len(ids)), ids],
                                   atol=1e-4, rtol=0)
        top_values = logp.topk(4, -1).values
        for i, alternatives in enumerate(c.top_logprobs):
            values = list(alternatives.values())
            assert values == sorted(values, reverse=True) and len(values) == 4
            torch.testing.assert_close(torch.tensor(values), top_values[i], atol=1e-4, rtol=0)
            if c.token_logprobs[i] >= values[-1]:
                assert alternatives[c.tokens[i]] == pytest.approx(c.token_logprobs[i])
        assert samples[1].text == c.text  # greedy: the n samples agree


def test_left_padding_gives_the_unbatched_greedy_output(prompts, local_teacher, tiny_lm_dir):
    single = LocalTeacher(str(tiny_lm_dir), batch_size=1)
    batched = local_teacher.complete(prompts, GREEDY)
    alone = single.complete(prompts, GREEDY)
    for b, a in zip(batched, alone):
        assert b[0].text == a[0].text and b[0].tokens == a[0].tokens
        assert b[0].token_logprobs == pytest.approx(a[0].token_logprobs, abs=1e-4)


def test_seeded_sampling_is_reproducible_and_logprobs_are_tempered(prompts, local_teacher):
    params = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=3)
    first = local_teacher.complete(prompts[:2], params, n=3)
    torch.manual_seed(123)  # the global RNG does not matter with a seed, and is left as it was
    state = torch.get_rng_state()
    again = local_teacher.complete(prompts[:2], params, n=3)
    assert torch.equal(state, torch.get_rng_state())
    assert [[c.text for c in s] for s in first] == [[c.text for c in s] for s in again]
    other = local_teacher.complete(prompts[:2], SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=4), n=3)
    assert [[c.text for c in s] for s in first] != [[c.text for c in s] for s in other]
    c = first[0][1]
    logp, ids = _direct_logprobs(local_teacher, prompts[0], c.tokens, temperature=0.7)
    assert c.token_logprobs == pytest.approx(logp[torch.arange(len(ids)), ids].tolist(), abs=1e-4)


def test_stop_strings_cut_text_and_tokens(prompts, local_teacher):
    (full,), = local_teacher.complete(prompts[:1], GREEDY)
    stop = full.tokens[2]  # the third token's text
    cut = full.text.index(stop)
    (c,), = local_teacher.complete(prompts[:1], SamplingParams(max_tokens=6, temperature=0, stop=(stop, "zzz")))
    assert c.text == full.text[:cut] and c.finish_reason == "stop"
    assert c.tokens == full.tokens[: len(c.tokens)] and "".join(c.tokens) == c.text
    assert full.finish_reason == "length"


def test_chat_uses_the_template_or_plain_lines(local_teacher):
    messages = [{"role": "user", "content": "hello"}]
    assert local_teacher.chat_prompt(messages) == "user hello assistant"
    (chat,), = local_teacher.complete_chat([messages], GREEDY)
    (plain,), = local_teacher.complete(["user hello assistant"], GREEDY)
    assert chat.text == plain.text
    bare = LocalTeacher(local_teacher.model, local_teacher.tokenizer, name="bare")
    bare.tokenizer.chat_template = None
    assert bare.chat_prompt(messages) == "user: hello\nassistant:"


def test_bad_arguments_raise_one_line_errors(local_teacher):
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="n must"):
        local_teacher.complete(["a"], GREEDY, n=0)
    with pytest.raises(BlackBoxError, match="prompt 1 has .* 64 positions"):
        local_teacher.complete(["the", "the " * 60], SamplingParams(max_tokens=8))
    assert SamplingParams(stop=["x"]).stop == ("x",)


# ---- replay ------------------------------------------------------------------------------------


class _Counting:
    """A TextTeacher wrapper counting the prompts it is asked."""

    def __init__(self, inner: TextTeacher) -> None:
        self.inner, self.name, self.asked = inner, inner.name, []
        self._lock = threading.Lock()

    def complete(self, prompts, params, n=1, logprobs=None):
        with self._lock:
            self.asked.extend(prompts)
        return self.inner.complete(prompts, params, n=n, logprobs=logprobs)


def _as_dicts(results: list[list[Completion]]) -> list[list[dict]]:
    return [[c.to_dict() for c in samples] for samples in results]


def test_record_then_replay_offline(prompts, local_teacher, tmp_path):
    path = tmp_path / "teacher.sqlite"
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    with ReplayTeacher(local_teacher, path, mode="record") as recorder:
        recorded = recorder.complete(prompts, params, n=2, logprobs=3)
        assert len(recorder) == len(prompts)
    with ReplayTeacher(None, path, mode="replay") as replay:  # no inner teacher: the name comes from the file
        assert replay.name == local_teacher.name
        assert _as_dicts(replay.complete(prompts, params, n=2, logprobs=3)) == _as_dicts(recorded)
        assert _as_dicts(replay.complete(prompts[2:3], params, n=2, logprobs=3)) == _as_dicts(recorded[2:3])
        with pytest.raises(BlackBoxError, match=r"replay miss .*'a new prompt that was never recorded by '"):
            replay.complete(["a new prompt that was never recorded by the teacher"], params, n=2, logprobs=3)
        with pytest.raises(BlackBoxError, match="replay miss"):  # other parameters are another request
            replay.complete(prompts[:1], params, n=1, logprobs=3)


def test_auto_asks_only_for_misses_and_is_thread_safe(prompts, local_teacher, tmp_path):
    counting = _Counting(local_teacher)
    replay = ReplayTeacher(counting, tmp_path / "auto.sqlite")
    first = replay.complete(prompts[:2], GREEDY)
    assert counting.asked == prompts[:2]
    both = replay.complete(prompts[:3] + prompts[2:3], GREEDY)  # one miss, asked once
    assert counting.asked == prompts[:3]
    assert _as_dicts(both[:2]) == _as_dicts(first) and _as_dicts(both[2:3]) == _as_dicts(both[3:4])

    outputs, errors = [], []

    def worker(i: int) -> None:
        try:
            outputs.append(_as_dicts(replay.complete(prompts, GREEDY)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(o == outputs[0] for o in outputs)
    assert len(replay) == len(prompts)
    replay.close()


def test_partial_results_of_the_inner_teacher_are_kept(prompts, local_teacher, tmp_path):
    class Limited:
        name = "limited"

        def complete(self, prompts, params, n=1, logprobs=None):
            done = local_teacher.complete(prompts[:1], params, n=n, logprobs=logprobs)
            raise BudgetExhausted("request budget exhausted", partial=done + [None] * (len(prompts) - 1))

    path = tmp_path / "partial.sqlite"
    replay = ReplayTeacher(Limited(), path)
    with pytest.raises(BudgetExhausted) as info:
        replay.complete(prompts[:3], GREEDY)
    assert [p is not None for p in info.value.partial] == [True, False, False]
    replay.close()
    (again,), = ReplayTeacher(None, path, mode="replay").complete(prompts[:1], GREEDY)
    assert again.to_dict() == info.value.partial[0][0].to_dict()


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["replay", "auto"])
def test_a_file_that_is_not_a_recording_is_refused_unchanged(tmp_path, local_teacher, mode):
    import sqlite3

    inner = None if mode == "replay" else local_teacher
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("create table people (name text)")
    other_records = tmp_path / "other-records.sqlite"
    with sqlite3.connect(other_records) as db:
        db.execute("create table records (id integer, body text)")
    cases = [(text, "not SQLite"), (other, r"its tables: people"),
             (other_records, r"its records table has columns id, body")]
    for path, message in cases:
        before = _digest(path)
        with pytest.raises(DataError, match=rf"^replay file {path} is not a kdistill recording \({message}"):
            ReplayTeacher(inner, path, mode=mode)
        assert _digest(path) == before and not path.with_name(path.name + "-wal").exists()
    with pytest.raises(DataError, match=f"replay file {tmp_path} is a folder, not a recording"):
        ReplayTeacher(inner, tmp_path, mode=mode)


def test_replaying_never_writes_and_an_empty_file_is_nothing_to_replay(prompts, local_teacher, tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"replay file {empty} is empty: nothing to replay"):
        ReplayTeacher(None, empty, mode="replay")
    assert empty.read_bytes() == b""
    ReplayTeacher(local_teacher, empty).close()  # auto: an empty file becomes a new recording
    path = tmp_path / "teacher.sqlite"
    with ReplayTeacher(local_teacher, path, mode="record") as recorder:
        recorder.complete(prompts[:1], GREEDY)
    before = _digest(path)
    with ReplayTeacher(None, path, mode="replay") as replay:
        replay.complete(prompts[:1], GREEDY)
    assert _digest(path) == before


def test_no_padding_advice_for_an_unpadded_prompt_starting_with_the_pad_token(tiny_lm_dir):
    """transformers drops generate's all-ones mask, then a model whose pad id is its bos/eos id warns
    "pass an attention_mask" when a prompt starts with that id: kdistill passed the mask."""
    import logging

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model.config.pad_token_id = model.config.bos_token_id  # as GPT-2 checkpoints that set a pad token
    teacher = LocalTeacher(model, LocalTeacher(str(tiny_lm_dir)).tokenizer, name="pad-is-bos")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_root = logging.getLogger("transformers")
    hf_root.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # a warning shown once in this process would hide it
    try:
        out = teacher.complete(["<eos> the movie was"], GREEDY)
    finally:
        hf_root.removeHandler(handler)
    assert out[0][0].tokens
    assert not [m for m in seen if "attention_mask" in m]
