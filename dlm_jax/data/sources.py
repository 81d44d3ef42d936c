"""Document sources: the embedded CPython corpus, local text files, TFDS, a synthetic Markov chain
and synthetic ordinal (quantised waveform) sequences.

All sources are deterministic: the same arguments give the same documents in the same order on
any machine with the same files. Text sources return documents as ``bytes``; the Markov and
ordinal sources return token arrays directly.

Train/validation splits of file-based sources are decided by a stable hash (BLAKE2b) of a
document key (a relative path, or ``path:line``), so adding or removing one file never moves
another file across the split.
"""

from __future__ import annotations

import ast
import dataclasses
import glob as glob_lib
import hashlib
import os
import sysconfig
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "SPLITS",
    "stable_unit_hash",
    "assign_split",
    "stdlib_root",
    "stdlib_documents",
    "text_documents",
    "expand_globs",
    "TFDS_PRESETS",
    "resolve_tfds",
    "tfds_source",
    "MarkovChain",
    "ordinal_sequences",
]

SPLITS = ("train", "validation")
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                            "__pycache__"})
_TOPICS = os.path.join("pydoc_data", "topics.py")


def _check_split(split: str, arg: str = "split") -> None:
    if split not in SPLITS:
        raise ValueError(f"{arg} must be one of {SPLITS}, got {split!r}")


def stable_unit_hash(key: str) -> float:
    """Map a string to [0, 1) with BLAKE2b (stable across runs, machines and Python versions)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(keys: Sequence[str], validation_fraction: float) -> np.ndarray:
    """Boolean mask (len(keys),), True = validation, from ``stable_unit_hash(key) < fraction``.

    With two or more keys both splits get at least one: if no key falls under the fraction the
    key with the smallest hash goes to validation; if all do, the largest stays in train.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    h = np.array([stable_unit_hash(k) for k in keys], dtype=np.float64)
    is_val = h < validation_fraction
    if len(keys) >= 2:
        if not is_val.any():
            is_val[np.argmin(h)] = True
        if is_val.all():
            is_val[np.argmax(h)] = False
    return is_val


def _cap(docs: list[bytes], max_bytes: int | None) -> list[bytes]:
    """Keep documents in order until ``max_bytes`` in total; the last one is cut at the cap."""
    if max_bytes is None:
        return docs
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    out, total = [], 0
    for d in docs:
        if total + len(d) >= max_bytes:
            out.append(d[: max_bytes - total])
            break
        out.append(d)
        total += len(d)
    return [d for d in out if d]


# --------------------------------------------------------------------------------------------
# (1) The embedded corpus: CPython's standard library.
# --------------------------------------------------------------------------------------------


def stdlib_root() -> str:
    """Directory of this interpreter's standard library (``sysconfig.get_paths()['stdlib']``)."""
    root = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the standard library directory {root!r} does not exist")
    return root


def _stdlib_files(root: str) -> list[str]:
    """Sorted relative paths of the stdlib ``.py`` files, without test dirs and site-packages."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(rels)


def _pydoc_topics(root: str) -> dict[str, str]:
    """The documentation strings of ``pydoc_data/topics.py`` ({topic: text}); {} if absent."""
    path = os.path.join(root, _TOPICS)
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "topics"):
            value = ast.literal_eval(node.value)
            return {str(k): str(v) for k, v in sorted(value.items())}
    return {}


def stdlib_keys(validation_fraction: float = 0.02) -> dict[str, list[str]]:
    """Document keys per split, in document order (see :func:`stdlib_documents`).

    Keys are ``relative/path.py`` for source files and ``pydoc_data/topics.py:<topic>`` for the
    documentation topics. Returns ``{"train": [...], "validation": [...]}``.
    """
    root = stdlib_root()
    keys = [k for k in _stdlib_files(root) if k != _TOPICS.replace(os.sep, "/")]
    keys += [f"pydoc_data/topics.py:{t}" for t in _pydoc_topics(root)]
    if not keys:
        raise FileNotFoundError(f"no standard-library .py files found under {root!r}")
    is_val = assign_split(keys, validation_fraction)
    # Document order: by hash, so that a ``max_bytes`` prefix is a mixed sample of the library.
    order = sorted(range(len(keys)), key=lambda i: (stable_unit_hash("order:" + keys[i]), keys[i]))
    return {"train": [keys[i] for i in order if not is_val[i]],
            "validation": [keys[i] for i in order if is_val[i]]}


def stdlib_documents(split: str = "train", *, max_bytes: int | None = None,
                     validation_fraction: float = 0.02, return_keys: bool = False):
    """The embedded default corpus: CPython's standard-library sources and pydoc topics.

    ``.py`` files under ``sysconfig.get_paths()['stdlib']`` (without ``test``, ``tests``,
    ``idle_test`` and ``site-packages`` directories), plus each documentation topic of
    ``pydoc_data/topics.py`` as its own document. About ``validation_fraction`` of the documents
    (at least one) form the validation split, chosen by a stable hash of their key.

    Args:
      split: "train" or "validation".
      max_bytes: cap on the total bytes returned for this split (documents are taken in a fixed
        hash order, the last one cut at the cap); None = everything (~12 MB on CPython 3.11).
      validation_fraction: share of documents in validation.
      return_keys: also return the document keys.
    Returns:
      list of documents (bytes), or ``(docs, keys)`` with ``return_keys``.
    """
    _check_split(split)
    root = stdlib_root()
    keys = stdlib_keys(validation_fraction)[split]
    topics = None
    docs, out_keys, total = [], [], 0
    for key in keys:
        if key.startswith("pydoc_data/topics.py:"):
            if topics is None:
                topics = _pydoc_topics(root)
            doc = topics[key.split(":", 1)[1]].encode("utf-8")
        else:
            with open(os.path.join(root, key), "rb") as f:
                doc = f.read()
        if not doc:
            continue
        docs.append(doc)
        out_keys.append(key)
        total += len(doc)
        if max_bytes is not None and total >= max_bytes:
            break
    docs = _cap(docs, max_bytes)
    out_keys = out_keys[: len(docs)]
    return (docs, out_keys) if return_keys else docs


# --------------------------------------------------------------------------------------------
# (2) Local text files.
# --------------------------------------------------------------------------------------------


def expand_globs(patterns: str | Sequence[str], arg: str = "paths") -> list[str]:
    """Sorted, de-duplicated regular files matching the glob(s) (``**`` recurses).

    Raises FileNotFoundError naming the glob when one matches no file.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    if not patterns:
        raise ValueError(f"{arg} is empty: give at least one file or glob")
    files = set()
    for pat in patterns:
        pat = os.path.expanduser(pat)
        matches = [m for m in glob_lib.glob(pat, recursive=True) if os.path.isfile(m)]
        if not matches and os.path.isdir(pat):
            matches = [m for m in glob_lib.glob(os.path.join(pat, "**", "*"), recursive=True)
                       if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{arg}: the glob {pat!r} matches no file")
        files.update(os.path.abspath(m) for m in matches)
    return sorted(files)


def _file_keys(files: list[str]) -> list[str]:
    if len(files) == 1:
        return [os.path.basename(files[0])]
    common = os.path.commonpath(files)
    return [os.path.relpath(f, common).replace(os.sep, "/") for f in files]


def _read_docs(files: list[str], per_line: bool) -> tuple[list[bytes], list[str]]:
    docs, keys = [], []
    for f, key in zip(files, _file_keys(files)):
        with open(f, "rb") as fh:
            data = fh.read()
        nul = data.find(b"\0", 0, 1 << 16)
        if nul >= 0:
            raise ValueError(f"{f} looks binary (a NUL byte at offset {nul}); "
                             f"data.source='text' reads text files")
        if per_line:
            for i, line in enumerate(data.split(b"\n")):
                line = line.rstrip(b"\r")
                if line.strip():
                    docs.append(line)
                    keys.append(f"{key}:{i}")
        elif data:
            docs.append(data)
            keys.append(key)
    return docs, keys


SPLIT_BY = ("auto", "documents", "bytes")


def _byte_split(docs: list[bytes], keys: list[str], split: str, fraction: float
                ) -> tuple[list[bytes], list[str]]:
    """The last `fraction` of every document's bytes is validation, the rest train."""
    out_docs, out_keys = [], []
    for d, k in zip(docs, keys):
        cut = len(d) - max(1, int(round(len(d) * fraction)))
        part = d[cut:] if split == "validation" else d[:cut]
        if part:
            out_docs.append(part)
            out_keys.append(f"{k}[{split}]")
    return out_docs, out_keys


def text_documents(paths: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                   split: str = "train", *, per_line: bool = False,
                   validation_fraction: float = 0.02, max_bytes: int | None = None,
                   return_keys: bool = False, split_by: str = "auto"):
    """Documents from local text files.

    Args:
      paths: a glob or list of globs (files are split into train/validation by a stable hash of
        their path relative to the files' common directory, or of ``path:line`` with
        ``per_line``), or a mapping ``{"train": globs, "validation": globs}`` giving each split
        its own files (no hashing).
      split: "train" or "validation".
      per_line: one document per non-empty line instead of one per file.
      validation_fraction: share of documents (or of each document's bytes) in validation.
      split_by: "documents" (by the stable hash of each document's key; needs ≥ 2 documents),
        "bytes" (the last `validation_fraction` of every document's bytes is validation: one
        file trains), or "auto" (documents when there are at least 2, else bytes).
      max_bytes: cap on the total bytes returned (in file order, the last doc cut at the cap).
      return_keys: also return the document keys.
    Returns:
      list of documents (bytes), or ``(docs, keys)``.
    """
    _check_split(split)
    if isinstance(paths, Mapping):
        unknown = set(paths) - set(SPLITS)
        if unknown:
            raise ValueError(f"paths: unknown split names {sorted(unknown)}; use {SPLITS}")
        if split not in paths:
            raise ValueError(f"paths has no entry for split {split!r} (it has {sorted(paths)})")
        docs, keys = _read_docs(expand_globs(paths[split], f"data.paths[{split!r}]"), per_line)
    else:
        if split_by not in SPLIT_BY:
            raise ValueError(f"data.text_split={split_by!r} is not allowed; choose one of "
                             f"{list(SPLIT_BY)}")
        files = expand_globs(paths, "data.paths")
        docs, keys = _read_docs(files, per_line)
        if not docs:
            raise ValueError(f"data.paths {paths!r}: every matching file is empty "
                             f"({len(files)} file(s))")
        if split_by == "bytes" or (split_by == "auto" and len(docs) < 2):
            docs, keys = _byte_split(docs, keys, split, validation_fraction)
        else:
            if len(docs) < 2:
                raise ValueError(
                    f"data.paths {paths!r} gave {len(docs)} document(s); a split by documents "
                    f"needs at least 2: set data.text_split='bytes' (or 'auto'), "
                    f"data.text_per_line=True, or data.paths={{'train': …, 'validation': …}}")
            is_val = assign_split(keys, validation_fraction)
            want = split == "validation"
            docs = [d for d, v in zip(docs, is_val) if v == want]
            keys = [k for k, v in zip(keys, is_val) if v == want]
    if not docs:
        raise ValueError(f"data.paths {paths!r}: split {split!r} has no non-empty documents")
    docs = _cap(docs, max_bytes)
    keys = keys[: len(docs)]
    return (docs, keys) if return_keys else docs


# --------------------------------------------------------------------------------------------
# (3) TFDS (array_record through tfds.data_source; no TensorFlow needed).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfdsPreset:
    name: str
    text_key: str = "text"
    splits: Mapping[str, str] = dataclasses.field(default_factory=dict)


# lm1b has train/test only; the published numbers use `test` as the validation set.
TFDS_PRESETS: dict[str, TfdsPreset] = {
    "lm1b": TfdsPreset("lm1b", "text", {"train": "train", "validation": "test"}),
}


def resolve_tfds(name: str, split: str, text_key: str = "") -> tuple[str, str, str]:
    """(tfds name, tfds split, text key) after applying :data:`TFDS_PRESETS`.

    Non-preset datasets keep ``split`` as given (any TFDS split string such as ``"train[:1%]"``).
    """
    if not name:
        raise ValueError("tfds_name is empty: name the TFDS dataset (e.g. 'lm1b')")
    preset = TFDS_PRESETS.get(name)
    if preset is None:
        return name, split, text_key or "text"
    return preset.name, preset.splits.get(split, split), text_key or preset.text_key


def tfds_source(name: str, split: str, data_dir: str = "", *, text_key: str = ""):
    """A random-access TFDS data source (array_record) and its text key.

    Uses ``tfds.data_source(name, split=..., data_dir=..., download=False)``, which needs no
    TensorFlow. The dataset must already be prepared under ``data_dir`` (``build_tfds`` writes one
    from local files; a real lm1b must be prepared elsewhere and copied, as nothing downloads).

    Returns:
      ``(source, text_key)``: ``source[i]`` is a dict whose ``text_key`` entry is bytes;
      ``len(source)`` records.
    """
    import tensorflow_datasets as tfds

    tname, tsplit, key = resolve_tfds(name, split, text_key)
    if data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data.tfds_data_dir {data_dir!r} does not exist (prepare the "
                                f"dataset there first, e.g. python -m dlm_jax.data.build_tfds)")
    try:
        src = tfds.data_source(tname, split=tsplit, data_dir=data_dir or None, download=False)
    except Exception as e:  # noqa: BLE001 - re-raised with what was asked for
        raise FileNotFoundError(
            f"cannot open TFDS dataset {tname!r} split {tsplit!r} under data_dir "
            f"{data_dir or '(default ~/tensorflow_datasets)'!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} The dataset must be prepared there as "
            f"array_record (e.g. python -m dlm_jax.data.build_tfds)."
        ) from e
    if len(src) == 0:
        raise ValueError(f"TFDS dataset {tname!r} split {tsplit!r} is empty")
    first = src[0]
    if key not in first:
        raise KeyError(f"TFDS dataset {tname!r} has no feature {key!r} (text_key); features: "
                       f"{sorted(first)}")
    return src, key


# --------------------------------------------------------------------------------------------
# (4) A synthetic source of known entropy rate.
# --------------------------------------------------------------------------------------------


def _entropy_nats(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


class MarkovChain:
    """A stationary Markov chain of order k over tokens {0, ..., V-1}.

    The state is the last k tokens, ``s = x_{t-k} V^{k-1} + ... + x_{t-1}``; ``transition[s, y]``
    = p(x_t = y | state s), shape (V^k, V). :meth:`random` draws each row from a Dirichlet with a
    small concentration (peaked rows, entropy rate well below log V) mixed with a small uniform
    floor (so the chain is irreducible and mixes fast).
    """

    def __init__(self, transition: np.ndarray, order: int):
        transition = np.asarray(transition, dtype=np.float64)
        if order < 1:
            raise ValueError(f"markov order must be >= 1, got {order}")
        if transition.ndim != 2:
            raise ValueError(f"transition must be 2-D (V^k, V), got shape {transition.shape}")
        vocab = transition.shape[1]
        if transition.shape[0] != vocab**order:
            raise ValueError(f"transition has {transition.shape[0]} rows; order {order} over "
                             f"{vocab} tokens needs {vocab ** order}")
        if (transition < 0).any() or not np.allclose(transition.sum(1), 1.0, atol=1e-9):
            raise ValueError("transition rows must be probability vectors")
        self.transition = transition / transition.sum(1, keepdims=True)
        self.order = order
        self.vocab = vocab
        self.num_states = vocab**order
        self._stationary: np.ndarray | None = None

    @classmethod
    def random(cls, vocab: int = 16, order: int = 2, seed: int = 0, concentration: float = 0.1,
               floor: float = 0.02) -> "MarkovChain":
        """A random chain: rows ~ (1 - floor)·Dirichlet(concentration) + floor/V."""
        if vocab < 2:
            raise ValueError(f"markov_vocab must be >= 2, got {vocab}")
        if vocab**order > 2**20:
            raise ValueError(f"markov_vocab**markov_order = {vocab ** order} states is too many "
                             f"(limit 2**20)")
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {floor}")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), vocab, order, 1729]))
        rows = rng.dirichlet(np.full(vocab, concentration), size=vocab**order)
        rows = (1.0 - floor) * rows + floor / vocab
        return cls(rows, order)

    def _next_state(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return (states % (self.num_states // self.vocab)) * self.vocab + tokens

    def stationary(self, method: str = "auto", tol: float = 1e-14,
                   max_iters: int = 1_000_000) -> np.ndarray:
        """Stationary distribution over the V^k k-gram states, shape (V^k,).

        ``method="solve"`` solves ``π T = π, Σπ = 1`` on the dense (V^k × V^k) k-gram chain;
        ``"power"`` iterates the (lazy, hence aperiodic) chain until the L1 change < ``tol``;
        ``"auto"`` solves when V^k <= 2048.
        """
        if method == "auto":
            if self._stationary is not None:
                return self._stationary
            method = "solve" if self.num_states <= 2048 else "power"
        n, v = self.num_states, self.vocab
        if method == "solve":
            dense = np.zeros((n, n))
            src = np.repeat(np.arange(n), v)
            dst = self._next_state(src, np.tile(np.arange(v), n))
            np.add.at(dense, (src, dst), self.transition.reshape(-1))
            a = dense.T - np.eye(n)
            a[-1, :] = 1.0
            b = np.zeros(n)
            b[-1] = 1.0
            pi = np.linalg.solve(a, b)
        elif method == "power":
            pi = np.full(n, 1.0 / n)
            for _ in range(max_iters):
                flow = (pi[:, None] * self.transition).reshape(v, n // v, v).sum(0).reshape(-1)
                new = 0.5 * (pi + flow)
                if np.abs(new - pi).sum() < tol:
                    pi = new
                    break
                pi = new
            else:
                raise RuntimeError(f"power iteration did not converge in {max_iters} steps")
        else:
            raise ValueError(f"method must be 'auto', 'solve' or 'power', got {method!r}")
        pi = np.clip(pi, 0.0, None)
        pi = pi / pi.sum()
        if self._stationary is None:
            self._stationary = pi
        return pi

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats/token: Σ_s π(s) H(transition[s])."""
        return float(self.stationary() @ _entropy_nats(self.transition, axis=1))

    def sequence_entropy(self, length: int) -> float:
        """Exact entropy H(X_1..X_L) in nats of a length-L segment started at stationarity.

        Equals H(π) + (L − k)·entropy_rate for L >= k (the first k tokens are the stationary
        k-gram). The best achievable mean NLL per token on :meth:`sample` rows is this / L.
        """
        if length < self.order:
            raise ValueError(f"length {length} must be >= markov order {self.order}")
        return float(_entropy_nats(self.stationary()) + (length - self.order) * self.entropy_rate())

    def sample(self, num_seqs: int, length: int, seed: int) -> np.ndarray:
        """``num_seqs`` independent stationary segments, int32 of shape (num_seqs, length)."""
        if length < self.order:
            raise ValueError(f"length {length} must be >= markov order {self.order}")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31337]))
        out = np.empty((num_seqs, length), dtype=np.int32)
        state = rng.choice(self.num_states, size=num_seqs, p=self.stationary())
        for j in range(self.order):  # unpack the k-gram into its tokens
            out[:, j] = (state // self.vocab ** (self.order - 1 - j)) % self.vocab
        cdf = np.cumsum(self.transition, axis=1)
        cdf[:, -1] = 1.0
        u = rng.random((num_seqs, length - self.order))
        for t in range(self.order, length):
            tok = (cdf[state] < u[:, t - self.order, None]).sum(1)
            tok = np.minimum(tok, self.vocab - 1)
            out[:, t] = tok
            state = self._next_state(state, tok)
        return out

    def log_prob(self, seqs: np.ndarray) -> np.ndarray:
        """Per-token log p(x_t | previous k tokens) for t >= k, shape (N, L − k), nats."""
        seqs = np.asarray(seqs, dtype=np.int64)
        if seqs.ndim == 1:
            seqs = seqs[None]
        state = np.zeros(seqs.shape[0], dtype=np.int64)
        for j in range(self.order):
            state = state * self.vocab + seqs[:, j]
        out = np.empty((seqs.shape[0], seqs.shape[1] - self.order))
        for t in range(self.order, seqs.shape[1]):
            out[:, t - self.order] = np.log(self.transition[state, seqs[:, t]])
            state = self._next_state(state, seqs[:, t])
        return out


# --------------------------------------------------------------------------------------------
# (5) A synthetic ordinal source: quantised audio-like waveforms.
# --------------------------------------------------------------------------------------------


def ordinal_sequences(num_seqs: int, length: int, *, levels: int = 32, seed: int = 0,
                      components: int = 3, noise: float = 0.5) -> np.ndarray:
    """``num_seqs`` independent quantised waveforms, int32 of shape (num_seqs, length), with
    values in {0, …, levels − 1}: an ordinal vocabulary, token k stands for the value k (like
    8-bit audio samples, at a smaller bit depth).

    Row n is s(t) = g · Σ_c a_c sin(2π f_c t + φ_c) / Σ_c a_c over `components` sinusoids with
    amplitudes a_c ~ U[0.2, 1], frequencies f_c log-uniform in [1/64, 1/8] cycles per sample,
    phases φ_c ~ U[0, 2π) and a gain g ~ U[0.4, 0.9] (so |s| < 0.9); the value is
    (levels − 1)/2 · (1 + s(t)) + noise · N(0, 1) (level units), rounded and clipped to the
    levels. The same arguments give the same array on any machine (PCG64 from a SeedSequence).
    """
    if levels < 2:
        raise ValueError(f"ordinal_levels must be >= 2, got {levels}")
    if components < 1:
        raise ValueError(f"ordinal_components must be >= 1, got {components}")
    if noise < 0:
        raise ValueError(f"ordinal_noise must be >= 0, got {noise}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), levels, components, 4242]))
    shape = (num_seqs, components, 1)
    amp = rng.uniform(0.2, 1.0, shape)
    freq = np.exp(rng.uniform(np.log(1 / 64), np.log(1 / 8), shape))
    phase = rng.uniform(0.0, 2 * np.pi, shape)
    gain = rng.uniform(0.4, 0.9, (num_seqs, 1))
    t = np.arange(length, dtype=np.float64)[None, None, :]
    s = gain * (amp * np.sin(2 * np.pi * freq * t + phase)).sum(1) / amp.sum(1)
    half = (levels - 1) / 2.0
    values = half * (1.0 + s) + noise * rng.standard_normal((num_seqs, length))
    return np.clip(np.rint(values), 0, levels - 1).astype(np.int32)
