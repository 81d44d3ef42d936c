"""Data layer: sources (embedded CPython corpus, text files, TFDS, Markov, ordinal), tokenizers,
grain pipelines.

Quick use::

    from dlm_jax.config import DataConfig
    from dlm_jax.data import make_dataset, make_tokenizer
    tok = make_tokenizer("byte")
    data = DataConfig(source="stdlib", seq_len=256, max_bytes=2_000_000)
    ds = make_dataset(data, split="train", global_batch=32, tokenizer=tok)
    it = iter(ds); batch = next(it)          # {"tokens": int32 (32, 256)}
    state = it.get_state()                   # checkpointable (grain)

Importing this package imports grain (~1 s); tensorflow_datasets, tiktoken, tokenizers and jax
are imported only by the functions that use them.
"""

from dlm_jax.data.pipeline import (  # noqa: F401
    MODES,
    SOURCES,
    TOKEN_SOURCES,
    dataset_vocab_size,
    make_dataset,
    markov_chain,
    pack_documents,
    to_global,
    wrap_documents,
)
from dlm_jax.data.sources import (  # noqa: F401
    TFDS_PRESETS,
    MarkovChain,
    ordinal_sequences,
    stdlib_documents,
    text_documents,
    tfds_source,
)
from dlm_jax.data.tokenizers import (  # noqa: F401
    ByteTokenizer,
    HFTokenizer,
    TiktokenBPE,
    Tokenizer,
    make_tokenizer,
)
