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
_R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


@functools.cache
def get_encoding(vocab_dir: str | None = None) -> tiktoken.Encoding:
    """GPT-2's encoding; `vocab_dir` (or $FORGE_VOCAB_DIR) holds its files, for offline use."""
    vocab_dir = vocab_dir or os.environ.get("FORGE_VOCAB_DIR")
    if not vocab_dir:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    folder = Path(vocab_dir)
    if (folder / "gpt2.tiktoken").is_file():  # the same ranks, 4x faster to load
        ranks = load_tiktoken_bpe(str(folder / "gpt2.tiktoken"), expected_hash=_R50K_SHA256)
    elif (folder / "vocab.bpe").is_file() and (folder / "encoder.json").is_file():
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    else:
        raise FileNotFoundError(
            f"no GPT-2 vocabulary in {folder}; set tokenize.vocab_dir to a folder holding "
            "gpt2.tiktoken (or encoder.json and vocab.bpe), or unset it to download them"
        )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
    )
