"""Evaluation and generation: HellaSwag scoring, perplexity windows, and the CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import DATA, VOCAB, forge, write_config

from model.evaluate import detokenize_wikitext, hellaswag, hellaswag_items, perplexity
from model.gpt import GPT, GPTConfig
from pipeline.encoding import get_encoding

HELLASWAG = DATA / "eval" / "hellaswag_val_full.txt.bz2"


def random_model(block_size: int = 64, vocab_size: int = 50257) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=block_size,
                         vocab_size=vocab_size)).eval()


def test_hellaswag_items_parse_the_six_line_layout() -> None:
    items = list(hellaswag_items(HELLASWAG, limit=3))
    assert len(items) == 3 and items[0].label == 3 and len(items[0].endings) == 4
    assert items[0].context.startswith("A man is sitting on a roof")  # activity label dropped


def test_a_random_model_scores_near_chance_on_hellaswag() -> None:
    torch.set_num_threads(1)
    result = hellaswag(random_model(), get_encoding(str(VOCAB)), HELLASWAG, limit=200)
    assert result["items"] == 200
    assert 0.15 < result["acc_norm"] < 0.35 and 0.15 < result["acc"] < 0.35


def test_perplexity_scores_every_token_once_and_matches_a_direct_loss() -> None:
    model = random_model(block_size=32, vocab_size=97)
    tokens = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    overlapping = perplexity(model, tokens, stride=8)
    disjoint = perplexity(model, tokens, stride=32)
    assert overlapping["tokens"] == disjoint["tokens"] == 149
    with torch.no_grad():  # disjoint windows by hand
        nll = 0.0
        for start in range(0, 149, 32):
            end = min(start + 32, 149)
            logits, _ = model(torch.tensor([tokens[start:end]]))
            nll += F.cross_entropy(logits[0], torch.tensor(tokens[start + 1:end + 1]),
                                   reduction="sum").item()
    assert math.isclose(disjoint["loss"], nll / 149, rel_tol=1e-5)
    assert abs(overlapping["loss"] - disjoint["loss"]) < 0.2  # more context, similar loss


def test_wikitext_detokenizer_joins_its_split_tokens() -> None:
    assert detokenize_wikitext("a @-@ b , c @.@ 5 ( d ) is n't it 's") == "a-b, c.5 (d) isn't it's"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real work folder: prepared from two books, then a tiny model pretrained a few steps."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "c.yaml", root / "work", [
        {"uri": str(DATA / "books" / "the-verdict.txt")},
        {"uri": str(DATA / "books" / "pg1952.txt.gz")},
        {"uri": str(DATA / "books" / "pg11.txt.gz")},
        {"uri": str(DATA / "books" / "pg43.txt.gz")},
    ], shard_tokens=20_000, val_fraction=0.3)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["filter"] = {"enabled": False}
    raw["data"]["dedupe"] = {"enabled": False}
    raw["pretrain"] = {"preset": "tiny", "block_size": 64, "micro_batch_size": 4,
                       "total_batch_tokens": 256, "max_steps": 4, "warmup_steps": 1,
                       "eval_every": 0, "checkpoint_every": 0, "eval_batches": 2,
                       "num_threads": 1, "verify_data": True}
    config.write_text(yaml.safe_dump(raw))
    forge("prepare", "--config", str(config), "--quiet")
    forge("pretrain", "--config", str(config), "--quiet")
    return root / "work"


def test_eval_command_reports_each_task(trained: Path) -> None:
    val = json.loads(forge("eval", str(trained), "--task", "val", "--batches", "2").stdout)
    assert 0 < val["loss"] < 12 and val["batches"] >= 1
    assert "pretrain/checkpoints" in val["checkpoint"]
    wiki = json.loads(forge("eval", str(trained), "--task", "wikitext2", "--limit", "300",
                            "--eval-dir", str(DATA / "eval")).stdout)
    assert wiki["tokens"] == 299 and wiki["perplexity"] > 1
    swag = json.loads(forge("eval", str(trained), "--task", "hellaswag", "--limit", "8",
                            "--eval-dir", str(DATA / "eval")).stdout)
    assert swag["items"] == 8 and 0 <= swag["acc_norm"] <= 1


def test_generate_streams_a_deterministic_continuation(trained: Path) -> None:
    args = ("generate", str(trained), "--prompt", "The picture", "--max-tokens", "12",
            "--temperature", "0")
    first, second = forge(*args).stdout, forge(*args).stdout
    assert first.startswith("The picture") and len(first) > len("The picture\n")
    assert first == second
    sampled = forge("generate", str(trained), "--prompt", "The", "--max-tokens", "12",
                    "--seed", "3").stdout
    assert sampled == forge("generate", str(trained), "--prompt", "The", "--max-tokens", "12",
                            "--seed", "3").stdout


def test_missing_eval_files_are_a_clear_error(trained: Path, tmp_path: Path) -> None:
    result = forge("eval", str(trained), "--task", "hellaswag", "--eval-dir", str(tmp_path),
                   check=False)
    assert result.returncode == 2 and "--eval-dir" in result.stderr
    assert "Traceback" not in result.stderr
