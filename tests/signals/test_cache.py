"""Teacher-signal cache: round trip against the teacher, alignment, resume, manifest and shard checks."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdistill.errors import ConfigError, DataError
from kdistill.signals.cache import (
    _topk,
    hash_examples,
    hash_model,
    hash_tokenizer,
    open_cache,
    write_cache,
)
from kdistill.signals.encoding import error_bound

VOCAB = 97  # not a power of two
K = 16


@pytest.fixture(scope="module")
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"example_id": 100 + 7 * i, "input_ids": ids, "attention_mask": [1] * length,
                    "labels": ids})
    return out


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return _examples(18)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher, tokenizer, examples):
    path = tmp_path_factory.mktemp("cache") / "c"
    write_cache(path, teacher, tokenizer, examples, k=K, temperature=2.0, batch_size=3, shard_size=5,
                hidden_layers=[0, -1], manifest_fields={"recipe": "test"})
    return path


def _direct(teacher, ex, temperature) -> torch.Tensor:
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
    return (logits / temperature).log_softmax(-1)


# ------------------------------------------------------------------------------------------------


def test_round_trip_matches_teacher_topk(cache_dir, teacher, tokenizer, examples):
    cache = open_cache(cache_dir, expect={"teacher_sha256": hash_model(teacher), "tokenizer_sha256": hash_tokenizer(tokenizer),
                                          "data_sha256": hash_examples(examples), "k": K, "temperature": 2.0})
    m = cache.manifest
    assert m.complete and m.n_examples == 18 and len(m.shards) == 4 and m.vocab_size == VOCAB
    assert m.n_tokens == sum(len(ex["input_ids"]) for ex in examples) and m.extra == {"recipe": "test"}
    assert m.hidden_layers == [0, 2] and cache.temperature == 2.0
    for ex in examples:
        n = len(ex["input_ids"])
        t = cache.targets(torch.tensor([ex["example_id"]]), n)
        assert t.ids.shape == (1, n, K) and t.temperature == 2.0
        logp = _direct(teacher, ex, 2.0)
        vals, ids = logp.topk(K, -1)
        got_ids, got = t.ids[0], t.logprobs[0].double()
        # ids: the teacher's top-k (a near-tie may swap neighbours: compare values at the ids too)
        assert (got_ids == ids).float().mean() > 0.95
        assert torch.allclose(logp.gather(-1, got_ids), vals, atol=1e-5)
        bound = error_bound(vals, K, VOCAB) + 1e-4
        assert ((got - logp.gather(-1, got_ids)).abs() <= bound).all()


def _check_against_teacher(cache_dir, teacher, examples, k, temperature, vocab):
    cache = open_cache(cache_dir)
    for ex in examples:
        n = len(ex["input_ids"])
        t = cache.targets(torch.tensor([ex["example_id"]]), n)
        logp = _direct(teacher, ex, temperature)
        vals, ids = logp.topk(k, -1)
        assert torch.equal(t.ids[0], ids)
        bound = error_bound(vals, k, vocab) + 1e-4
        assert ((t.logprobs[0].double() - vals).abs() <= bound).all()


def test_soft_capped_head(tmp_path, examples):
    """Gemma 3: the cache applies the head's soft-cap (cap 5 bounds the logits) as the model does."""
    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              final_logit_softcapping=5.0, sliding_window=8)
    gemma = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        gemma.lm_head.weight.mul_(30.0)  # logits well past the cap
    write_cache(tmp_path / "c", gemma, None, examples[:4], k=8, temperature=0.7)
    _check_against_teacher(tmp_path / "c", gemma, examples[:4], 8, 0.7, VOCAB)


def test_extreme_logits_keep_exact_ids(tmp_path, teacher, examples):
    """Top-k probabilities below fp32's range (p < 1e-30) come from the log-softmax: ids stay exact."""
    sharp = LlamaForCausalLM(teacher.config).eval()
    sharp.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        sharp.lm_head.weight.mul_(300.0)
    write_cache(tmp_path / "c", sharp, None, examples[:3], k=6)
    assert (_direct(sharp, examples[0], 1.0).topk(6, -1).values[:, -1] < math.log(1e-30)).any()  # it occurs
    _check_against_teacher(tmp_path / "c", sharp, examples[:3], 6, 1.0, VOCAB)


def test_alignment_with_shuffled_order_and_padding(cache_dir, examples):
    cache = open_cache(cache_dir)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(1))[:7]
    batch = [examples[i] for i in order]
    seq_len = max(len(ex["input_ids"]) for ex in batch) + 3
    t = cache.targets(torch.tensor([ex["example_id"] for ex in batch]), seq_len)
    assert t.ids.shape == (7, seq_len, K)
    for b, ex in enumerate(batch):
        n = len(ex["input_ids"])
        alone = cache.targets(torch.tensor([ex["example_id"]]), n)
        assert torch.equal(t.ids[b, :n], alone.ids[0]) and torch.equal(t.logprobs[b, :n], alone.logprobs[0])
        assert (t.ids[b, n:] == -1).all() and torch.isneginf(t.logprobs[b, n:]).all()
    hidden = cache.hidden(torch.tensor([batch[0]["example_id"]]), seq_len, 2)
    assert hidden.dtype == torch.float16 and (hidden[0, len(batch[0]["input_ids"]):] == 0).all()


def test_masked_positions_have_no_rows(tmp_path, teacher, tokenizer):
    ex = {"example_id": 5, "input_ids": [4, 5, 6, 7, 8], "attention_mask": [0, 0, 1, 1, 1]}
    m = write_cache(tmp_path / "c", teacher, tokenizer, [ex], k=4)
    assert m.n_tokens == 3
    t = open_cache(tmp_path / "c").targets(torch.tensor([5]), 6)
    assert (t.ids[0, :2] == -1).all() and (t.ids[0, 2:5] >= 0).all() and (t.ids[0, 5] == -1).all()
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([ex["input_ids"]]), attention_mask=torch.tensor([ex["attention_mask"]])).logits
    assert torch.equal(t.ids[0, 2:5, 0], logits[0, 2:].argmax(-1))


def test_hidden_states_match_the_teacher(cache_dir, teacher, examples):
    cache = open_cache(cache_dir)
    ex = examples[3]
    with torch.no_grad():
        states = teacher(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True).hidden_states
    for layer in (0, 2):
        got = cache.hidden(torch.tensor([ex["example_id"]]), len(ex["input_ids"]), layer)[0].float()
        assert torch.allclose(got, states[layer][0], atol=2e-3, rtol=2e-3)
    with pytest.raises(ConfigError, match="hidden layer 1 not cached"):
        cache.hidden(torch.tensor([ex["example_id"]]), 12, 1)


def test_resume_after_interruption_equals_uninterrupted(tmp_path, teacher, tokenizer, examples):
    kwargs = dict(k=K, batch_size=2, shard_size=4, sampled=8, hidden_layers=[1])
    full = write_cache(tmp_path / "full", teacher, tokenizer, examples, **kwargs)

    def stop_after_two_shards(done: int, total: int) -> None:
        if done > 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "part", teacher, tokenizer, examples, progress=stop_after_two_shards, **kwargs)
    part = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert [s["file"] for s in part["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(DataError, match="incomplete"):
        open_cache(tmp_path / "part")
    (tmp_path / "part" / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # a crash mid-write
    calls = []
    resumed = write_cache(tmp_path / "part", teacher, tokenizer, examples,
                          progress=lambda d, t: calls.append(d), **kwargs)
    assert calls[0] == 8 and calls[-1] == 18
    assert resumed.shards == full.shards  # same files, same sha256
    for shard in full.shards:
        assert (tmp_path / "part" / shard["file"]).read_bytes() == (tmp_path / "full" / shard["file"]).read_bytes()
    assert not list((tmp_path / "part").glob("*.tmp"))
    cache = open_cache(tmp_path / "part")
    assert len(cache) == 18 and sorted(cache._ids.tolist()) == sorted(ex["example_id"] for ex in examples)
    # rerunning a complete cache does nothing
    again = write_cache(tmp_path / "part", teacher, tokenizer, examples, **kwargs)
    assert again.shards == full.shards


def test_manifest_mismatch_names_the_field(cache_dir, teacher, tokenizer, examples):
    with pytest.raises(ConfigError, match=r"tokenizer differs from the recipe's \(manifest tokenizer_sha256 [0-9a-f]{12}…, expected 000000000000…\)"):
        open_cache(cache_dir, expect={"tokenizer_sha256": "0" * 64})
    with pytest.raises(ConfigError, match="data differs .*data_sha256"):
        open_cache(cache_dir, expect={"data_sha256": hash_examples(examples[:-1])})
    with pytest.raises(ConfigError, match="manifest k 16, expected 8"):
        open_cache(cache_dir, expect={"k": 8})
    with pytest.raises(ConfigError, match="temperature"):
        open_cache(cache_dir, expect={"temperature": 1.0})
    with pytest.raises(ConfigError, match="'colour' is not a cache manifest field"):
        open_cache(cache_dir, expect={"colour": 1})
    other = LlamaForCausalLM(teacher.config)
    with pytest.raises(ConfigError, match="hash of the teacher's weights differs from this run's"):
        write_cache(cache_dir, other, tokenizer, examples, k=K, temperature=2.0, shard_size=5, hidden_layers=[0, -1])


def test_corrupt_and_truncated_shards_name_the_file(tmp_path, cache_dir):
    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    shard = bad / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: sha256"):
        open_cache(bad)
    lazy = open_cache(bad, verify=False)  # size unchanged: found when the shard is read
    ids = torch.tensor([json.loads((bad / "manifest.json").read_text())["shards"][1]["min_example_id"]])
    with pytest.raises(DataError, match=r"shard-00001\.safetensors"):
        lazy.targets(ids, 12)
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: \d+ bytes, manifest says"):
        open_cache(bad, verify=False)
    (bad / "shard-00001.safetensors").unlink()
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: missing"):
        open_cache(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        open_cache(bad)
    with pytest.raises(DataError, match="no manifest.json"):
        open_cache(tmp_path / "nowhere")


def test_bad_settings(tmp_path, teacher, tokenizer, examples, cache_dir):
    with pytest.raises(ConfigError, match="k: 98 exceeds the teacher's vocabulary size 97"):
        write_cache(tmp_path / "c", teacher, tokenizer, examples, k=VOCAB + 1)
    with pytest.raises(ConfigError, match="temperature"):
        write_cache(tmp_path / "c", teacher, tokenizer, examples, temperature=0.0)
    with pytest.raises(ConfigError, match="hidden_layers: 3 is out of range"):
        write_cache(tmp_path / "c", teacher, tokenizer, examples, hidden_layers=[3])
    with pytest.raises(DataError, match="example_id 100 appears twice"):
        write_cache(tmp_path / "c", teacher, tokenizer, examples + examples[:1])
    cache = open_cache(cache_dir)
    with pytest.raises(DataError, match="example_id 5 is not in the cache"):
        cache.targets(torch.tensor([100, 5]), 12)
    with pytest.raises(ConfigError, match="no sampled targets"):
        cache.sampled(torch.tensor([100]), 12)


def test_k_equal_to_vocab_is_the_full_distribution(tmp_path, teacher, tokenizer, examples):
    write_cache(tmp_path / "c", teacher, tokenizer, examples[:2], k=VOCAB)
    ex = examples[0]
    t = open_cache(tmp_path / "c").targets(torch.tensor([ex["example_id"]]), len(ex["input_ids"]))
    logp = _direct(teacher, ex, 1.0)
    assert torch.allclose(t.logprobs[0].double().exp().sum(-1), torch.ones(len(ex["input_ids"]), dtype=torch.float64), atol=1e-6)
    assert ((t.logprobs[0].double() - logp.gather(-1, t.ids[0])).abs() <= error_bound(logp.sort(-1, descending=True).values, VOCAB, VOCAB) + 1e-4).all()


def test_sampled_targets_follow_the_teacher(tmp_path, teacher, tokenizer, examples):
    s, temperature = 20_000, 1.5
    write_cache(tmp_path / "c", teacher, tokenizer, examples[:2], k=4, temperature=temperature, sampled=s, seed=3)
    cache = open_cache(tmp_path / "c")
    ex = examples[1]
    n = len(ex["input_ids"])
    t = cache.sampled(torch.tensor([ex["example_id"]]), n + 2)
    assert t.ids.shape == (1, n + 2, s) and t.temperature == temperature
    used = t.ids[0, :n] >= 0
    counts = torch.where(used, t.logprobs[0, :n].double().exp() * s, torch.zeros(())).round()
    assert torch.equal(counts.sum(-1), torch.full((n,), float(s), dtype=torch.float64))  # Σ counts = s
    assert (t.ids[0, n:] == -1).all()
    p = _direct(teacher, ex, temperature).exp()  # (n, V)
    freq = torch.zeros_like(p).scatter_add_(-1, t.ids[0, :n].clamp(min=0), counts / s)
    tolerance = 5 * (p * (1 - p) / s).sqrt() + 2e-4  # 5σ of a binomial frequency
    assert ((freq - p).abs() <= tolerance).all()
    # distinct ids per row, and reproducible from (seed, example_id)
    rows = t.ids[0, :n]
    for row in rows:
        kept = row[row >= 0]
        assert kept.unique().numel() == kept.numel()
    write_cache(tmp_path / "d", teacher, tokenizer, examples[1:2], k=4, temperature=temperature, sampled=s, seed=3)
    again = open_cache(tmp_path / "d").sampled(torch.tensor([ex["example_id"]]), n + 2)
    # same draws in another batch, up to a rare flip where the forward's last bits differ
    again_counts = torch.zeros_like(p).scatter_add_(-1, again.ids[0, :n].clamp(min=0),
                                                    torch.where(again.ids[0, :n] >= 0, again.logprobs[0, :n].double().exp() * s, 0.0).round())
    assert (again_counts - freq * s).abs().sum(-1).max() <= 4


def test_hashes_are_stable_and_discriminating(teacher, tokenizer, examples):
    assert hash_examples(examples) == hash_examples(list(reversed(examples)))  # keyed by example id, not order
    changed = [dict(ex) for ex in examples]
    changed[0] = {**changed[0], "input_ids": changed[0]["input_ids"][:-1] + [changed[0]["input_ids"][-1] + 1]}
    assert hash_examples(changed) != hash_examples(examples)
    h = hash_model(teacher)
    assert len(h) == 64 and hash_model(copy.deepcopy(teacher)) == h  # the weights' content, not the object
    assert hash_model(LlamaForCausalLM(teacher.config)) != h
    t = copy.deepcopy(tokenizer)
    assert hash_tokenizer(t) == hash_tokenizer(tokenizer)
    t("a sentence long enough to be cut", truncation=True, max_length=3)  # leaves truncation state behind
    assert t.backend_tokenizer.truncation is not None and hash_tokenizer(t) == hash_tokenizer(tokenizer)
    t.add_tokens(["<a-new-token>"])
    assert hash_tokenizer(t) != hash_tokenizer(tokenizer)


@pytest.mark.parametrize("vocab", [97, 1024, 4096, 262_144])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_block_topk_equals_topk(vocab, k):
    if k > vocab:
        pytest.skip("k > V")
    z = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab + k))
    z[0, : min(vocab, 300)] = 9.0  # ties across blocks
    values, ids = _topk(z, k)
    assert torch.equal(values, z.topk(k, -1).values)
    assert torch.equal(z.gather(1, ids), values) and (ids[0].unique().numel() == k)
    assert torch.equal(ids[1:], z[1:].topk(k, -1).indices)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(k="16"), r"field 'k' should be int, got '16'"),
    (lambda m: m.update(temperature=None), r"field 'temperature' should be float, got None"),
    (lambda m: m.update(hidden_layers=[0, "-1"]), r"field 'hidden_layers' should be list\[int\], got \[0, '-1'\]"),
    (lambda m: m.update(shards={"file": "x"}), r"field 'shards' should be list\[dict\]"),
    (lambda m: m["shards"][1].update(n_examples="5"), r"shards\[1\]\.n_examples should be int, got '5'"),
    (lambda m: m["shards"][0].pop("file"), r"shards\[0\]\.file should be str, got None"),
])
def test_hand_edited_manifest_of_the_wrong_type_is_named(tmp_path, cache_dir, edit, message):
    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"^{bad / 'manifest.json'}: {message}"):
        open_cache(bad)


WIDE = 4160  # > 2 head blocks, = 65 sub-blocks of 64: the streamed head path (the last block 64 wide)


def _wide_writer(temperature: float, softcap: float | None, scale: float, bias: bool):
    """A ``_ShardWriter`` over a random (WIDE, 24) head with the given transforms."""
    from kdistill.losses.chunked import LMHead
    from kdistill.signals.cache import _ShardWriter

    g = torch.Generator().manual_seed(3)
    config = LlamaConfig(vocab_size=WIDE, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    writer = _ShardWriter(LlamaForCausalLM(config).eval(), k=K, temperature=temperature, batch_size=4, sampled=0,
                          seed=0, hidden_layers=[], pad_id=0, chunk_rows=64, on_batch=lambda n: None)
    b = torch.randn(WIDE, generator=g) if bias else None
    if b is not None:
        b[64:192] = -math.inf  # two whole sub-blocks the head never predicts
    writer.head = LMHead(torch.randn(WIDE, 24, generator=g), b, scale, softcap)
    return writer


@pytest.mark.parametrize(("temperature", "softcap", "scale", "bias"),
                         [(1.0, None, 1.0, False), (2.0, None, 0.5, True), (0.7, 5.0, 3.0, False)])
def test_streamed_head_matches_the_full_softmax(temperature, softcap, scale, bias):
    """On a CPU with an fp32 head over > 2 blocks, the writer takes top-k and tail mass block by
    block: the same top-k, log p and log tail as an fp64 log-softmax over the whole vocabulary, also for
    peaked rows whose tail is far below fp32's resolution of 1 and for −inf logits."""
    writer = _wide_writer(temperature, softcap, scale, bias)
    hidden = torch.randn(40, 24, generator=torch.Generator().manual_seed(4))
    hidden[:4] *= 8.0  # peaked rows
    assert writer._streams(hidden)
    ids, vals, log_tail = writer._top_streamed(hidden)
    head = writer.head
    z = hidden.double() @ head.weight.double().t() + (0 if head.bias is None else head.bias.double())
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = (z / temperature).log_softmax(-1)
    want_vals, want_ids = logp.topk(K, -1)
    torch.testing.assert_close(vals.double(), want_vals, atol=1e-5, rtol=1e-5)
    # the ids hold those values (among near-ties at a soft-cap fp32 and fp64 may order them apart)
    torch.testing.assert_close(logp.gather(-1, ids), want_vals, atol=1e-5, rtol=1e-5)
    assert all(row.unique().numel() == K for row in ids)
    want_tail = logp.scatter(-1, want_ids, -math.inf).logsumexp(-1)
    torch.testing.assert_close(log_tail, want_tail, atol=1e-4, rtol=1e-5)
    if softcap is None and scale == 1.0:  # tails far below fp32's resolution of 1: no cancellation
        assert (want_tail[:4] < math.log(1e-8)).all()
    if bias:
        assert not ((ids >= 64) & (ids < 192)).any()
    # the softmax path over the whole (n, V) buffer gives the same
    old_ids, old_vals, probs = writer._top(hidden)
    old_tail = probs.scatter_(-1, old_ids, 0.0).sum(-1).double().log()
    torch.testing.assert_close(old_vals, vals, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(old_tail, log_tail, atol=1e-4, rtol=1e-5)


def test_streamed_cache_round_trip(tmp_path, examples):
    """A cache written by the streamed path decodes to the teacher's top-k, as the softmax path's."""
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=WIDE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    wide = LlamaForCausalLM(config).eval()
    write_cache(tmp_path / "c", wide, None, examples[:5], k=K, temperature=1.5)
    _check_against_teacher(tmp_path / "c", wide, examples[:5], K, 1.5, WIDE)
