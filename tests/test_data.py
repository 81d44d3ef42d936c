"""Tests of the data layer: tokenizers, sources, grain pipelines, TFDS build, Markov entropy."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from dlm_jax.config import DataConfig
from dlm_jax.data import build_tfds, pipeline, sources, tokenizers
from dlm_jax.data import make_dataset, make_tokenizer
from dlm_jax.data.pipeline import merge_states, stream_count

# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

TEXTS = ["hello world", "Grüße, 世界! ünïcödé", "", "tabs\tand\nnewlines\r\n", "x" * 50,
         "def f(x):\n    return x ** 2  # comment"]


def _write_gpt2_files(folder):
    """A tiny GPT-2-style encoder.json / vocab.bpe: the 256 byte tokens plus six merges."""
    b2u = tokenizers.gpt2_byte_to_unicode()
    encoder = {b2u[b]: b for b in range(256)}
    merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or"]
    for i, m in enumerate(merges):
        encoder[m.replace(" ", "")] = 256 + i
    encoder["<|endoftext|>"] = 256 + len(merges)
    with open(os.path.join(folder, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def _write_text_files(folder, n_files=6, lines_per_file=5):
    """Files with unique lines: 'file{i} line{j} ...'. Returns {relative name: content}."""
    contents = {}
    for i in range(n_files):
        lines = [f"file{i} line{j} " + "abc" * (i + j) for j in range(lines_per_file)]
        text = "\n".join(lines) + "\n"
        name = f"doc_{i}.txt"
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
        contents[name] = text
    return contents


def _all_batches(ds):
    return list(iter(ds))


def _segments(batch):
    """All (tokens of one segment) tuples in a packed batch, checking the layout on the way."""
    out = []
    for tok, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
        nseg = seg.max()
        # segments are contiguous, numbered 1..nseg from the left, padding (0) only at the end.
        nonpad = seg > 0
        assert np.all(nonpad[: nonpad.sum()]), seg
        assert np.all(np.diff(seg[nonpad]) >= 0) and np.all(np.diff(seg[nonpad]) <= 1), seg
        if nseg:
            assert seg[0] == 1
        assert np.all(pos[~nonpad] == 0)
        for s in range(1, nseg + 1):
            m = seg == s
            np.testing.assert_array_equal(pos[m], np.arange(m.sum()))
            out.append(tuple(tok[m].tolist()))
    return out


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip():
    tok = tokenizers.ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (258, 256, 257, None)
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids.dtype == np.int32 and ids.shape == (len(t.encode()),)
        assert tok.decode(ids) == t
        np.testing.assert_array_equal(tok.encode(t.encode()), ids)
    ids = np.concatenate([[tok.bos_id], tok.encode("ab"), [tok.eos_id, 258]])
    assert tok.decode(ids) == "ab\ufffd"
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>ab<|eos|>\ufffd"
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised


def test_tiktoken_bpe_from_handmade_files(tmp_path):
    tok = make_tokenizer("gpt2", _write_gpt2_files(str(tmp_path)))
    assert tok.vocab_size == 263 and tok.eos_id == tok.bos_id == 262
    ids = tok.encode("hello world")
    # "hello" → [hell, o]; " world" → [Ġwor, l, d]
    assert ids.tolist() == [258, ord("o"), 261, ord("l"), ord("d")]
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert [a.tolist() for a in tok.encode_batch(["hello", b" world"])] == [[258, 111],
                                                                           [261, 108, 100]]
    # special-token text is encoded as ordinary text; the id decodes only when asked.
    assert 262 not in tok.encode("<|endoftext|>").tolist()
    assert tok.decode([258, 262], skip_special_tokens=False) == "hell<|endoftext|>"
    assert tok.decode([258, 262]) == "hell"


def test_hf_tokenizer_json_built_in_test(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(["hello world"] * 20 + TEXTS * 5, trainer=trainer)
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    for tok in (make_tokenizer("hf", path), make_tokenizer("hf", str(tmp_path))):
        assert tok.eos_id == tok.bos_id == 0 and tok.vocab_size == hf.get_vocab_size()
        for t in TEXTS:
            assert tok.decode(tok.encode(t)) == t
        assert len(tok.encode("hello world")) < len("hello world")
        batch = tok.encode_batch(TEXTS)
        assert all(np.array_equal(a, tok.encode(t)) for a, t in zip(batch, TEXTS))
        assert tok.decode(np.concatenate([tok.encode("hi"), [tok.eos_id]])) == "hi"


def test_bert_vocab_txt(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = make_tokenizer("bert", str(tmp_path / "vocab.txt"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (9, 2, 3, 0)
    ids = tok.encode("Hello worlds!")
    assert ids.tolist() == [5, 6, 7, 8]  # lowercased, no [CLS]/[SEP] template
    assert tok.decode(np.r_[2, ids, 3]) == "hello worlds!"


def test_make_tokenizer_errors(tmp_path):
    assert isinstance(make_tokenizer("byte"), tokenizers.ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer name 'sentencepiece'"):
        make_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="encoder.json"):
        make_tokenizer("gpt2", "")
    with pytest.raises(FileNotFoundError, match="nope"):
        make_tokenizer("gpt2", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        make_tokenizer("gpt2", str(tmp_path))  # exists, but holds no files
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        make_tokenizer("hf", str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_gpt2_files(str(bad))
    (bad / "vocab.bpe").write_text("#version: 0.2\nl l\nh e\n")  # out of id order
    with pytest.raises(ValueError, match="out of merge order"):
        make_tokenizer("gpt2", str(bad))


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


def test_stdlib_split_deterministic_and_disjoint():
    keys = sources.stdlib_keys()
    assert keys == sources.stdlib_keys()
    train, val = set(keys["train"]), set(keys["validation"])
    assert train and val and not (train & val)
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05
    all_keys = train | val
    assert any(k.startswith("pydoc_data/topics.py:") for k in all_keys)
    assert "pydoc_data/topics.py" not in all_keys
    for k in all_keys:
        parts = k.split(":")[0].split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), k
    docs, dkeys = sources.stdlib_documents("validation", max_bytes=50_000, return_keys=True)
    assert sum(map(len, docs)) == 50_000 and set(dkeys) <= val
    assert docs == sources.stdlib_documents("validation", max_bytes=50_000)
    assert dkeys == keys["validation"][: len(dkeys)]


def test_tfds_presets():
    assert sources.resolve_tfds("lm1b", "validation") == ("lm1b", "test", "text")
    assert sources.resolve_tfds("lm1b", "train") == ("lm1b", "train", "text")
    assert sources.resolve_tfds("my_set", "train[:10%]", "body") == ("my_set", "train[:10%]", "body")
    with pytest.raises(ValueError, match="tfds_name"):
        sources.resolve_tfds("", "train")


def test_text_source(tmp_path):
    contents = _write_text_files(str(tmp_path))
    glob = str(tmp_path / "*.txt")
    train, tkeys = sources.text_documents(glob, "train", return_keys=True)
    val, vkeys = sources.text_documents(glob, "validation", return_keys=True)
    assert len(val) >= 1 and not set(tkeys) & set(vkeys)
    assert sorted(tkeys + vkeys) == sorted(contents)
    assert {d.decode() for d in train + val} == set(contents.values())
    lines = sources.text_documents([glob], "train", per_line=True) + sources.text_documents(
        [glob], "validation", per_line=True)
    assert sorted(d.decode() for d in lines) == sorted(
        line for t in contents.values() for line in t.splitlines())
    by_split = sources.text_documents({"train": str(tmp_path / "doc_[0-3].txt"),
                                       "validation": str(tmp_path / "doc_5.txt")}, "validation")
    assert by_split == [contents["doc_5.txt"].encode()]
    missing = str(tmp_path / "nothing*.md")
    with pytest.raises(FileNotFoundError, match="nothing\\*.md"):
        sources.text_documents(missing, "train")
    one = str(tmp_path / "doc_0.txt")
    with pytest.raises(ValueError, match="data.text_split='bytes'"):
        sources.text_documents(one, "train", split_by="documents")
    # One file trains: the last validation_fraction of its bytes is validation (auto or bytes).
    text = contents["doc_0.txt"].encode()
    for split_by in ("auto", "bytes"):
        train = sources.text_documents(one, "train", split_by=split_by, validation_fraction=0.25)
        val = sources.text_documents(one, "validation", split_by=split_by,
                                     validation_fraction=0.25)
        assert train[0] + val[0] == text and len(val[0]) == round(len(text) * 0.25)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="every matching file is empty"):
        sources.text_documents(str(tmp_path / "empty.txt"), "train")
    (tmp_path / "blob.txt").write_bytes(b"abc\0def")
    with pytest.raises(ValueError, match="blob.txt looks binary \\(a NUL byte at offset 3\\)"):
        sources.text_documents(str(tmp_path / "blob.txt"), "train")


# ------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
def test_wrap_chunks_and_eos(tmp_path, add_bos):
    _write_text_files(str(tmp_path))
    tok = tokenizers.ByteTokenizer()
    docs = sources.text_documents(str(tmp_path / "*.txt"), "train", per_line=True)
    ds = make_dataset(DataConfig(source="text", seq_len=16, paths=str(tmp_path / "*.txt"),
                                 text_per_line=True, add_bos=add_bos),
                      split="train", global_batch=1, tokenizer=tok, shuffle=False, repeat=False)
    batches = _all_batches(ds)
    assert all(set(b) == {"tokens"} and b["tokens"].shape == (1, 16) and
               b["tokens"].dtype == np.int32 for b in batches)
    stream = np.concatenate([b["tokens"][0] for b in batches])
    expected = np.concatenate([np.r_[[256] * add_bos, tok.encode(d), 257] for d in docs])
    assert len(expected) - 16 < len(stream) <= len(expected)
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    # EOS exactly at the end of every document, BOS (if asked) at every start.
    ends = np.cumsum([len(d) + 1 + add_bos for d in docs]) - 1
    assert set(np.flatnonzero(stream == 257)) == {e for e in ends if e < len(stream)}
    if add_bos:
        starts = np.r_[0, ends[:-1] + 1]
        assert set(np.flatnonzero(stream == 256)) == {s for s in starts if s < len(stream)}


def test_pack_segments_and_positions(tmp_path):
    _write_text_files(str(tmp_path), n_files=4, lines_per_file=8)
    tok = tokenizers.ByteTokenizer()
    glob = str(tmp_path / "*.txt")
    docs = sources.text_documents(glob, "train", per_line=True)
    seq_len = 24
    ds = make_dataset(DataConfig(source="text", seq_len=seq_len, paths=(glob,),
                                 text_per_line=True, mode="pack"),
                      split="train", global_batch=1, tokenizer=tok, shuffle=False, repeat=False)
    batches = _all_batches(ds)
    assert all(set(b) == {"tokens", "segment_ids", "positions"} for b in batches)
    segs = [s for b in batches for s in _segments(b)]
    expected = [tuple(p.tolist()) for d in docs
                for p in pipeline._split_long(np.r_[tok.encode(d), 257], seq_len)]
    assert sorted(segs) == sorted(expected)
    pad = np.concatenate([b["tokens"][b["segment_ids"] == 0] for b in batches])
    assert np.all(pad == tok.eos_id)
    fill = np.mean([np.mean(b["segment_ids"] > 0) for b in batches])
    assert fill > 0.8


def test_tfds_build_and_read_back(tmp_path):
    data = tmp_path / "text"
    data.mkdir()
    contents = _write_text_files(str(data), n_files=8)
    out = tmp_path / "tfds"
    assert build_tfds.main(["--input", str(data / "*.txt"), "--output", str(out), "--name",
                            "tiny_text", "--validation_fraction", "0.25"]) == 0
    import tensorflow_datasets as tfds

    srcs = tfds.data_source("tiny_text", data_dir=str(out), download=False)
    got = {split: sorted(srcs[split][i]["text"].decode() for i in range(len(srcs[split])))
           for split in ("train", "validation")}
    want = {split: sorted(d.decode() for d in sources.text_documents(
        str(data / "*.txt"), split, validation_fraction=0.25)) for split in ("train", "validation")}
    assert got == want and sorted(got["train"] + got["validation"]) == sorted(contents.values())
    builder = tfds.builder_from_directory(str(out / "tiny_text" / "1.0.0"))
    assert len(builder.as_data_source(split="train")) == len(got["train"])

    tok = tokenizers.ByteTokenizer()
    ds = make_dataset(DataConfig(source="tfds", seq_len=256, mode="pack", tfds_name="tiny_text",
                                 tfds_data_dir=str(out)),
                      split="train", global_batch=1, tokenizer=tok, shuffle=False, repeat=False)
    texts = sorted(tok.decode(s) for b in _all_batches(ds) for s in _segments(b))
    assert texts == got["train"]
    # wrap through ConcatThenSplit: the token stream is the records with EOS, in record order.
    ds = make_dataset(DataConfig(source="tfds", seq_len=32, tfds_name="tiny_text",
                                 tfds_data_dir=str(out), streams=1),
                      split="train", global_batch=2, tokenizer=tok, shuffle=False, repeat=False)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in _all_batches(ds)])
    records = [srcs["train"][i]["text"] for i in range(len(srcs["train"]))]
    expected = np.concatenate([np.r_[tok.encode(r), 257] for r in records])
    assert len(stream) > 0 and len(stream) % 64 == 0
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    with pytest.raises(FileNotFoundError, match="no_such_set"):
        make_dataset(DataConfig(source="tfds", seq_len=8, tfds_name="no_such_set",
                                tfds_data_dir=str(out)), split="train", global_batch=1)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_state")
    data = root / "text"
    data.mkdir()
    _write_text_files(str(data), n_files=5, lines_per_file=12)
    out = root / "tfds"
    build_tfds.build_text_dataset(str(data / "*.txt"), str(out), name="state_text",
                                  per_line=True)
    return str(out)


def _state_roundtrip(make, n=5, m=7):
    it = iter(make())
    for _ in range(n):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(m)]
    fresh = iter(make())
    fresh.set_state(state)
    for want in after:
        got = next(fresh)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    return state


@pytest.mark.parametrize("mode", ["wrap", "pack"])
def test_iterator_state_roundtrip_in_memory(mode):
    state = _state_roundtrip(lambda: make_dataset(
        DataConfig(source="stdlib", seq_len=64, mode=mode, max_bytes=20_000, seed=3),
        split="validation", global_batch=4))
    json.dumps(state)  # the state is plain JSON (what grain's orbax handler writes)


@pytest.mark.parametrize("mode", ["wrap", "pack"])
def test_iterator_state_roundtrip_tfds(tiny_tfds, mode):
    # small data, many epochs: the resumed stream crosses epoch boundaries and packing bins.
    _state_roundtrip(lambda: make_dataset(
        DataConfig(source="tfds", seq_len=48, mode=mode, tfds_name="state_text",
                   tfds_data_dir=tiny_tfds, seed=1, pack_bins=4),
        split="train", global_batch=3), n=9, m=12)


def test_iterator_position_in_a_checkpoint(tmp_path):
    from dlm_jax.checkpoint import Checkpointer

    def make():
        return make_dataset(DataConfig(source="markov", seq_len=32, markov_num_tokens=32 * 64,
                                       seed=5), split="train", global_batch=4)

    it = iter(make())
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, {"x": np.zeros(2, np.float32)}, it)
    ckpt.wait()
    want = [next(it)["tokens"] for _ in range(2)]
    fresh = iter(make())
    step, _ = ckpt.restore({"x": np.zeros(2, np.float32)}, fresh)
    assert step == 3
    for w in want:
        np.testing.assert_array_equal(next(fresh)["tokens"], w)
    with open(tmp_path / "ckpt" / "3" / "data" / "metadata") as f:
        assert json.load(f) == {"streams": {"all": {"next_index": 3}}}  # one global position
    # a position that does not fit the pipeline is an error, not an unreadable checkpoint.
    other = pipeline.HostBatchIterator({"0-of-2": None, "1-of-2": None})
    with pytest.raises(ValueError, match=r"saved data position has streams \['all'\]"):
        ckpt.restore({"x": np.zeros(2, np.float32)}, other)
    assert ckpt.all_steps() == [3] and not ckpt.skipped
    ckpt.close()


def _global_batches(data, hosts, n, *, state=None, **kw):
    """n global batches assembled from `hosts` pipelines (optionally starting at `state`);
    returns (batches, merged state after them)."""
    its = [iter(make_dataset(data, process_index=i, process_count=hosts, **kw))
           for i in range(hosts)]
    if state is not None:
        for it in its:
            it.set_state(state)
    out = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
           for parts in (tuple(next(it) for it in its) for _ in range(n))]
    return out, merge_states([it.get_state() for it in its])


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind", ["text-pack", "stdlib-wrap", "markov", "tfds-wrap",
                                  "tfds-pack"])
def test_global_batches_do_not_depend_on_the_host_count(kind, tmp_path, tiny_tfds):
    """1, 2 and 4 hosts see the same global batches, and a position saved on any host count
    resumes on any other at the exact next global batch."""
    if kind == "text-pack":
        _write_text_files(str(tmp_path), n_files=6, lines_per_file=6)
        data = DataConfig(source="text", seq_len=64, mode="pack", text_per_line=True,
                          paths=(str(tmp_path / "*.txt"),))
    elif kind == "stdlib-wrap":
        data = DataConfig(source="stdlib", seq_len=64, max_bytes=20_000)
    elif kind == "markov":
        data = DataConfig(source="markov", seq_len=32, markov_num_tokens=32 * 40)
    else:
        data = DataConfig(source="tfds", seq_len=48, mode=kind.split("-")[1],
                          tfds_name="state_text", tfds_data_dir=tiny_tfds, pack_bins=4)
    kw = dict(split="train", global_batch=4)
    data = dataclasses.replace(data, seed=3)
    alone, _ = _global_batches(data, 1, 10, **kw)
    for hosts in (2, 4):
        together, _ = _global_batches(data, hosts, 10, **kw)
        _assert_same_batches(together, alone)
    # save on 2 hosts after 4 batches, resume on 1 and on 4; save on 1, resume on 2.
    _, two_host_state = _global_batches(data, 2, 4, **kw)
    for hosts in (1, 4):
        rest, _ = _global_batches(data, hosts, 6, state=two_host_state, **kw)
        _assert_same_batches(rest, alone[4:])
    _, one_host_state = _global_batches(data, 1, 7, **kw)
    rest, _ = _global_batches(data, 2, 3, state=one_host_state, **kw)
    _assert_same_batches(rest, alone[7:])
    json.dumps(two_host_state)
    # rows shard batches: host i gets rows [i*B/n, (i+1)*B/n) of the same global batch.
    host_one = next(iter(make_dataset(data, process_index=1, process_count=2, **kw)))
    np.testing.assert_array_equal(host_one["tokens"], alone[0]["tokens"][2:])


def test_host_and_stream_count_errors(tiny_tfds):
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_dataset(DataConfig(source="markov", seq_len=8), split="train", global_batch=3,
                     process_count=2)
    tfds_data = DataConfig(source="tfds", seq_len=48, tfds_name="state_text",
                           tfds_data_dir=tiny_tfds)
    assert [stream_count(0, b) for b in (1, 4, 6, 12, 32, 48, 7 * 17)] == [1, 4, 6, 12, 16, 16, 7]
    with pytest.raises(ValueError, match=r"data.streams=3 must divide the batch size 4"):
        make_dataset(dataclasses.replace(tfds_data, streams=3), split="train", global_batch=4)
    with pytest.raises(ValueError, match=r"data.streams=2 .*multiple of the process count 4"):
        make_dataset(dataclasses.replace(tfds_data, streams=2), split="train", global_batch=8,
                     process_count=4)
    four = iter(make_dataset(tfds_data, split="train", global_batch=4))
    two = iter(make_dataset(tfds_data, split="train", global_batch=2))
    with pytest.raises(ValueError, match=r"saved data position has streams \['0-of-4'"):
        two.set_state(four.get_state())


def test_shuffle_and_repeat_stdlib():
    data = DataConfig(source="stdlib", seq_len=128, max_bytes=40_000)
    kw = dict(split="validation", global_batch=8)
    once = _all_batches(make_dataset(data, shuffle=False, repeat=False, **kw))
    n_rows = 40_000 // 128
    assert len(once) == n_rows // 8
    shuffled = iter(make_dataset(dataclasses.replace(data, seed=0), **kw))
    epoch1 = np.concatenate([next(shuffled)["tokens"] for _ in range(len(once))])
    rows = np.concatenate([b["tokens"] for b in once])
    assert not np.array_equal(epoch1, rows)
    # the first epoch is a permutation of the rows (39 batches of 8 = all 312 rows).
    assert sorted(r.tobytes() for r in epoch1) == sorted(r.tobytes() for r in rows)
    epoch2 = np.concatenate([next(shuffled)["tokens"] for _ in range(len(once))])
    assert not np.array_equal(epoch2, epoch1)  # reshuffled every epoch
    other_seed = next(iter(make_dataset(dataclasses.replace(data, seed=1), **kw)))["tokens"]
    assert not np.array_equal(other_seed, epoch1[:8])
    assert pipeline.dataset_vocab_size("stdlib") == 258
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        make_dataset(DataConfig(source="stdlib", seq_len=128, max_bytes=1000),
                     split="validation", global_batch=64)


def test_make_dataset_reads_data_config(tmp_path):
    _write_text_files(str(tmp_path))
    glob = str(tmp_path / "*.txt")
    kw = dict(split="train", global_batch=2, shuffle=False, repeat=False)

    def tokens(data):
        return np.concatenate([b["tokens"] for b in _all_batches(make_dataset(data, **kw))])

    base = DataConfig(source="text", seq_len=16, paths=(glob,), text_per_line=True)
    want = tokens(base)
    # a plain glob string works like a one-glob tuple; max_bytes=0 is no cap.
    np.testing.assert_array_equal(tokens(dataclasses.replace(base, paths=glob)), want)
    np.testing.assert_array_equal(tokens(dataclasses.replace(base, max_bytes=0)), want)
    np.testing.assert_array_equal(tokens(dataclasses.replace(base, max_bytes=10**9)), want)
    capped = tokens(dataclasses.replace(base, max_bytes=100))
    assert 0 < len(capped) < len(want) and np.sum(capped != 257) <= 100
    assert not np.any(tokens(dataclasses.replace(base, add_eos=False)) == 257)
    with pytest.raises(ValueError, match="source must be one of"):
        make_dataset(dataclasses.replace(base, source="web"), **kw)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_dataset(dataclasses.replace(base, mode="ragged"), **kw)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        make_dataset(dataclasses.replace(base, seq_len=0), **kw)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        make_dataset(dataclasses.replace(base, max_bytes=-1), **kw)
    with pytest.raises(ValueError, match="needs data.paths"):
        make_dataset(dataclasses.replace(base, paths=()), **kw)
    with pytest.raises(ValueError, match="split must be one of"):
        make_dataset(base, **{**kw, "split": "test"})


def test_to_global():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch = next(iter(make_dataset(DataConfig(source="markov", seq_len=16, mode="pack",
                                              markov_num_tokens=16 * 32),
                                   split="train", global_batch=8)))
    out = pipeline.to_global(batch, NamedSharding(mesh, P("data")))
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(out[k]), v)


# ------------------------------------------------------------------------------------------
# Markov source
# ------------------------------------------------------------------------------------------


def _h(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_markov_entropy_rate_hand_computed():
    a, b = 0.1, 0.3
    chain = sources.MarkovChain(np.array([[1 - a, a], [b, 1 - b]]), order=1)
    np.testing.assert_allclose(chain.stationary(), [b / (a + b), a / (a + b)], atol=1e-12)
    np.testing.assert_allclose(chain.stationary("power"), chain.stationary("solve"), atol=1e-10)
    want = b / (a + b) * _h([a, 1 - a]) + a / (a + b) * _h([b, 1 - b])
    assert chain.entropy_rate() == pytest.approx(want, abs=1e-12)
    # order 2 over {0,1} where x_t = x_{t-2} xor noise(0.2): π uniform, rate H(0.2).
    rows = np.array([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]])  # state = 2 x_{t-2} + x_{t-1}
    chain2 = sources.MarkovChain(rows, order=2)
    np.testing.assert_allclose(chain2.stationary(), np.full(4, 0.25), atol=1e-12)
    assert chain2.entropy_rate() == pytest.approx(_h([0.2, 0.8]), abs=1e-12)


def test_markov_entropy_rate_monte_carlo():
    chain = pipeline.markov_chain(markov_vocab=8, markov_order=2, markov_seed=0)
    np.testing.assert_allclose(chain.stationary("power"), chain.stationary("solve"), atol=1e-10)
    rate = chain.entropy_rate()
    assert 0.2 * math.log(8) < rate < 0.8 * math.log(8)
    seqs = chain.sample(64, 4096, seed=1)
    assert seqs.dtype == np.int32 and seqs.min() >= 0 and seqs.max() < 8
    nll = -chain.log_prob(seqs).mean()
    assert nll == pytest.approx(rate, rel=0.03)
    # whole short segments: mean −log p(x_1..x_L) equals the exact segment entropy.
    short = chain.sample(20000, 6, seed=2)
    pi = chain.stationary()
    first = pi[short[:, 0] * 8 + short[:, 1]]
    seg_nll = -(np.log(first) + chain.log_prob(short).sum(1)).mean()
    assert seg_nll == pytest.approx(chain.sequence_entropy(6), rel=0.03)
    # the pipeline serves exactly these rows (train and validation differ).
    ds = make_dataset(DataConfig(source="markov", seq_len=64, markov_vocab=8, markov_order=2,
                                 markov_num_tokens=64 * 16),
                      split="train", global_batch=4, shuffle=False, repeat=False,
                      tokenizer=tokenizers.ByteTokenizer())
    rows = np.concatenate([b["tokens"] for b in _all_batches(ds)])
    assert rows.shape == (16, 64) and rows.max() < 8
    val = next(iter(make_dataset(DataConfig(source="markov", seq_len=64, markov_vocab=8,
                                            markov_num_tokens=64 * 16),
                                 split="validation", global_batch=4, shuffle=False)))["tokens"]
    assert not np.array_equal(val, rows[:4])
    assert pipeline.dataset_vocab_size("markov", markov_vocab=8) == 8
