"""grain input pipelines: documents → fixed-length token sequences → host-local numpy batches.

Two layouts (``mode``):

* ``"wrap"`` (BD3-LM/MDLM "wrap"): each document is tokenized, EOS is appended (and BOS
  prepended with ``add_bos``), everything is concatenated and cut into ``seq_len`` chunks; the
  last partial chunk is dropped. Output ``{"tokens": int32 (B, L)}``.
* ``"pack"``: documents (cut into pieces of at most ``seq_len``) are packed first-fit into rows
  padded with ``pad_id`` (``tokenizer.pad_id`` or else ``eos_id``). Output ``{"tokens",
  "segment_ids", "positions"}``, int32 (B, L): ``segment_ids`` is 0 on padding and 1, 2, ... for
  the pieces in a row; ``positions`` counts from 0 within each piece (0 on padding).

Two ways to get there:

* in memory (``stdlib``, ``text``, ``markov``, ``ordinal``): the documents are tokenized once up
  front (in numpy; the byte tokenizer is a ``frombuffer``), laid out as an (N, L) array, then
  served by ``MapDataset.source(rows).shuffle(seed).repeat().batch(B)`` — fast to start (about
  a second for a few MB) and cheap per step.
* streaming (``tfds``): for each of ``data.streams`` record streams,
  ``MapDataset.source(array_record)[k::streams].shuffle(seed_k).repeat()`` → per-record
  tokenization on reader threads → ``ConcatThenSplitIterDataset`` (wrap) or
  ``FirstFitPackIterDataset`` (pack) → ``batch(B // streams)``.

Either way the result is a :class:`HostBatches`; ``iter(ds)`` is a checkpointable iterator
(``get_state()``/``set_state()``, plain JSON) that resumes at the exact next batch.

All settings come from the data config section (:class:`dlm_jax.config.DataConfig`):
``make_dataset(cfg.data, split=..., global_batch=..., tokenizer=...)``.

Multi-host: the global batches are a function of the data config, the seed and the global
batch size alone, never of the number of hosts. Every host calls :func:`make_dataset` with its
``process_index``/``process_count`` and gets its ``global_batch // process_count`` consecutive
rows of each global batch; :func:`to_global` assembles the global ``jax.Array``. In-memory sources
lay out all the data on every host (they are small) and slice each global batch. TFDS splits its
records into ``data.streams`` fixed streams (record ``k::streams``), each shuffled, tokenized and
packed on its own and contributing ``global_batch // streams`` rows to every batch; each host
runs only its own streams, so hosts share the tokenization work. With ``repeat=False`` TFDS
streams can run out at different batches on different hosts: multi-host evaluation should use
``repeat=True`` and a fixed number of steps (as the trainer's does).

The iterator position is ``{"streams": {name: grain state}}``; the states of all hosts merged
(:func:`merge_states`) are one global position, which a pipeline on any number of hosts accepts
(``set_state`` takes the streams it runs). This is what the trainer checkpoints, so a run
resumes at the exact next global batch on another host count.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

import grain

from dlm_jax.config import DataConfig
from dlm_jax.data import sources as sources_lib
from dlm_jax.data.tokenizers import ByteTokenizer, Tokenizer, encode_documents

__all__ = [
    "SOURCES",
    "MODES",
    "make_dataset",
    "dataset_vocab_size",
    "markov_chain",
    "TOKEN_SOURCES",
    "wrap_documents",
    "pack_documents",
    "to_global",
    "merge_states",
    "stream_count",
    "HostBatches",
]

SOURCES = ("stdlib", "text", "tfds", "markov", "ordinal")
# Synthetic in-memory sources that yield token ids directly: no tokenizer, no EOS/BOS, their own
# vocabulary size (`dataset_vocab_size`).
TOKEN_SOURCES = ("markov", "ordinal")
MODES = ("wrap", "pack")


def _derive_seed(*parts: Any) -> int:
    """A 32-bit seed from any printable parts (stable across runs and machines)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(h, "big")


# --------------------------------------------------------------------------------------------
# Layout in numpy (in-memory sources).
# --------------------------------------------------------------------------------------------


def _with_specials(doc: np.ndarray, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    parts = []
    if bos_id is not None:
        parts.append(np.array([bos_id], np.int32))
    parts.append(np.asarray(doc, np.int32))
    if eos_id is not None:
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def wrap_documents(docs: Sequence[np.ndarray], seq_len: int, *, bos_id: int | None = None,
                   eos_id: int | None = None) -> np.ndarray:
    """Concatenate ``[bos] doc [eos]`` for all docs and cut into rows.

    Args:
      docs: token arrays, shapes (n_i,).
      seq_len: row length L.
      bos_id / eos_id: prepended / appended to every document when not None.
    Returns:
      int32 array (N, L) with N = total_tokens // L (the remainder is dropped).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pieces = [_with_specials(d, bos_id, eos_id) for d in docs]
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    n = stream.shape[0] // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int32, copy=False)


def _split_long(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    return [tokens[i: i + seq_len] for i in range(0, len(tokens), seq_len)]


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, *, bos_id: int | None = None,
                   eos_id: int | None = None, pad_id: int = 0,
                   max_open_rows: int = 64) -> dict[str, np.ndarray]:
    """First-fit packing of documents into padded rows with segment ids and positions.

    Each ``[bos] doc [eos]`` is cut into pieces of at most L tokens; full-length pieces become
    rows of their own, shorter ones go into the first of (at most ``max_open_rows``) open rows
    with room, in document order (when too many rows are open the oldest is closed).

    Args:
      docs: token arrays, shapes (n_i,).
      seq_len: row length L.
      bos_id / eos_id: added around every document when not None.
      pad_id: token written on padding.
      max_open_rows: rows kept open for first-fit.
    Returns:
      ``{"tokens", "segment_ids", "positions"}``, int32 arrays of shape (N, L); segment ids are
      1.. per piece and 0 on padding, positions restart at 0 for every piece.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows: list[list[np.ndarray]] = []
    open_rows: list[list[np.ndarray]] = []
    free: list[int] = []
    for doc in docs:
        for piece in _split_long(_with_specials(doc, bos_id, eos_id), seq_len):
            n = len(piece)
            if n == 0:
                continue
            if n == seq_len:
                rows.append([piece])
                continue
            for j, room in enumerate(free):
                if room >= n:
                    open_rows[j].append(piece)
                    free[j] -= n
                    if free[j] == 0:
                        rows.append(open_rows.pop(j))
                        free.pop(j)
                    break
            else:
                open_rows.append([piece])
                free.append(seq_len - n)
                if len(open_rows) > max_open_rows:
                    rows.append(open_rows.pop(0))
                    free.pop(0)
    rows.extend(open_rows)
    n_rows = len(rows)
    tokens = np.full((n_rows, seq_len), pad_id, np.int32)
    segment_ids = np.zeros((n_rows, seq_len), np.int32)
    positions = np.zeros((n_rows, seq_len), np.int32)
    for r, pieces in enumerate(rows):
        start = 0
        for s, piece in enumerate(pieces, start=1):
            end = start + len(piece)
            tokens[r, start:end] = piece
            segment_ids[r, start:end] = s
            positions[r, start:end] = np.arange(len(piece), dtype=np.int32)
            start = end
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


class _RowSource:
    """Random-access grain source over a dict of equally long arrays; item i = {k: a[k][i]}."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._arrays = dict(arrays)
        lengths = {len(a) for a in self._arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays must have the same length, got {lengths}")
        self._len = lengths.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: a[index] for k, a in self._arrays.items()}

    def __repr__(self) -> str:
        return f"_RowSource(n={self._len}, keys={sorted(self._arrays)})"


# --------------------------------------------------------------------------------------------
# Streaming transforms (TFDS).
# --------------------------------------------------------------------------------------------


class _EncodeRecord(grain.transforms.Map):
    """record[text_key] (bytes) → {"tokens": int32 [bos] ids [eos]}."""

    def __init__(self, tokenizer: Tokenizer, text_key: str, bos_id, eos_id):
        self._tok, self._key, self._bos, self._eos = tokenizer, text_key, bos_id, eos_id

    def map(self, record):
        text = record[self._key]
        if isinstance(text, np.ndarray):
            text = text.item() if text.ndim == 0 else text.tobytes()
        return {"tokens": _with_specials(self._tok.encode(text), self._bos, self._eos)}


class _SplitLong(grain.experimental.FlatMapTransform):
    """{"tokens": (n,)} → pieces of at most seq_len tokens (n = 0 gives none)."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len
        self.max_fan_out = 1 << 30  # not used by FlatMapIterDataset

    def flat_map(self, element):
        return [{"tokens": p} for p in _split_long(element["tokens"], self._seq_len)]


def _wrap_output(element):
    return {"tokens": element["tokens"].astype(np.int32)}


def _is_full(element) -> bool:
    return bool(element["tokens_segment_ids"][-1] != 0)


def _pack_output(element):
    return {"tokens": element["tokens"].astype(np.int32),
            "segment_ids": element["tokens_segment_ids"].astype(np.int32),
            "positions": element["tokens_positions"].astype(np.int32)}


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------


def markov_chain(markov_vocab: int = 16, markov_order: int = 2, markov_seed: int = 0,
                 markov_concentration: float = 0.1) -> sources_lib.MarkovChain:
    """The chain behind ``source="markov"`` (for its exact ``entropy_rate()`` in nats/token)."""
    return sources_lib.MarkovChain.random(markov_vocab, markov_order, markov_seed,
                                          concentration=markov_concentration)


def dataset_vocab_size(source: str, tokenizer: Tokenizer | None = None, *,
                       markov_vocab: int = 16, ordinal_levels: int = 32) -> int:
    """Number of token ids the data can contain: ``markov_vocab``, ``ordinal_levels`` or
    ``tokenizer.vocab_size``."""
    if source == "markov":
        return int(markov_vocab)
    if source == "ordinal":
        return int(ordinal_levels)
    if tokenizer is None:
        tokenizer = ByteTokenizer()
    return int(tokenizer.vocab_size)


def _token_rows(data: DataConfig, split: str) -> np.ndarray:
    """(N, seq_len) int32 rows of a `TOKEN_SOURCES` source for `split` (a seed per split)."""
    seq_len = data.seq_len
    if data.source == "ordinal":
        return sources_lib.ordinal_sequences(
            data.ordinal_num_tokens // seq_len, seq_len, levels=data.ordinal_levels,
            seed=_derive_seed("ordinal", data.seed, split), components=data.ordinal_components,
            noise=data.ordinal_noise)
    chain = markov_chain(data.markov_vocab, data.markov_order, data.markov_seed,
                         data.markov_concentration)
    return chain.sample(data.markov_num_tokens // seq_len, seq_len,
                        _derive_seed("markov", data.markov_seed, split))


def _documents(source: str, split: str, *, paths, max_bytes, text_per_line,
               validation_fraction, split_by) -> list[bytes]:
    if source == "stdlib":
        docs = sources_lib.stdlib_documents(split, max_bytes=max_bytes,
                                            validation_fraction=validation_fraction)
    else:
        if not paths:
            raise ValueError("source='text' needs data.paths (a glob, a tuple of globs, or "
                             "{'train': ..., 'validation': ...})")
        docs = sources_lib.text_documents(paths, split, per_line=text_per_line,
                                          validation_fraction=validation_fraction,
                                          max_bytes=max_bytes, split_by=split_by)
    if not docs:
        raise ValueError(f"source={source!r} split={split!r} has no documents")
    return docs


def _tokenize_all(tokenizer: Tokenizer, docs: list[bytes]) -> list[np.ndarray]:
    if type(tokenizer) is ByteTokenizer:  # noqa: E721 - exact fast path only
        return [np.frombuffer(d, np.uint8).astype(np.int32) for d in docs]
    return encode_documents(tokenizer, docs)


def make_dataset(data: DataConfig, *, split: str, global_batch: int,
                 tokenizer: Tokenizer | None = None, shuffle: bool = True, repeat: bool = True,
                 process_index: int = 0, process_count: int = 1) -> "HostBatches":
    """Build the host-local input pipeline for one split of the data config section.

    What is read and how it is laid out comes from the fields of ``data`` (a
    :class:`dlm_jax.config.DataConfig`):

    * ``source``: "stdlib" (CPython's standard library, no download), "text" (local files,
      ``paths``), "tfds" (prepared array_record dataset ``tfds_name`` under ``tfds_data_dir``,
      text feature ``text_key``; preset "lm1b" maps validation → test), "markov" (synthetic
      chain, no tokenizer) or "ordinal" (synthetic quantised waveforms, no tokenizer).
    * ``seq_len`` (L, tokens per row), ``mode`` ("wrap": concatenate and chunk; "pack":
      first-fit packing with segment ids), ``seed`` (shuffle seed; per-epoch reshuffling is
      derived from it), ``pack_bins`` (packing bins for streaming "pack" mode), ``streams``
      (TFDS record streams, see :func:`stream_count`).
    * "text": ``paths`` (a glob, a tuple/list of globs or ``{"train": ..., "validation": ...}``,
      see :func:`sources.text_documents`) and ``text_per_line`` (one document per line instead
      of per file); "stdlib"/"text": ``max_bytes`` (cap on the bytes read;
      0 = no cap) and ``validation_fraction`` (share of documents in validation).
    * ``add_bos`` / ``add_eos``: put ``tokenizer.bos_id`` before / ``eos_id`` after every
      document.
    * "markov": ``markov_order`` / ``markov_vocab`` / ``markov_seed`` /
      ``markov_concentration`` (the chain, see :func:`markov_chain`) and ``markov_num_tokens``
      (tokens generated for this split).
    * "ordinal": ``ordinal_levels`` (the vocabulary: token k is the value k),
      ``ordinal_components`` / ``ordinal_noise`` (see :func:`sources.ordinal_sequences`) and
      ``ordinal_num_tokens`` (tokens generated for this split), all drawn from ``seed``.
    * ``num_threads`` / ``prefetch``: reader threads and prefetch buffer (``grain.ReadOptions``);
      threads, not processes, as grain worker processes are slower on small CPUs.

    The ``tokenizer`` / ``tokenizer_path`` fields are not read here: build the tokenizer with
    :func:`~dlm_jax.data.tokenizers.make_tokenizer` and pass it in.

    Args:
      data: the data config section.
      split: "train" or "validation" (any TFDS split string for "tfds").
      global_batch: rows per step over all hosts; each host yields ``global_batch //
        process_count`` (must divide).
      tokenizer: a :class:`~dlm_jax.data.tokenizers.Tokenizer`; None = byte tokenizer. Ignored
        by "markov" and "ordinal".
      shuffle / repeat: shuffle rows (records for TFDS); repeat forever (False = one pass).
      process_index / process_count: this host and the number of hosts; host i gets rows
        ``[i * B/n, (i + 1) * B/n)`` of every global batch, which do not depend on n.
    Returns:
      a :class:`HostBatches`; iterating gives dicts of int32 numpy arrays of shape
      (global_batch // process_count, data.seq_len): ``{"tokens"}`` for wrap, ``{"tokens",
      "segment_ids", "positions"}`` for pack (segment ids 1.. per piece and 0 on padding,
      positions restarting at 0 for every piece). ``iter(ds)`` supports
      ``get_state``/``set_state``.
    Raises:
      ValueError: an unknown source / mode / split, ``seq_len < 1``, a negative ``max_bytes``,
        a bad ``process_index``/``process_count``, a ``global_batch`` that is not a positive
        multiple of ``process_count``, ``source="text"`` without ``paths``, a ``data.streams``
        that does not fit the batch and host count, or too little data for one batch.
    """
    source, mode, seq_len = data.source, data.mode, data.seq_len
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
    if mode not in MODES:
        raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
    if source != "tfds" and split not in sources_lib.SPLITS:
        raise ValueError(f"split must be one of {sources_lib.SPLITS} for source={source!r}, "
                         f"got {split!r}")
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    max_bytes = data.max_bytes or None  # 0 (or None) in the config: no cap
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"data.max_bytes must be >= 0 (0: no cap), got {data.max_bytes}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                         f"{process_index}, process_count={process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                         f"process_count={process_count}")
    local_batch = global_batch // process_count
    seed = int(data.seed) % 2**32
    if tokenizer is None:
        tokenizer = ByteTokenizer()
    bos_id = tokenizer.bos_id if data.add_bos else None
    eos_id = tokenizer.eos_id if data.add_eos else None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    read_options = grain.ReadOptions(num_threads=data.num_threads,
                                     prefetch_buffer_size=data.prefetch)

    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    if source == "tfds":
        streams = stream_count(data.streams, global_batch, process_count)
        mine = range(process_index * streams // process_count,
                     (process_index + 1) * streams // process_count)
        threads = max(1, -(-data.num_threads // len(mine)))
        stream_options = grain.ReadOptions(num_threads=threads,
                                           prefetch_buffer_size=data.prefetch)
        return HostBatches({f"{k}-of-{streams}": _record_stream(
            tfds_name=data.tfds_name, tfds_data_dir=data.tfds_data_dir, split=split,
            text_key=data.text_key, tokenizer=tokenizer, mode=mode, seq_len=seq_len,
            batch=global_batch // streams, seed=seed, shuffle=shuffle, repeat=repeat,
            stream=k, streams=streams, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
            pack_bins=data.pack_bins, read_options=stream_options) for k in mine})

    if source in TOKEN_SOURCES:
        tokens = _token_rows(data, split)
        arrays = {"tokens": tokens}
        if mode == "pack":
            arrays["segment_ids"] = np.ones_like(tokens)
            arrays["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                  tokens.shape).copy()
    else:
        docs = _documents(source, split, paths=data.paths, max_bytes=max_bytes,
                          split_by=data.text_split, text_per_line=data.text_per_line,
                          validation_fraction=data.validation_fraction)
        token_docs = _tokenize_all(tokenizer, docs)
        if mode == "wrap":
            arrays = {"tokens": wrap_documents(token_docs, seq_len, bos_id=bos_id, eos_id=eos_id)}
        else:
            arrays = pack_documents(token_docs, seq_len, bos_id=bos_id, eos_id=eos_id,
                                    pad_id=pad_id)
    num_rows = len(arrays["tokens"])
    if num_rows < global_batch:
        raise ValueError(
            f"source={source!r} split={split!r} has {num_rows} sequences of seq_len={seq_len}, "
            f"fewer than one batch of {global_batch}; raise max_bytes / markov_num_tokens / "
            f"ordinal_num_tokens or lower seq_len / the batch size")
    ds = grain.MapDataset.source(_RowSource(arrays))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.batch(global_batch, drop_remainder=True)
    if process_count > 1:
        ds = ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    # One stream, the same on every host: each host keeps its rows of every global batch.
    return HostBatches({"all": ds.to_iter_dataset(read_options)})


def stream_count(streams: int, global_batch: int, process_count: int = 1) -> int:
    """The number of TFDS record streams: ``streams``, or for 0 the largest divisor of
    ``global_batch`` up to 16 (a function of the batch alone, so the data order does not depend
    on the host count). It must divide ``global_batch`` and be a multiple of ``process_count``.
    """
    if streams < 0:
        raise ValueError(f"data.streams must be >= 0 (0: automatic), got {streams}")
    n = streams or max(d for d in range(1, min(16, global_batch) + 1) if global_batch % d == 0)
    if global_batch % n or n % process_count:
        raise ValueError(
            f"data.streams={n}{' (automatic)' if not streams else ''} must divide the batch "
            f"size {global_batch} and be a multiple of the process count {process_count}; set "
            f"data.streams to a multiple of every host count the run will use")
    return n


def _record_stream(*, tfds_name, tfds_data_dir, split, text_key, tokenizer, mode, seq_len, batch,
                   seed, shuffle, repeat, stream, streams, bos_id, eos_id, pad_id, pack_bins,
                   read_options) -> grain.IterDataset:
    """Records ``stream::streams`` → shuffled, tokenized, wrapped or packed rows in batches."""
    src, key = sources_lib.tfds_source(tfds_name, split, tfds_data_dir, text_key=text_key)
    if len(src) < streams:
        raise ValueError(f"TFDS {tfds_name!r} split {split!r} has {len(src)} records, fewer than "
                         f"data.streams={streams}")
    stream_seed = _derive_seed("stream", seed, stream) if streams > 1 else seed
    ds = grain.MapDataset.source(src)[stream::streams]
    if shuffle:
        ds = ds.shuffle(seed=stream_seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(_EncodeRecord(tokenizer, key, bos_id, eos_id))
    it = ds.to_iter_dataset(read_options)
    length = {"tokens": seq_len}
    if mode == "wrap":
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=length)
        it = it.filter(_is_full).map(_wrap_output)
    else:
        it = grain.experimental.FlatMapIterDataset(it, _SplitLong(seq_len))
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=length, num_packing_bins=pack_bins, seed=stream_seed,
            shuffle_bins=shuffle, padding_struct={"tokens": pad_id})
        it = it.map(_pack_output)
    return it.batch(batch, drop_remainder=True)


class HostBatches:
    """This host's rows of every global batch, drawn from named grain streams.

    Iterating concatenates one batch of each stream (in name order as given); ``iter()`` gives a
    :class:`HostBatchIterator`, whose position is ``{"streams": {name: grain state}}``.
    """

    def __init__(self, streams: Mapping[str, grain.IterDataset]):
        self.streams = dict(streams)

    def __iter__(self) -> "HostBatchIterator":
        return HostBatchIterator({k: iter(ds) for k, ds in self.streams.items()})


class HostBatchIterator:
    """Checkpointable iterator over :class:`HostBatches` (``get_state``/``set_state``)."""

    def __init__(self, iterators: Mapping[str, Any]):
        self._its = dict(iterators)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._its.values()]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        """This host's position: ``{"streams": {name: state}}`` (plain JSON)."""
        return {"streams": {k: it.get_state() for k, it in self._its.items()}}

    def set_state(self, state: Mapping) -> None:
        """Move to ``state``: this host's or a merged global position (any host count)."""
        saved = state.get("streams", {}) if isinstance(state, Mapping) else {}
        missing = sorted(set(self._its) - set(saved))
        if missing:
            raise ValueError(
                f"the saved data position has streams {sorted(saved)}, this pipeline reads "
                f"{sorted(self._its)} (data.streams, data.source or the batch size changed?)")
        for k, it in self._its.items():
            it.set_state(saved[k])


def merge_states(states: Sequence[Mapping]) -> dict:
    """One global data position from every host's ``get_state()`` (hosts hold disjoint streams,
    or the same one at the same position)."""
    merged: dict = {}
    for state in states:
        for k, v in state["streams"].items():
            if merged.setdefault(k, v) != v:
                raise ValueError(f"hosts disagree on the position of data stream {k!r}: "
                                 f"{merged[k]} vs {v}")
    return {"streams": merged}


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local numpy batch → global ``jax.Array`` s.

    Args:
      batch: dict of arrays of shape (B_local, ...) from this host's iterator.
      sharding: a ``jax.sharding.Sharding`` for the global (B_local * process_count, ...) arrays,
        typically ``NamedSharding(mesh, P(("data", "fsdp")))``.
    Returns:
      dict of global ``jax.Array`` s built with ``jax.make_array_from_process_local_data``.
    """
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
