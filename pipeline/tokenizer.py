"""The GPT-2 tokenizer, online (tiktoken's own download cache) or from a local vocabulary folder."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import tiktoken

EOT_ID = 50256
VOCAB_SIZE = 50257

# sha256 of the published files: a wrong or truncated vocabulary fails loudly
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.cache
def get_encoding(vocab_dir: str | None = None) -> tiktoken.Encoding:
    """GPT-2's encoding; `vocab_dir` (or $FORGE_VOCAB_DIR) holds encoder.json and vocab.bpe."""
    vocab_dir = vocab_dir or os.environ.get("FORGE_VOCAB_DIR")
    if not vocab_dir:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    folder = Path(vocab_dir)
    for name in ("vocab.bpe", "encoder.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"tokenizer vocabulary {folder / name} is missing; set tokenize.vocab_dir to a "
                "folder holding encoder.json and vocab.bpe, or unset it to download them"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"),
        encoder_json_file=str(folder / "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
    )
