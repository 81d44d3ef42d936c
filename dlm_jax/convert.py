"""Import released PyTorch checkpoints into a dlm_jax workdir, and export one back.

    python -m dlm_jax.convert --from mdlm --checkpoint PATH --out runs/mdlm-owt \\
        --tokenizer gpt2 --tokenizer_path tokenizers/gpt2
    python -m dlm_jax.convert --export runs/mdlm-owt/model.safetensors --workdir runs/mdlm-owt

Import (`--from bd3lm | mdlm | sedd | gpt2`): reads the checkpoint (`models.convert.open_checkpoint`:
.safetensors, .bin / .pt, a Lightning .ckpt, or a Hugging Face directory), maps every tensor to
our parameters (an unknown, missing or mis-shaped key is one error listing them), and writes
WORKDIR/config.json plus WORKDIR/checkpoints/0 holding the parameters alone. `dlm_jax.evaluate`
and `dlm_jax.sample` then use WORKDIR like a trained run, and `dlm_jax.train` fine-tunes from it
with `--config.train.init_from=WORKDIR`. Sizes come from the tensors (and the checkpoint's own
config where it has one), never from our defaults; `--from` fixes the family (SEDD and BD3-LM
checkpoints have the same keys), and a checkpoint whose config declares another family is an
error. Settings the weights cannot tell (a BD3-LM's block size, the tokenizer) come from flags
or `--set section.key=value`.

Export (`--export FILE.safetensors --workdir DIR`): the run's (EMA) parameters under the
reference names (bd3lms / SEDD DiT keys, or GPT-2's), so the reference code can load them.
The work is done by `dlm_jax.interop`.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from dlm_jax.interop import FAMILIES, export_run, import_checkpoint
_FROM = flags.DEFINE_enum("from", None, FAMILIES, "Which reference model the checkpoint holds.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint file or directory.")
_OUT = flags.DEFINE_string("out", None, "The workdir to write (import).")
_HEADS = flags.DEFINE_integer("heads", None, "Attention heads, when neither the tensors nor the "
                              "checkpoint's config say (GPT-2 without config.json).")
_BLOCK = flags.DEFINE_integer("block_size", None, "BD3-LM block size (default: the checkpoint's "
                              "config).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "data.seq_len of the workdir (default: the "
                                "checkpoint's config, GPT-2's n_positions, else 1024).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "data.tokenizer: byte | gpt2 | hf (default: "
                                 "from the vocabulary size: 50257 GPT-2, 258 bytes).")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", None, "data.tokenizer_path.")
_SET = flags.DEFINE_multi_string("set", [], "Any other config field, section.key=value.")
_UNSAFE = flags.DEFINE_bool("unsafe_pickle", False, "Unpickle .ckpt / .bin files fully (needed "
                            "for Lightning configs; runs code from the file: trust it).")
_EXPORT = flags.DEFINE_string("export", None, "Export: the .safetensors file to write.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Export: the run to export.")


def main(argv) -> int:
    del argv
    from dlm_jax.config import ConfigError
    logging.set_verbosity(logging.WARNING)
    try:
        if _EXPORT.value:
            if not _WORKDIR.value:
                raise ValueError("--export needs --workdir (the run to export)")
            summary = export_run(_WORKDIR.value, _EXPORT.value)
        else:
            missing = [f"--{n}" for n, f in (("from", _FROM), ("checkpoint", _CHECKPOINT),
                                             ("out", _OUT)) if not f.value]
            if missing:
                raise ValueError(f"import needs {', '.join(missing)} (or --export FILE "
                                 f"--workdir DIR to export)")
            summary = import_checkpoint(
                _FROM.value, _CHECKPOINT.value, _OUT.value, heads=_HEADS.value,
                block_size=_BLOCK.value, seq_len=_SEQ_LEN.value, tokenizer=_TOKENIZER.value,
                tokenizer_path=_TOKENIZER_PATH.value, sets=_SET.value,
                unsafe_pickle=_UNSAFE.value)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
