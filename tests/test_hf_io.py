"""Hugging Face GPT-2 layout: export and import round trips, and transformers reading ours.

No GPT-2 weights are downloaded: the models are random tiny ones (biases and LayerNorms
randomized too, so a tensor left out or not transposed changes the logits).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_finetune import pretrained_workdir, synthetic_records, tiny_finetune, write_json

from model.checkpoint import PRETRAIN_FORMAT, CheckpointManager, load_checkpoint
from model.finetune import run_finetune
from model.gpt import GPT, GPTConfig
from model.gpt_config import ARCHITECTURES
from model.hf_io import (
    HFFormatError,
    export_hf,
    hf_config,
    import_gpt2,
    load_forge_export,
    load_hf_gpt2,
)
from model.inference import load_model

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max abs logit difference, fp32 on the CPU


def random_gpt(vocab: int = 1000, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=vocab))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases 0 and LayerNorm gains 1 would hide mistakes
                p.normal_(0.0, 0.2 if "bias" in name else 1.0)
    return model.eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(1))


def test_export_then_import_gives_identical_logits(tmp_path: Path, batch: torch.Tensor) -> None:
    model = random_gpt()
    out = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(out / "model.safetensors")
    assert "h.0.attn.c_attn.weight" in tensors and "lm_head.weight" not in tensors
    assert tensors["h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == 128 and config["model_type"] == "gpt2"
    back = load_hf_gpt2(out)
    assert torch.equal(logits(back, batch), logits(model, batch))
    path = import_gpt2(out, tmp_path / "work")
    assert path == tmp_path / "work" / "pretrain" / "checkpoints" / "ckpt-000000.pt"
    imported, state = load_model(tmp_path / "work")
    assert state["model_config"]["n_embd"] == 64
    assert torch.equal(logits(imported, batch), logits(model, batch))
    with pytest.raises(HFFormatError, match="already holds checkpoints"):
        import_gpt2(out, tmp_path / "work")  # it would not be the folder's newest
    single = import_gpt2(out, tmp_path / "gpt2.pt")
    assert torch.equal(logits(load_model(single)[0], batch), logits(model, batch))
    assert load_checkpoint(single)["step"] == 0  # verified against its sidecar


def test_transformers_reads_our_export(tmp_path: Path, batch: torch.Tensor) -> None:
    import transformers
    model = random_gpt()
    export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    diff = (logits(hf, batch) - logits(model, batch)).abs().max().item()
    assert diff < TOLERANCE, diff


def test_import_reads_transformers_and_published_layouts(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    import transformers
    torch.manual_seed(3)
    config = transformers.GPT2Config(
        **{
            k: v
            for k, v in hf_config(random_gpt().config).items()
            if k not in ("architectures", "model_type")
        }
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.2)
    expected = logits(hf, batch)
    hf.save_pretrained(tmp_path / "saved")  # transformer.* names
    assert (load_hf_gpt2(tmp_path / "saved")(batch)[0] - expected).abs().max() < TOLERANCE
    # as published on the Hub: no prefix, no lm_head, attention-mask buffers
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    tensors = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    save_file(tensors, str(published / "model.safetensors"), metadata={"format": "pt"})
    assert (load_hf_gpt2(published)(batch)[0] - expected).abs().max() < TOLERANCE


def test_unsupported_or_incomplete_folders_are_refused(tmp_path: Path) -> None:
    export_hf(random_gpt(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(HFFormatError, match="activation_function='relu'"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(HFFormatError, match="missing.*h.2"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="model.safetensors is missing"):
        load_hf_gpt2(tmp_path)


def test_modern_model_is_not_exported_to_the_gpt2_layout(tmp_path: Path) -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                       **ARCHITECTURES["modern"])
    with pytest.raises(HFFormatError, match="ckpt-000003.pt is a model of pretrain.recipe "
                       "modern.*export it with --format safetensors"):
        export_hf(GPT(config), tmp_path / "hf", source="ckpt-000003.pt")
    assert not (tmp_path / "hf").exists()


def test_modern_checkpoint_exports_as_forge_safetensors(tmp_path: Path,
                                                      batch: torch.Tensor) -> None:
    """`forge export CKPT OUT`: the GPT-2 layout refuses a modern model in one sentence and
    writes nothing; --format safetensors writes a folder that reads back to the same logits."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=1000,
                       **ARCHITECTURES["modern"])
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialized projections and head would hide a miss
            p.normal_(0.0, 0.2)
    checkpoint = CheckpointManager(tmp_path / "checkpoints").save(0, {
        "format": PRETRAIN_FORMAT, "version": 1, "step": 0,
        "model": model.state_dict(), "model_config": dataclasses.asdict(config)})

    def export(fmt: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", "export", str(checkpoint),
                               str(tmp_path / fmt), "--format", fmt],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    refused = export("hf")
    assert refused.returncode != 0 and "--format safetensors" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "hf").exists()
    assert export("safetensors").returncode == 0
    assert sorted(p.name for p in (tmp_path / "safetensors").iterdir()) == [
        "forge_config.json", "model.safetensors"]
    again = load_forge_export(tmp_path / "safetensors")
    assert again.config == config
    assert torch.equal(logits(again, batch), logits(model.eval(), batch))
    with pytest.raises(HFFormatError, match="forge_config.json is missing"):
        load_forge_export(tmp_path)


@pytest.mark.slow
def test_cli_exports_a_lora_fine_tune_merged(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """`forge export WORKDIR OUT --format hf` then `forge import-gpt2 OUT X.pt`: same model."""
    base = pretrained_workdir(tmp_path_factory)
    data = write_json(tmp_path / "data.json", synthetic_records(40))
    cfg = tiny_finetune(
        base,
        data,
        method="lora",
        lr=1e-2,
        max_steps=2,
        eval_every=0,
        checkpoint_every=0,
        test_generate=False,
        lora={"r": 2, "alpha": 4},
    )
    run_finetune(cfg, tmp_path / "work")
    out, again = tmp_path / "hf", tmp_path / "again.pt"
    for args in (
        ["export", str(tmp_path / "work"), str(out), "--format", "hf"],
        ["import-gpt2", str(out), str(again)],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    assert f"-> {again}" in result.stdout
    assert not [k for k in load_file(out / "model.safetensors") if "lora" in k]  # merged
    x = torch.randint(0, 50257, (2, 24))
    fine_tuned, _ = load_model(tmp_path / "work")
    assert (logits(load_model(again)[0], x) - logits(fine_tuned, x)).abs().max() < TOLERANCE
    base_model, _ = load_model(CheckpointManager(base / "pretrain" / "checkpoints").latest())
    assert (logits(base_model, x) - logits(fine_tuned, x)).abs().max() > TOLERANCE
